//! Kubernetes NetworkPolicy as the programs see it: what user space compiles policies
//! into.
//!
//! Pods with the same compiled rules share a *rule set*: each policed pod points to one
//! set per direction ([`PolicedPod`]), and a set is an LPM trie of peer prefixes
//! ([`RulePeer`]) to the ports those peers may use ([`PortRules`]). User space flattens
//! `ipBlock`s with `except`s so that the longest matching prefix alone gives the answer.
//!
//! Connections are tracked ([`FlowKey`], [`FlowState`]) so that replies pass and a policy
//! change is applied to established flows at their next packet: every flow remembers the
//! policy revision it was judged under, and is judged again once that changes.

/// Port ranges per (rule set, peer prefix); more is a compile error user space reports.
pub const PORT_RANGES_MAX: usize = 16;

/// Rule set 0: not isolated in that direction (everything allowed).
pub const SET_NONE: u32 = 0;

pub mod direction {
    /// What a pod receives; peers are sources.
    pub const INGRESS: u32 = 0;
    /// What a pod sends; peers are destinations.
    pub const EGRESS: u32 = 1;
}

/// Value of the policed-pods map, keyed by the pod IPv4 (network order). A pod absent
/// from the map is isolated in neither direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicedPod {
    /// Rule set judging what the pod receives, or [`SET_NONE`].
    pub ingress_set: u32,
    /// Rule set judging what the pod sends, or [`SET_NONE`].
    pub egress_set: u32,
}

/// Data of the rules LPM trie's key (the trie's key is the prefix length followed by
/// this): a rule set, a direction and a peer. The prefix length always covers `set` and
/// `direction` ([`RulePeer::FIXED_BITS`]) plus the peer prefix's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RulePeer {
    /// Big-endian, so that the trie compares it bit by bit as user space wrote it.
    pub set: [u8; 4],
    /// [`direction`], big-endian.
    pub direction: [u8; 4],
    /// Network order.
    pub peer: u32,
}

impl RulePeer {
    /// The bits every key's prefix length covers.
    pub const FIXED_BITS: u32 = 64;

    pub const fn new(set: u32, direction: u32, peer: u32) -> Self {
        Self {
            set: set.to_be_bytes(),
            direction: direction.to_be_bytes(),
            peer,
        }
    }

    pub const fn set(&self) -> u32 {
        u32::from_be_bytes(self.set)
    }

    pub const fn direction(&self) -> u32 {
        u32::from_be_bytes(self.direction)
    }
}

/// One allowed protocol and destination port range. `proto` 0 admits every protocol and
/// port (a rule without `ports`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub proto: u8,
    pub pad: u8,
    /// Host order, inclusive.
    pub first: u16,
    /// Host order, inclusive.
    pub last: u16,
}

/// Value of the rules trie: what the peers under that prefix may use. `count` 0: nothing
/// (a prefix carved out by an `except`, or a peer whose named port did not resolve).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRules {
    pub count: u32,
    pub ranges: [PortRange; PORT_RANGES_MAX],
}

impl PortRules {
    /// Whether a packet of `proto` to `port` is admitted; `port` `None`: a packet
    /// without one (another protocol, a later fragment), admitted by a rule that admits
    /// the whole protocol.
    #[inline]
    #[must_use]
    pub fn admits(&self, proto: u8, port: Option<u16>) -> bool {
        let mut i: u32 = 0;
        while (i as usize) < PORT_RANGES_MAX {
            if i >= self.count {
                return false;
            }
            let r = &self.ranges[i as usize];
            if r.proto == 0 {
                return true;
            }
            if r.proto == proto {
                match port {
                    Some(p) if r.first <= p && p <= r.last => return true,
                    None if r.first == 0 && r.last == u16::MAX => return true,
                    _ => {}
                }
            }
            i += 1;
        }
        false
    }
}

/// Key of the flow table: a connection as seen in one direction (addresses network
/// order, ports host order). Each tracked connection has two entries, one per direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

impl FlowKey {
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            pad: [0; 3],
        }
    }
}

/// Key of the fragment table: an IPv4 datagram as its fragments share it (RFC 791: source,
/// destination, protocol and identification), the identification as in the packet.
/// Later fragments carry no ports; they follow the verdict their first fragment got.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: u32,
    pub dst: u32,
    pub id: u16,
    pub proto: u8,
    pub pad: u8,
}

/// Value of the fragment table: 1, the first fragment was admitted.
pub type FragAdmitted = u32;

/// Datagrams in reassembly at once: fragments within the VPC are rare (9001 MTU), and an
/// evicted entry only makes its later fragments judged on their own.
pub const FRAGS_MAX_ENTRIES: u32 = 8192;

/// Value of the flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// The policy revision ([`REVISION_INDEX`]) the connection was last judged under.
    pub revision: u64,
    /// Last packet, `bpf_ktime_get_coarse_ns`-style monotonic nanoseconds.
    pub seen_ns: u64,
    /// 1: this entry is the reply direction (its key is the connection reversed).
    pub reply: u32,
    /// 1: a policy change revoked the connection; its packets are dropped until it goes
    /// idle or another change admits it again (without this mark, its next segment
    /// would be admitted as the reply of a connection opened before tracking).
    pub revoked: u32,
}

/// Entry of the revision array that user space bumps after every change to the policy
/// maps.
pub const REVISION_INDEX: u32 = 0;

/// Entry of the revision array holding until when (monotonic ns) a TCP segment without
/// a tracked connection may be admitted as the reply of one opened before tracking began.
/// User space sets it once, when it first switches policy on for the node: connections
/// opened earlier are not tracked, and their replies must not be cut. Later, an untracked
/// segment is judged in its own direction, so no one can slip segments into a pod whose
/// ingress denies them just because the pod may send the other way.
pub const MID_STREAM_UNTIL_INDEX: u32 = 1;

/// How long that window lasts.
pub const MID_STREAM_GRACE_NS: u64 = 15 * 60 * 1_000_000_000;

/// A tracked flow idle this long is forgotten: a packet on it is judged as new.
pub const FLOW_IDLE_TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const FLOW_IDLE_OTHER_NS: u64 = 180 * 1_000_000_000;

/// What a [`PolicyEvent`] reports.
pub mod verdict {
    /// A new connection that a pod's rules admitted (reported only when at least one end
    /// is isolated, so unpoliced traffic costs no event).
    pub const ALLOW: u8 = 1;
    /// A packet the rules denied (each one: repeated SYNs are repeated events).
    pub const DENY: u8 = 2;
    /// A tracked connection that a policy change now denies: reported once, at the
    /// packet that found it revoked.
    pub const REVOKE: u8 = 3;
}

/// Bits of [`PolicyEvent::ends`]: which ends are pods of this node.
pub mod ends {
    pub const SRC_LOCAL: u8 = 1;
    pub const DST_LOCAL: u8 = 2;
}

/// A policy verdict, sent to user space through the events ring buffer (flow logs,
/// per-policy counters, the live view). Addresses network order, ports host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the packet.
    pub ts_ns: u64,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`verdict`].
    pub verdict: u8,
    /// [`ends`].
    pub ends: u8,
    /// 1: the packet goes the reverse way of its connection (the connection was opened
    /// by `dst`): a reply of a revoked connection, or a segment admitted as the reply of
    /// a connection opened before tracking began. `ends` describes the packet too.
    pub reply: u8,
    /// For a denial, the drop reason ([`crate::counters::reason`]): which direction's
    /// rules denied it.
    pub reason: u16,
    /// 1: the packet carried no ports (a later fragment, a protocol without them).
    pub portless: u8,
    pub pad: [u8; 5],
}

/// Size of the events ring buffer: about 6,500 events between two reads.
pub const EVENTS_BYTES: u32 = 256 * 1024;

pub const POLICED_MAX_ENTRIES: u32 = 16_384;
pub const RULES_MAX_ENTRIES: u32 = 65_536;
pub const FLOWS_DEFAULT_MAX_ENTRIES: u32 = 131_072;

const _: () = assert!(core::mem::size_of::<PolicedPod>() == 8);
const _: () = assert!(core::mem::size_of::<RulePeer>() == 12);
const _: () = assert!(core::mem::size_of::<PortRange>() == 6);
const _: () = assert!(core::mem::size_of::<PortRules>() == 4 + 6 * PORT_RANGES_MAX);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);
const _: () = assert!(core::mem::size_of::<FlowState>() == 24);
const _: () = assert!(core::mem::size_of::<PolicyEvent>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, every byte covered by a field.
    unsafe impl aya::Pod for super::PolicedPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RulePeer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortRules {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(r: &[(u8, u16, u16)]) -> PortRules {
        let mut p = PortRules {
            count: u32::try_from(r.len()).expect("a short list"),
            ..Default::default()
        };
        for (i, &(proto, first, last)) in r.iter().enumerate() {
            p.ranges[i] = PortRange {
                proto,
                pad: 0,
                first,
                last,
            };
        }
        p
    }

    #[test]
    fn admits_by_protocol_and_range() {
        let r = rules(&[(6, 80, 80), (17, 1000, 2000)]);
        assert!(r.admits(6, Some(80)));
        assert!(!r.admits(6, Some(81)));
        assert!(!r.admits(17, Some(80)));
        assert!(r.admits(17, Some(1000)) && r.admits(17, Some(2000)));
        assert!(!r.admits(17, Some(2001)));
        assert!(
            !r.admits(6, None),
            "a port rule does not admit portless packets"
        );
        assert!(!r.admits(1, None));
        assert!(rules(&[(0, 0, 0)]).admits(1, None));
        assert!(rules(&[(6, 0, u16::MAX)]).admits(6, None));
        assert!(!rules(&[]).admits(6, Some(80)));
    }
}
