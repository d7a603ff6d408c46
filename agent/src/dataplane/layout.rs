//! The guard against re-opening a pinned map written with another layout.
//!
//! aya re-uses whatever map is pinned under a map's name without comparing it with the
//! object's definition. A map whose key or value changed size would then be read and
//! written with the wrong layout by the programs and by us; one whose type changed would
//! make the programs fail to load. Layout changes are meant to bump `PIN_VERSION` (a new
//! pin directory); this catches the forgotten bump: a pinned map that does not match is
//! unpinned and re-created (its entries are lost, as they could not be read anyway), and
//! the agent says so.

use std::{mem::size_of, path::Path};

use aya::maps::{MapInfo, MapType};
use tracing::warn;
use vpc_ebpf_common::{
    counters::{COUNTERS_MAX_ENTRIES, Counter, CounterKey, FORWARD_SLOTS},
    maps as names,
    nat::{
        FragPorts, HOSTPORTS_MAX_ENTRIES, HostPortKey, HostPortTarget, KernelFlow,
        NAT_FRAGS_MAX_ENTRIES, NatEntry, NatKey,
    },
    node::{
        CIDRS_MAX_ENTRIES, ENDPOINTS_MAX_ENTRIES, ENIS_MAX_ENTRIES, Endpoint, Eni, Ipv4Prefix,
        NodeConfig,
    },
    policy::{
        EVENTS_BYTES, FLOWS_DEFAULT_MAX_ENTRIES, FRAGS_MAX_ENTRIES, FlowKey, FlowState,
        FragAdmitted, FragKey, POLICED_MAX_ENTRIES, PolicedPod, PortRules, RULES_MAX_ENTRIES,
        RulePeer,
    },
};

use super::DataplaneError;

/// `BPF_F_NO_PREALLOC`, which the kernel requires of LPM tries.
const NO_PREALLOC: u32 = 1;

/// What the object defines for a pinned map.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    /// `None`: sized at load from configuration (the NAT and kernel-flow tables). A pinned
    /// table of another size is kept: its entries are live flows, and its size is not a
    /// matter of layout.
    pub max_entries: Option<u32>,
    pub flags: u32,
}

#[expect(clippy::cast_possible_truncation, reason = "map types are a few bytes")]
const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

const fn layout(map_type: MapType, key: u32, value: u32, max: Option<u32>, flags: u32) -> Layout {
    Layout {
        map_type,
        key_size: key,
        value_size: value,
        max_entries: max,
        flags,
    }
}

/// Every pinned map of the object, as `ebpf/programs/src/{maps,counters}.rs` define them.
/// A root test loads the object into an empty pin directory and checks this table
/// against what the kernel created, so the two cannot drift apart unnoticed.
#[expect(clippy::too_many_lines, reason = "one entry per map, a table")]
pub fn expected() -> [(&'static str, Layout); 20] {
    let cidrs = layout(
        MapType::LpmTrie,
        size::<Ipv4Prefix>(),
        size::<u32>(),
        Some(CIDRS_MAX_ENTRIES),
        NO_PREALLOC,
    );
    [
        (
            names::COUNTERS,
            layout(
                MapType::PerCpuHash,
                size::<CounterKey>(),
                size::<Counter>(),
                Some(COUNTERS_MAX_ENTRIES),
                0,
            ),
        ),
        (
            names::FORWARD_COUNTERS,
            layout(
                MapType::PerCpuArray,
                4,
                size::<Counter>(),
                Some(FORWARD_SLOTS),
                0,
            ),
        ),
        (
            names::CONFIG,
            layout(MapType::Array, 4, size::<NodeConfig>(), Some(1), 0),
        ),
        (
            names::ENDPOINTS,
            layout(
                MapType::Hash,
                size::<u32>(),
                size::<Endpoint>(),
                Some(ENDPOINTS_MAX_ENTRIES),
                0,
            ),
        ),
        (
            names::ENIS,
            layout(
                MapType::Hash,
                size::<u32>(),
                size::<Eni>(),
                Some(ENIS_MAX_ENTRIES),
                0,
            ),
        ),
        (names::VPC_CIDRS, cidrs),
        (names::SNAT_EXCLUSIONS, cidrs),
        (names::PASSTHROUGH_CIDRS, cidrs),
        (
            names::NAT,
            layout(
                MapType::LruHash,
                size::<NatKey>(),
                size::<NatEntry>(),
                None,
                0,
            ),
        ),
        (
            names::HOSTPORTS,
            layout(
                MapType::Hash,
                size::<HostPortKey>(),
                size::<HostPortTarget>(),
                Some(HOSTPORTS_MAX_ENTRIES),
                0,
            ),
        ),
        (
            names::KERNEL_FLOWS,
            layout(
                MapType::LruHash,
                size::<NatKey>(),
                size::<KernelFlow>(),
                None,
                0,
            ),
        ),
        (
            names::NODE_ADDRESSES,
            layout(
                MapType::Hash,
                size::<u32>(),
                size::<u32>(),
                Some(ENIS_MAX_ENTRIES),
                0,
            ),
        ),
        (
            names::NAT_FRAGMENTS,
            layout(
                MapType::LruHash,
                size::<FragKey>(),
                size::<FragPorts>(),
                Some(NAT_FRAGS_MAX_ENTRIES),
                0,
            ),
        ),
        (
            names::POLICED,
            layout(
                MapType::Hash,
                size::<u32>(),
                size::<PolicedPod>(),
                Some(POLICED_MAX_ENTRIES),
                0,
            ),
        ),
        (
            names::POLICY_RULES,
            layout(
                MapType::LpmTrie,
                // The trie's key: the prefix length, then the data.
                4 + size::<RulePeer>(),
                size::<PortRules>(),
                Some(RULES_MAX_ENTRIES),
                NO_PREALLOC,
            ),
        ),
        (
            names::POLICY_FLOWS,
            layout(
                MapType::LruHash,
                size::<FlowKey>(),
                size::<FlowState>(),
                Some(FLOWS_DEFAULT_MAX_ENTRIES),
                0,
            ),
        ),
        (
            names::POLICY_FRAGMENTS,
            layout(
                MapType::LruHash,
                size::<FragKey>(),
                size::<FragAdmitted>(),
                Some(FRAGS_MAX_ENTRIES),
                0,
            ),
        ),
        (
            names::POLICY_REVISION,
            layout(MapType::Array, 4, size::<u64>(), Some(2), 0),
        ),
        (
            names::POLICY_EVENTS,
            layout(MapType::RingBuf, 0, 0, Some(EVENTS_BYTES), 0),
        ),
        (
            names::POLICY_EVENTS_LOST,
            layout(MapType::PerCpuArray, 4, size::<u64>(), Some(1), 0),
        ),
    ]
}

/// How a pinned map differs from `want`; `None`: it matches.
fn mismatch(info: &MapInfo, want: &Layout) -> Option<String> {
    let found_type = info.map_type().ok();
    let mut diffs = Vec::new();
    if found_type != Some(want.map_type) {
        diffs.push(format!("type {found_type:?}, want {:?}", want.map_type));
    }
    if info.key_size() != want.key_size {
        diffs.push(format!(
            "key size {}, want {}",
            info.key_size(),
            want.key_size
        ));
    }
    if info.value_size() != want.value_size {
        diffs.push(format!(
            "value size {}, want {}",
            info.value_size(),
            want.value_size
        ));
    }
    if let Some(max) = want.max_entries
        && info.max_entries() != max
    {
        diffs.push(format!("max entries {}, want {max}", info.max_entries()));
    }
    if info.map_flags() != want.flags {
        diffs.push(format!(
            "flags {:#x}, want {:#x}",
            info.map_flags(),
            want.flags
        ));
    }
    (!diffs.is_empty()).then(|| diffs.join(", "))
}

/// Unpins every map under `pin_dir` whose layout is not the object's, so that the load
/// that follows creates it afresh. Returns the names of the maps replaced.
pub fn replace_mismatched(pin_dir: &Path) -> Result<Vec<&'static str>, DataplaneError> {
    let mut replaced = Vec::new();
    for (name, want) in expected() {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let why = match MapInfo::from_pin(&path) {
            Ok(info) => match mismatch(&info, &want) {
                Some(why) => why,
                None => continue,
            },
            Err(e) => format!("not a readable map ({e})"),
        };
        warn!(
            map = name,
            pin = %path.display(),
            differs = %why,
            "pinned map has another layout than this agent's eBPF object; re-creating it \
             (its entries are lost). A change of map layout must bump PIN_VERSION \
             (vpc-ebpf-common) so that a new pin directory is used"
        );
        std::fs::remove_file(&path).map_err(|source| DataplaneError::PinDir {
            path: path.clone(),
            source,
        })?;
        replaced.push(name);
    }
    Ok(replaced)
}
