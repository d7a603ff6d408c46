//! The NetworkPolicy maps: writing a [`Plan`] in its order and reading back what an
//! earlier run applied, so that a restarted agent diffs against the pinned maps instead
//! of rewriting them (the programs keep enforcing throughout).

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, BorrowedFd},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapError, lpm_trie::Key},
    sys::SyscallError,
};
use ipnet::Ipv4Net;
use vpc_ebpf_common::{
    maps,
    policy::{
        MID_STREAM_GRACE_NS, MID_STREAM_UNTIL_INDEX, PolicedPod, PortRules, REVISION_INDEX,
        RulePeer, SET_NONE, direction,
    },
};

use super::{
    DataplaneError,
    spec::{be, from_be},
    sys,
};
use crate::policy::{
    compile::RuleSet,
    sets::{Applied, Plan},
};

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn rules_map(
    ebpf: &mut Ebpf,
) -> Result<LpmTrie<&mut aya::maps::MapData, RulePeer, PortRules>, DataplaneError> {
    let m = ebpf
        .map_mut(maps::POLICY_RULES)
        .ok_or(DataplaneError::MissingMap(maps::POLICY_RULES))?;
    LpmTrie::try_from(m).map_err(map_err(maps::POLICY_RULES))
}

fn policed_map(
    ebpf: &mut Ebpf,
) -> Result<HashMap<&mut aya::maps::MapData, u32, PolicedPod>, DataplaneError> {
    let m = ebpf
        .map_mut(maps::POLICED)
        .ok_or(DataplaneError::MissingMap(maps::POLICED))?;
    HashMap::try_from(m).map_err(map_err(maps::POLICED))
}

fn revision_map(ebpf: &mut Ebpf) -> Result<Array<&mut aya::maps::MapData, u64>, DataplaneError> {
    let m = ebpf
        .map_mut(maps::POLICY_REVISION)
        .ok_or(DataplaneError::MissingMap(maps::POLICY_REVISION))?;
    Array::try_from(m).map_err(map_err(maps::POLICY_REVISION))
}

fn key(set: u32, dir: u32, net: Ipv4Net) -> Key<RulePeer> {
    Key::new(
        RulePeer::FIXED_BITS + u32::from(net.prefix_len()),
        RulePeer::new(set, dir, be(net.network())),
    )
}

fn value(ranges: &[vpc_ebpf_common::policy::PortRange]) -> PortRules {
    let mut v = PortRules {
        count: u32::try_from(ranges.len()).expect("the compiler keeps at most PORT_RANGES_MAX"),
        ..Default::default()
    };
    v.ranges[..ranges.len()].copy_from_slice(ranges);
    v
}

/// Writes `plan`: new sets, then pod pointers, then removals, then a new revision so
/// that tracked connections are judged again under the new rules. Rule entries go in
/// batches: a set of hundreds of peers is one syscall, not hundreds.
pub fn apply(ebpf: &mut Ebpf, plan: &Plan) -> Result<(), DataplaneError> {
    if plan.is_empty() {
        return Ok(());
    }
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (id, dir, set) in &plan.new_sets {
        for (net, ranges) in set.iter() {
            keys.push(key(*id, *dir, *net));
            values.push(value(ranges));
        }
    }
    for (id, dir, old, new) in &plan.amended {
        for (net, ranges) in new.iter().filter(|(n, r)| old.get(n) != Some(r)) {
            keys.push(key(*id, *dir, *net));
            values.push(value(ranges));
        }
    }
    write_rules(ebpf, &keys, &values)?;
    {
        let mut pods = policed_map(ebpf)?;
        for (ip, p) in &plan.pods_set {
            pods.insert(be(*ip), p, 0).map_err(map_err(maps::POLICED))?;
        }
        for ip in &plan.pods_removed {
            match pods.remove(&be(*ip)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err(maps::POLICED)(e)),
            }
        }
    }
    let gone = plan
        .dead_sets
        .iter()
        .map(|(id, dir, set)| (id, dir, set, None));
    let dropped = plan
        .amended
        .iter()
        .map(|(id, dir, old, new)| (id, dir, old, Some(new)));
    let mut doomed = Vec::new();
    for (id, dir, set, kept) in gone.chain(dropped) {
        doomed.extend(
            set.keys()
                .filter(|n| kept.is_none_or(|k| !k.contains_key(*n)))
                .map(|net| key(*id, *dir, *net)),
        );
    }
    remove_rules(ebpf, &doomed)?;
    bump_revision(ebpf)
}

fn rules_fd(ebpf: &Ebpf) -> Result<BorrowedFd<'_>, DataplaneError> {
    match ebpf.map(maps::POLICY_RULES) {
        Some(aya::maps::Map::LpmTrie(m)) => Ok(m.fd().as_fd()),
        Some(_) => Err(map_err(maps::POLICY_RULES)(MapError::InvalidMapType {
            map_type: 0,
        })),
        None => Err(DataplaneError::MissingMap(maps::POLICY_RULES)),
    }
}

fn batch_err(call: &'static str, e: sys::BatchError) -> DataplaneError {
    map_err(maps::POLICY_RULES)(MapError::SyscallError(SyscallError {
        call,
        io_error: e.source,
    }))
}

/// Inserts or replaces `keys[i]` → `values[i]`, in order.
fn write_rules(
    ebpf: &mut Ebpf,
    keys: &[Key<RulePeer>],
    values: &[PortRules],
) -> Result<(), DataplaneError> {
    match sys::update_batch(rules_fd(ebpf)?, keys, values) {
        Ok(()) => Ok(()),
        Err(e) if e.unsupported() => {
            let mut rules = rules_map(ebpf)?;
            for (k, v) in keys.iter().zip(values) {
                rules.insert(k, v, 0).map_err(map_err(maps::POLICY_RULES))?;
            }
            Ok(())
        }
        Err(e) => Err(batch_err("BPF_MAP_UPDATE_BATCH", e)),
    }
}

/// Deletes `keys`; a key already absent is not an error.
fn remove_rules(ebpf: &mut Ebpf, mut keys: &[Key<RulePeer>]) -> Result<(), DataplaneError> {
    while !keys.is_empty() {
        match sys::delete_batch(rules_fd(ebpf)?, keys) {
            Ok(()) => return Ok(()),
            // The kernel stops at the first absent key: skip it, go on after it.
            Err(e) if e.source.raw_os_error() == Some(libc::ENOENT) => {
                keys = keys.get(e.done + 1..).unwrap_or_default();
            }
            Err(e) if e.unsupported() => {
                let mut rules = rules_map(ebpf)?;
                for k in keys {
                    match rules.remove(k) {
                        Ok(()) | Err(MapError::KeyNotFound) => {}
                        Err(MapError::SyscallError(e))
                            if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(map_err(maps::POLICY_RULES)(e)),
                    }
                }
                return Ok(());
            }
            Err(e) => return Err(batch_err("BPF_MAP_DELETE_BATCH", e)),
        }
    }
    Ok(())
}

/// Opens the mid-stream window (see [`MID_STREAM_UNTIL_INDEX`]) unless it was opened
/// before: a restarted agent finds the connections of the earlier run tracked.
pub fn open_mid_stream_window(ebpf: &mut Ebpf, now_ns: u64) -> Result<(), DataplaneError> {
    let mut rev = revision_map(ebpf)?;
    let until = rev
        .get(&MID_STREAM_UNTIL_INDEX, 0)
        .map_err(map_err(maps::POLICY_REVISION))?;
    if until == 0 {
        rev.set(MID_STREAM_UNTIL_INDEX, now_ns + MID_STREAM_GRACE_NS, 0)
            .map_err(map_err(maps::POLICY_REVISION))?;
    }
    Ok(())
}

/// Sets the end of the mid-stream window outright (tests close it).
pub fn set_mid_stream_until(ebpf: &mut Ebpf, until_ns: u64) -> Result<(), DataplaneError> {
    let mut rev = revision_map(ebpf)?;
    rev.set(MID_STREAM_UNTIL_INDEX, until_ns, 0)
        .map_err(map_err(maps::POLICY_REVISION))
}

fn bump_revision(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let mut rev = revision_map(ebpf)?;
    let now = rev
        .get(&REVISION_INDEX, 0)
        .map_err(map_err(maps::POLICY_REVISION))?;
    rev.set(REVISION_INDEX, now.wrapping_add(1), 0)
        .map_err(map_err(maps::POLICY_REVISION))
}

/// What the maps enforce now (an earlier run's work, kept by the pins).
pub fn read(ebpf: &mut Ebpf) -> Result<Applied, DataplaneError> {
    let mut sets: BTreeMap<u32, (u32, RuleSet)> = BTreeMap::new();
    {
        let rules = rules_map(ebpf)?;
        for entry in &rules {
            let (k, v) = entry.map_err(map_err(maps::POLICY_RULES))?;
            let data = k.data();
            let len = k.prefix_len().saturating_sub(RulePeer::FIXED_BITS);
            let Some(net) = u8::try_from(len)
                .ok()
                .and_then(|len| Ipv4Net::new(from_be(data.peer), len).ok())
            else {
                continue;
            };
            let n = (v.count as usize).min(v.ranges.len());
            sets.entry(data.set())
                .or_insert_with(|| (data.direction(), RuleSet::new()))
                .1
                .insert(net, v.ranges[..n].to_vec());
        }
    }
    let pods: BTreeMap<_, PolicedPod> = policed_map(ebpf)?
        .iter()
        .map(|r| r.map(|(ip, p)| (from_be(ip), p)))
        .collect::<Result<_, _>>()
        .map_err(map_err(maps::POLICED))?;
    // A set that admits nothing has no entries: only the pods pointing to it tell it is
    // there (and taken).
    for p in pods.values() {
        for (id, dir) in [
            (p.ingress_set, direction::INGRESS),
            (p.egress_set, direction::EGRESS),
        ] {
            if id != SET_NONE {
                sets.entry(id).or_insert_with(|| (dir, RuleSet::new()));
            }
        }
    }
    let sets = sets
        .into_iter()
        .map(|(id, (dir, set))| (id, (dir, std::sync::Arc::new(set))))
        .collect();
    Ok(Applied { sets, pods })
}
