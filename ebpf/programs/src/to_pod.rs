//! TC egress of a pod's host veth: what the host stack delivers to the pod.
//!
//! The programs deliver pod-to-pod and VPC traffic with `bpf_redirect_peer`, which skips
//! this hook; so whatever passes here came through the host stack: kube-proxy's DNAT
//! (a Service cluster IP or node port whose backend is this pod), kubelet probes and other
//! connections from the host. Their flows are recorded so that the pod's replies go back
//! through the host stack, where conntrack un-DNATs them.

use aya_ebpf::programs::TcContext;
use network_types::eth::EthHdr;
use vpc_ebpf_common::{counters::reason, nat::NatKey};

use crate::{
    from_pod::{Outcome, PASS, config},
    kflow,
    maps::VPC_ENDPOINTS,
    packet::{self, ETH_P_IP, ptr_at},
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> Outcome {
    packet::pull_headers(ctx);
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (reason::PASS_TRUNCATED_ETH, PASS);
    };
    // SAFETY: ptr_at checked the whole header.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return (packet::classify(ctx), PASS);
    }
    let ip = match packet::ipv4(ctx) {
        Ok(ip) => ip,
        Err(r) => return (r, PASS),
    };
    if config().is_none() {
        return (reason::PASS_NOT_CONFIGURED, PASS);
    }
    // SAFETY: the kernel hands every TC program a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only access to a map value.
    let mine = unsafe { VPC_ENDPOINTS.get(ip.dst) }.is_some_and(|e| e.host_ifindex == ifindex);
    if !mine {
        // Not this veth's pod (a stale route, a broadcast): nothing to remember.
        return (packet::classify(ctx), PASS);
    }
    match packet::ports(ctx, &ip) {
        Ok(Some(p)) => {
            // Oriented from the pod, as `from_pod` looks its packets up.
            let key = NatKey::new(ip.dst, ip.src, p.dst, p.src, ip.proto);
            kflow::record(&key, &p);
            (reason::PASS_KERNEL_TO_POD, PASS)
        }
        // No ports (another protocol, a later fragment, an ICMP error): nothing a reply
        // could be matched by.
        Ok(None) => (packet::classify(ctx), PASS),
        Err(r) => (r, PASS),
    }
}
