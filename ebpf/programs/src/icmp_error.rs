//! ICMP errors (destination unreachable, time exceeded, parameter problem) about
//! translated flows. The error quotes the packet as it left the node, i.e. already
//! translated, so the pod would not recognise it: the outer destination and the quoted
//! source (address and port, or echo identifier) are translated back, with the outer IPv4
//! checksum, the quoted IPv4 checksum, the quoted L4 checksum when it was quoted, and the
//! ICMP checksum over all of it kept right.
//!
//! Checksums are updated incrementally (RFC 1624) in software rather than with the
//! `*_csum_replace` helpers: the quoted headers' checksums are plain payload to the
//! kernel, and the ICMP checksum has to absorb every change made inside the quote,
//! including the changes to the quoted checksums themselves.

use aya_ebpf::programs::TcContext;
use network_types::{icmp::Icmpv4Hdr, ip::Ipv4Hdr};
use vpc_ebpf_common::{
    counters::reason,
    nat::{NatKey, nat_kind},
    node::NodeConfig,
};

use crate::{
    deliver,
    maps::{VPC_ENDPOINTS, VPC_ENIS, VPC_KFLOWS, VPC_NAT},
    packet::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Ipv4, ptr_at},
    rewrite,
    verdict::{DROP, Outcome, PASS},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_ECHO_REQUEST: u8 = 8;

/// The first 8 bytes of the quoted L4 header, all an error is sure to carry (RFC 792).
/// TCP/UDP: source and destination ports first; ICMP echo: type and code, checksum,
/// identifier.
#[repr(C)]
struct Quoted8 {
    w0: [u8; 2],
    w1: [u8; 2],
    w2: [u8; 2],
    w3: [u8; 2],
}

/// The ICMP checksum of `ip` when it is an error that quotes a packet (destination
/// unreachable, time exceeded, parameter problem); `None` for anything else.
#[inline(always)]
fn error_checksum(ctx: &TcContext, ip: &Ipv4) -> Option<[u8; 2]> {
    let icmp = ptr_at::<Icmpv4Hdr>(ctx, ip.l4).ok()?;
    // SAFETY: ptr_at checked the whole 8-byte header.
    let (ty, icmp_csum) = unsafe { ((*icmp).type_, (*icmp).check) };
    (ty == ICMP_DEST_UNREACH || ty == ICMP_TIME_EXCEEDED || ty == ICMP_PARAMETER_PROBLEM)
        .then_some(icmp_csum)
}

/// `Some`: the packet is an ICMP error and this is what became of it; `None`: not an
/// error (the caller goes on).
#[inline(always)]
pub fn translate(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4) -> Option<Outcome> {
    let icmp_csum = error_checksum(ctx, ip)?;
    Some(match translate_error(ctx, cfg, ip, icmp_csum) {
        Ok(o) => o,
        Err(r) => (r, PASS),
    })
}

/// Whether `ip`, addressed to a pod, is an ICMP error about a flow the pod sent into the
/// host stack (a Service that kube-proxy translated to a backend elsewhere): the quote
/// holds the backend, not the Service address the pod knows, and only the kernel's conntrack can put it
/// back, so such an error must go through the host stack like the flow's replies do.
#[inline(always)]
pub fn about_kernel_flow(ctx: &TcContext, ip: &Ipv4) -> bool {
    if error_checksum(ctx, ip).is_none() {
        return false;
    }
    let Ok(q) = quote(ctx, ip) else {
        return false;
    };
    u32::from_ne_bytes(q.src) == ip.dst
        && VPC_KFLOWS
            .get_ptr(NatKey::pod_port(ip.dst, q.sport, q.proto))
            .is_some()
}

/// The quoted packet's tuple and where its fields are.
struct Quote {
    ip_off: usize,
    l4_off: usize,
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    ip_csum: [u8; 2],
    /// Ports in host order, as in [`NatKey`]; for ICMP echo `(id, 0)`.
    sport: u16,
    dport: u16,
}

#[inline(always)]
fn quote(ctx: &TcContext, ip: &Ipv4) -> Result<Quote, u16> {
    let ip_off = ip.l4 + Icmpv4Hdr::LEN;
    let q = ptr_at::<Ipv4Hdr>(ctx, ip_off).map_err(|()| reason::PASS_ICMP_ERROR_UNKNOWN)?;
    // SAFETY: ptr_at checked the whole fixed header.
    let (vihl, frags, proto, src, dst, ip_csum) = unsafe {
        (
            (*q).vihl,
            (*q).frags,
            (*q).proto,
            (*q).src_addr,
            (*q).dst_addr,
            (*q).check,
        )
    };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(reason::PASS_ICMP_ERROR_UNKNOWN);
    }
    // A quoted later fragment has no ports to find the flow by.
    if u16::from_be_bytes(frags) & 0x1fff != 0 {
        return Err(reason::PASS_ICMP_ERROR_UNKNOWN);
    }
    let l4_off = ip_off + ihl;
    let l4 = ptr_at::<Quoted8>(ctx, l4_off).map_err(|()| reason::PASS_ICMP_ERROR_UNKNOWN)?;
    // SAFETY: ptr_at checked the 8 bytes.
    let (s, d, w2) = unsafe { ((*l4).w0, (*l4).w1, (*l4).w2) };
    let (sport, dport) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (u16::from_be_bytes(s), u16::from_be_bytes(d)),
        // Only our own echo requests were translated; the identifier is bytes 4..6.
        IPPROTO_ICMP if s[0] == ICMP_ECHO_REQUEST => (u16::from_be_bytes(w2), 0),
        _ => return Err(reason::PASS_ICMP_ERROR_UNKNOWN),
    };
    Ok(Quote {
        ip_off,
        l4_off,
        src,
        dst,
        proto,
        ip_csum,
        sport,
        dport,
    })
}

#[inline(always)]
fn translate_error(
    ctx: &TcContext,
    cfg: &NodeConfig,
    ip: &Ipv4,
    icmp_csum: [u8; 2],
) -> Result<Outcome, u16> {
    let q = quote(ctx, ip)?;
    // The quote left this node from the node address: it is the translated side of a
    // flow, whose reverse tuple is what the NAT table holds for the replies.
    if u32::from_ne_bytes(q.src) != cfg.node_ip || ip.dst != cfg.node_ip {
        return Err(reason::PASS_ICMP_ERROR_UNKNOWN);
    }
    let reply_key = NatKey::new(
        u32::from_ne_bytes(q.dst),
        u32::from_ne_bytes(q.src),
        q.dport,
        q.sport,
        q.proto,
    );
    // Read-only: an error does not keep a flow alive.
    // SAFETY: read-only copy of a map value.
    let e = unsafe { VPC_NAT.get(reply_key) }
        .copied()
        .ok_or(reason::PASS_ICMP_ERROR_UNKNOWN)?;
    if e.kind != nat_kind::REWRITE_DST {
        return Err(reason::PASS_ICMP_ERROR_UNKNOWN);
    }
    // SAFETY: read-only copy of a map value.
    let Some(pod) = unsafe { VPC_ENDPOINTS.get(e.addr) }.copied() else {
        return Err(reason::PASS_NAT_STALE);
    };
    if ip.ttl <= 1 {
        return Err(reason::PASS_TTL_EXPIRED);
    }

    let quote_ok = rewrite_quote(
        ctx,
        &q,
        Side::Source,
        icmp_csum,
        (e.addr.to_ne_bytes(), e.port),
    );
    if quote_ok.is_err() || rewrite::set_addr(ctx, ip, false, ip.dst, e.addr).is_err() {
        return Ok((reason::DROP_REWRITE_FAILED, DROP));
    }
    let mut out = *ip;
    out.dst = e.addr;
    Ok(deliver::to_pod(ctx, &out, &pod, reason::FWD_ICMP_ERROR_NAT))
}

/// An ICMP error a pod sends about a packet it received through a translation (a hostPort
/// DNAT, or a reply to one of its source-NATed flows): the quote holds the pod's address and
/// port, which the far end never saw. They become the node address and port it did see,
/// so does the error's source, and the error leaves the way the flow's packets do. `None`:
/// not an error about a translated flow, which the caller routes like any packet.
#[inline(always)]
pub fn translate_from_pod(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4) -> Option<Outcome> {
    let icmp_csum = error_checksum(ctx, ip)?;
    pod_error(ctx, cfg, ip, icmp_csum).ok()
}

#[inline(always)]
fn pod_error(
    ctx: &TcContext,
    cfg: &NodeConfig,
    ip: &Ipv4,
    icmp_csum: [u8; 2],
) -> Result<Outcome, u16> {
    let q = quote(ctx, ip)?;
    // About a packet the pod received: the quote's destination is the pod. Pods' own echo
    // requests are never translated inbound, so only TCP and UDP quotes qualify.
    if u32::from_ne_bytes(q.dst) != ip.src || q.proto == IPPROTO_ICMP || ip.ttl <= 1 {
        return Err(reason::PASS_ICMP_ERROR_UNKNOWN);
    }
    // The pod's replies on that flow: what they are translated with.
    let reply_key = NatKey::new(ip.src, u32::from_ne_bytes(q.src), q.dport, q.sport, q.proto);
    // Read in place and left alone: an error does not keep a flow alive.
    // SAFETY: a valid map value.
    let e = unsafe { VPC_NAT.get(reply_key) }.ok_or(reason::PASS_ICMP_ERROR_UNKNOWN)?;
    if e.kind != nat_kind::REWRITE_SRC || e.addr != cfg.node_ip {
        return Err(reason::PASS_ICMP_ERROR_UNKNOWN);
    }
    let (addr, port) = (e.addr, e.port);
    // Where it goes is settled before the packet is touched: to a pod of this node, or
    // out of the primary ENI, which owns the node address.
    // SAFETY: valid map values, read in place.
    let peer = unsafe { VPC_ENDPOINTS.get(ip.dst) };
    let gateway = match (peer, unsafe { VPC_ENIS.get(cfg.primary_eni_ifindex) }) {
        (Some(_), _) => 0,
        (None, Some(eni)) => eni.gateway_ip,
        (None, None) => return Ok((reason::DROP_NO_ENI, DROP)),
    };
    let quote_ok = rewrite_quote(
        ctx,
        &q,
        Side::Destination,
        icmp_csum,
        (addr.to_ne_bytes(), port),
    );
    if quote_ok.is_err() || rewrite::set_addr(ctx, ip, true, ip.src, addr).is_err() {
        return Ok((reason::DROP_REWRITE_FAILED, DROP));
    }
    // Forwarding reads only the TTL of `ip`, which the translation left alone.
    Ok(match peer {
        Some(peer) => deliver::to_pod(ctx, ip, peer, reason::FWD_ICMP_ERROR_NAT),
        None => deliver::to_gateway(
            ctx,
            ip,
            cfg.primary_eni_ifindex,
            gateway,
            reason::FWD_ICMP_ERROR_NAT,
        ),
    })
}

/// Which end of the quoted packet a translation rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Rewrites one end (address and port, or echo identifier) of the quoted packet to `to`,
/// with the quoted IPv4 checksum, the quoted L4 checksum when it is there, and the ICMP
/// checksum over all of it. Everything is computed before the first byte is written.
#[inline(always)]
fn rewrite_quote(
    ctx: &TcContext,
    q: &Quote,
    side: Side,
    icmp_csum: [u8; 2],
    (new_addr, new_port): ([u8; 4], u16),
) -> Result<(), ()> {
    let (old_addr, old_port, addr_off, port_off) = match side {
        Side::Source if q.proto == IPPROTO_ICMP => (q.src, q.sport, 12, q.l4_off + 4),
        Side::Source => (q.src, q.sport, 12, q.l4_off),
        Side::Destination => (q.dst, q.dport, 16, q.l4_off + 2),
    };
    let old_port = old_port.to_be_bytes();
    let new_port = new_port.to_be_bytes();
    let ip_csum = replace32(q.ip_csum, old_addr, new_addr);
    let mut icmp = replace32(icmp_csum, old_addr, new_addr);
    icmp = replace16(icmp, q.ip_csum, ip_csum);
    icmp = replace16(icmp, old_port, new_port);
    let l4_csum = quoted_l4_csum(ctx, q).map(|(off, old)| {
        let mut new = old;
        if q.proto != IPPROTO_ICMP {
            // TCP and UDP checksums cover the addresses through the pseudo-header.
            new = replace32(new, old_addr, new_addr);
        }
        new = replace16(new, old_port, new_port);
        if q.proto == IPPROTO_UDP && new == [0, 0] {
            // Zero means "no checksum" in UDP; a computed zero is sent as all ones.
            new = [0xff, 0xff];
        }
        icmp = replace16(icmp, old, new);
        (off, new)
    });
    let failed = ctx.store(q.ip_off + addr_off, &new_addr, 0).is_err()
        || ctx.store(q.ip_off + 10, &ip_csum, 0).is_err()
        || ctx.store(port_off, &new_port, 0).is_err()
        || l4_csum.is_some_and(|(off, c)| ctx.store(off, &c, 0).is_err())
        || ctx.store(q.ip_off - Icmpv4Hdr::LEN + 2, &icmp, 0).is_err();
    if failed { Err(()) } else { Ok(()) }
}

/// Offset and value of the quoted L4 checksum, when the quote holds one that must follow
/// the translation: UDP's (unless zero, "none") and ICMP echo's are in the 8 bytes every
/// error quotes; TCP's is at bytes 16..18, present only when the sender quoted more, and
/// left alone otherwise (as Linux's NAT does).
#[inline(always)]
fn quoted_l4_csum(ctx: &TcContext, q: &Quote) -> Option<(usize, [u8; 2])> {
    let off = match q.proto {
        IPPROTO_TCP => q.l4_off + 16,
        IPPROTO_UDP => q.l4_off + 6,
        _ => q.l4_off + 2,
    };
    let c = ptr_at::<[u8; 2]>(ctx, off).ok()?;
    // SAFETY: ptr_at checked both bytes.
    let c = unsafe { *c };
    if q.proto == IPPROTO_UDP && c == [0, 0] {
        return None;
    }
    Some((off, c))
}

/// RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`, on 16-bit words as they lie in the packet
/// (one's-complement sums do not depend on byte order, so no swapping is needed).
#[inline(always)]
fn replace16(hc: [u8; 2], old: [u8; 2], new: [u8; 2]) -> [u8; 2] {
    let mut s = u32::from(!u16::from_ne_bytes(hc))
        + u32::from(!u16::from_ne_bytes(old))
        + u32::from(u16::from_ne_bytes(new));
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits")]
    let folded = s as u16;
    (!folded).to_ne_bytes()
}

#[inline(always)]
fn replace32(hc: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let hc = replace16(hc, [old[0], old[1]], [new[0], new[1]]);
    replace16(hc, [old[2], old[3]], [new[2], new[3]])
}
