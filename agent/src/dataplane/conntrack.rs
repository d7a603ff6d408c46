//! The NAT/conntrack table from user space: sizing, expiry, inspection.

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{HashMap, MapError},
};
use vpc_ebpf_common::{
    maps,
    nat::{KernelFlow, NatEntry, NatKey, tcp_state},
};

use super::DataplaneError;

const IPPROTO_TCP: u8 = 6;

/// How long a flow may stay idle before [`gc`] removes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcTimeouts {
    /// Established TCP.
    pub tcp: Duration,
    /// TCP after a FIN or RST was seen in either direction.
    pub tcp_closing: Duration,
    /// UDP and ICMP.
    pub other: Duration,
}

impl Default for GcTimeouts {
    fn default() -> Self {
        Self {
            tcp: Duration::from_hours(6),
            tcp_closing: Duration::from_secs(10),
            other: Duration::from_mins(1),
        }
    }
}

/// Per-entry cost of the LRU hash in kernel memory (key, value, element header, LRU
/// node), rounded up.
const BYTES_PER_ENTRY: u64 = 128;
/// Share of the node's memory the table may take, as Cilium's default map sizing does.
const MEMORY_SHARE_PER_MILLE: u64 = 2;
const MIN_ENTRIES: u32 = 1 << 16;
const MAX_ENTRIES: u32 = 1 << 22;

/// Entries for a node with `mem_total` bytes of memory: 0.2 % of it, within bounds.
pub fn entries_for_memory(mem_total: u64) -> u32 {
    let n = mem_total / 1000 * MEMORY_SHARE_PER_MILLE / BYTES_PER_ENTRY;
    u32::try_from(n)
        .unwrap_or(MAX_ENTRIES)
        .clamp(MIN_ENTRIES, MAX_ENTRIES)
}

/// MemTotal from /proc/meminfo, in bytes.
pub fn mem_total() -> Result<u64, DataplaneError> {
    let path = std::path::Path::new("/proc/meminfo");
    let text = std::fs::read_to_string(path).map_err(|source| DataplaneError::Meminfo {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| DataplaneError::Meminfo {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no MemTotal line"),
        })
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which stamps entries.
pub fn monotonic_now_ns() -> u64 {
    // SAFETY: zeroed timespec is a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn map_err(source: MapError) -> DataplaneError {
    DataplaneError::Map {
        name: maps::NAT,
        source,
    }
}

/// Every entry of the table.
pub fn entries(ebpf: &Ebpf) -> Result<Vec<(NatKey, NatEntry)>, DataplaneError> {
    let map = ebpf
        .map(maps::NAT)
        .ok_or(DataplaneError::MissingMap(maps::NAT))?;
    let m: HashMap<_, NatKey, NatEntry> = HashMap::try_from(map).map_err(map_err)?;
    // Entries may vanish (LRU eviction, the programs) while we walk: skip those.
    Ok(m.iter().filter_map(Result::ok).collect())
}

/// Every entry of the kernel-flows table.
pub fn kernel_flows(ebpf: &Ebpf) -> Result<Vec<(NatKey, KernelFlow)>, DataplaneError> {
    let map = ebpf
        .map(maps::KERNEL_FLOWS)
        .ok_or(DataplaneError::MissingMap(maps::KERNEL_FLOWS))?;
    let m: HashMap<_, NatKey, KernelFlow> = HashMap::try_from(map).map_err(kflow_err)?;
    Ok(m.iter().filter_map(Result::ok).collect())
}

fn kflow_err(source: MapError) -> DataplaneError {
    DataplaneError::Map {
        name: maps::KERNEL_FLOWS,
        source,
    }
}

fn timeout_ns(proto: u8, state: u8, t: &GcTimeouts) -> u64 {
    let timeout = if proto != IPPROTO_TCP {
        t.other
    } else if state & (tcp_state::FIN | tcp_state::RST) != 0 {
        t.tcp_closing
    } else {
        t.tcp
    };
    u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX)
}

/// Removes the flows idle for longer than their timeout at `now_ns` from the NAT table
/// (both entries of a flow go together, judged by the more recent of the two) and from
/// the kernel-flows table. Returns entries removed.
pub fn gc(ebpf: &mut Ebpf, now_ns: u64, t: &GcTimeouts) -> Result<usize, DataplaneError> {
    let removed = gc_nat(ebpf, now_ns, t)?;
    Ok(removed + gc_kernel_flows(ebpf, now_ns, t)?)
}

fn gc_kernel_flows(ebpf: &mut Ebpf, now_ns: u64, t: &GcTimeouts) -> Result<usize, DataplaneError> {
    let all = kernel_flows(ebpf)?;
    let map = ebpf
        .map_mut(maps::KERNEL_FLOWS)
        .ok_or(DataplaneError::MissingMap(maps::KERNEL_FLOWS))?;
    let mut m: HashMap<_, NatKey, KernelFlow> = HashMap::try_from(map).map_err(kflow_err)?;
    let mut removed = 0;
    for (key, f) in &all {
        if now_ns.saturating_sub(f.last_seen_ns) > timeout_ns(key.proto, f.state, t) {
            match m.remove(key) {
                Ok(()) => removed += 1,
                Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(kflow_err(e)),
            }
        }
    }
    Ok(removed)
}

fn gc_nat(ebpf: &mut Ebpf, now_ns: u64, t: &GcTimeouts) -> Result<usize, DataplaneError> {
    let all = entries(ebpf)?;
    let index: std::collections::HashMap<NatKey, NatEntry> = all.iter().copied().collect();
    let map = ebpf
        .map_mut(maps::NAT)
        .ok_or(DataplaneError::MissingMap(maps::NAT))?;
    let mut m: HashMap<_, NatKey, NatEntry> = HashMap::try_from(map).map_err(map_err)?;
    let mut removed = 0;
    for (key, e) in &all {
        let peer = index.get(&e.peer_key(key));
        let last = peer.map_or(e.last_seen_ns, |p| p.last_seen_ns.max(e.last_seen_ns));
        let state = e.state | peer.map_or(0, |p| p.state);
        if now_ns.saturating_sub(last) > timeout_ns(key.proto, state, t) {
            match m.remove(key) {
                Ok(()) => removed += 1,
                Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(map_err(e)),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizing_scales_with_memory_within_bounds() {
        assert_eq!(entries_for_memory(512 << 20), MIN_ENTRIES);
        let n24 = entries_for_memory(24 << 30);
        assert!(n24 > MIN_ENTRIES && n24 < MAX_ENTRIES, "{n24}");
        assert!(entries_for_memory(64 << 30) > n24);
        assert_eq!(entries_for_memory(u64::MAX), MAX_ENTRIES);
    }
}
