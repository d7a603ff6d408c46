//! vpc-ebpf-cni as a library: the binary is a thin edge over these modules.

pub mod names;
pub mod spec;
