//! Incremental Internet-checksum arithmetic (RFC 1624), shared by the programs and the
//! host tests that check it against a full recomputation.

/// The IPv4 header checksum after the TTL drops by one, from the checksum before
/// (both as read from the packet, big-endian).
///
/// TTL is the high byte of the 16-bit word it shares with the protocol, so the word
/// drops by 0x0100 and the one's-complement checksum, which stores the negated sum,
/// rises by 0x0100; the carry out of the top is added back in at the bottom.
#[must_use]
#[inline]
pub const fn ttl_decremented(check: u16) -> u16 {
    let sum = check as u32 + 0x0100;
    #[expect(clippy::cast_possible_truncation, reason = "one fold fits in 16 bits")]
    let folded = ((sum & 0xffff) + (sum >> 16)) as u16;
    folded
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum a router computes from scratch for a 20-byte header.
    fn full(h: &[u8; 20]) -> u16 {
        let mut sum = 0u32;
        for (i, w) in h.chunks(2).enumerate() {
            if i != 5 {
                sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !u16::try_from(sum).expect("folded")
    }

    /// Every TTL with a header sum chosen to land the checksum everywhere in its range,
    /// carries included: the incremental update must verify like a full recomputation.
    #[test]
    fn matches_a_full_recomputation() {
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[9] = 6;
        for ttl in 2..=255u8 {
            for filler in (0..=0xffffu16).step_by(7) {
                h[8] = ttl;
                h[12..14].copy_from_slice(&filler.to_be_bytes());
                let before = full(&h);
                h[10..12].copy_from_slice(&before.to_be_bytes());
                h[8] = ttl - 1;
                let after = ttl_decremented(before);
                h[10..12].copy_from_slice(&after.to_be_bytes());
                // A receiver sums all words, checksum included: all ones means valid.
                let mut sum = 0u32;
                for w in h.chunks(2) {
                    sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
                }
                while sum > 0xffff {
                    sum = (sum & 0xffff) + (sum >> 16);
                }
                assert_eq!(sum, 0xffff, "ttl {ttl} check {before:#06x} -> {after:#06x}");
            }
        }
    }
}
