//! Kubernetes `NetworkPolicy`: one check per decided packet, at the one point each program
//! has between deciding and acting ([`crate::action`]). A connection needs the sender's
//! egress rules (when the sender is a pod of this node) and the receiver's ingress rules
//! (when the receiver is a pod of this node) to admit it; the other node judges its own
//! pods. Admitted connections are tracked both ways, so replies pass and later packets
//! cost one lookup; a policy change (a new revision) has every tracked connection judged
//! again at its next packet, and one that is now denied is cut.
//!
//! See [`vpc_ebpf_common::policy`] for the maps' layout.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_ANY},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use vpc_ebpf_common::{
    counters::reason,
    node::{NodeConfig, config_flags},
    policy::{
        FLOW_IDLE_OTHER_NS, FLOW_IDLE_TCP_NS, FlowKey, FlowState, FragKey, MID_STREAM_UNTIL_INDEX,
        PolicyEvent, REVISION_INDEX, RulePeer, SET_NONE, direction, verdict,
    },
};

use crate::{
    maps::{
        VPC_CONFIG, VPC_POL_EVENTS, VPC_POL_EVLOST, VPC_POL_FLOWS, VPC_POL_FRAGS, VPC_POL_REV,
        VPC_POL_RULES, VPC_POLICED,
    },
    nat,
    packet::{IP_OFF, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ports, ptr_at},
};

/// Which ends of a packet are pods of this node, whose rules this node enforces.
#[derive(Clone, Copy)]
pub struct Ends {
    pub src_local: bool,
    pub dst_local: bool,
}

/// A packet as policy sees it: after any translation the program itself makes (a hostPort
/// is judged as the pod and container port it is translated to).
#[derive(Clone, Copy)]
pub struct Conn {
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    /// `None`: no L4 ports (a later fragment, a protocol without them).
    pub ports: Option<Ports>,
    /// [`FRAG_FIRST`], [`FRAG_LATER`], or 0 for a whole datagram.
    pub fragment: u8,
}

/// More fragments follow, offset 0: the one with the ports.
const FRAG_FIRST: u8 = 1;
const FRAG_LATER: u8 = 2;

impl Conn {
    #[inline(always)]
    pub fn of(ip: &Ipv4, ports: Option<Ports>) -> Self {
        Self {
            src: ip.src,
            dst: ip.dst,
            proto: ip.proto,
            ports: ports.filter(|_| !ip.later_fragment),
            fragment: if ip.later_fragment {
                FRAG_LATER
            } else {
                u8::from(ip.fragment) * FRAG_FIRST
            },
        }
    }
}

/// Where a packet stands in its datagram; a fragment's datagram id is read from the packet
/// (not carried in [`Conn`]: the calling programs' stack and registers are at their
/// limit), only for fragments.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Piece {
    Whole,
    First(FragKey),
    Later(FragKey),
}

#[inline(always)]
fn piece(ctx: &TcContext, ip: &Conn) -> Piece {
    if ip.fragment == 0 {
        return Piece::Whole;
    }
    let Ok(hdr) = ptr_at::<Ipv4Hdr>(ctx, IP_OFF) else {
        return Piece::Whole;
    };
    // SAFETY: ptr_at checked the whole fixed header.
    let id = unsafe { (*hdr).id };
    let key = FragKey {
        src: ip.src,
        dst: ip.dst,
        id: u16::from_ne_bytes(id),
        proto: ip.proto,
        pad: 0,
    };
    if ip.fragment == FRAG_LATER {
        Piece::Later(key)
    } else {
        Piece::First(key)
    }
}

const IP_OFFSET: u16 = 0x1fff;
const IPPROTO_SCTP: u8 = 132;

/// SCTP's ports (the first four bytes of its common header), read by policy alone: the
/// dataplane neither translates nor tracks SCTP for itself, as its `CRC32c` checksum cannot
/// be patched incrementally.
#[inline(always)]
fn sctp_ports(ctx: &TcContext) -> Option<Ports> {
    let hdr = ptr_at::<Ipv4Hdr>(ctx, IP_OFF).ok()?;
    // SAFETY: ptr_at checked the whole fixed header.
    let (vihl, frags) = unsafe { ((*hdr).vihl, (*hdr).frags) };
    if u16::from_be_bytes(frags) & IP_OFFSET != 0 {
        return None;
    }
    let l4 = IP_OFF + usize::from(vihl & 0x0f) * 4;
    let ports = ptr_at::<[u8; 4]>(ctx, l4).ok()?;
    // SAFETY: ptr_at checked the four bytes.
    let b = unsafe { *ports };
    Some(Ports {
        src: u16::from_be_bytes([b[0], b[1]]),
        dst: u16::from_be_bytes([b[2], b[3]]),
        tcp_flags: 0,
    })
}

/// Whether `NetworkPolicy` is on: callers test it before gathering what [`judge`] needs,
/// so that with policy off the policy point costs this test alone.
#[inline(always)]
pub fn enabled(cfg: &NodeConfig) -> bool {
    cfg.flags & config_flags::NETWORK_POLICY != 0
}

/// `None`: the packet may go on; `Some(reason)`: drop it, counted under `reason`.
#[inline(always)]
pub fn judge(ctx: &TcContext, cfg: &NodeConfig, ip: &Conn, ends: Ends) -> Option<u16> {
    if !enabled(cfg) {
        return None;
    }
    let ports = ip.ports.map_or(0, |p| {
        1 << 40 | u64::from(p.tcp_flags) << 32 | u64::from(p.src) << 16 | u64::from(p.dst)
    });
    let proto_ends = u32::from(ip.proto)
        | u32::from(ends.src_local) << 8
        | u32::from(ends.dst_local) << 9
        | u32::from(ip.fragment) << 10;
    #[expect(clippy::cast_possible_truncation, reason = "a reason code")]
    match vpc_policy_judge(ctx.skb.skb, ip.src, ip.dst, ports, proto_ends) {
        0 => None,
        r => Some(r as u16),
    }
}

/// [`judge`]'s work, as a global function: the verifier checks a global function once,
/// on its own, where it would check an inlined or static one again for every path of
/// the calling program that reaches it (policy tripled `from_pod`'s verification time,
/// which every agent start pays). Arguments are scalars and the context, as a global
/// function's must be: `ports` is `1 << 40 | tcp_flags << 32 | src << 16 | dst` (0: no
/// ports), `proto_ends` is `proto | src_local << 8 | dst_local << 9 | fragment << 10`.
/// Returns 0 to let the packet go on, otherwise the drop reason.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vpc_policy_judge(
    skb: *mut __sk_buff,
    src: u32,
    dst: u32,
    ports: u64,
    proto_ends: u32,
) -> u32 {
    let ctx = TcContext::new(skb);
    let Some(cfg) = VPC_CONFIG.get(0) else {
        return 0;
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "unpacked as packed in judge"
    )]
    let ip = Conn {
        src,
        dst,
        proto: proto_ends as u8,
        ports: (ports >> 40 != 0).then_some(Ports {
            src: (ports >> 16) as u16,
            dst: ports as u16,
            tcp_flags: (ports >> 32) as u8,
        }),
        fragment: (proto_ends >> 10) as u8 & (FRAG_FIRST | FRAG_LATER),
    };
    let ends = Ends {
        src_local: proto_ends & 1 << 8 != 0,
        dst_local: proto_ends & 1 << 9 != 0,
    };
    u32::from(judge_whole(&ctx, cfg, &ip, ends).unwrap_or(0))
}

#[inline(always)]
fn judge_whole(ctx: &TcContext, cfg: &NodeConfig, ip: &Conn, ends: Ends) -> Option<u16> {
    let verdict = judge_packet(ctx, cfg, ip, ends);
    // The datagram's later fragments carry no ports to judge: they follow this one.
    if verdict.is_none()
        && let Piece::First(key) = piece(ctx, ip)
    {
        let _ = VPC_POL_FRAGS.insert(key, 1, u64::from(BPF_ANY));
    }
    verdict
}

/// Without ports (a later fragment, a protocol without them) there is no connection to
/// track: a later fragment follows its first fragment's verdict when that was seen, and
/// the rest is judged on its own, by protocol.
#[inline(always)]
fn judge_portless(ctx: &TcContext, ip: &Conn, ends: Ends) -> Option<u16> {
    if let Piece::Later(key) = piece(ctx, ip)
        && VPC_POL_FRAGS.get_ptr(key).is_some()
    {
        return None;
    }
    let r = admitted(ip.src, ip.dst, ip.proto, None, ends).err()?;
    report(ip, ends, verdict::DENY, r, 0);
    Some(r)
}

#[inline(always)]
fn judge_packet(ctx: &TcContext, cfg: &NodeConfig, ip: &Conn, ends: Ends) -> Option<u16> {
    // A pod and its own node always talk (kubelet probes, node-local agents).
    if ip.src == cfg.node_ip || ip.dst == cfg.node_ip {
        return None;
    }
    // ICMP errors belong to a connection judged already (and PMTU discovery must work).
    if ip.proto == IPPROTO_ICMP && ip.ports.is_none() {
        return None;
    }
    let ports = ip
        .ports
        .or_else(|| (ip.proto == IPPROTO_SCTP).then(|| sctp_ports(ctx))?);
    let Some(p) = ports else {
        return judge_portless(ctx, ip, ends);
    };
    let key = FlowKey {
        src: ip.src,
        dst: ip.dst,
        sport: p.src,
        dport: p.dst,
        proto: ip.proto,
        pad: [0; 3],
    };
    let revision = VPC_POL_REV.get(REVISION_INDEX).copied().unwrap_or(0);
    let now = nat::now();
    if let Some(f) = VPC_POL_FLOWS.get_ptr_mut(key) {
        // SAFETY: a valid map value; racing CPUs write the same kind of values.
        let (seen, judged, reply) = unsafe { ((*f).seen_ns, (*f).revision, (*f).reply) };
        let idle = if ip.proto == IPPROTO_TCP {
            FLOW_IDLE_TCP_NS
        } else {
            FLOW_IDLE_OTHER_NS
        };
        if now.wrapping_sub(seen) < idle {
            // SAFETY: as above.
            let was_revoked = unsafe { (*f).revoked };
            // Judged under this revision and seen lately: nothing to write. Writing the
            // time on every packet would dirty the entry's cache line for each one (and
            // across CPUs); the idle timeouts are minutes, a second late is nothing.
            if judged == revision && now.wrapping_sub(seen) < SEEN_REFRESH_NS {
                return (was_revoked != 0).then_some(reason::DROP_POLICY_REVOKED);
            }
            let mut revoked = was_revoked;
            if judged != revision {
                // Judge the connection as it was opened: a reply entry's key is reversed.
                let now_judged = if reply != 0 {
                    let back = Ends {
                        src_local: ends.dst_local,
                        dst_local: ends.src_local,
                    };
                    admitted(ip.dst, ip.src, ip.proto, port_of(ip.proto, p.src), back)
                } else {
                    admitted(ip.src, ip.dst, ip.proto, port_of(ip.proto, p.dst), ends)
                };
                revoked = u32::from(now_judged.is_err());
                if let Err(r) = now_judged
                    && was_revoked == 0
                {
                    report(ip, ends, verdict::REVOKE, r, u8::from(reply != 0));
                }
            }
            // SAFETY: as above.
            unsafe {
                (*f).seen_ns = now;
                (*f).revision = revision;
                (*f).revoked = revoked;
            }
            return (revoked != 0).then_some(reason::DROP_POLICY_REVOKED);
        }
    }
    let mut as_reply = 0;
    let judged = admitted(ip.src, ip.dst, ip.proto, port_of(ip.proto, p.dst), ends);
    if let Err(r) = judged {
        // A TCP segment other than a bare SYN, soon after policy was switched on, may
        // belong to a connection opened the other way before tracking began: admitted as
        // that connection's reply if its opening would be.
        let back = Ends {
            src_local: ends.dst_local,
            dst_local: ends.src_local,
        };
        let mid_stream_until = VPC_POL_REV
            .get(MID_STREAM_UNTIL_INDEX)
            .copied()
            .unwrap_or(0);
        if ip.proto != IPPROTO_TCP
            || p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            || now >= mid_stream_until
            || admitted(ip.dst, ip.src, ip.proto, port_of(ip.proto, p.src), back).is_err()
        {
            report(ip, ends, verdict::DENY, r, 0);
            return Some(r);
        }
        as_reply = 1;
    }
    // Only connections some rules judged are worth an event: unpoliced traffic costs none.
    if as_reply != 0 || judged.is_ok_and(|by_rules| by_rules) {
        report(ip, ends, verdict::ALLOW, 0, u8::from(as_reply != 0));
    }
    track(key, revision, now, as_reply);
    None
}

/// Records an admitted connection both ways (`as_reply`: this packet is the reply
/// direction of it). One value and one key, changed in place for the other direction:
/// the judge's stack is what the calling program leaves.
#[inline(always)]
fn track(key: FlowKey, revision: u64, now: u64, as_reply: u32) {
    let mut state = FlowState {
        revision,
        seen_ns: now,
        reply: as_reply,
        revoked: 0,
    };
    let mut key = key;
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, each call takes a copy on the stack"
    )]
    let _ = VPC_POL_FLOWS.insert(&key, &state, u64::from(BPF_ANY));
    state.reply = 1 - as_reply;
    key = key.reversed();
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, each call takes a copy on the stack"
    )]
    let _ = VPC_POL_FLOWS.insert(&key, &state, u64::from(BPF_ANY));
}

/// How stale a tracked flow's last-seen time may get before a packet refreshes it.
const SEEN_REFRESH_NS: u64 = 1_000_000_000;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The destination port rules match, for the protocols whose ports rules name.
#[inline(always)]
fn port_of(proto: u8, port: u16) -> Option<u16> {
    (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP).then_some(port)
}

/// Whether a new connection `src` → `dst` (`proto`, destination `port`) is admitted by the
/// rules of its local ends: `Ok(true)` when rules were consulted (an end is isolated),
/// `Ok(false)` when neither end is; `Err` is the drop reason.
#[inline(always)]
fn admitted(src: u32, dst: u32, proto: u8, port: Option<u16>, ends: Ends) -> Result<bool, u16> {
    let mut by_rules = false;
    if ends.src_local
        // SAFETY: read-only access to a map value.
        && let Some(pod) = unsafe { VPC_POLICED.get(src) }
        && pod.egress_set != SET_NONE
    {
        if !rules_admit(pod.egress_set, direction::EGRESS, dst, proto, port) {
            return Err(reason::DROP_POLICY_EGRESS);
        }
        by_rules = true;
    }
    if ends.dst_local
        // SAFETY: as above.
        && let Some(pod) = unsafe { VPC_POLICED.get(dst) }
        && pod.ingress_set != SET_NONE
    {
        if !rules_admit(pod.ingress_set, direction::INGRESS, src, proto, port) {
            return Err(reason::DROP_POLICY_INGRESS);
        }
        by_rules = true;
    }
    Ok(by_rules)
}

/// Hands a verdict to user space, written in place in the ring buffer (no copy on the
/// stack, which the calling programs have little of); a full ring buffer loses the
/// event, counted.
#[inline(always)]
fn report(ip: &Conn, ends: Ends, what: u8, why: u16, reply: u8) {
    let Some(mut slot) = VPC_POL_EVENTS.reserve::<PolicyEvent>(0) else {
        if let Some(lost) = VPC_POL_EVLOST.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot: only this CPU writes it, and a program cannot
            // preempt itself on the same CPU.
            unsafe { *lost += 1 };
        }
        return;
    };
    let (sport, dport) = ip.ports.map_or((0, 0), |p| (p.src, p.dst));
    let ev = slot.as_mut_ptr();
    // SAFETY: the reserved slot is a PolicyEvent's size; every field is written
    // (field by field: a whole value would be built on the stack first).
    unsafe {
        (*ev).ts_ns = nat::now();
        (*ev).src = ip.src;
        (*ev).dst = ip.dst;
        (*ev).sport = sport;
        (*ev).dport = dport;
        (*ev).proto = ip.proto;
        (*ev).verdict = what;
        (*ev).ends = u8::from(ends.src_local) | u8::from(ends.dst_local) << 1;
        (*ev).reply = reply;
        (*ev).reason = why;
        (*ev).portless = u8::from(ip.ports.is_none());
        (*ev).pad = [0; 5];
    }
    slot.submit(0);
}

#[inline(always)]
fn rules_admit(set: u32, dir: u32, peer: u32, proto: u8, port: Option<u16>) -> bool {
    let key = Key::new(RulePeer::FIXED_BITS + 32, RulePeer::new(set, dir, peer));
    VPC_POL_RULES
        .get(&key)
        .is_some_and(|r| r.admits(proto, port))
}
