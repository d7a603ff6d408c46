//! What the programs know about the node: its configuration, its ENIs and its pods.
//!
//! IPv4 addresses are `u32` holding the four address bytes in packet (network) order, so
//! the programs compare them with what they read from a header without byte swapping;
//! user space converts with `u32::from_ne_bytes(addr.octets())`.

/// The node configuration: the single entry (index 0) of the config array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// The node's primary IPv4 (on the primary ENI): the SNAT source address.
    pub node_ip: u32,
    /// ifindex of the primary ENI, where SNATed traffic leaves.
    pub primary_eni_ifindex: u32,
    /// First port SNAT may allocate (host order).
    pub snat_port_min: u16,
    /// Last port SNAT may allocate, inclusive (host order).
    pub snat_port_max: u16,
    /// [`config_flags`].
    pub flags: u32,
    /// First port of a band inside `[snat_port_min, snat_port_max]` SNAT must not
    /// allocate (host order): the node's own ephemeral ports, whose flows the programs do
    /// not see. Both zero: no band.
    pub snat_skip_min: u16,
    /// Last port of that band, inclusive (host order).
    pub snat_skip_max: u16,
}

pub mod config_flags {
    /// Set once user space has written the entry; until then every packet goes to the
    /// kernel (the all-zero entry the kernel creates must not steer anything).
    pub const CONFIGURED: u32 = 1;
    /// `AWS_VPC_K8S_CNI_EXTERNALSNAT`: never SNAT; traffic leaves through the ENI that
    /// owns the pod address and a NAT gateway translates it.
    pub const EXTERNAL_SNAT: u32 = 2;
    /// `ENABLE_NETWORK_POLICY`: judge new flows against the policy maps and track
    /// connections; without it the policy point costs one test of this bit.
    pub const NETWORK_POLICY: u32 = 4;
}

/// Value of the endpoints map, keyed by the pod IPv4 (`u32`, network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// ifindex of the host side of the pod's veth.
    pub host_ifindex: u32,
    /// ifindex of the ENI that owns the pod address: the only ENI its traffic may leave by.
    pub eni_ifindex: u32,
    /// Reserved for the NetworkPolicy issue; zero today.
    pub policy_id: u32,
    /// [`endpoint_flags`].
    pub flags: u32,
    /// MAC of the pod's `eth0`.
    pub pod_mac: [u8; 6],
    /// MAC of the host side of the veth (the pod's gateway MAC).
    pub host_mac: [u8; 6],
}

/// Bits of [`Endpoint::flags`].
pub mod endpoint_flags {
    /// Deliver to this pod through the egress of its host veth, so that a qdisc there
    /// applies: the `bandwidth` plugin's limit on what the pod receives is a tbf on that
    /// qdisc, which `bpf_redirect_peer` would skip.
    pub const VIA_HOST_QDISC: u32 = 1;
}

/// The skb mark a program sets on a packet it sends through a pod's host veth egress
/// ([`endpoint_flags::VIA_HOST_QDISC`]), so that the veth's egress program lets it pass
/// to the qdisc as it is (it was judged and translated already) and clears the mark. An
/// exact value, not a bit: kube-proxy and others set bits of the mark on the host stack's
/// packets.
pub const VIA_HOST_QDISC_MARK: u32 = 0x7665_6271;

/// Value of the ENIs map, keyed by the ENI's ifindex (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Eni {
    /// The ENI's primary IPv4.
    pub primary_ip: u32,
    /// The subnet gateway (first host of the subnet): next hop of everything leaving.
    pub gateway_ip: u32,
    /// [`eni_flags`].
    pub flags: u32,
    pub mac: [u8; 6],
    /// Explicit padding; zero.
    pub pad: [u8; 2],
}

pub mod eni_flags {
    /// The node's primary ENI (device index 0).
    pub const PRIMARY: u32 = 1;
}

/// Key of the LPM trie maps (VPC CIDRs, SNAT exclusions, pass-through CIDRs); the same
/// layout as the kernel's `struct bpf_lpm_trie_key` followed by an IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ipv4Prefix {
    pub prefix_len: u32,
    pub addr: u32,
}

/// The pod gateway every pod routes through (`169.254.1.1`), whose ARP the programs answer.
pub const POD_GATEWAY: [u8; 4] = [169, 254, 1, 1];

const _: () = assert!(core::mem::size_of::<NodeConfig>() == 20);
const _: () = assert!(core::mem::size_of::<Endpoint>() == 28);
const _: () = assert!(core::mem::size_of::<Eni>() == 20);
const _: () = assert!(core::mem::size_of::<Ipv4Prefix>() == 8);

pub const ENDPOINTS_MAX_ENTRIES: u32 = 16_384;
pub const ENIS_MAX_ENTRIES: u32 = 64;
pub const CIDRS_MAX_ENTRIES: u32 = 1_024;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, every byte covered by a field.
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Eni {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Ipv4Prefix {}
}
