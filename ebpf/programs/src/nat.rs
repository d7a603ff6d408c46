//! Connection tracking and translation of source-NATed and hostPort flows.

use aya_ebpf::{
    bindings::__sk_buff,
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use network_types::ip::Ipv4Hdr;
use vpc_ebpf_common::{
    nat::{FragPorts, NatEntry, NatKey, SnatPorts, nat_kind, nat_origin, tcp_state},
    policy::FragKey,
};

use crate::{
    action::Action,
    maps::{VPC_NAT, VPC_NAT_FRAGS},
    packet::{
        ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IP_MF, IP_OFF, IP_OFFSET_MASK, IPPROTO_ICMP,
        IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ports, TCP_ACK, TCP_SYN, ptr_at,
    },
    rewrite,
};

/// Ports tried for a new SNAT flow before giving up; each try is one or two hash
/// operations.
const SNAT_ATTEMPTS: u32 = 12;

#[inline(always)]
pub fn key(ip: &Ipv4, p: &Ports) -> NatKey {
    NatKey::new(ip.src, ip.dst, p.src, p.dst, ip.proto)
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// Finds the entry for `key` and marks it used by this packet.
#[inline(always)]
pub fn lookup(key: &NatKey, p: &Ports) -> Option<NatEntry> {
    let e = VPC_NAT.get_ptr_mut(key)?;
    // SAFETY: a valid map value; concurrent updates from other CPUs only race on the
    // timestamp and state bits, where any of the racing values is fine.
    unsafe {
        (*e).last_seen_ns = now();
        (*e).state = p.next_state((*e).state);
        Some(*e)
    }
}

/// Applies `e` to the packet: rewrites the source or destination address and port. A
/// later fragment has no ports: only its address changes (the first fragment carried the
/// port and the L4 checksum, which covers the whole datagram).
#[inline(always)]
pub fn apply(ctx: &TcContext, ip: &Ipv4, p: &Ports, e: &NatEntry) -> Result<(), ()> {
    if e.kind == nat_kind::REWRITE_SRC {
        rewrite::set_addr(ctx, ip, true, ip.src, e.addr)?;
        if p.src != e.port && !ip.later_fragment {
            rewrite::set_port(ctx, ip, true, p.src, e.port)?;
        }
    } else {
        rewrite::set_addr(ctx, ip, false, ip.dst, e.addr)?;
        if p.dst != e.port && !ip.later_fragment {
            rewrite::set_port(ctx, ip, false, p.dst, e.port)?;
        }
    }
    Ok(())
}

/// A later fragment (no ports) of a datagram whose first fragment was translated here
/// (see [`VPC_NAT_FRAGS`]): the flow's entry, with the first fragment's ports. `None`
/// for any other packet, and when the flow is gone.
#[inline(always)]
pub fn established_fragment(ip: &Ipv4) -> Option<Action> {
    if !ip.later_fragment {
        return None;
    }
    let found = frag_lookup(ip.src, ip.dst, u32::from(ip.id) << 8 | u32::from(ip.proto));
    if found == 0 {
        return None;
    }
    #[expect(clippy::cast_possible_truncation, reason = "two 16-bit halves")]
    let p = Ports {
        src: (found >> 16) as u16,
        dst: found as u16,
        tcp_flags: 0,
    };
    let e = lookup(&key(ip, &p), &p)?;
    Some(Action::Established(e, p))
}

/// BPF-to-BPF calls with scalar arguments, so that the key lives in their own frame
/// rather than in the 512 bytes `from_pod` already nearly fills.
#[inline(never)]
fn frag_lookup(src: u32, dst: u32, id_proto: u32) -> u64 {
    let key = frag_key(src, dst, id_proto);
    // SAFETY: read-only copy of a map value.
    match unsafe { VPC_NAT_FRAGS.get(key) } {
        Some(p) => 1 << 32 | u64::from(p.src) << 16 | u64::from(p.dst),
        None => 0,
    }
}

#[inline(never)]
fn frag_record(src: u32, dst: u32, id_proto: u32, ports: u32) {
    let key = frag_key(src, dst, id_proto);
    #[expect(clippy::cast_possible_truncation, reason = "two 16-bit halves")]
    let value = FragPorts {
        src: (ports >> 16) as u16,
        dst: ports as u16,
    };
    let _ = VPC_NAT_FRAGS.insert(key, value, u64::from(BPF_ANY));
}

/// Records the ports of a first fragment (`ip` has more fragments and offset 0), keyed
/// by its header as it arrived: its later fragments arrive with the same header and no
/// ports. Every first fragment is recorded (a later one whose flow is not translated
/// finds no entry with them, and goes on as any packet without ports), so that this
/// runs before deciding anything.
#[inline(always)]
pub fn note_first_fragment(ctx: &TcContext, ip: &Ipv4) {
    if ip.fragment && !ip.later_fragment {
        vpc_note_first_fragment(ctx.skb.skb);
    }
}

/// [`note_first_fragment`]'s work, as a global function, which the verifier checks once
/// on its own: inlined, its branches had the verifier follow every later step of the
/// calling program once more per outcome (`from_pod` went past its 1M-instruction
/// budget). It reads the header afresh for the same reason.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn vpc_note_first_fragment(skb: *mut __sk_buff) -> u32 {
    let ctx = TcContext::new(skb);
    let ctx = &ctx;
    let Ok(hdr) = ptr_at::<Ipv4Hdr>(ctx, IP_OFF) else {
        return 0;
    };
    // SAFETY: ptr_at checked the whole fixed header.
    let (vihl, frags, proto, id, src, dst) = unsafe {
        (
            (*hdr).vihl,
            (*hdr).frags,
            (*hdr).proto,
            (*hdr).id,
            (*hdr).src_addr,
            (*hdr).dst_addr,
        )
    };
    if u16::from_be_bytes(frags) & (IP_MF | IP_OFFSET_MASK) != IP_MF {
        return 0;
    }
    let l4 = IP_OFF + usize::from(vihl & 0x0f) * 4;
    let Ok(b) = ptr_at::<[u8; 8]>(ctx, l4) else {
        return 0;
    };
    // SAFETY: ptr_at checked the 8 bytes.
    let b = unsafe { *b };
    // As [`crate::packet::ports`] reads them: an echo's identifier is the request's
    // source port and the reply's destination port.
    let ports = match proto {
        IPPROTO_TCP | IPPROTO_UDP => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        IPPROTO_ICMP => {
            let echo_id = u32::from(u16::from_be_bytes([b[4], b[5]]));
            match b[0] {
                ICMP_ECHO_REQUEST => echo_id << 16,
                ICMP_ECHO_REPLY => echo_id,
                _ => return 0,
            }
        }
        _ => return 0,
    };
    frag_record(
        u32::from_ne_bytes(src),
        u32::from_ne_bytes(dst),
        u32::from(u16::from_ne_bytes(id)) << 8 | u32::from(proto),
        ports,
    );
    0
}

#[inline(always)]
#[expect(clippy::cast_possible_truncation, reason = "packed by the callers")]
fn frag_key(src: u32, dst: u32, id_proto: u32) -> FragKey {
    FragKey {
        src,
        dst,
        id: (id_proto >> 8) as u16,
        proto: id_proto as u8,
        pad: 0,
    }
}

/// Whether the other direction of the flow `fwd` belongs to still points back at it.
/// LRU eviction removes entries one at a time, so a surviving forward entry may have lost
/// its reverse, or see its translated tuple reused by a newer flow.
#[inline(always)]
pub fn peer_intact(key: &NatKey, e: &NatEntry) -> bool {
    let peer = e.peer_key(key);
    // SAFETY: read-only copy of a map value.
    if let Some(r) = unsafe { VPC_NAT.get(peer) } {
        return r.peer_key(&peer) == *key;
    }
    // Re-create the lost half; if another flow took the tuple in between, the insert
    // fails and the caller starts over with a fresh port.
    let back = reverse_of(key, e);
    VPC_NAT.insert(peer, back, u64::from(BPF_NOEXIST)).is_ok()
}

/// The entry that undoes `e` for packets of the other direction.
#[inline(always)]
fn reverse_of(key: &NatKey, e: &NatEntry) -> NatEntry {
    let (addr, port, kind) = if e.kind == nat_kind::REWRITE_SRC {
        (key.src_ip, key.src_port, nat_kind::REWRITE_DST)
    } else {
        (key.dst_ip, key.dst_port, nat_kind::REWRITE_SRC)
    };
    NatEntry {
        last_seen_ns: now(),
        addr,
        port,
        kind,
        origin: e.origin,
        state: 0,
        pad: [0; 7],
    }
}

/// Drops a forward entry whose reverse is gone for good.
#[inline(always)]
pub fn forget(key: &NatKey) {
    let _ = VPC_NAT.remove(key);
}

/// Allocates a port from `ports` for a new flow `key` from a pod and records both
/// directions. The pod's own port is kept when it is allocatable and free (as Linux's
/// NAT does), then hashed candidates are tried. A candidate whose reverse entry is this
/// very flow's (its forward half was evicted) is taken back at once. Only when every
/// candidate is taken may a TCP SYN take the port of a flow that closed (RST, or FIN both
/// ways) at least [`REUSE_AFTER_NS`] ago, as conntrack lets a SYN reuse a `TIME_WAIT`
/// tuple: a high connection rate to one server then never runs out of ports, while a
/// port that closed moments ago (whose last ACK may still be on its way) is left alone.
/// `None`: every try was taken.
#[inline(always)]
pub fn snat_new(key: &NatKey, p: &Ports, node_ip: u32, ports: &SnatPorts) -> Option<NatEntry> {
    let syn = key.proto == IPPROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let h = hash(key);
    let mut closed_port = 0u16;
    let mut i = 0;
    while i < SNAT_ATTEMPTS {
        let port = if i == 0 && ports.contains(key.src_port) {
            key.src_port
        } else {
            ports.nth(h.wrapping_add(i.wrapping_mul(0x9e37_79b1)))?
        };
        i += 1;
        match claim(key, node_ip, port, false) {
            claim::DONE => return Some(snat_entry(node_ip, port)),
            // SAFETY: read-only copy of a map value.
            claim::RACED => return unsafe { VPC_NAT.get(key) }.copied(),
            claim::CLOSED if syn && closed_port == 0 => closed_port = port,
            _ => {}
        }
    }
    if closed_port != 0 && claim(key, node_ip, closed_port, true) == claim::DONE {
        return Some(snat_entry(node_ip, closed_port));
    }
    None
}

/// What became of one candidate port (plain codes rather than an enum carrying the
/// entry: this runs as a BPF-to-BPF call and every byte of its frame counts).
mod claim {
    /// The flow has this port now.
    pub const DONE: u8 = 0;
    /// Held by a flow that closed long enough ago to be taken over.
    pub const CLOSED: u8 = 1;
    /// Held by a live flow.
    pub const TAKEN: u8 = 2;
    /// Another CPU created the same flow meanwhile; its entry stands.
    pub const RACED: u8 = 3;
}

/// Tries to give `port` to the new flow `key`; with `take_closed`, a closed flow holding
/// it is evicted. A BPF-to-BPF call rather than inlined: it touches no packet memory,
/// and inlined copies would overflow the 512-byte stack of `from_pod`.
#[inline(never)]
fn claim(key: &NatKey, node_ip: u32, port: u16, take_closed: bool) -> u8 {
    let fwd = snat_entry(node_ip, port);
    let rev_key = fwd.peer_key(key);
    if VPC_NAT
        .insert(rev_key, reverse_of(key, &fwd), u64::from(BPF_NOEXIST))
        .is_err()
    {
        let Some(old) = VPC_NAT.get_ptr(rev_key) else {
            return claim::TAKEN;
        };
        // SAFETY: a valid map value, read in place.
        let old_fwd_key = unsafe { (*old).peer_key(&rev_key) };
        if old_fwd_key != *key {
            // SAFETY: as above.
            if !closed_long_enough(unsafe { &*old }, &old_fwd_key) {
                return claim::TAKEN;
            }
            if !take_closed {
                return claim::CLOSED;
            }
            let _ = VPC_NAT.remove(old_fwd_key);
        }
        if VPC_NAT
            .insert(rev_key, reverse_of(key, &fwd), u64::from(BPF_ANY))
            .is_err()
        {
            return claim::TAKEN;
        }
    }
    if VPC_NAT.insert(key, fwd, u64::from(BPF_NOEXIST)).is_ok() {
        return claim::DONE;
    }
    // Give our port back: the other CPU's entry is the flow's.
    let _ = VPC_NAT.remove(rev_key);
    claim::RACED
}

/// The forward entry of an SNAT flow given `port` on `node_ip`.
#[inline(always)]
fn snat_entry(node_ip: u32, port: u16) -> NatEntry {
    NatEntry {
        last_seen_ns: now(),
        addr: node_ip,
        port,
        kind: nat_kind::REWRITE_SRC,
        origin: nat_origin::SNAT,
        state: 0,
        pad: [0; 7],
    }
}

/// How long a closed flow keeps its port before a new connection may take it: long
/// enough for the closing handshake's last segments to arrive.
const REUSE_AFTER_NS: u64 = 2_000_000_000;

/// Whether the flow of reverse entry `rev` (forward key `fwd_key`) saw RST, or FIN both
/// ways, and has been quiet for [`REUSE_AFTER_NS`].
#[inline(always)]
fn closed_long_enough(rev: &NatEntry, fwd_key: &NatKey) -> bool {
    let (fwd_state, fwd_seen) = match VPC_NAT.get_ptr(fwd_key) {
        // SAFETY: a valid map value, read in place.
        Some(f) => unsafe { ((*f).state, (*f).last_seen_ns) },
        None => (tcp_state::FIN, 0),
    };
    let closed = (rev.state | fwd_state) & tcp_state::RST != 0
        || rev.state & fwd_state & tcp_state::FIN != 0;
    let last = if fwd_seen > rev.last_seen_ns {
        fwd_seen
    } else {
        rev.last_seen_ns
    };
    closed && now().saturating_sub(last) >= REUSE_AFTER_NS
}

/// Records a new hostPort flow `key` (client → node:hostPort) translated to
/// `pod_ip:container_port`, both directions; returns the forward entry.
#[inline(always)]
pub fn hostport_new(key: &NatKey, pod_ip: u32, container_port: u16) -> Result<NatEntry, ()> {
    let fwd = NatEntry {
        last_seen_ns: now(),
        addr: pod_ip,
        port: container_port,
        kind: nat_kind::REWRITE_DST,
        origin: nat_origin::HOSTPORT,
        state: 0,
        pad: [0; 7],
    };
    let rev_key = fwd.peer_key(key);
    let rev = reverse_of(key, &fwd);
    // The hostport map is authoritative: a stale entry for the same tuple is replaced.
    VPC_NAT
        .insert(rev_key, rev, u64::from(BPF_ANY))
        .map_err(|_| ())?;
    VPC_NAT
        .insert(key, fwd, u64::from(BPF_ANY))
        .map_err(|_| ())?;
    Ok(fwd)
}

/// A cheap mix of the tuple, so that flows spread over the port range.
#[inline(always)]
fn hash(k: &NatKey) -> u32 {
    let mut h = k.src_ip ^ k.dst_ip.rotate_left(7);
    h ^= (u32::from(k.src_port) << 16 | u32::from(k.dst_port)) ^ u32::from(k.proto);
    h = (h ^ (h >> 16)).wrapping_mul(0x7feb_352d);
    h = (h ^ (h >> 15)).wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}
