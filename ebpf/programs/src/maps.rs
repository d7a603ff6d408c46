//! The dataplane's maps. All pinned by name, so user space and a restarted agent see the
//! same state the programs use.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use vpc_ebpf_common::{
    nat::{
        FragPorts, HOSTPORTS_MAX_ENTRIES, HostPortKey, HostPortTarget, KernelFlow,
        NAT_DEFAULT_MAX_ENTRIES, NAT_FRAGS_MAX_ENTRIES, NatEntry, NatKey,
    },
    node::{CIDRS_MAX_ENTRIES, ENDPOINTS_MAX_ENTRIES, ENIS_MAX_ENTRIES, Endpoint, Eni, NodeConfig},
    policy::{
        EVENTS_BYTES, FLOWS_DEFAULT_MAX_ENTRIES, FRAGS_MAX_ENTRIES, FlowKey, FlowState,
        FragAdmitted, FragKey, POLICED_MAX_ENTRIES, PolicedPod, PortRules, RULES_MAX_ENTRIES,
        RulePeer,
    },
};

#[map]
pub static VPC_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// Pod IPv4 (network order) → endpoint.
#[map]
pub static VPC_ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(ENDPOINTS_MAX_ENTRIES, 0);

/// ENI ifindex → ENI.
#[map]
pub static VPC_ENIS: HashMap<u32, Eni> = HashMap::pinned(ENIS_MAX_ENTRIES, 0);

/// The primary address of each ENI (network order) → the ENI's ifindex: where what
/// leaves from that address must go.
#[map]
pub static VPC_NODE_ADDRS: HashMap<u32, u32> = HashMap::pinned(ENIS_MAX_ENTRIES, 0);

/// The VPC's CIDR blocks: destinations reached through the owning ENI without SNAT.
#[map]
pub static VPC_CIDRS: LpmTrie<u32, u32> = LpmTrie::pinned(CIDRS_MAX_ENTRIES, 0);

/// `AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS`: outside the VPC but reached without SNAT.
#[map]
pub static VPC_SNAT_EXCL: LpmTrie<u32, u32> = LpmTrie::pinned(CIDRS_MAX_ENTRIES, 0);

/// Destinations the kernel handles (Service CIDRs, link-local services).
#[map]
pub static VPC_PASSTHRU: LpmTrie<u32, u32> = LpmTrie::pinned(CIDRS_MAX_ENTRIES, 0);

/// Two entries per translated flow; LRU so a full table sheds the idlest flows instead of
/// refusing new ones. User space overrides the size at load.
#[map]
pub static VPC_NAT: LruHashMap<NatKey, NatEntry> = LruHashMap::pinned(NAT_DEFAULT_MAX_ENTRIES, 0);

#[map]
pub static VPC_HOSTPORTS: HashMap<HostPortKey, HostPortTarget> =
    HashMap::pinned(HOSTPORTS_MAX_ENTRIES, 0);

/// Flows the host stack handles (see [`KernelFlow`]); LRU for the same reason as the NAT
/// table, and sized with it at load.
#[map]
pub static VPC_KFLOWS: LruHashMap<NatKey, KernelFlow> =
    LruHashMap::pinned(NAT_DEFAULT_MAX_ENTRIES, 0);

/// Datagrams whose first fragment was translated → its ports, so that the later
/// fragments get the same translation.
#[map]
pub static VPC_NAT_FRAGS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::pinned(NAT_FRAGS_MAX_ENTRIES, 0);

/// Pod IPv4 (network order) → its rule sets; absent: not isolated.
#[map]
pub static VPC_POLICED: HashMap<u32, PolicedPod> = HashMap::pinned(POLICED_MAX_ENTRIES, 0);

/// (rule set, direction, peer prefix) → the ports those peers may use.
#[map]
pub static VPC_POL_RULES: LpmTrie<RulePeer, PortRules> = LpmTrie::pinned(RULES_MAX_ENTRIES, 0);

/// Connections judged by policy, one entry per direction; LRU as the NAT table.
#[map]
pub static VPC_POL_FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::pinned(FLOWS_DEFAULT_MAX_ENTRIES, 0);

/// Datagrams whose first fragment policy admitted: their later fragments, which carry no
/// ports, pass too.
#[map]
pub static VPC_POL_FRAGS: LruHashMap<FragKey, FragAdmitted> =
    LruHashMap::pinned(FRAGS_MAX_ENTRIES, 0);

/// The policy revision, bumped by user space after every policy change, and the end of
/// the mid-stream window (see [`vpc_ebpf_common::policy::MID_STREAM_UNTIL_INDEX`]).
#[map]
pub static VPC_POL_REV: Array<u64> = Array::pinned(2, 0);

/// Policy verdicts for user space (see [`vpc_ebpf_common::policy::PolicyEvent`]).
#[map]
pub static VPC_POL_EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

/// Events [`VPC_POL_EVENTS`] had no room for (slot 0, per CPU).
#[map]
pub static VPC_POL_EVLOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
