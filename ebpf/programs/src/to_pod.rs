//! TC egress of a pod's host veth: what the host stack delivers to the pod.
//!
//! The programs deliver pod-to-pod and VPC traffic with `bpf_redirect_peer`, which skips
//! this hook; so whatever passes here came through the host stack: kube-proxy's DNAT
//! (a Service cluster IP or node port whose backend is this pod), kubelet probes and other
//! connections from the host. Decide, the pod's ingress policy, act: their flows are
//! recorded so that the pod's replies go back through the host stack, where conntrack
//! un-DNATs them.

use aya_ebpf::programs::TcContext;
use network_types::eth::EthHdr;
use vpc_ebpf_common::{counters::reason, nat::NatKey};

use crate::{
    action::{self, Action},
    from_pod::config,
    maps::VPC_ENDPOINTS,
    packet::{self, ETH_P_IP, Ipv4, ptr_at},
    policy,
    verdict::{Outcome, drop, pass},
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Outcome {
    packet::pull_headers(ctx);
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass(reason::PASS_TRUNCATED_ETH);
    };
    // SAFETY: ptr_at checked the whole header.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return pass(packet::classify(ctx));
    }
    let ip = match packet::ipv4(ctx) {
        Ok(ip) => ip,
        Err(r) => return pass(r),
    };
    let Some(cfg) = config() else {
        return pass(reason::PASS_NOT_CONFIGURED);
    };
    // SAFETY: the kernel hands every TC program a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only access to a map value.
    let Some(pod) = unsafe { VPC_ENDPOINTS.get(ip.dst) }.filter(|e| e.host_ifindex == ifindex)
    else {
        // Not this veth's pod (a stale route, a broadcast): nothing to remember.
        return pass(packet::classify(ctx));
    };
    let action = decide(ctx, &ip);
    if let Some(r) = policy::ingress(&ip, pod, &action) {
        return drop(r);
    }
    action::act(ctx, cfg, &ip, action)
}

#[inline(always)]
fn decide(ctx: &TcContext, ip: &Ipv4) -> Action {
    match packet::ports(ctx, ip) {
        // Oriented from the pod, as `from_pod` looks its packets up.
        Ok(Some(p)) => Action::ToKernel(
            reason::PASS_KERNEL_TO_POD,
            Some((NatKey::new(ip.dst, ip.src, p.dst, p.src, ip.proto), p)),
        ),
        // No ports (another protocol, a later fragment, an ICMP error): nothing a reply
        // could be matched by.
        Ok(None) => Action::Done(pass(packet::classify(ctx))),
        Err(r) => Action::Done(pass(r)),
    }
}
