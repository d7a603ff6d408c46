//! Connection tracking and translation of source-NATed and hostPort flows.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use vpc_ebpf_common::nat::{NatEntry, NatKey, SnatPorts, nat_kind, nat_origin, tcp_state};

use crate::{
    maps::VPC_NAT,
    packet::{IPPROTO_TCP, Ipv4, Ports, TCP_ACK, TCP_SYN},
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

/// Applies `e` to the packet: rewrites the source or destination address and port.
#[inline(always)]
pub fn apply(ctx: &TcContext, ip: &Ipv4, p: &Ports, e: &NatEntry) -> Result<(), ()> {
    if e.kind == nat_kind::REWRITE_SRC {
        rewrite::set_addr(ctx, ip, true, ip.src, e.addr)?;
        if p.src != e.port {
            rewrite::set_port(ctx, ip, true, p.src, e.port)?;
        }
    } else {
        rewrite::set_addr(ctx, ip, false, ip.dst, e.addr)?;
        if p.dst != e.port {
            rewrite::set_port(ctx, ip, false, p.dst, e.port)?;
        }
    }
    Ok(())
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
