//! The static-ARP replacement: pods resolve their gateway (169.254.1.1) through the
//! program on their host veth, which answers with the host veth's MAC.

use aya_ebpf::programs::TcContext;
use vpc_ebpf_common::{counters::reason, node::POD_GATEWAY};

use crate::{
    maps::VPC_ENDPOINTS,
    packet::{IP_OFF, ptr_at},
    rewrite,
    verdict::{DROP, Outcome, PASS},
};

/// An Ethernet/IPv4 ARP packet (RFC 826), byte arrays only so it has no alignment.
#[repr(C)]
struct ArpEthIpv4 {
    htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    oper: [u8; 2],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// The part of the ARP packet an answer rewrites: operation and both address pairs.
#[repr(C)]
struct ArpAnswer {
    oper: [u8; 2],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

const OPER_OFF: usize = IP_OFF + 6;

#[inline(always)]
pub fn answer_gateway(ctx: &TcContext, ifindex: u32) -> Outcome {
    let Ok(a) = ptr_at::<ArpEthIpv4>(ctx, IP_OFF) else {
        return (reason::PASS_ARP, PASS);
    };
    // SAFETY: ptr_at checked the whole ARP packet.
    let a = unsafe { &*a };
    let request = a.htype == [0, 1]
        && a.ptype == [0x08, 0x00]
        && a.hlen == 6
        && a.plen == 4
        && a.oper == [0, 1];
    if !request || a.tpa != POD_GATEWAY {
        return (reason::PASS_ARP, PASS);
    }
    let (sha, spa) = (a.sha, a.spa);
    // SAFETY: read-only copy of a map value.
    let Some(me) = (unsafe { VPC_ENDPOINTS.get(u32::from_ne_bytes(spa)) }).copied() else {
        // Not an endpoint (yet): the kernel's answer, or none, as without the program.
        return (reason::PASS_ARP, PASS);
    };
    if me.host_ifindex != ifindex {
        return (reason::DROP_SPOOFED_IP, DROP);
    }
    if sha != me.pod_mac {
        return (reason::DROP_SPOOFED_MAC, DROP);
    }
    let answer = ArpAnswer {
        oper: [0, 2],
        sha: me.host_mac,
        spa: POD_GATEWAY,
        tha: sha,
        tpa: spa,
    };
    if rewrite::set_macs(ctx, &sha, &me.host_mac).is_err()
        || ctx.store(OPER_OFF, &answer, 0).is_err()
    {
        return (reason::DROP_REWRITE_FAILED, DROP);
    }
    // Back out of the interface it came in on: the pod receives the answer.
    match rewrite::to_egress(ifindex) {
        Ok(v) => (reason::FWD_ARP_REPLY, v),
        Err(()) => (reason::DROP_REWRITE_FAILED, DROP),
    }
}
