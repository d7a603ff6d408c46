//! TC ingress of a pod's host veth: everything the pod sends. Decide (anti-spoofing, then
//! where the packet goes), the sender's egress policy and, for a pod of this node, the
//! receiver's ingress policy, then act.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use network_types::eth::EthHdr;
use vpc_ebpf_common::{
    counters::reason,
    nat::NatKey,
    node::{Endpoint, NodeConfig, config_flags},
};

use crate::{
    action::{self, Action},
    arp, deliver, icmp_error, kflow,
    maps::{VPC_CIDRS, VPC_ENDPOINTS, VPC_ENIS, VPC_PASSTHRU, VPC_SNAT_EXCL},
    nat,
    packet::{self, ETH_P_ARP, ETH_P_IP, IPPROTO_ICMP, Ipv4, Ports, ptr_at},
    policy::{self, Conn, Ends},
    verdict::{Outcome, drop, pass},
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Outcome {
    packet::pull_headers(ctx);
    // SAFETY: the kernel hands every TC program a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass(reason::PASS_TRUNCATED_ETH);
    };
    // SAFETY: ptr_at checked the whole header.
    let (ether_type, src_mac) = unsafe { (u16::from_be((*eth).ether_type), (*eth).src_addr) };
    match ether_type {
        ETH_P_ARP => arp::answer_gateway(ctx, ifindex),
        ETH_P_IP => ipv4(ctx, ifindex, &src_mac),
        // VLAN, IPv6 and the rest: classified for the counters, left to the kernel.
        _ => pass(packet::classify(ctx)),
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, ifindex: u32, src_mac: &[u8; 6]) -> Outcome {
    let ip = match packet::ipv4(ctx) {
        Ok(ip) => ip,
        Err(r) => return pass(r),
    };
    let Some(cfg) = config() else {
        return pass(reason::PASS_NOT_CONFIGURED);
    };
    // SAFETY: read-only access to a map value.
    let Some(me) = (unsafe { VPC_ENDPOINTS.get(ip.src) }) else {
        return drop(reason::DROP_SPOOFED_IP);
    };
    if me.host_ifindex != ifindex {
        return drop(reason::DROP_SPOOFED_IP);
    }
    if *src_mac != me.pod_mac {
        return drop(reason::DROP_SPOOFED_MAC);
    }
    nat::note_first_fragment(ctx, &ip);
    let action = decide(ctx, cfg, &ip, me);
    if action.judged_here() && policy::enabled(cfg) {
        let ends = Ends {
            src_local: true,
            dst_local: matches!(action, Action::ToPod(_)),
        };
        // The ports are read again rather than kept from deciding: a value held across
        // `decide` costs stack and registers the verifier then follows on every path.
        let ports = packet::ports(ctx, &ip).ok().flatten();
        if let Some(r) = policy::judge(ctx, cfg, &Conn::of(&ip, ports), ends) {
            return drop(r);
        }
    }
    action::act(ctx, cfg, &ip, action)
}

/// Where a packet of the pod `me` goes.
#[inline(always)]
fn decide(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4, me: &Endpoint) -> Action {
    let ports = match packet::ports(ctx, ip) {
        Ok(p) => p,
        Err(r) => return Action::Done(pass(r)),
    };
    // A later fragment of a datagram whose first fragment was translated: the same way.
    if let Some(a) = nat::established_fragment(ip) {
        return a;
    }
    // An established translated flow first: SNAT of an outgoing flow, or the pod's reply
    // on a hostPort flow (a first fragment too: it carries the ports).
    if let Some(p) = ports {
        let key = nat::key(ip, &p);
        if let Some(e) = nat::lookup(&key, &p) {
            if nat::peer_intact(&key, &e) {
                return Action::Established(e, p);
            }
            nat::forget(&key);
        }
        // A flow the host stack delivered to the pod (kube-proxy DNAT, the host's own
        // connections): only the host stack can translate the pod's side back. (Not a
        // test of the fragment bits here: a branch on them would have the verifier
        // follow every later step twice.)
        if kflow::touch(&key, &p) {
            return Action::Done(pass(reason::PASS_KERNEL_FLOW));
        }
    }
    // An error about a packet the pod received translated (hostPort, SNAT reply).
    if ip.proto == IPPROTO_ICMP
        && ports.is_none()
        && !ip.fragment
        && let Some(o) = icmp_error::translate_from_pod(ctx, cfg, ip)
    {
        return Action::Done(o);
    }
    if ip.dst == cfg.node_ip {
        // A pod reaching a hostPort through the node address.
        if let Some(p) = ports
            && let Some(a) = deliver::hostport(ip, &p)
        {
            return a;
        }
        return to_kernel(ip, ports, reason::PASS_TO_HOST);
    }
    // SAFETY: read-only copy of a map value.
    if let Some(peer) = unsafe { VPC_ENDPOINTS.get(ip.dst) }.copied() {
        return Action::ToPod(peer);
    }
    let dst = Key::new(32, ip.dst);
    if VPC_PASSTHRU.get(&dst).is_some() {
        return to_kernel(ip, ports, reason::PASS_PASSTHROUGH_CIDR);
    }
    if VPC_CIDRS.get(&dst).is_some()
        || cfg.flags & config_flags::EXTERNAL_SNAT != 0
        || VPC_SNAT_EXCL.get(&dst).is_some()
    {
        return out_own_eni(me);
    }
    // A later fragment (no ports) never starts a flow: without its first fragment's
    // translation it cannot be translated consistently.
    match ports {
        Some(p) => Action::NewSnat(p),
        None if ip.fragment => Action::Done(pass(reason::PASS_IPV4_FRAGMENT)),
        _ => Action::Done(pass(reason::PASS_NOT_TRANSLATABLE)),
    }
}

/// The pod sends this flow into the host stack, which may DNAT it (a Service, a node port
/// on the node address) to a backend elsewhere: replies from that backend will come in
/// through an ENI, addressed to the pod, and must cross the host stack too. Who the
/// backend is cannot be known here (DNAT happens after this hook), so the pod's port is
/// recorded with any peer.
#[inline(always)]
fn to_kernel(ip: &Ipv4, ports: Option<Ports>, r: u16) -> Action {
    let flow = match ports {
        Some(p) if !ip.fragment => Some((NatKey::pod_port(ip.src, p.src, ip.proto), p)),
        _ => None,
    };
    Action::ToKernel(r, flow)
}

/// The node's configuration, read in place (a copy would cost stack the verifier counts).
#[inline(always)]
pub fn config() -> Option<&'static NodeConfig> {
    let cfg = crate::maps::VPC_CONFIG.get(0)?;
    (cfg.flags & config_flags::CONFIGURED != 0).then_some(cfg)
}

/// Out of the ENI that owns the pod's address: the VPC drops a source address arriving on
/// any other ENI, so there is no fallback to another one.
#[inline(always)]
fn out_own_eni(me: &Endpoint) -> Action {
    // SAFETY: read-only copy of a map value.
    let Some(eni) = (unsafe { VPC_ENIS.get(me.eni_ifindex) }).copied() else {
        return Action::Done(drop(reason::DROP_NO_ENI));
    };
    Action::ToGateway {
        ifindex: me.eni_ifindex,
        gateway: eni.gateway_ip,
    }
}
