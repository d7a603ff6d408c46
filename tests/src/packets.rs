//! Hand-built Ethernet frames for BPF_PROG_TEST_RUN tests.

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_LLDP: u16 = 0x88CC;

pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub fn eth(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Options for [`ipv4`]: everything a test may want to break.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub version: u8,
    /// Header length in 32-bit words (5 without options).
    pub ihl: u8,
    pub proto: u8,
    /// Flags and fragment offset, host order.
    pub frag: u16,
    /// Identification, host order.
    pub id: u16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Default for Ipv4 {
    fn default() -> Self {
        Self {
            version: 4,
            ihl: 5,
            proto: 17,
            frag: 0x4000, // DF
            id: 0,
            src: [192, 0, 2, 1],
            dst: [192, 0, 2, 2],
        }
    }
}

/// An IPv4 packet (header with zeroed options, correct checksum) around `l4`.
pub fn ipv4(h: &Ipv4, l4: &[u8]) -> Vec<u8> {
    let hlen = usize::from(h.ihl.max(5)) * 4;
    let total = u16::try_from(hlen + l4.len()).expect("packet fits in u16");
    let mut p = vec![0u8; hlen];
    p[0] = (h.version << 4) | (h.ihl & 0x0f);
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[4..6].copy_from_slice(&h.id.to_be_bytes());
    p[6..8].copy_from_slice(&h.frag.to_be_bytes());
    p[8] = 64;
    p[9] = h.proto;
    p[12..16].copy_from_slice(&h.src);
    p[16..20].copy_from_slice(&h.dst);
    let csum = checksum(&p);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("fits");
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

pub fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t
}

pub fn icmp_echo(id: u16, seq: u16) -> Vec<u8> {
    let mut i = vec![8, 0, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&seq.to_be_bytes());
    let c = checksum(&i);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    i
}

/// An ICMP error (`ty` 3 destination unreachable, 11 time exceeded, ...) quoting
/// `quoted` (the offending packet's IPv4 header and as much of the rest as wanted), with
/// its checksum.
pub fn icmp_error(ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut i = vec![ty, code, 0, 0, 0, 0, 0, 0];
    i.extend_from_slice(quoted);
    let c = checksum(&i);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    i
}

/// ARP who-has `target` from `sender`.
pub fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&SRC_MAC);
    a.extend_from_slice(&sender);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target);
    a
}

/// An Ethernet frame with the given addresses.
pub fn eth_with(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = eth(ether_type, payload);
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

/// ARP who-has `target` from (`sha`, `spa`).
pub fn arp_request_from(sha: [u8; 6], spa: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut a = arp_request(spa, target);
    a[8..14].copy_from_slice(&sha);
    a
}

/// A TCP segment with `flags` (0x02 SYN, 0x10 ACK, ...), no payload.
pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = tcp_syn(sport, dport);
    t[13] = flags;
    t
}

/// Fills in the TCP, UDP or ICMP checksum of a whole IPv4 packet (header included).
pub fn fill_l4_checksum(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let off = match p[9] {
        6 => 16,
        17 => 6,
        1 => 2,
        _ => return,
    };
    p[ihl + off] = 0;
    p[ihl + off + 1] = 0;
    let c = l4_checksum(p);
    p[ihl + off..ihl + off + 2].copy_from_slice(&c.to_be_bytes());
}

/// The checksum the L4 header of IPv4 packet `p` should carry (computed with its own
/// checksum field as is: a correct packet gives 0).
pub fn l4_checksum(p: &[u8]) -> u16 {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let l4 = &p[ihl..total];
    let mut buf = Vec::new();
    if p[9] != 1 {
        buf.extend_from_slice(&p[12..20]);
        buf.push(0);
        buf.push(p[9]);
        buf.extend_from_slice(&u16::try_from(l4.len()).expect("fits").to_be_bytes());
    }
    buf.extend_from_slice(l4);
    checksum(&buf)
}

/// Asserts that the IPv4 header checksum and the L4 checksum of the IPv4 packet inside
/// Ethernet frame `f` are right (a zero UDP checksum means none and is accepted).
pub fn assert_checksums(f: &[u8]) {
    let p = &f[14..];
    let ihl = usize::from(p[0] & 0x0f) * 4;
    assert_eq!(checksum(&p[..ihl]), 0, "IPv4 header checksum of {f:02x?}");
    if p[9] == 17 && p[ihl + 6..ihl + 8] == [0, 0] {
        return;
    }
    if matches!(p[9], 1 | 6 | 17) {
        assert_eq!(l4_checksum(p), 0, "L4 checksum of {f:02x?}");
    }
}

/// Splits the IPv4 packet `p` (no options) into two fragments of datagram `id`, the
/// first carrying `at` bytes of its L4 part (a multiple of 8); headers and their
/// checksums as a sender's stack writes them.
pub fn fragments(p: &[u8], id: u16, at: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(at % 8, 0, "fragment offsets count 8-byte units");
    let piece = |l4: &[u8], frag: u16| {
        let mut f = ipv4(
            &Ipv4 {
                proto: p[9],
                frag,
                id,
                src: p[12..16].try_into().unwrap(),
                dst: p[16..20].try_into().unwrap(),
                ..Ipv4::default()
            },
            l4,
        );
        f[8] = p[8];
        f[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&f[..20]);
        f[10..12].copy_from_slice(&c.to_be_bytes());
        f
    };
    let offset = u16::try_from(at / 8).expect("fits");
    (piece(&p[20..20 + at], 0x2000), piece(&p[20 + at..], offset))
}

/// The datagram two fragments (Ethernet frames) make once reassembled, as the receiver
/// sees it: the first's header, unfragmented, with both payloads.
pub fn reassembled(first: &[u8], later: &[u8]) -> Vec<u8> {
    let mut l4 = first[14 + 20..].to_vec();
    l4.extend_from_slice(&later[14 + 20..]);
    let mut p = ipv4(
        &Ipv4 {
            proto: first[14 + 9],
            frag: 0,
            src: first[14 + 12..14 + 16].try_into().unwrap(),
            dst: first[14 + 16..14 + 20].try_into().unwrap(),
            ..Ipv4::default()
        },
        &l4,
    );
    let mut f = first[..14].to_vec();
    f.append(&mut p);
    f
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
}

/// An IPv4 packet from `src` to `dst` around `l4`, every checksum filled in.
pub fn ipv4_between(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut p = ipv4(
        &Ipv4 {
            proto,
            src: src.octets(),
            dst: dst.octets(),
            ..Ipv4::default()
        },
        l4,
    );
    fill_l4_checksum(&mut p);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        let p = ipv4(&Ipv4::default(), &udp(1, 2, b"x"));
        assert_eq!(checksum(&p[..20]), 0);
        assert_eq!(p.len(), 20 + 9);
    }

    #[test]
    fn options_extend_the_header() {
        let h = Ipv4 {
            ihl: 6,
            ..Ipv4::default()
        };
        let p = ipv4(&h, &udp(1, 2, b""));
        assert_eq!(p[0], 0x46);
        assert_eq!(p.len(), 24 + 8);
    }
}
