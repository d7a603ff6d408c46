//! The last step of every forwarded packet: TTL, MACs, redirect.

use aya_ebpf::programs::TcContext;
use vpc_ebpf_common::{
    counters::reason,
    nat::{HostPortKey, HostPortTarget, NatEntry, SnatPorts, nat_kind, nat_origin},
    node::{Endpoint, NodeConfig, endpoint_flags},
};

use crate::{
    action::Action,
    maps::{VPC_ENDPOINTS, VPC_ENIS, VPC_HOSTPORTS},
    nat,
    packet::{IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ports},
    rewrite,
    verdict::{DROP, Outcome, PASS, drop, pass},
};

/// Into the pod's namespace, as if its gateway had routed it there: straight to the
/// peer, or through the host veth's qdisc for a pod whose received traffic is limited.
#[inline(always)]
pub fn to_pod(ctx: &TcContext, ip: &Ipv4, pod: &Endpoint, fwd: u16) -> Outcome {
    if ip.ttl <= 1 {
        return (reason::PASS_TTL_EXPIRED, PASS);
    }
    if rewrite::dec_ttl(ctx, ip).is_err()
        || rewrite::set_macs(ctx, &pod.pod_mac, &pod.host_mac).is_err()
    {
        return (reason::DROP_REWRITE_FAILED, DROP);
    }
    let sent = if pod.flags & endpoint_flags::VIA_HOST_QDISC == 0 {
        rewrite::to_peer(pod.host_ifindex)
    } else {
        rewrite::through_host_veth(ctx, pod.host_ifindex)
    };
    match sent {
        Ok(v) => (fwd, v),
        Err(()) => (reason::DROP_REWRITE_FAILED, DROP),
    }
}

/// Out of `ifindex` to the subnet gateway; the kernel fills in the MACs.
#[inline(always)]
pub fn to_gateway(ctx: &TcContext, ip: &Ipv4, ifindex: u32, gateway: u32, fwd: u16) -> Outcome {
    if ip.ttl <= 1 {
        return (reason::PASS_TTL_EXPIRED, PASS);
    }
    if rewrite::dec_ttl(ctx, ip).is_err() {
        return (reason::DROP_REWRITE_FAILED, DROP);
    }
    match rewrite::to_gateway(ifindex, gateway) {
        Ok(v) => (fwd, v),
        Err(()) => (reason::DROP_REWRITE_FAILED, DROP),
    }
}

/// Sends on a packet of a translated flow, translating it with `e`: to a local pod when
/// the (translated) destination is one; otherwise, when the source became the node
/// address, out of the primary ENI that owns it.
#[inline(always)]
pub fn translated(
    ctx: &TcContext,
    cfg: &NodeConfig,
    ip: &Ipv4,
    p: &Ports,
    e: &NatEntry,
) -> Outcome {
    let src_nat = e.kind == nat_kind::REWRITE_SRC;
    let fwd = match (e.origin, src_nat) {
        (nat_origin::HOSTPORT, true) => reason::FWD_HOSTPORT_REPLY,
        (nat_origin::HOSTPORT, false) => reason::FWD_HOSTPORT_DNAT,
        (_, true) => reason::FWD_SNAT,
        (_, false) => reason::FWD_REVERSE_NAT,
    };
    if ip.ttl <= 1 {
        return (reason::PASS_TTL_EXPIRED, PASS);
    }
    let mut out = *ip;
    if src_nat {
        out.src = e.addr;
    } else {
        out.dst = e.addr;
    }
    // Where it goes is settled before the packet is touched, so that a packet that
    // cannot be delivered leaves untranslated.
    // SAFETY: read-only copies of map values.
    let peer = unsafe { VPC_ENDPOINTS.get(out.dst) }.copied();
    let eni = unsafe { VPC_ENIS.get(cfg.primary_eni_ifindex) }.copied();
    let gateway = match (&peer, &eni) {
        (Some(_), _) => 0,
        (None, Some(eni)) if src_nat => eni.gateway_ip,
        (None, None) if src_nat => return (reason::DROP_NO_ENI, DROP),
        (None, _) => return (reason::PASS_NAT_STALE, PASS),
    };
    if nat::apply(ctx, ip, p, e).is_err() {
        return (reason::DROP_REWRITE_FAILED, DROP);
    }
    match peer {
        Some(peer) => to_pod(ctx, &out, &peer, fwd),
        None => to_gateway(ctx, &out, cfg.primary_eni_ifindex, gateway, fwd),
    }
}

/// A new flow to node-address:hostPort, if the port is published. `None`: no hostPort
/// there.
#[inline(always)]
pub fn hostport(ip: &Ipv4, p: &Ports) -> Option<Action> {
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return None;
    }
    // SAFETY: read-only copy of a map value.
    let t = unsafe { VPC_HOSTPORTS.get(HostPortKey::new(ip.proto, p.dst)) }.copied()?;
    // SAFETY: as above.
    if unsafe { VPC_ENDPOINTS.get(t.pod_ip) }.is_none() {
        return Some(Action::Done(pass(reason::PASS_NAT_STALE)));
    }
    if ip.ttl <= 1 {
        return Some(Action::Done(pass(reason::PASS_TTL_EXPIRED)));
    }
    Some(Action::NewHostPort(t, *p))
}

/// DNAT of a new hostPort flow to its pod.
#[inline(always)]
pub fn new_hostport(
    ctx: &TcContext,
    cfg: &NodeConfig,
    ip: &Ipv4,
    p: &Ports,
    t: &HostPortTarget,
) -> Outcome {
    let key = nat::key(ip, p);
    let Ok(e) = nat::hostport_new(&key, t.pod_ip, t.container_port) else {
        return drop(reason::DROP_REWRITE_FAILED);
    };
    translated(ctx, cfg, ip, p, &e)
}

/// A new flow to outside the VPC: allocate a port on the node address and translate.
#[inline(always)]
pub fn new_snat(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4, p: &Ports) -> Outcome {
    if ip.ttl <= 1 {
        return pass(reason::PASS_TTL_EXPIRED);
    }
    // Checked before allocating so that a missing ENI does not leak a port per packet.
    // SAFETY: read-only access to a map value.
    if unsafe { VPC_ENIS.get(cfg.primary_eni_ifindex) }.is_none() {
        return drop(reason::DROP_NO_ENI);
    }
    let key = nat::key(ip, p);
    let ports = SnatPorts::new(
        cfg.snat_port_min,
        cfg.snat_port_max,
        cfg.snat_skip_min,
        cfg.snat_skip_max,
    );
    let Some(e) = nat::snat_new(&key, p, cfg.node_ip, &ports) else {
        return drop(reason::DROP_NO_SNAT_PORT);
    };
    translated(ctx, cfg, ip, p, &e)
}
