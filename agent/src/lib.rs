//! vpc-ebpf node agent as a library: the binary wires these modules together, tests
//! drive them directly.

pub mod aws;
pub mod bootstrap;
pub mod config;
pub mod datapath;
pub mod dataplane;
pub mod host;
pub mod http;
pub mod ipam;
pub mod metrics;
pub mod pending;
pub mod reconcile;
pub mod rpc;
