//! What every program ends with: a TC verdict and the reason it is counted under
//! ([`vpc_ebpf_common::counters::reason`]). Below every program, so none imports another
//! program's types.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};

/// (reason, TC verdict) of one packet.
pub type Outcome = (u16, i32);

/// To the kernel, unchanged.
pub const PASS: i32 = TC_ACT_OK;
pub const DROP: i32 = TC_ACT_SHOT;

#[inline(always)]
pub const fn pass(reason: u16) -> Outcome {
    (reason, PASS)
}

#[inline(always)]
pub const fn drop(reason: u16) -> Outcome {
    (reason, DROP)
}
