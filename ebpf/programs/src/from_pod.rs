//! TC ingress of a pod's host veth: everything the pod sends.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use network_types::eth::EthHdr;
use vpc_ebpf_common::{
    counters::reason,
    nat::{NatKey, SnatPorts},
    node::{Endpoint, NodeConfig, config_flags},
};

use crate::{
    arp, deliver, icmp_error, kflow,
    maps::{VPC_CIDRS, VPC_ENDPOINTS, VPC_ENIS, VPC_PASSTHRU, VPC_SNAT_EXCL},
    nat,
    packet::{self, ETH_P_ARP, ETH_P_IP, IPPROTO_ICMP, Ipv4, Ports, ptr_at},
};

/// (reason, TC verdict) of one packet.
pub type Outcome = (u16, i32);

pub const PASS: i32 = TC_ACT_OK;
pub const DROP: i32 = TC_ACT_SHOT;

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Outcome {
    packet::pull_headers(ctx);
    // SAFETY: the kernel hands every TC program a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (reason::PASS_TRUNCATED_ETH, PASS);
    };
    // SAFETY: ptr_at checked the whole header.
    let (ether_type, src_mac) = unsafe { (u16::from_be((*eth).ether_type), (*eth).src_addr) };
    match ether_type {
        ETH_P_ARP => arp::answer_gateway(ctx, ifindex),
        ETH_P_IP => ipv4(ctx, ifindex, &src_mac),
        // VLAN, IPv6 and the rest: classified for the counters, left to the kernel.
        _ => (packet::classify(ctx), PASS),
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, ifindex: u32, src_mac: &[u8; 6]) -> Outcome {
    let ip = match packet::ipv4(ctx) {
        Ok(ip) => ip,
        Err(r) => return (r, PASS),
    };
    let Some(cfg) = config() else {
        return (reason::PASS_NOT_CONFIGURED, PASS);
    };
    // SAFETY: read-only copy of a map value.
    let Some(me) = (unsafe { VPC_ENDPOINTS.get(ip.src) }).copied() else {
        return (reason::DROP_SPOOFED_IP, DROP);
    };
    if me.host_ifindex != ifindex {
        return (reason::DROP_SPOOFED_IP, DROP);
    }
    if *src_mac != me.pod_mac {
        return (reason::DROP_SPOOFED_MAC, DROP);
    }
    let ports = match packet::ports(ctx, &ip) {
        Ok(p) => p,
        Err(r) => return (r, PASS),
    };
    // An established translated flow first: SNAT of an outgoing flow, or the pod's reply
    // on a hostPort flow.
    if let Some(p) = ports
        && !ip.fragment
    {
        let key = nat::key(&ip, &p);
        if let Some(e) = nat::lookup(&key, &p) {
            if nat::peer_intact(&key, &e) {
                return deliver::translated(ctx, &cfg, &ip, &p, &e);
            }
            nat::forget(&key);
        }
        // A flow the host stack delivered to the pod (kube-proxy DNAT, the host's own
        // connections): only the host stack can translate the pod's side back.
        if kflow::touch(&key, &p) {
            return (reason::PASS_KERNEL_FLOW, PASS);
        }
    }
    // An error about a packet the pod received translated (hostPort, SNAT reply).
    if ip.proto == IPPROTO_ICMP
        && ports.is_none()
        && !ip.fragment
        && let Some(o) = icmp_error::translate_from_pod(ctx, &cfg, &ip)
    {
        return o;
    }
    if ip.dst == cfg.node_ip {
        // A pod reaching a hostPort through the node address.
        if let Some(p) = ports
            && !ip.fragment
            && let Some(o) = deliver::hostport(ctx, &cfg, &ip, &p)
        {
            return o;
        }
        to_kernel(&ip, ports);
        return (reason::PASS_TO_HOST, PASS);
    }
    // SAFETY: read-only copy of a map value.
    if let Some(peer) = unsafe { VPC_ENDPOINTS.get(ip.dst) }.copied() {
        return deliver::to_pod(ctx, &ip, &peer, reason::FWD_LOCAL_POD);
    }
    let dst = Key::new(32, ip.dst);
    if VPC_PASSTHRU.get(&dst).is_some() {
        to_kernel(&ip, ports);
        return (reason::PASS_PASSTHROUGH_CIDR, PASS);
    }
    if VPC_CIDRS.get(&dst).is_some()
        || cfg.flags & config_flags::EXTERNAL_SNAT != 0
        || VPC_SNAT_EXCL.get(&dst).is_some()
    {
        return out_own_eni(ctx, &ip, &me);
    }
    match ports {
        Some(p) if !ip.fragment => snat(ctx, &cfg, &ip, &p),
        _ if ip.fragment => (reason::PASS_IPV4_FRAGMENT, PASS),
        _ => (reason::PASS_NOT_TRANSLATABLE, PASS),
    }
}

/// The pod sends this flow into the host stack, which may DNAT it (a Service, a node port
/// on the node address) to a backend elsewhere: replies from that backend will come in
/// through an ENI, addressed to the pod, and must cross the host stack too. Who the
/// backend is cannot be known here (DNAT happens after this hook), so the pod's port is
/// recorded with any peer.
#[inline(always)]
fn to_kernel(ip: &Ipv4, ports: Option<Ports>) {
    if let Some(p) = ports
        && !ip.fragment
    {
        kflow::record(&NatKey::pod_port(ip.src, p.src, ip.proto), &p);
    }
}

#[inline(always)]
pub fn config() -> Option<NodeConfig> {
    let cfg = crate::maps::VPC_CONFIG.get(0)?;
    (cfg.flags & config_flags::CONFIGURED != 0).then_some(*cfg)
}

/// Out of the ENI that owns the pod's address: the VPC drops a source address arriving on
/// any other ENI, so there is no fallback to another one.
#[inline(always)]
fn out_own_eni(ctx: &TcContext, ip: &Ipv4, me: &Endpoint) -> Outcome {
    // SAFETY: read-only copy of a map value.
    let Some(eni) = (unsafe { VPC_ENIS.get(me.eni_ifindex) }).copied() else {
        return (reason::DROP_NO_ENI, DROP);
    };
    deliver::to_gateway(ctx, ip, me.eni_ifindex, eni.gateway_ip, reason::FWD_ENI)
}

/// A new flow to outside the VPC: allocate a port on the node address and translate.
#[inline(always)]
fn snat(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4, p: &Ports) -> Outcome {
    if ip.ttl <= 1 {
        return (reason::PASS_TTL_EXPIRED, PASS);
    }
    // Checked before allocating so that a missing ENI does not leak a port per packet.
    // SAFETY: read-only access to a map value.
    if unsafe { VPC_ENIS.get(cfg.primary_eni_ifindex) }.is_none() {
        return (reason::DROP_NO_ENI, DROP);
    }
    let key = nat::key(ip, p);
    let ports = SnatPorts::new(
        cfg.snat_port_min,
        cfg.snat_port_max,
        cfg.snat_skip_min,
        cfg.snat_skip_max,
    );
    let Some(e) = nat::snat_new(&key, p, cfg.node_ip, &ports) else {
        return (reason::DROP_NO_SNAT_PORT, DROP);
    };
    deliver::translated(ctx, cfg, ip, p, &e)
}
