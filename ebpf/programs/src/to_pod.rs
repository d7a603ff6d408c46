//! TC egress of a pod's host veth: what the host stack delivers to the pod.
//!
//! The programs deliver pod-to-pod and VPC traffic with `bpf_redirect_peer`, which skips
//! this hook, or, to a pod whose received traffic is limited, through this veth's qdisc
//! with a mark that lets it straight on; so whatever else passes here came through the
//! host stack: kube-proxy's DNAT
//! (a Service cluster IP or node port whose backend is this pod), kubelet probes and other
//! connections from the host. Decide, the pod's ingress policy, act: their flows are
//! recorded so that the pod's replies go back through the host stack, where conntrack
//! un-DNATs them.

use aya_ebpf::programs::TcContext;
use network_types::eth::EthHdr;
use vpc_ebpf_common::{counters::reason, nat::NatKey, node::VIA_HOST_QDISC_MARK};

use crate::{
    action::{self, Action},
    from_pod::config,
    kflow,
    maps::VPC_ENDPOINTS,
    packet::{self, ETH_P_IP, Ipv4, Ports, ptr_at},
    policy::{self, Conn, Ends},
    verdict::{Outcome, drop, pass},
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Outcome {
    // SAFETY: the kernel hands every TC program a valid __sk_buff.
    let skb = ctx.skb.skb;
    // SAFETY: as above; TC programs may read and write the mark.
    if unsafe { (*skb).mark } == VIA_HOST_QDISC_MARK {
        // Sent here by a program for the qdisc (see `rewrite::through_host_veth`): judged
        // and translated already. The mark would not leave the node (crossing into the
        // pod's namespace clears it), but nothing else should see it either.
        unsafe { (*skb).mark = 0 };
        return pass(reason::PASS_TO_POD_QDISC);
    }
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
    if unsafe { VPC_ENDPOINTS.get(ip.dst) }.is_none_or(|e| e.host_ifindex != ifindex) {
        // Not this veth's pod (a stale route, a broadcast): nothing to remember.
        return pass(packet::classify(ctx));
    }
    let ports = match packet::ports(ctx, &ip) {
        Ok(p) => p,
        Err(r) => return pass(r),
    };
    // What the host stack delivers after kube-proxy: a new connection to this pod (from
    // another node, the internet, or a pod of this node through a Service whose backend
    // is this pod, judged as that pod's egress too), unless it answers a connection the
    // pod itself sent into the host stack.
    let unjudged = !policy::enabled(cfg)
        || ports.is_some_and(|p| {
            !ip.fragment && kflow::touch(&NatKey::pod_port(ip.dst, p.dst, ip.proto), &p)
        });
    if !unjudged {
        let ends = Ends {
            // SAFETY: read-only access to a map value.
            src_local: unsafe { VPC_ENDPOINTS.get(ip.src) }.is_some(),
            dst_local: true,
        };
        if let Some(r) = policy::judge(ctx, cfg, &Conn::of(&ip, ports), ends) {
            return drop(r);
        }
    }
    action::act(ctx, cfg, &ip, decide(ctx, &ip, ports))
}

#[inline(always)]
fn decide(ctx: &TcContext, ip: &Ipv4, ports: Option<Ports>) -> Action {
    match ports {
        // Oriented from the pod, as `from_pod` looks its packets up.
        Some(p) => Action::ToKernel(
            reason::PASS_KERNEL_TO_POD,
            Some((NatKey::new(ip.dst, ip.src, p.dst, p.src, ip.proto), p)),
        ),
        // No ports (another protocol, a later fragment, an ICMP error): nothing a reply
        // could be matched by.
        None => Action::Done(pass(packet::classify(ctx))),
    }
}
