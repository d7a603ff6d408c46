//! Bounds-checked packet access and header classification.

use aya_ebpf::programs::TcContext;
use network_types::{eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use vpc_ebpf_common::counters::reason;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Longest header chain the programs read: Ethernet + IPv4 with options + TCP with options.
const MAX_HEADERS: u32 = 14 + 60 + 60;
const _: () = assert!(EthHdr::LEN == 14);

/// Returns a pointer to a `T` at `offset` into the packet, or `Err` when the packet's
/// linear data ends before the whole `T`. The only way programs read packet bytes.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

/// Makes the headers readable: TC may see packets whose headers are partly in paged
/// fragments (GSO, some drivers). Pulls at most what exists, so short packets stay short
/// and are classified as truncated rather than failing here.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext) {
    let len = ctx.len();
    let want = if len < MAX_HEADERS { len } else { MAX_HEADERS };
    let linear = ctx.data_end() - ctx.data();
    if linear < want as usize {
        // A failure leaves the packet as it was; classification then reports truncation.
        let _ = ctx.pull_data(want);
    }
}

/// Classifies the frame into a [`reason`] code without changing it.
#[inline(always)]
pub fn classify(ctx: &TcContext) -> u16 {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return reason::PASS_TRUNCATED_ETH;
    };
    // SAFETY: ptr_at checked that the whole header lies inside the packet.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    match ether_type {
        ETH_P_IP => classify_ipv4(ctx, EthHdr::LEN),
        ETH_P_ARP => reason::PASS_ARP,
        ETH_P_IPV6 => reason::PASS_IPV6,
        ETH_P_8021Q | ETH_P_8021AD => reason::PASS_VLAN,
        _ => reason::PASS_OTHER_ETHERTYPE,
    }
}

#[inline(always)]
fn classify_ipv4(ctx: &TcContext, offset: usize) -> u16 {
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, offset) else {
        return reason::PASS_TRUNCATED_IPV4;
    };
    // SAFETY: ptr_at checked that the whole fixed header lies inside the packet.
    let (vihl, frags, proto) = unsafe { ((*ip).vihl, (*ip).frags, (*ip).proto) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return reason::PASS_MALFORMED_IPV4;
    }
    if u16::from_be_bytes(frags) & 0x1fff != 0 {
        return reason::PASS_IPV4_FRAGMENT;
    }
    let l4 = offset + ihl;
    let complete = match proto {
        IPPROTO_TCP => ptr_at::<TcpHdr>(ctx, l4).is_ok(),
        IPPROTO_UDP => ptr_at::<UdpHdr>(ctx, l4).is_ok(),
        IPPROTO_ICMP => ptr_at::<Icmpv4Hdr>(ctx, l4).is_ok(),
        _ => return reason::PASS_IPV4_OTHER,
    };
    if !complete {
        return reason::PASS_TRUNCATED_IPV4;
    }
    match proto {
        IPPROTO_TCP => reason::PASS_IPV4_TCP,
        IPPROTO_UDP => reason::PASS_IPV4_UDP,
        _ => reason::PASS_IPV4_ICMP,
    }
}
