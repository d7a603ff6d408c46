//! Types shared by the eBPF programs and user space.
//!
//! Everything here crosses the kernel/user boundary through BPF maps, so every type is
//! `#[repr(C)]`, has explicit padding fields and uses only integers and byte arrays: no
//! `bool`, `enum` or `Option`, whose bit patterns the kernel side could violate.
#![cfg_attr(not(test), no_std)]

pub mod counters;
pub mod csum;
pub mod nat;
pub mod node;
pub mod policy;

/// Version of the pinned-object layout. Pinned maps live under
/// `/sys/fs/bpf/vpc-ebpf/<PIN_VERSION>/`; a change of any map's key or value layout bumps
/// it, so an agent never re-opens a pinned map written with another layout.
pub const PIN_VERSION: &str = "v1";

/// Names of the programs in the eBPF object, as user space looks them up.
pub mod programs {
    pub const COUNT_INGRESS: &str = "count_ingress";
    pub const COUNT_EGRESS: &str = "count_egress";
    /// TC ingress of a pod's host veth: traffic from the pod.
    pub const FROM_POD: &str = "from_pod";
    /// TC ingress of an ENI: traffic from the VPC.
    pub const FROM_ENI: &str = "from_eni";
    /// TC egress of a pod's host veth: what the host stack delivers to the pod.
    pub const TO_POD: &str = "to_pod";
    /// TC egress of an ENI: what the host stack sends out for a pod.
    pub const TO_ENI: &str = "to_eni";
}

/// Names of the maps in the eBPF object (also their pin file names).
pub mod maps {
    pub const COUNTERS: &str = "VPC_COUNTERS";
    pub const FORWARD_COUNTERS: &str = "VPC_FWD_COUNTERS";
    pub const CONFIG: &str = "VPC_CONFIG";
    pub const ENDPOINTS: &str = "VPC_ENDPOINTS";
    pub const ENIS: &str = "VPC_ENIS";
    /// ENI primary address → the ENI's ifindex.
    pub const NODE_ADDRESSES: &str = "VPC_NODE_ADDRS";
    pub const VPC_CIDRS: &str = "VPC_CIDRS";
    pub const SNAT_EXCLUSIONS: &str = "VPC_SNAT_EXCL";
    pub const PASSTHROUGH_CIDRS: &str = "VPC_PASSTHRU";
    pub const NAT: &str = "VPC_NAT";
    pub const HOSTPORTS: &str = "VPC_HOSTPORTS";
    pub const KERNEL_FLOWS: &str = "VPC_KFLOWS";
    /// Ports of translated datagrams, for their later fragments.
    pub const NAT_FRAGMENTS: &str = "VPC_NAT_FRAGS";
    pub const POLICED: &str = "VPC_POLICED";
    pub const POLICY_RULES: &str = "VPC_POL_RULES";
    pub const POLICY_FLOWS: &str = "VPC_POL_FLOWS";
    pub const POLICY_FRAGMENTS: &str = "VPC_POL_FRAGS";
    pub const POLICY_REVISION: &str = "VPC_POL_REV";
    pub const POLICY_EVENTS: &str = "VPC_POL_EVENTS";
    /// Events the ring buffer had no room for, per CPU.
    pub const POLICY_EVENTS_LOST: &str = "VPC_POL_EVLOST";
}
