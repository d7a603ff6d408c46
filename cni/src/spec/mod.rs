//! The CNI specification as data: versions, the runtime's environment, the network
//! configuration, results and errors. Pure: no I/O, so every rule is unit-tested and fuzzed.

pub mod args;
pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use error::{CniError, ErrorCode};
