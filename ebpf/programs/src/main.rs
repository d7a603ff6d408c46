//! vpc-ebpf kernel programs.
//!
//! Each entry point is a thin wrapper that turns the program's logic into a TC verdict
//! and counts it; every packet byte is read through [`packet::ptr_at`], the one
//! bounds-checked accessor, and written through [`rewrite`], which keeps checksums right.
#![no_std]
#![no_main]

mod action;
mod arp;
mod counters;
mod deliver;
mod from_eni;
mod from_pod;
mod icmp_error;
mod kflow;
mod maps;
mod nat;
mod packet;
mod policy;
mod rewrite;
mod to_eni;
mod to_pod;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};
use vpc_ebpf_common::counters::direction;

/// tcx "next" / clsact "unspecified": hand the packet to the next program or, when there
/// is none, to the kernel, unchanged. Observers must not cut the chain short.
const TC_ACT_NEXT: i32 = -1;

/// Counts every packet received by the interface under its classification reason.
#[classifier]
pub fn count_ingress(ctx: TcContext) -> i32 {
    counters::observe(&ctx, direction::INGRESS);
    TC_ACT_NEXT
}

/// Counts every packet the interface sends under its classification reason.
#[classifier]
pub fn count_egress(ctx: TcContext) -> i32 {
    counters::observe(&ctx, direction::EGRESS);
    TC_ACT_NEXT
}

/// Host side of a pod veth, ingress: ARP for the gateway, anti-spoofing, pod-to-pod,
/// pod-to-VPC through the owning ENI, SNAT to outside the VPC.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let (reason, verdict) = from_pod::handle(&ctx);
    counters::count(&ctx, reason, direction::INGRESS);
    verdict
}

/// ENI ingress: reverse NAT, hostPort DNAT, delivery to local pods.
#[classifier]
pub fn from_eni(ctx: TcContext) -> i32 {
    let (reason, verdict) = from_eni::handle(&ctx);
    counters::count(&ctx, reason, direction::INGRESS);
    verdict
}

/// Host side of a pod veth, egress: records the flows the host stack delivers to the pod,
/// so that their replies return through it.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let (reason, verdict) = to_pod::handle(&ctx);
    counters::count(&ctx, reason, direction::EGRESS);
    verdict
}

/// ENI egress: what a pod handed to the host stack, judged by policy once translated.
#[classifier]
pub fn to_eni(ctx: TcContext) -> i32 {
    let (reason, verdict) = to_eni::handle(&ctx);
    counters::count(&ctx, reason, direction::EGRESS);
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier guarantees no path reaches a panic; this only satisfies the linker.
    loop {}
}

// License of the object: GPL-compatible so the programs may call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
