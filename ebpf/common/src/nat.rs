//! Connection tracking for the flows the programs translate (SNAT to the node address and
//! hostPort DNAT): one LRU hash holding two entries per flow, one per direction, each
//! saying how to rewrite a packet whose 5-tuple is the key.
//!
//! Addresses are network order (as in [`crate::node`]); ports are host order. ICMP echo
//! uses the identifier as a port: a request is `(id, 0)` and its reply `(0, id)`, so
//! reversing a tuple (swap addresses and ports) turns one into the other, as for TCP/UDP.

/// A 5-tuple as seen in a packet at the hook that looks it up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// IPPROTO_TCP, IPPROTO_UDP or IPPROTO_ICMP.
    pub proto: u8,
    /// Explicit padding; always zero so equal tuples hash equally.
    pub pad: [u8; 3],
}

impl NatKey {
    pub const fn new(src_ip: u32, dst_ip: u32, src_port: u16, dst_port: u16, proto: u8) -> Self {
        Self {
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            proto,
            pad: [0; 3],
        }
    }

    /// The tuple of packets going the other way.
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.dst_ip,
            self.src_ip,
            self.dst_port,
            self.src_port,
            self.proto,
        )
    }
}

/// How to rewrite a packet whose tuple is the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet of this direction.
    pub last_seen_ns: u64,
    /// The address that replaces the source ([`nat_kind::REWRITE_SRC`]) or destination
    /// ([`nat_kind::REWRITE_DST`]).
    pub addr: u32,
    /// The port that replaces the matching port (the ICMP echo id for ICMP).
    pub port: u16,
    /// [`nat_kind`].
    pub kind: u8,
    /// [`nat_origin`].
    pub origin: u8,
    /// [`tcp_state`] bits seen in this direction.
    pub state: u8,
    /// Explicit padding; zero.
    pub pad: [u8; 7],
}

impl NatEntry {
    /// The key of the other direction's entry: the tuple of the other direction as it
    /// looks where that entry is looked up, i.e. after this entry's translation, reversed.
    #[must_use]
    pub const fn peer_key(&self, key: &NatKey) -> NatKey {
        let mut k = *key;
        if self.kind == nat_kind::REWRITE_SRC {
            k.src_ip = self.addr;
            k.src_port = self.port;
        } else {
            k.dst_ip = self.addr;
            k.dst_port = self.port;
        }
        k.reversed()
    }
}

pub mod nat_kind {
    pub const REWRITE_SRC: u8 = 1;
    pub const REWRITE_DST: u8 = 2;
}

pub mod nat_origin {
    /// A pod's flow to outside the VPC, translated to the node address.
    pub const SNAT: u8 = 1;
    /// A hostPort flow, translated from the node address to the pod.
    pub const HOSTPORT: u8 = 2;
}

pub mod tcp_state {
    pub const FIN: u8 = 1;
    pub const RST: u8 = 2;
}

/// Key of the hostports map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostPortKey {
    /// Host order.
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// Explicit padding; zero.
    pub pad: u8,
}

impl HostPortKey {
    pub const fn new(proto: u8, port: u16) -> Self {
        Self {
            port,
            proto,
            pad: 0,
        }
    }
}

/// Value of the hostports map: where node-IP:port goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostPortTarget {
    pub pod_ip: u32,
    /// Host order.
    pub container_port: u16,
    /// Explicit padding; zero.
    pub pad: u16,
}

/// Value of the kernel-flows map, whose key is a [`NatKey`] oriented from the pod (source
/// = the pod), of a flow the host stack handles: kube-proxy's DNAT, connections from the
/// host itself. Its packets must cross the host stack both ways, or its conntrack never
/// un-DNATs the replies.
///
/// Two kinds of key: an exact 5-tuple (recorded on the host veth's egress, where the host
/// stack hands the pod a packet: the pod's replies then go back to the kernel), and a
/// "wildcard" with peer address and port zero (recorded when the pod sends to a Service
/// or the node: the peer after DNAT is unknown at that point, so any packet from an ENI
/// to that pod port goes to the kernel, which knows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelFlow {
    /// `bpf_ktime_get_ns` of the last packet seen.
    pub last_seen_ns: u64,
    /// [`tcp_state`] bits seen.
    pub state: u8,
    /// Explicit padding; zero.
    pub pad: [u8; 7],
}

impl NatKey {
    /// The wildcard kernel-flow key of `pod`'s port `pod_port`.
    pub const fn pod_port(pod: u32, pod_port: u16, proto: u8) -> Self {
        Self::new(pod, 0, pod_port, 0, proto)
    }
}

const _: () = assert!(core::mem::size_of::<NatKey>() == 16);
const _: () = assert!(core::mem::size_of::<KernelFlow>() == 16);
const _: () = assert!(core::mem::size_of::<NatEntry>() == 24);
const _: () = assert!(core::mem::size_of::<HostPortKey>() == 4);
const _: () = assert!(core::mem::size_of::<HostPortTarget>() == 8);

/// Compiled-in size of the NAT map; user space overrides it at load (from memory or
/// configuration), so this only bounds a load that forgets to.
pub const NAT_DEFAULT_MAX_ENTRIES: u32 = 65_536;
pub const HOSTPORTS_MAX_ENTRIES: u32 = 4_096;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, every byte covered by a field.
    unsafe impl aya::Pod for super::NatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HostPortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HostPortTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelFlow {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_of_an_snat_entry_is_the_reply_tuple() {
        let pod = u32::from_ne_bytes([10, 0, 0, 5]);
        let ext = u32::from_ne_bytes([8, 8, 8, 8]);
        let node = u32::from_ne_bytes([10, 0, 0, 10]);
        let fwd = NatKey::new(pod, ext, 40000, 53, 17);
        let e = NatEntry {
            addr: node,
            port: 61000,
            kind: nat_kind::REWRITE_SRC,
            ..NatEntry::default()
        };
        let rev = e.peer_key(&fwd);
        assert_eq!(rev, NatKey::new(ext, node, 53, 61000, 17));
        let back = NatEntry {
            addr: pod,
            port: 40000,
            kind: nat_kind::REWRITE_DST,
            ..NatEntry::default()
        };
        assert_eq!(back.peer_key(&rev), fwd);
    }
}
