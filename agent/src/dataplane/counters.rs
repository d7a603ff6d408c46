//! Reading the per-CPU counters map.

use aya::{Ebpf, maps::PerCpuHashMap};
use vpc_ebpf_common::{
    counters::{Counter, CounterKey},
    maps,
};

use super::DataplaneError;

/// One counter, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterRow {
    pub key: CounterKey,
    pub value: Counter,
}

pub fn read(ebpf: &Ebpf) -> Result<Vec<CounterRow>, DataplaneError> {
    let map = ebpf
        .map(maps::COUNTERS)
        .ok_or(DataplaneError::MissingMap(maps::COUNTERS))?;
    let map: PerCpuHashMap<_, CounterKey, Counter> =
        PerCpuHashMap::try_from(map).map_err(map_error)?;
    let mut rows = Vec::new();
    for entry in &map {
        let (key, per_cpu) = entry.map_err(map_error)?;
        let value = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        });
        rows.push(CounterRow { key, value });
    }
    rows.sort_by_key(|r| r.key);
    Ok(rows)
}

fn map_error(source: aya::maps::MapError) -> DataplaneError {
    DataplaneError::Map {
        name: maps::COUNTERS,
        source,
    }
}
