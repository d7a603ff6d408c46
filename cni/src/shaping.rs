//! The tbf that limits what a pod sends, worked out from the `bandwidth` capability.
//!
//! The `bandwidth` plugin limits a pod's egress with an ifb device fed by a mirred
//! redirect on the host veth's tc ingress; the dataplane redirects the pod's packets at
//! that hook before the mirred filter runs, so the plugin's egress limit never applies.
//! vpc-ebpf puts the same limit on the pod's own interface instead: the same token
//! bucket, enforced where the packets are made (which also pushes back on the sending
//! socket rather than dropping). A pod with `NET_ADMIN` could remove it; such a pod can
//! do worse to its own network anyway.

use crate::spec::config::Limit;

/// A tbf's settings, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tbf {
    pub rate_bytes: u64,
    /// The bucket: how much may leave at once after a quiet spell.
    pub burst_bytes: u32,
    /// The queue behind the bucket.
    pub limit_bytes: u32,
}

/// The `bandwidth` plugin hands the kernel its bucket as a time (in scheduler ticks),
/// which the kernel caps at 2^32 - 1 ns: its bucket never holds more than this much
/// of the rate, whatever burst was asked for (containerd asks for 4 Gibit).
const MAX_BUCKET_NS: u128 = u32::MAX as u128;
/// The plugin's queue: 25 ms at the rate, behind the bucket.
const QUEUE_MS: u64 = 25;

/// The tbf for `limit`, as the `bandwidth` plugin sets its own up; the bucket holds at
/// least one frame of `mtu` bytes, or larger frames could never leave.
pub fn tbf(limit: Limit, mtu: u32) -> Tbf {
    let rate_bytes = (limit.rate_bps / 8).max(1);
    let capped = u128::from(rate_bytes) * MAX_BUCKET_NS / 1_000_000_000;
    let frame = u64::from(mtu) + 14;
    let burst = (limit.burst_bits / 8)
        .min(u64::try_from(capped).unwrap_or(u64::MAX))
        .max(frame);
    let burst_bytes = u32::try_from(burst).unwrap_or(u32::MAX);
    let queue = rate_bytes.saturating_mul(QUEUE_MS) / 1000;
    Tbf {
        rate_bytes,
        burst_bytes,
        limit_bytes: u32::try_from(queue.saturating_add(u64::from(burst_bytes)))
            .unwrap_or(u32::MAX),
    }
}

const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
const TC_LINKLAYER_ETHERNET: u8 = 1;

/// The tbf's `TCA_OPTIONS` attributes: (type, payload). `TCA_TBF_PARMS` is
/// `struct tc_tbf_qopt` (rate and peak rate `tc_ratespec`s, limit, buffer, mtu); the
/// bucket goes as `TCA_TBF_BURST` in bytes, which the kernel turns into time itself.
pub fn tbf_attributes(t: &Tbf) -> Vec<(u16, Vec<u8>)> {
    let mut parms = Vec::with_capacity(36);
    // rate: cell_log, linklayer, overhead, cell_align, mpu, rate (bytes/s, or the
    // 64-bit attribute when it does not fit).
    parms.extend_from_slice(&[0, TC_LINKLAYER_ETHERNET]);
    parms.extend_from_slice(&0u16.to_ne_bytes());
    parms.extend_from_slice(&0i16.to_ne_bytes());
    parms.extend_from_slice(&0u16.to_ne_bytes());
    parms.extend_from_slice(
        &u32::try_from(t.rate_bytes)
            .unwrap_or(u32::MAX)
            .to_ne_bytes(),
    );
    // No peak rate.
    parms.extend_from_slice(&[0; 12]);
    parms.extend_from_slice(&t.limit_bytes.to_ne_bytes());
    // buffer and mtu: replaced by TCA_TBF_BURST, unused without a peak rate.
    parms.extend_from_slice(&[0; 8]);
    let mut attrs = vec![(TCA_TBF_PARMS, parms)];
    if t.rate_bytes >= u64::from(u32::MAX) {
        attrs.push((TCA_TBF_RATE64, t.rate_bytes.to_ne_bytes().to_vec()));
    }
    attrs.push((TCA_TBF_BURST, t.burst_bytes.to_ne_bytes().to_vec()));
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate_bps: u64, burst_bits: u64) -> Limit {
        Limit {
            rate_bps,
            burst_bits,
        }
    }

    #[test]
    fn the_bucket_is_what_was_asked_within_the_kernels_cap_and_one_frame() {
        // 10 Mbit/s, 1 Mbit: 125 kB.
        let t = tbf(limit(10_000_000, 1_000_000), 9001);
        assert_eq!(t.rate_bytes, 1_250_000);
        assert_eq!(t.burst_bytes, 125_000);
        assert_eq!(t.limit_bytes, 31_250 + 125_000);
        // containerd's 4 Gibit bucket: capped at ~4.29 s of the rate, as the kernel caps
        // the bandwidth plugin's.
        let t = tbf(limit(10_000_000, u64::from(u32::MAX)), 9001);
        assert_eq!(t.burst_bytes, 5_368_709);
        // A bucket smaller than a frame would never let that frame out.
        let t = tbf(limit(1_000_000, 800), 1500);
        assert_eq!(t.burst_bytes, 1514);
    }

    #[test]
    fn the_attributes_carry_the_rate_limit_and_bucket() {
        let t = tbf(limit(80_000_000, 8_000_000), 9001);
        let a = tbf_attributes(&t);
        assert_eq!(a.len(), 2);
        let (kind, parms) = &a[0];
        assert_eq!((*kind, parms.len()), (TCA_TBF_PARMS, 36));
        assert_eq!(parms[1], TC_LINKLAYER_ETHERNET);
        assert_eq!(&parms[8..12], &10_000_000u32.to_ne_bytes());
        assert_eq!(&parms[24..28], &t.limit_bytes.to_ne_bytes());
        assert_eq!(a[1], (TCA_TBF_BURST, 1_000_000u32.to_ne_bytes().to_vec()));
        // 40 Gbyte/s does not fit the 32-bit rate.
        let fast = tbf(limit(320_000_000_000, 8_000_000), 9001);
        let a = tbf_attributes(&fast);
        assert_eq!(&a[0].1[8..12], &u32::MAX.to_ne_bytes());
        assert_eq!(
            a[1],
            (TCA_TBF_RATE64, 40_000_000_000u64.to_ne_bytes().to_vec())
        );
    }
}
