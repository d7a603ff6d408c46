//! What a program decided for a packet, held between deciding and acting: the one place
//! where policy sees it ([`crate::policy`]). Deciding reads the packet and the maps and
//! changes nothing; acting rewrites, allocates and redirects.

use aya_ebpf::programs::TcContext;
use vpc_ebpf_common::{
    counters::reason,
    nat::{HostPortTarget, NatEntry, NatKey},
    node::{Endpoint, NodeConfig},
};

use crate::{
    deliver, kflow,
    packet::{Ipv4, Ports},
    verdict::{Outcome, PASS},
};

pub enum Action {
    /// Settled while deciding: drops, hand-overs the program does not act on, ARP answers,
    /// and ICMP errors about established translated flows (translated in place; they are
    /// replies, which policy never judges).
    Done(Outcome),
    /// Into a local pod's namespace. A copy of its entry: a map-value pointer held in an
    /// enum is split into halves by LLVM, which the verifier refuses.
    ToPod(Endpoint),
    /// Out of `ifindex` to the subnet gateway (the ENI that owns the sender's address).
    ToGateway { ifindex: u32, gateway: u32 },
    /// A packet of an established translated flow (SNAT, reverse NAT, hostPort).
    Established(NatEntry, Ports),
    /// A new flow to a hostPort: DNAT to its pod.
    NewHostPort(HostPortTarget, Ports),
    /// A new flow to outside the VPC: SNAT to the node address.
    NewSnat(Ports),
    /// To the host stack (or on from it, to the pod), counted under the reason; the flow
    /// given is recorded so that the rest of it crosses the host stack too (see
    /// [`crate::kflow`]).
    ToKernel(u16, Option<(NatKey, Ports)>),
}

impl Action {
    /// Whether policy judges this packet where it was decided: packets the program sends
    /// on itself. Packets of translated flows are replies or continuations (the flow was
    /// judged when it started); packets handed to the host stack are judged after it,
    /// where they reach a pod ([`crate::to_pod`]), since kube-proxy may translate them
    /// to a Service backend first.
    #[inline(always)]
    pub fn judged_here(&self) -> bool {
        matches!(
            self,
            Self::ToPod(_) | Self::ToGateway { .. } | Self::NewHostPort(..) | Self::NewSnat(_)
        )
    }
}

/// Carries out `action` on the packet `ip` of `ctx`.
#[inline(always)]
pub fn act(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4, action: Action) -> Outcome {
    match action {
        Action::Done(o) => o,
        Action::ToPod(peer) => deliver::to_pod(ctx, ip, &peer, reason::FWD_LOCAL_POD),
        Action::ToGateway { ifindex, gateway } => {
            deliver::to_gateway(ctx, ip, ifindex, gateway, reason::FWD_ENI)
        }
        Action::Established(e, p) => deliver::translated(ctx, cfg, ip, &p, &e),
        Action::NewHostPort(t, p) => deliver::new_hostport(ctx, cfg, ip, &p, &t),
        Action::NewSnat(p) => deliver::new_snat(ctx, cfg, ip, &p),
        Action::ToKernel(r, flow) => {
            if let Some((key, p)) = flow {
                kflow::record(&key, &p);
            }
            (r, PASS)
        }
    }
}
