//! TC ingress of an ENI: what the VPC sends to the node. Decide (reverse NAT, hostPort
//! DNAT, delivery to a local pod), the receiving pod's ingress policy, act.

use aya_ebpf::programs::TcContext;
use network_types::eth::EthHdr;
use vpc_ebpf_common::{
    counters::reason,
    nat::{NatKey, nat_kind},
    node::NodeConfig,
};

use crate::{
    action::{self, Action},
    deliver,
    from_pod::config,
    kflow,
    maps::{VPC_ENDPOINTS, VPC_ENIS},
    nat,
    packet::{self, ETH_P_IP, IPPROTO_ICMP, Ipv4, Ports, ptr_at},
    policy::{self, Conn, Ends},
    verdict::{Outcome, drop, pass},
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Outcome {
    packet::pull_headers(ctx);
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass(reason::PASS_TRUNCATED_ETH);
    };
    // SAFETY: ptr_at checked the whole header.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type != ETH_P_IP {
        return pass(packet::classify(ctx));
    }
    let ip = match packet::ipv4(ctx) {
        Ok(ip) => ip,
        Err(r) => return pass(r),
    };
    let Some(cfg) = config() else {
        return pass(reason::PASS_NOT_CONFIGURED);
    };
    let ports = match packet::ports(ctx, &ip) {
        Ok(p) => p,
        Err(r) => return pass(r),
    };
    nat::note_first_fragment(ctx, &ip);
    let action = decide(ctx, cfg, &ip, ports);
    // The receiving pod's ingress rules, for the packets this program sends on to a pod;
    // a hostPort is judged as the pod and container port it is translated to.
    let conn = match &action {
        Action::ToPod(_) => Some(Conn::of(&ip, ports)),
        Action::NewHostPort(t, p) => Some(Conn {
            dst: t.pod_ip,
            ports: Some(Ports {
                dst: t.container_port,
                ..*p
            }),
            ..Conn::of(&ip, ports)
        }),
        _ => None,
    };
    if let Some(conn) = conn.filter(|_| policy::enabled(cfg)) {
        let ends = Ends {
            src_local: false,
            dst_local: true,
        };
        if let Some(r) = policy::judge(ctx, cfg, &conn, ends) {
            return drop(r);
        }
    }
    action::act(ctx, cfg, &ip, action)
}

/// Whether `ip` is addressed to the node: to one of its ENIs' primary addresses, which
/// the VPC delivers each to its own ENI.
#[inline(always)]
fn is_node_address(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4) -> bool {
    if ip.dst == cfg.node_ip {
        return true;
    }
    // SAFETY: the kernel hands every TC program a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only access to a map value.
    unsafe { VPC_ENIS.get(ifindex) }.is_some_and(|e| e.primary_ip == ip.dst)
}

#[inline(always)]
fn decide(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4, ports: Option<Ports>) -> Action {
    // A later fragment of a datagram whose first fragment was translated: the same way.
    if let Some(a) = nat::established_fragment(ip) {
        return a;
    }
    if let Some(p) = ports {
        // Replies to SNATed flows and further packets of hostPort flows (a first fragment
        // too: it carries the ports).
        let key = nat::key(ip, &p);
        if let Some(e) = nat::lookup(&key, &p)
            && e.kind == nat_kind::REWRITE_DST
        {
            if nat::peer_intact(&key, &e) {
                return Action::Established(e, p);
            }
            nat::forget(&key);
        }
    }
    // SAFETY: read-only copy of a map value.
    if let Some(pod) = unsafe { VPC_ENDPOINTS.get(ip.dst) }.copied() {
        // A reply to a flow the pod sent into the host stack (a ClusterIP whose backend
        // is elsewhere): the host's conntrack must un-DNAT it on its way to the pod.
        if let Some(p) = ports
            && !ip.fragment
            && kflow::touch(&NatKey::pod_port(ip.dst, p.dst, ip.proto), &p)
        {
            return Action::Done(pass(reason::PASS_KERNEL_FLOW));
        }
        if ip.proto == IPPROTO_ICMP
            && ports.is_none()
            && !ip.fragment
            && crate::icmp_error::about_kernel_flow(ctx, ip)
        {
            return Action::Done(pass(reason::PASS_KERNEL_FLOW));
        }
        return Action::ToPod(pod);
    }
    // Not a pod's address (a pod never has a node address): a hostPort, or an error
    // about a translated flow.
    if let Some(p) = ports
        && is_node_address(ctx, cfg, ip)
        && let Some(a) = deliver::hostport(ip, &p)
    {
        return a;
    }
    if ip.proto == IPPROTO_ICMP
        && ports.is_none()
        && !ip.fragment
        && ip.dst == cfg.node_ip
        && let Some(o) = crate::icmp_error::translate(ctx, cfg, ip)
    {
        return Action::Done(o);
    }
    Action::Done(pass(reason::PASS_NOT_FOR_POD))
}
