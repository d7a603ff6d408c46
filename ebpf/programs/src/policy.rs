//! Kubernetes `NetworkPolicy`: one check per direction, at the one point each program has between
//! deciding and acting ([`crate::action`]). `egress` judges what a pod sends, `ingress`
//! what is delivered to a pod; a connection needs both. No policy is enforced yet: both
//! allow everything. A denial is a drop counted under one of the reserved policy reasons
//! ([`vpc_ebpf_common::counters::reason::POLICY_FIRST`]..=`POLICY_LAST`).

use vpc_ebpf_common::node::Endpoint;

use crate::{action::Action, packet::Ipv4};

/// `None`: `from` may send this; `Some(reason)`: drop it, counted under `reason`.
#[inline(always)]
pub fn egress(_ip: &Ipv4, _from: &Endpoint, action: &Action) -> Option<u16> {
    if !action.starts_flow() {
        return None;
    }
    None
}

/// `None`: `to` may receive this; `Some(reason)`: drop it, counted under `reason`.
#[inline(always)]
pub fn ingress(_ip: &Ipv4, _to: &Endpoint, action: &Action) -> Option<u16> {
    if !action.starts_flow() {
        return None;
    }
    None
}
