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
    /// The node address published on (a `hostIP`), network order; zero: every address
    /// of the node, as `portmap` publishes a mapping without one.
    pub addr: u32,
}

impl HostPortKey {
    /// On every node address.
    pub const fn new(proto: u8, port: u16) -> Self {
        Self::at(proto, port, 0)
    }

    /// On the node address `addr` (network order) only.
    pub const fn at(proto: u8, port: u16, addr: u32) -> Self {
        Self {
            port,
            proto,
            pad: 0,
            addr,
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

/// Value of the translated-fragments map, keyed by the [`crate::policy::FragKey`] of a
/// datagram as it arrived (untranslated): the ports its first fragment carried. Later
/// fragments carry no L4 header, so this is how they find their flow's entry and get
/// the same address translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    /// Host order, as in [`NatKey`].
    pub src: u16,
    pub dst: u16,
}

/// Translated datagrams in reassembly at once. An evicted entry costs only that
/// datagram's later fragments (and so the datagram): they are not translated.
pub const NAT_FRAGS_MAX_ENTRIES: u32 = 8192;

const _: () = assert!(core::mem::size_of::<NatKey>() == 16);
const _: () = assert!(core::mem::size_of::<FragPorts>() == 4);
const _: () = assert!(core::mem::size_of::<KernelFlow>() == 16);
const _: () = assert!(core::mem::size_of::<NatEntry>() == 24);
const _: () = assert!(core::mem::size_of::<HostPortKey>() == 8);
const _: () = assert!(core::mem::size_of::<HostPortTarget>() == 8);

/// The ports SNAT may allocate: `[min, max]` less one band (the node's own ephemeral
/// ports, which the programs cannot see in use). Pure arithmetic shared by the programs
/// and user space, so the mapping is tested on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatPorts {
    min: u32,
    max: u32,
    skip_min: u32,
    /// Ports of the band inside `[min, max]`; zero when there is no band.
    skip_len: u32,
}

impl SnatPorts {
    /// `skip_min..=skip_max` is clipped to the range; `skip_max < skip_min` (or both
    /// zero) means no band.
    pub const fn new(min: u16, max: u16, skip_min: u16, skip_max: u16) -> Self {
        let (min, max) = (min as u32, max as u32);
        let lo = if (skip_min as u32) > min {
            skip_min as u32
        } else {
            min
        };
        let hi = if (skip_max as u32) < max {
            skip_max as u32
        } else {
            max
        };
        let none = skip_max == 0 || skip_max < skip_min || hi < lo;
        Self {
            min,
            max,
            skip_min: if none { 0 } else { lo },
            skip_len: if none { 0 } else { hi - lo + 1 },
        }
    }

    /// How many ports can be allocated.
    pub const fn usable(&self) -> u32 {
        if self.min == 0 || self.max < self.min {
            return 0;
        }
        self.max - self.min + 1 - self.skip_len
    }

    /// Whether `port` may be allocated.
    pub const fn contains(&self, port: u16) -> bool {
        let p = port as u32;
        self.usable() != 0
            && p >= self.min
            && p <= self.max
            && !(self.skip_len != 0 && p >= self.skip_min && p < self.skip_min + self.skip_len)
    }

    /// The allocatable port `n` lands on (`n` taken modulo [`Self::usable`]): every
    /// usable port is hit by exactly one residue. `None` when nothing is usable.
    pub const fn nth(&self, n: u32) -> Option<u16> {
        let Some(off) = n.checked_rem(self.usable()) else {
            return None;
        };
        let mut p = self.min + off;
        if self.skip_len != 0 && p >= self.skip_min {
            p += self.skip_len;
        }
        #[expect(clippy::cast_possible_truncation, reason = "p <= max <= u16::MAX")]
        Some(p as u16)
    }
}

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
    unsafe impl aya::Pod for super::FragPorts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelFlow {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_ports_skip_the_band_and_hit_every_usable_port_once() {
        // The agent's default: 1024-65535 around Linux's default ephemeral range.
        let r = SnatPorts::new(1024, 65_535, 32_768, 60_999);
        assert_eq!(r.usable(), 65_535 - 1024 + 1 - (60_999 - 32_768 + 1));
        let mut seen = vec![false; 65_536];
        for n in 0..r.usable() {
            let p = r.nth(n).unwrap();
            assert!(r.contains(p), "{p}");
            assert!(!seen[usize::from(p)], "{p} twice");
            seen[usize::from(p)] = true;
        }
        assert_eq!(r.nth(0), Some(1024));
        assert_eq!(r.nth(32_768 - 1024), Some(61_000));
        assert_eq!(r.nth(r.usable()), Some(1024));
        assert!(!r.contains(32_768) && !r.contains(60_999) && !r.contains(1023));
        assert!(r.contains(32_767) && r.contains(61_000) && r.contains(65_535));
    }

    #[test]
    fn snat_ports_bands_outside_the_range_or_empty_change_nothing() {
        let plain = SnatPorts::new(61_000, 65_535, 0, 0);
        assert_eq!(plain.usable(), 4536);
        assert_eq!(SnatPorts::new(61_000, 65_535, 32_768, 60_999), plain);
        assert_eq!(SnatPorts::new(61_000, 65_535, 9, 3), plain);
        // A band covering the top of the range is clipped to it.
        let clipped = SnatPorts::new(1024, 65_535, 60_000, 65_535);
        assert_eq!(clipped.usable(), 60_000 - 1024);
        assert_eq!(clipped.nth(60_000 - 1024 - 1), Some(59_999));
    }

    #[test]
    fn snat_ports_with_nothing_usable_give_none() {
        assert_eq!(SnatPorts::new(0, 0, 0, 0).nth(5), None);
        assert_eq!(SnatPorts::new(2000, 1000, 0, 0).nth(5), None);
        let all_skipped = SnatPorts::new(40_000, 50_000, 32_768, 60_999);
        assert_eq!(all_skipped.usable(), 0);
        assert_eq!(all_skipped.nth(1), None);
        assert!(!all_skipped.contains(45_000));
    }

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
