//! vpc-ebpf-cni as a library: the binary is a thin edge over these modules.

pub mod agent;
pub mod commands;
pub mod fuzz;
pub mod logging;
pub mod names;
pub mod netlink;
pub mod shaping;
pub mod spec;
