//! Types shared by the eBPF programs and user space.
//!
//! Everything here crosses the kernel/user boundary through BPF maps, so every type is
//! `#[repr(C)]`, has explicit padding fields and uses only integers and byte arrays: no
//! `bool`, `enum` or `Option`, whose bit patterns the kernel side could violate.
#![cfg_attr(not(test), no_std)]

pub mod counters;

/// Version of the pinned-object layout. Pinned maps live under
/// `/sys/fs/bpf/vpc-ebpf/<PIN_VERSION>/`; a change of any map's key or value layout bumps
/// it, so an agent never re-opens a pinned map written with another layout.
pub const PIN_VERSION: &str = "v1";

/// Names of the programs in the eBPF object, as user space looks them up.
pub mod programs {
    pub const COUNT_INGRESS: &str = "count_ingress";
    pub const COUNT_EGRESS: &str = "count_egress";
}

/// Names of the maps in the eBPF object (also their pin file names).
pub mod maps {
    pub const COUNTERS: &str = "VPC_COUNTERS";
}
