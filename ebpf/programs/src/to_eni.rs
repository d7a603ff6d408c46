//! TC egress of an ENI: what leaves the node for the VPC. The programs judge what they
//! send on themselves where they decide; what a pod handed to the host stack (a Service
//! `ClusterIP`, which kube-proxy translates to a backend) is judged here, after the
//! translation, when it leaves for a backend on another node: the sending pod's egress,
//! against the backend pod and port.

use aya_ebpf::programs::TcContext;
use network_types::eth::EthHdr;
use vpc_ebpf_common::{counters::reason, nat::NatKey};

use crate::{
    from_pod::config,
    kflow,
    maps::VPC_ENDPOINTS,
    packet::{self, ETH_P_IP, ptr_at},
    policy::{self, Conn, Ends},
    verdict::{Outcome, drop, pass},
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Outcome {
    let Some(cfg) = config() else {
        return pass(reason::PASS_NOT_CONFIGURED);
    };
    if !policy::enabled(cfg) {
        return pass(reason::PASS_TO_VPC);
    }
    packet::pull_headers(ctx);
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass(reason::PASS_TRUNCATED_ETH);
    };
    // SAFETY: ptr_at checked the whole header.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return pass(reason::PASS_TO_VPC);
    }
    let ip = match packet::ipv4(ctx) {
        Ok(ip) => ip,
        Err(r) => return pass(r),
    };
    // SAFETY: read-only access to a map value.
    if unsafe { VPC_ENDPOINTS.get(ip.src) }.is_none() {
        return pass(reason::PASS_TO_VPC);
    }
    let Ok(Some(p)) = packet::ports(ctx, &ip) else {
        return pass(reason::PASS_TO_VPC);
    };
    // Only a flow the pod handed to the host stack; the programs' own were judged.
    if ip.fragment || !kflow::touch(&NatKey::pod_port(ip.src, p.src, ip.proto), &p) {
        return pass(reason::PASS_TO_VPC);
    }
    let ends = Ends {
        src_local: true,
        dst_local: false,
    };
    match policy::judge(ctx, cfg, &Conn::of(&ip, Some(p)), ends) {
        Some(r) => drop(r),
        None => pass(reason::PASS_TO_VPC),
    }
}
