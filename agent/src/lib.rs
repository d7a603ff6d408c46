//! vpc-ebpf node agent as a library: the binary wires these modules together, tests
//! drive them directly.

pub mod aws;
pub mod config;
pub mod dataplane;
pub mod ipam;
pub mod pending;
pub mod rpc;
