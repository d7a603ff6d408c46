//! Packet rewrites that keep every checksum right, and the redirect helpers.
//!
//! Callers read everything they need first: each function here may move the packet data,
//! so no packet pointer survives a call.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_REDIRECT, bpf_redir_neigh,
        bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};

use vpc_ebpf_common::{csum, node::VIA_HOST_QDISC_MARK};

use crate::packet::{IP_OFF, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Ipv4, ptr_at};

const IP_CSUM: usize = IP_OFF + 10;
const IP_TTL: usize = IP_OFF + 8;
const IP_SRC: usize = IP_OFF + 12;
const IP_DST: usize = IP_OFF + 16;
const AF_INET: u32 = 2;

/// Offset of the L4 checksum and the extra `l4_csum_replace` flags it needs, if the
/// protocol has one that covers what is rewritten.
#[inline(always)]
fn l4_csum(ip: &Ipv4) -> Option<(usize, u64)> {
    match ip.proto {
        IPPROTO_TCP => Some((ip.l4 + 16, 0)),
        // A zero UDP checksum means "none" and must stay zero; a computed zero is sent as
        // 0xffff. MARK_MANGLED_0 does both.
        IPPROTO_UDP => Some((ip.l4 + 6, u64::from(BPF_F_MARK_MANGLED_0))),
        IPPROTO_ICMP => Some((ip.l4 + 2, 0)),
        _ => None,
    }
}

/// Replaces the source (`src`) or destination address, fixing the IPv4 header checksum
/// and the TCP/UDP checksum (whose pseudo-header covers addresses; ICMP's does not).
#[inline(always)]
pub fn set_addr(ctx: &TcContext, ip: &Ipv4, src: bool, old: u32, new: u32) -> Result<(), ()> {
    let off = if src { IP_SRC } else { IP_DST };
    ctx.store(off, &new, 0).map_err(|_| ())?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 4)
        .map_err(|_| ())?;
    // A later fragment has no L4 header; callers never translate fragments anyway.
    if ip.proto != IPPROTO_ICMP
        && !ip.later_fragment
        && let Some((csum, flags)) = l4_csum(ip)
    {
        ctx.l4_csum_replace(
            csum,
            u64::from(old),
            u64::from(new),
            flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
        )
        .map_err(|_| ())?;
    }
    Ok(())
}

/// Replaces the source (`src`) or destination port (host order in, network order
/// written); for ICMP echo both are the identifier.
#[inline(always)]
pub fn set_port(ctx: &TcContext, ip: &Ipv4, src: bool, old: u16, new: u16) -> Result<(), ()> {
    let off = match ip.proto {
        IPPROTO_ICMP => ip.l4 + 4,
        _ if src => ip.l4,
        _ => ip.l4 + 2,
    };
    let (old, new) = (old.to_be(), new.to_be());
    ctx.store(off, &new, 0).map_err(|_| ())?;
    if let Some((csum, flags)) = l4_csum(ip) {
        ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), flags | 2)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// A writable view of the `T` at `offset`, bounds-checked by [`ptr_at`]. The per-packet
/// rewrites of forwarding (TTL, MACs) store directly: a store helper is a call that
/// re-checks writability each time, where a program that writes directly has the kernel
/// make the packet writable once, before it starts.
#[inline(always)]
fn mut_at<T>(ctx: &TcContext, offset: usize) -> Result<*mut T, ()> {
    ptr_at::<T>(ctx, offset).map(<*const T>::cast_mut)
}

/// Decrements the TTL as a router does. The caller hands TTL <= 1 to the kernel, which
/// sends the ICMP time-exceeded.
#[inline(always)]
pub fn dec_ttl(ctx: &TcContext, ip: &Ipv4) -> Result<(), ()> {
    // Bytes 8..12 of the IPv4 header: TTL, protocol, checksum.
    let h = mut_at::<[u8; 4]>(ctx, IP_TTL)?;
    // SAFETY: mut_at checked that the 4 bytes lie inside the packet, which the kernel
    // made writable for this program.
    unsafe {
        let check = u16::from_be_bytes([(*h)[2], (*h)[3]]);
        let [hi, lo] = csum::ttl_decremented(check).to_be_bytes();
        *h = [ip.ttl.wrapping_sub(1), (*h)[1], hi, lo];
    }
    Ok(())
}

/// Rewrites the Ethernet addresses (no checksum covers them).
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), ()> {
    let eth = mut_at::<[u8; 12]>(ctx, 0)?;
    // SAFETY: as in dec_ttl.
    unsafe {
        (*eth.cast::<[u8; 6]>()) = *dst;
        (*eth.cast::<[u8; 6]>().add(1)) = *src;
    }
    Ok(())
}

/// Delivers into the network namespace of the veth whose host side is `host_ifindex`,
/// straight to its peer's ingress (no backlog queue, no host stack). TC ingress only.
#[inline(always)]
pub fn to_peer(host_ifindex: u32) -> Result<i32, ()> {
    // SAFETY: a plain helper call.
    let rc = unsafe { bpf_redirect_peer(host_ifindex, 0) };
    verdict(rc)
}

/// Sends out of the host veth `host_ifindex` (to the pod behind it) through its egress
/// qdisc, marked so that the veth's egress program passes it on untouched
/// ([`VIA_HOST_QDISC_MARK`]). Costs the qdisc and a backlog hop that
/// [`to_peer`] avoids; used only for pods with a limit there.
#[inline(always)]
pub fn through_host_veth(ctx: &TcContext, host_ifindex: u32) -> Result<i32, ()> {
    // SAFETY: the kernel hands every TC program a valid __sk_buff, whose mark TC
    // programs may write.
    unsafe { (*ctx.skb.skb).mark = VIA_HOST_QDISC_MARK };
    to_egress(host_ifindex)
}

/// Sends out of `ifindex` to `gateway` (network order), the kernel's neighbour table
/// resolving (and, when needed, asking ARP for) the gateway's MAC.
#[inline(always)]
pub fn to_gateway(ifindex: u32, gateway: u32) -> Result<i32, ()> {
    let mut nh = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: gateway },
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        reason = "20 bytes"
    )]
    let len = core::mem::size_of::<bpf_redir_neigh>() as i32;
    // SAFETY: `nh` is a valid bpf_redir_neigh of `len` bytes on the stack.
    let rc = unsafe { bpf_redirect_neigh(ifindex, &raw mut nh, len, 0) };
    verdict(rc)
}

/// Sends out of `ifindex` (egress) as is.
#[inline(always)]
pub fn to_egress(ifindex: u32) -> Result<i32, ()> {
    // SAFETY: a plain helper call.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    verdict(rc)
}

#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "TC verdicts are small ints"
)]
fn verdict(rc: i64) -> Result<i32, ()> {
    if rc == i64::from(TC_ACT_REDIRECT) {
        Ok(rc as i32)
    } else {
        Err(())
    }
}
