//! Per-reason packet and byte counters.
//!
//! Every verdict the dataplane takes is counted under a reason code, so drops are never
//! silent. Two per-CPU maps (the kernel side adds to its own CPU's slot without atomics,
//! user space sums the slots):
//! - the forwarding verdicts ([`reason::is_forward`]), which every packet of the fast
//!   paths takes, in an array indexed by [`forward_slot`] (reason and direction, no
//!   interface): a slot is found with a few instructions, where a hash lookup cost
//!   20–35 ns per packet on the development VM, up to a tenth of `from_pod`'s pod-to-pod
//!   path. Per pod, the forwarded packets are in the host veth's interface statistics;
//! - every other verdict (drops, hand-overs to the kernel) in a hash keyed by
//!   [`CounterKey`], per interface, so that a drop says which pod or ENI it happened on.

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

/// The `ifindex` of [`CounterKey`]s that user space reports for the forwarding
/// counters, which are not kept per interface.
pub const ALL_INTERFACES: u32 = 0;

/// Slots of the forwarding counters array: every reason code below 64, both directions.
pub const FORWARD_SLOTS: u32 = 128;

/// The forwarding counters array slot of (`reason`, `direction`); `reason` below 64.
pub const fn forward_slot(reason: u16, direction: u8) -> u32 {
    ((reason as u32) & 63) << 1 | (direction as u32) & 1
}

/// Capacity of the per-interface counters map: interfaces x reasons x directions on a busy node
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

/// Reason codes. `PASS_*`: handed to the kernel unchanged; `DROP_*`: dropped; `FWD_*`:
/// forwarded by the program itself (redirected, possibly rewritten). Codes are stable (they
/// are stored in pinned maps and exported as metric labels); never renumber.
///
/// Ranges: 1-29 hand-overs and drops, 30-63 forwarding verdicts (they index the per-CPU
/// array, so they stay below 64) and further hand-overs, [`POLICY_FIRST`]..=[`POLICY_LAST`]
/// reserved for NetworkPolicy's verdicts (drops, counted per interface so a denial names
/// its pod).
pub mod reason {
    /// First code of the range reserved for NetworkPolicy.
    pub const POLICY_FIRST: u16 = 64;
    /// Last code of the range reserved for NetworkPolicy.
    pub const POLICY_LAST: u16 = 95;

    macro_rules! reasons {
        ($($(#[$doc:meta])* $name:ident = $code:literal, $label:literal;)*) => {
            $($(#[$doc])* pub const $name: u16 = $code;)*

            /// All codes, for exporting every series even when zero.
            pub const ALL: &[u16] = &[$($name),*];

            /// Stable `snake_case` name used as the metric label.
            pub const fn name(r: u16) -> &'static str {
                match r {
                    $($code => $label,)*
                    _ => "unknown",
                }
            }
        };
    }

    /// Whether `r` is a forwarding verdict, counted per direction only (see the module
    /// documentation); the others are counted per interface.
    pub const fn is_forward(r: u16) -> bool {
        r >= FWD_ARP_REPLY && r <= FWD_ICMP_ERROR_NAT
    }

    reasons! {
        /// Frame too short for an Ethernet header.
        PASS_TRUNCATED_ETH = 1, "pass_truncated_eth";
        /// ARP the dataplane does not answer.
        PASS_ARP = 2, "pass_arp";
        /// IPv4 TCP (the counting programs only).
        PASS_IPV4_TCP = 3, "pass_ipv4_tcp";
        /// IPv4 UDP (the counting programs only).
        PASS_IPV4_UDP = 4, "pass_ipv4_udp";
        /// IPv4 ICMP (the counting programs only).
        PASS_IPV4_ICMP = 5, "pass_ipv4_icmp";
        /// IPv4 with another L4 protocol.
        PASS_IPV4_OTHER = 6, "pass_ipv4_other";
        /// An IPv4 fragment the program cannot handle (no L4 header to translate).
        PASS_IPV4_FRAGMENT = 7, "pass_ipv4_fragment";
        /// Ethertype IPv4 but fewer bytes than the IPv4 header or its L4 header needs.
        PASS_TRUNCATED_IPV4 = 8, "pass_truncated_ipv4";
        /// IPv4 header with a version other than 4 or an IHL below 5.
        PASS_MALFORMED_IPV4 = 9, "pass_malformed_ipv4";
        /// IPv6 (not handled by the dataplane yet).
        PASS_IPV6 = 10, "pass_ipv6";
        /// 802.1Q / 802.1ad tagged frames.
        PASS_VLAN = 11, "pass_vlan";
        /// Any other ethertype.
        PASS_OTHER_ETHERTYPE = 12, "pass_other_ethertype";
        /// The node configuration has not been written yet: the kernel decides.
        PASS_NOT_CONFIGURED = 13, "pass_not_configured";
        /// Addressed to the node itself.
        PASS_TO_HOST = 14, "pass_to_host";
        /// Destination in the pass-through CIDRs (Service ClusterIPs and the like): the
        /// kernel and kube-proxy handle it.
        PASS_PASSTHROUGH_CIDR = 15, "pass_passthrough_cidr";
        /// TTL would reach zero: the kernel forwards nothing and sends the ICMP error.
        PASS_TTL_EXPIRED = 16, "pass_ttl_expired";
        /// Needs SNAT but is not TCP, UDP or ICMP echo.
        PASS_NOT_TRANSLATABLE = 17, "pass_not_translatable";
        /// Arrived on an ENI and is not for a local pod, a NATed flow or a hostPort.
        PASS_NOT_FOR_POD = 18, "pass_not_for_pod";
        /// A NAT entry points at a pod that no longer has an endpoint.
        PASS_NAT_STALE = 19, "pass_nat_stale";
        /// Source IPv4 is not the address of the pod behind this interface.
        DROP_SPOOFED_IP = 20, "drop_spoofed_ip";
        /// Source MAC is not the MAC of the pod behind this interface.
        DROP_SPOOFED_MAC = 21, "drop_spoofed_mac";
        /// The ENI owning the pod's address (or the primary ENI, for SNAT) is not in the
        /// ENI map; sending it out of another ENI would be dropped by the VPC anyway.
        DROP_NO_ENI = 22, "drop_no_eni";
        /// Every SNAT port tried for the flow was taken.
        DROP_NO_SNAT_PORT = 23, "drop_no_snat_port";
        /// A packet rewrite or redirect helper failed half way; the packet cannot be sent
        /// on in a consistent state.
        DROP_REWRITE_FAILED = 24, "drop_rewrite_failed";
        /// ARP request for the pod gateway answered with the host veth MAC.
        FWD_ARP_REPLY = 30, "fwd_arp_reply";
        /// Delivered to a local pod with bpf_redirect_peer.
        FWD_LOCAL_POD = 31, "fwd_local_pod";
        /// Sent out of the ENI owning the source address, to the subnet gateway.
        FWD_ENI = 32, "fwd_eni";
        /// Source-NATed to the node IP and sent out of the primary ENI.
        FWD_SNAT = 33, "fwd_snat";
        /// Reply to a source-NATed flow translated back and delivered to its pod.
        FWD_REVERSE_NAT = 34, "fwd_reverse_nat";
        /// hostPort traffic destination-NATed to its pod.
        FWD_HOSTPORT_DNAT = 35, "fwd_hostport_dnat";
        /// Reply from a hostPort pod translated back to the node address.
        FWD_HOSTPORT_REPLY = 36, "fwd_hostport_reply";
        /// ICMP error about a NATed flow translated and delivered to its pod.
        FWD_ICMP_ERROR_NAT = 37, "fwd_icmp_error_nat";
        /// A packet of a flow the host stack translates or terminates (kube-proxy DNAT,
        /// host-originated connections): handed to the kernel so that its conntrack sees
        /// both directions, instead of being redirected or source-NATed.
        PASS_KERNEL_FLOW = 38, "pass_kernel_flow";
        /// Host veth egress: the host stack delivered this to the pod; its flow is recorded
        /// so that the pod's replies go back through the host stack.
        PASS_KERNEL_TO_POD = 39, "pass_kernel_to_pod";
        /// An ICMP error whose quoted packet belongs to no flow translated here, or is cut
        /// too short to tell: the kernel's.
        PASS_ICMP_ERROR_UNKNOWN = 40, "pass_icmp_error_unknown";
        /// ENI egress: leaves for the VPC as the host stack sent it.
        PASS_TO_VPC = 41, "pass_to_vpc";
        /// Host veth egress: a packet the programs sent to a pod through the veth's qdisc
        /// (the `bandwidth` plugin's limit), passed on as it is.
        PASS_TO_POD_QDISC = 42, "pass_to_pod_qdisc";
        /// NetworkPolicy: the sending pod's egress rules do not admit this new flow.
        DROP_POLICY_EGRESS = 64, "drop_policy_egress";
        /// NetworkPolicy: the receiving pod's ingress rules do not admit this new flow.
        DROP_POLICY_INGRESS = 65, "drop_policy_ingress";
        /// NetworkPolicy: a flow admitted before a policy change, which now denies it.
        DROP_POLICY_REVOKED = 66, "drop_policy_revoked";
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

    /// The policy range holds the NetworkPolicy verdicts and nothing else.
    #[test]
    fn the_policy_range_is_policy_only() {
        for r in reason::ALL.iter().copied() {
            assert_eq!(
                (reason::POLICY_FIRST..=reason::POLICY_LAST).contains(&r),
                reason::name(r).starts_with("drop_policy_"),
                "{} = {r}",
                reason::name(r)
            );
        }
    }

    /// A forwarding reason added outside the range `is_forward` checks would be counted
    /// per interface, and one past 63 would share an array slot.
    #[test]
    fn forward_reasons_are_the_fwd_names_and_fit_the_array() {
        for r in reason::ALL.iter().copied() {
            assert_eq!(
                reason::is_forward(r),
                reason::name(r).starts_with("fwd_"),
                "{}",
                reason::name(r)
            );
            if !reason::is_forward(r) {
                continue;
            }
            assert!(r < 64, "{} = {r} does not fit the array", reason::name(r));
            for d in [super::direction::INGRESS, super::direction::EGRESS] {
                let slot = super::forward_slot(r, d);
                assert!(slot < super::FORWARD_SLOTS);
                assert_eq!((slot >> 1, slot & 1), (u32::from(r), u32::from(d)));
            }
        }
    }
}
