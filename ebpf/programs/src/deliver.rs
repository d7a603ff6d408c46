//! The last step of every forwarded packet: TTL, MACs, redirect.

use aya_ebpf::programs::TcContext;
use vpc_ebpf_common::{
    counters::reason,
    nat::{HostPortKey, HostPortTarget, NatEntry, SnatPorts, nat_kind, nat_origin},
    node::{Endpoint, NodeConfig, endpoint_flags},
};

use crate::{
    action::Action,
    maps::{VPC_ENDPOINTS, VPC_ENIS, VPC_HOSTPORTS, VPC_NODE_ADDRS},
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
    // SAFETY: read-only copy of a map value.
    let peer = unsafe { VPC_ENDPOINTS.get(out.dst) }.copied();
    let exit = match (&peer, src_nat) {
        (Some(_), _) => 0,
        (None, true) => match exit_for(e.addr, cfg.node_ip, cfg.primary_eni_ifindex) {
            0 => return (reason::DROP_NO_ENI, DROP),
            exit => exit,
        },
        (None, false) => return (reason::PASS_NAT_STALE, PASS),
    };
    if nat::apply(ctx, ip, p, e).is_err() {
        return (reason::DROP_REWRITE_FAILED, DROP);
    }
    match peer {
        Some(peer) => to_pod(ctx, &out, &peer, fwd),
        #[expect(
            clippy::cast_possible_truncation,
            reason = "unpacked as exit_for packs"
        )]
        None => to_gateway(ctx, &out, (exit >> 32) as u32, exit as u32, fwd),
    }
}

/// A new flow to a node address's hostPort, if the port is published there (for that
/// address, or for every address of the node). `None`: no hostPort there.
#[inline(always)]
pub fn hostport(ip: &Ipv4, p: &Ports) -> Option<Action> {
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return None;
    }
    let found = hostport_lookup(u32::from(ip.proto) << 16 | u32::from(p.dst), ip.dst);
    if found == 0 {
        return None;
    }
    #[expect(clippy::cast_possible_truncation, reason = "unpacked as packed below")]
    let t = HostPortTarget {
        pod_ip: found as u32,
        container_port: (found >> 32) as u16,
        pad: 0,
    };
    // SAFETY: as above.
    if unsafe { VPC_ENDPOINTS.get(t.pod_ip) }.is_none() {
        return Some(Action::Done(pass(reason::PASS_NAT_STALE)));
    }
    if ip.ttl <= 1 {
        return Some(Action::Done(pass(reason::PASS_TTL_EXPIRED)));
    }
    Some(Action::NewHostPort(t, *p))
}

/// The target of (protocol << 16 | port) on `addr`, or on every address: pod address in
/// the low 32 bits, container port above, zero when there is none. A BPF-to-BPF call with
/// scalar arguments, so that its two keys live in its own frame, not in the 512 bytes
/// `from_pod` nearly fills.
#[inline(never)]
fn hostport_lookup(proto_port: u32, addr: u32) -> u64 {
    #[expect(clippy::cast_possible_truncation, reason = "packed by the caller")]
    let (proto, port) = ((proto_port >> 16) as u8, proto_port as u16);
    // SAFETY: read-only copies of map values.
    let t = unsafe { VPC_HOSTPORTS.get(HostPortKey::at(proto, port, addr)) }
        .or_else(|| unsafe { VPC_HOSTPORTS.get(HostPortKey::new(proto, port)) });
    match t {
        Some(t) if t.pod_ip != 0 => u64::from(t.container_port) << 32 | u64::from(t.pod_ip),
        _ => 0,
    }
}

/// Where a packet whose source became the node address `addr` leaves: the ENI that owns
/// the address (the VPC drops a source arriving on another ENI; a hostPort flow's replies
/// leave from whichever address the client used) and its subnet's gateway, as
/// `ifindex << 32 | gateway`; zero when that ENI is not programmed. A BPF-to-BPF call:
/// `from_pod` has no stack for the ENI's copy.
#[inline(never)]
fn exit_for(addr: u32, node_ip: u32, primary: u32) -> u64 {
    let ifindex = if addr == node_ip {
        primary
    } else {
        // SAFETY: read-only copy of a map value.
        unsafe { VPC_NODE_ADDRS.get(addr) }
            .copied()
            .unwrap_or(primary)
    };
    // SAFETY: read-only access to a map value.
    match unsafe { VPC_ENIS.get(ifindex) } {
        Some(eni) => u64::from(ifindex) << 32 | u64::from(eni.gateway_ip),
        None => 0,
    }
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
