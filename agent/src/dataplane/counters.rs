//! Reading the per-CPU counters maps.

use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuHashMap},
};
use vpc_ebpf_common::{
    counters::{ALL_INTERFACES, Counter, CounterKey, direction, forward_slot, reason},
    maps,
};

use super::DataplaneError;

/// One counter, summed over CPUs. The forwarding verdicts are not kept per interface:
/// their rows have `key.ifindex` [`ALL_INTERFACES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterRow {
    pub key: CounterKey,
    pub value: Counter,
}

fn sum(per_cpu: &[Counter]) -> Counter {
    per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

/// Every counter that counted something, sorted by key.
pub fn read(ebpf: &Ebpf) -> Result<Vec<CounterRow>, DataplaneError> {
    let mut rows = per_interface(ebpf)?;
    rows.extend(forwarded(ebpf)?);
    rows.sort_by_key(|r| r.key);
    Ok(rows)
}

fn per_interface(ebpf: &Ebpf) -> Result<Vec<CounterRow>, DataplaneError> {
    let name = maps::COUNTERS;
    let map = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    let map: PerCpuHashMap<_, CounterKey, Counter> =
        PerCpuHashMap::try_from(map).map_err(map_error(name))?;
    let mut rows = Vec::new();
    for entry in &map {
        let (key, per_cpu) = entry.map_err(map_error(name))?;
        rows.push(CounterRow {
            key,
            value: sum(&per_cpu),
        });
    }
    Ok(rows)
}

fn forwarded(ebpf: &Ebpf) -> Result<Vec<CounterRow>, DataplaneError> {
    let name = maps::FORWARD_COUNTERS;
    let map = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    let map: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_error(name))?;
    let mut rows = Vec::new();
    for r in reason::ALL
        .iter()
        .copied()
        .filter(|r| reason::is_forward(*r))
    {
        for d in [direction::INGRESS, direction::EGRESS] {
            let value = sum(&map.get(&forward_slot(r, d), 0).map_err(map_error(name))?);
            // Like the hash, which only has the keys that counted something.
            if value.packets != 0 {
                rows.push(CounterRow {
                    key: CounterKey::new(ALL_INTERFACES, r, d),
                    value,
                });
            }
        }
    }
    Ok(rows)
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}
