//! Bounds-checked packet access and header classification.

use aya_ebpf::programs::TcContext;
use network_types::{eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use vpc_ebpf_common::{counters::reason, nat::tcp_state};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Longest header chain the programs read: Ethernet + IPv4 with options + TCP with
/// options, or an ICMP error quoting IPv4 with options and a TCP header up to its checksum.
const MAX_HEADERS: u32 = 14 + 60 + 8 + 60 + 18;
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

/// Makes the headers the programs read linear: TC may see packets whose headers are
/// partly in paged fragments (GSO, some drivers). Only the headers are pulled, never
/// payload: every TCP segment is a clone of the socket's copy with its payload in
/// fragments, and pulling past the headers of a clone makes the kernel reallocate the
/// head and copy the payload in, on every packet. Pulls at most what exists, so short
/// packets stay short and are classified as truncated rather than failing here.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext) {
    let len = ctx.len();
    let linear = ctx.data_end() - ctx.data();
    // Most packets are linear throughout: nothing to work out.
    if linear >= len as usize {
        return;
    }
    let want = headers_len(ctx).min(len);
    if linear < want as usize {
        // A failure leaves the packet as it was; classification then reports truncation.
        let _ = ctx.pull_data(want);
    }
}

/// How many bytes from the frame's start the programs read: Ethernet, the IPv4 header
/// with its options and the L4 header up to the TCP flags and checksums; an ICMP error
/// also its quote. [`MAX_HEADERS`] when the fixed headers themselves are not linear yet.
#[inline(always)]
fn headers_len(ctx: &TcContext) -> u32 {
    const ETH_LEN: u32 = 14;
    const ARP_LEN: u32 = 28;
    const TCP_LEN: u32 = 20;
    const UDP_LEN: u32 = 8;
    const _: () = assert!(TcpHdr::LEN == 20 && UdpHdr::LEN == 8);
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return MAX_HEADERS;
    };
    // SAFETY: ptr_at checked the whole header.
    match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => {}
        ETH_P_ARP => return ETH_LEN + ARP_LEN,
        // Classified by the Ethernet header alone.
        _ => return ETH_LEN,
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, IP_OFF) else {
        return MAX_HEADERS;
    };
    // SAFETY: ptr_at checked the whole fixed header.
    let (vihl, frags, proto) = unsafe { ((*ip).vihl, (*ip).frags, (*ip).proto) };
    let l4 = ETH_LEN + u32::from(vihl & 0x0f) * 4;
    if u16::from_be_bytes(frags) & IP_OFFSET_MASK != 0 {
        return l4;
    }
    l4 + match proto {
        IPPROTO_TCP => TCP_LEN,
        IPPROTO_UDP => UDP_LEN,
        // An echo needs its 8 bytes; an error's quote is read too. Both are rare and
        // small, so the whole chain is asked for rather than parsing the type here.
        IPPROTO_ICMP => MAX_HEADERS - l4,
        _ => 0,
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

/// Where the IPv4 header starts (untagged Ethernet only: tagged frames go to the kernel).
pub const IP_OFF: usize = EthHdr::LEN;

pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// What the programs need of an IPv4 header, read once before any rewrite (rewrites
/// invalidate packet pointers).
#[derive(Clone, Copy)]
pub struct Ipv4 {
    /// Network order, as in the packet.
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    pub ttl: u8,
    /// Offset of the L4 header.
    pub l4: usize,
    /// More-fragments set or a non-zero offset: ports cannot be translated consistently.
    pub fragment: bool,
    /// A non-zero offset: no L4 header at all.
    pub later_fragment: bool,
    /// The identification field, raw bytes (network order): with the addresses and the
    /// protocol, which datagram a fragment belongs to.
    pub id: u16,
}

/// Parses the IPv4 header after an untagged Ethernet header; `Err` is the pass reason.
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Result<Ipv4, u16> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, IP_OFF).map_err(|()| reason::PASS_TRUNCATED_IPV4)?;
    // SAFETY: ptr_at checked that the whole fixed header lies inside the packet.
    let (vihl, frags, proto, ttl, src, dst, id) = unsafe {
        (
            (*ip).vihl,
            (*ip).frags,
            (*ip).proto,
            (*ip).ttl,
            (*ip).src_addr,
            (*ip).dst_addr,
            (*ip).id,
        )
    };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(reason::PASS_MALFORMED_IPV4);
    }
    // Options must be there too before anything is rewritten behind them.
    if ctx.data() + IP_OFF + ihl > ctx.data_end() {
        return Err(reason::PASS_TRUNCATED_IPV4);
    }
    let frags = u16::from_be_bytes(frags);
    Ok(Ipv4 {
        src: u32::from_ne_bytes(src),
        dst: u32::from_ne_bytes(dst),
        proto,
        ttl,
        l4: IP_OFF + ihl,
        fragment: frags & (IP_MF | IP_OFFSET_MASK) != 0,
        later_fragment: frags & IP_OFFSET_MASK != 0,
        id: u16::from_ne_bytes(id),
    })
}

/// The translatable part of an L4 header. Ports are host order; ICMP echo carries its
/// identifier as the source port of a request and the destination port of a reply.
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
    /// TCP flags byte (zero for UDP and ICMP).
    pub tcp_flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl Ports {
    /// The [`tcp_state`] of a flow entry once this packet is seen, from its state
    /// `before`: FIN and RST accumulate, and a SYN starts over (a new connection on a
    /// reused tuple, whose old FIN/RST would otherwise expire it as closing).
    #[inline(always)]
    pub fn next_state(self, before: u8) -> u8 {
        let mut seen = 0;
        if self.tcp_flags & TCP_FIN != 0 {
            seen |= tcp_state::FIN;
        }
        if self.tcp_flags & TCP_RST != 0 {
            seen |= tcp_state::RST;
        }
        if self.tcp_flags & TCP_SYN != 0 {
            seen
        } else {
            before | seen
        }
    }
}

/// Reads the ports of a TCP, UDP or ICMP echo packet. `Ok(None)`: no ports to translate
/// (another protocol, a later fragment, an ICMP message other than echo); `Err`: the L4
/// header is cut short (the pass reason).
#[inline(always)]
pub fn ports(ctx: &TcContext, ip: &Ipv4) -> Result<Option<Ports>, u16> {
    if ip.later_fragment {
        return Ok(None);
    }
    match ip.proto {
        IPPROTO_TCP => {
            let t = ptr_at::<TcpHdr>(ctx, ip.l4).map_err(|()| reason::PASS_TRUNCATED_IPV4)?;
            // SAFETY: ptr_at checked the whole header; byte 13 is the flags byte.
            let (s, d, flags) = unsafe { ((*t).source, (*t).dest, *(t.cast::<u8>().add(13))) };
            Ok(Some(Ports {
                src: u16::from_be_bytes(s),
                dst: u16::from_be_bytes(d),
                tcp_flags: flags,
            }))
        }
        IPPROTO_UDP => {
            let u = ptr_at::<UdpHdr>(ctx, ip.l4).map_err(|()| reason::PASS_TRUNCATED_IPV4)?;
            // SAFETY: ptr_at checked the whole header.
            let (s, d) = unsafe { ((*u).src, (*u).dst) };
            Ok(Some(Ports {
                src: u16::from_be_bytes(s),
                dst: u16::from_be_bytes(d),
                tcp_flags: 0,
            }))
        }
        IPPROTO_ICMP => {
            let i = ptr_at::<Icmpv4Hdr>(ctx, ip.l4).map_err(|()| reason::PASS_TRUNCATED_IPV4)?;
            // SAFETY: ptr_at checked the whole 8-byte header; the id is its bytes 4..6.
            let (ty, id) = unsafe { ((*i).type_, (*i).data) };
            let id = u16::from_be_bytes([id[0], id[1]]);
            Ok(match ty {
                ICMP_ECHO_REQUEST => Some(Ports {
                    src: id,
                    dst: 0,
                    tcp_flags: 0,
                }),
                ICMP_ECHO_REPLY => Some(Ports {
                    src: 0,
                    dst: id,
                    tcp_flags: 0,
                }),
                _ => None,
            })
        }
        _ => Ok(None),
    }
}
