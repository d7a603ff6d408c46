//! TC ingress of an ENI: what the VPC sends to the node.

use aya_ebpf::programs::TcContext;
use network_types::eth::EthHdr;
use vpc_ebpf_common::{
    counters::reason,
    nat::{NatKey, nat_kind},
};

use crate::{
    deliver,
    from_pod::{Outcome, PASS, config},
    kflow,
    maps::VPC_ENDPOINTS,
    nat,
    packet::{self, ETH_P_IP, IPPROTO_ICMP, ptr_at},
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Outcome {
    packet::pull_headers(ctx);
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (reason::PASS_TRUNCATED_ETH, PASS);
    };
    // SAFETY: ptr_at checked the whole header.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type != ETH_P_IP {
        return (packet::classify(ctx), PASS);
    }
    let ip = match packet::ipv4(ctx) {
        Ok(ip) => ip,
        Err(r) => return (r, PASS),
    };
    let Some(cfg) = config() else {
        return (reason::PASS_NOT_CONFIGURED, PASS);
    };
    let ports = match packet::ports(ctx, &ip) {
        Ok(p) => p,
        Err(r) => return (r, PASS),
    };
    if let Some(p) = ports
        && !ip.fragment
    {
        // Replies to SNATed flows and further packets of hostPort flows.
        let key = nat::key(&ip, &p);
        if let Some(e) = nat::lookup(&key, &p)
            && e.kind == nat_kind::REWRITE_DST
        {
            if nat::peer_intact(&key, &e) {
                return deliver::translated(ctx, &cfg, &ip, &p, &e);
            }
            nat::forget(&key);
        }
        if ip.dst == cfg.node_ip
            && let Some(o) = deliver::hostport(ctx, &cfg, &ip, &p)
        {
            return o;
        }
    }
    if ip.proto == IPPROTO_ICMP
        && ports.is_none()
        && !ip.fragment
        && ip.dst == cfg.node_ip
        && let Some(o) = crate::icmp_error::translate(ctx, &cfg, &ip)
    {
        return o;
    }
    // SAFETY: read-only copy of a map value.
    if let Some(pod) = unsafe { VPC_ENDPOINTS.get(ip.dst) }.copied() {
        // A reply to a flow the pod sent into the host stack (a ClusterIP whose backend
        // is elsewhere): the host's conntrack must un-DNAT it on its way to the pod.
        if let Some(p) = ports
            && !ip.fragment
            && kflow::touch(&NatKey::pod_port(ip.dst, p.dst, ip.proto), &p)
        {
            return (reason::PASS_KERNEL_FLOW, PASS);
        }
        if ip.proto == IPPROTO_ICMP
            && ports.is_none()
            && !ip.fragment
            && crate::icmp_error::about_kernel_flow(ctx, &ip)
        {
            return (reason::PASS_KERNEL_FLOW, PASS);
        }
        return deliver::to_pod(ctx, &ip, &pod, reason::FWD_LOCAL_POD);
    }
    (reason::PASS_NOT_FOR_POD, PASS)
}
