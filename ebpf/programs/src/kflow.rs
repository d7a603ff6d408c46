//! Flows the host stack handles: kube-proxy DNAT (Service cluster IPs, node ports) and connections
//! the host itself makes or accepts. The programs redirect around the host stack, so
//! without this a reply of such a flow would skip the conntrack entry that un-DNATs it
//! (or be source-NATed by us instead). See [`vpc_ebpf_common::nat::KernelFlow`].

use aya_ebpf::bindings::BPF_ANY;
use vpc_ebpf_common::nat::{KernelFlow, NatKey};

use crate::{maps::VPC_KFLOWS, nat, packet::Ports};

/// Whether `key` is a kernel flow; refreshes it when it is.
#[inline(always)]
pub fn touch(key: &NatKey, p: &Ports) -> bool {
    let Some(f) = VPC_KFLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a valid map value; racing CPUs only write the timestamp and OR state bits,
    // where any of the racing values is fine.
    unsafe {
        (*f).last_seen_ns = nat::now();
        (*f).state = p.next_state((*f).state);
    }
    true
}

/// Records `key` as a kernel flow (or refreshes it). A full table evicts the idlest flow,
/// whose packets then take the fast path again: the cost of an undersized table is
/// correctness of idle kube-proxy flows, so the table is sized like the NAT table.
#[inline(always)]
pub fn record(key: &NatKey, p: &Ports) {
    if touch(key, p) {
        return;
    }
    let f = KernelFlow {
        last_seen_ns: nat::now(),
        state: p.next_state(0),
        pad: [0; 7],
    };
    let _ = VPC_KFLOWS.insert(key, f, u64::from(BPF_ANY));
}
