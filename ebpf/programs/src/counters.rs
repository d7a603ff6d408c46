//! The counters maps and their update path (see [`vpc_ebpf_common::counters`]).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use vpc_ebpf_common::counters::{
    COUNTERS_MAX_ENTRIES, Counter, CounterKey, FORWARD_SLOTS, forward_slot, reason::is_forward,
};

use crate::packet;

/// Pinned by name so counts (and later the dataplane's) survive agent restarts.
#[map]
static VPC_COUNTERS: PerCpuHashMap<CounterKey, Counter> =
    PerCpuHashMap::pinned(COUNTERS_MAX_ENTRIES, 0);

/// The forwarding verdicts, by reason and direction; pinned like the others.
#[map]
static VPC_FWD_COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(FORWARD_SLOTS, 0);

/// Classifies the packet and adds it to its counter.
#[inline(always)]
pub fn observe(ctx: &TcContext, direction: u8) {
    packet::pull_headers(ctx);
    let reason = packet::classify(ctx);
    count(ctx, reason, direction);
}

/// Adds one packet of `ctx.len()` bytes to (reason, direction) for a forwarding verdict,
/// to (ifindex, reason, direction) for any other.
#[inline(always)]
pub fn count(ctx: &TcContext, reason: u16, direction: u8) {
    let bytes = u64::from(ctx.len());
    if is_forward(reason) {
        if let Some(c) = VPC_FWD_COUNTERS.get_ptr_mut(forward_slot(reason, direction)) {
            // SAFETY: per-CPU value: only this CPU writes this slot, and the program
            // cannot be preempted by itself on the same CPU.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += bytes;
            }
        }
        return;
    }
    // SAFETY: the kernel hands every TC program a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = CounterKey::new(ifindex, reason, direction);
    if let Some(c) = VPC_COUNTERS.get_ptr_mut(key) {
        // SAFETY: per-CPU value: only this CPU writes this slot, and the program cannot be
        // preempted by itself on the same CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
        return;
    }
    let first = Counter { packets: 1, bytes };
    // NOEXIST: if another CPU created the key in between, add to our slot instead of
    // overwriting every CPU's slot with `first`.
    if VPC_COUNTERS
        .insert(key, first, u64::from(BPF_NOEXIST))
        .is_err()
        && let Some(c) = VPC_COUNTERS.get_ptr_mut(key)
    {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
