//! Per-interface, per-reason packet and byte counters.
//!
//! One per-CPU hash map keyed by [`CounterKey`]: the kernel side adds to its own CPU's
//! slot without atomics, user space sums the slots. Every verdict the dataplane takes is
//! counted here under a reason code, so drops are never silent.

/// Map key: which interface, which direction, why.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    /// Kernel ifindex of the interface the program is attached to.
    pub ifindex: u32,
    /// One of the [`reason`] codes.
    pub reason: u16,
    /// One of the [`direction`] codes.
    pub direction: u8,
    /// Explicit padding; always zero so equal keys hash equally.
    pub pad: u8,
}

impl CounterKey {
    pub const fn new(ifindex: u32, reason: u16, direction: u8) -> Self {
        Self {
            ifindex,
            reason,
            direction,
            pad: 0,
        }
    }
}

/// Map value (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    /// Bytes as the kernel sees the packet at the hook: the L2 frame (`skb->len`).
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<CounterKey>() == 8);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Capacity of the counters map: interfaces x reasons x directions on a busy node
/// (a few hundred pod veths, a few dozen reasons) with ample headroom.
pub const COUNTERS_MAX_ENTRIES: u32 = 32_768;

/// Which TC hook counted the packet.
pub mod direction {
    /// TC ingress: packets the interface received.
    pub const INGRESS: u8 = 0;
    /// TC egress: packets the interface is about to send.
    pub const EGRESS: u8 = 1;

    pub const fn name(d: u8) -> &'static str {
        match d {
            INGRESS => "ingress",
            EGRESS => "egress",
            _ => "unknown",
        }
    }
}

/// Reason codes. `PASS_*`: handed to the kernel unchanged; `DROP_*`: dropped (none yet);
/// later programs add `FWD_*` for packets they redirect themselves. Codes are stable
/// (they are stored in pinned maps and exported as metric labels); never renumber.
pub mod reason {
    /// Frame too short for an Ethernet header.
    pub const PASS_TRUNCATED_ETH: u16 = 1;
    /// ARP.
    pub const PASS_ARP: u16 = 2;
    /// IPv4 TCP.
    pub const PASS_IPV4_TCP: u16 = 3;
    /// IPv4 UDP.
    pub const PASS_IPV4_UDP: u16 = 4;
    /// IPv4 ICMP.
    pub const PASS_IPV4_ICMP: u16 = 5;
    /// IPv4 with another L4 protocol.
    pub const PASS_IPV4_OTHER: u16 = 6;
    /// A non-first IPv4 fragment: no L4 header to look at.
    pub const PASS_IPV4_FRAGMENT: u16 = 7;
    /// Ethertype IPv4 but fewer bytes than the IPv4 header or its L4 header needs.
    pub const PASS_TRUNCATED_IPV4: u16 = 8;
    /// IPv4 header with a version other than 4 or an IHL below 5.
    pub const PASS_MALFORMED_IPV4: u16 = 9;
    /// IPv6 (not handled by the dataplane yet).
    pub const PASS_IPV6: u16 = 10;
    /// 802.1Q / 802.1ad tagged frames.
    pub const PASS_VLAN: u16 = 11;
    /// Any other ethertype.
    pub const PASS_OTHER_ETHERTYPE: u16 = 12;

    /// All codes, for exporting every series even when zero.
    pub const ALL: [u16; 12] = [
        PASS_TRUNCATED_ETH,
        PASS_ARP,
        PASS_IPV4_TCP,
        PASS_IPV4_UDP,
        PASS_IPV4_ICMP,
        PASS_IPV4_OTHER,
        PASS_IPV4_FRAGMENT,
        PASS_TRUNCATED_IPV4,
        PASS_MALFORMED_IPV4,
        PASS_IPV6,
        PASS_VLAN,
        PASS_OTHER_ETHERTYPE,
    ];

    /// Stable `snake_case` name used as the metric label.
    pub const fn name(r: u16) -> &'static str {
        match r {
            PASS_TRUNCATED_ETH => "pass_truncated_eth",
            PASS_ARP => "pass_arp",
            PASS_IPV4_TCP => "pass_ipv4_tcp",
            PASS_IPV4_UDP => "pass_ipv4_udp",
            PASS_IPV4_ICMP => "pass_ipv4_icmp",
            PASS_IPV4_OTHER => "pass_ipv4_other",
            PASS_IPV4_FRAGMENT => "pass_ipv4_fragment",
            PASS_TRUNCATED_IPV4 => "pass_truncated_ipv4",
            PASS_MALFORMED_IPV4 => "pass_malformed_ipv4",
            PASS_IPV6 => "pass_ipv6",
            PASS_VLAN => "pass_vlan",
            PASS_OTHER_ETHERTYPE => "pass_other_ethertype",
            _ => "unknown",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are repr(C), made only of integers, with every byte covered by a field
    // (explicit padding), so any bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for super::CounterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counter {}
}

#[cfg(test)]
mod tests {
    use super::reason;

    #[test]
    fn reason_codes_are_unique_and_named() {
        for (i, a) in reason::ALL.iter().enumerate() {
            assert_ne!(reason::name(*a), "unknown", "code {a} has no name");
            for b in &reason::ALL[i + 1..] {
                assert_ne!(a, b, "duplicate reason code");
                assert_ne!(reason::name(*a), reason::name(*b), "duplicate reason name");
            }
        }
    }
}
