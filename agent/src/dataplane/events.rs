//! The policy events ring buffer, read by user space: what the programs decided
//! ([`PolicyEvent`]) and how many events found no room.

use std::os::fd::AsRawFd as _;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use vpc_ebpf_common::{maps, policy::PolicyEvent};

use super::DataplaneError;

/// Both maps, taken out of the loaded object: one reader owns them.
pub struct PolicyEvents {
    ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for PolicyEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEvents")
            .field("fd", &self.ring.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl PolicyEvents {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, DataplaneError> {
        let map_err = |name| move |source| DataplaneError::Map { name, source };
        let ring = ebpf
            .take_map(maps::POLICY_EVENTS)
            .ok_or(DataplaneError::MissingMap(maps::POLICY_EVENTS))?;
        let lost = ebpf
            .take_map(maps::POLICY_EVENTS_LOST)
            .ok_or(DataplaneError::MissingMap(maps::POLICY_EVENTS_LOST))?;
        Ok(Self {
            ring: RingBuf::try_from(ring).map_err(map_err(maps::POLICY_EVENTS))?,
            lost: PerCpuArray::try_from(lost).map_err(map_err(maps::POLICY_EVENTS_LOST))?,
        })
    }

    /// Appends every event waiting now; does not block.
    pub fn drain(&mut self, out: &mut Vec<PolicyEvent>) {
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<PolicyEvent>() {
                // SAFETY: the programs write whole `PolicyEvent`s (repr(C), plain
                // integers); the length is checked and the read is unaligned-safe.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
    }

    /// Events the programs could not hand over (the buffer was full), since the map was
    /// created.
    pub fn lost(&self) -> Result<u64, DataplaneError> {
        let per_cpu = self.lost.get(&0, 0).map_err(|source| DataplaneError::Map {
            name: maps::POLICY_EVENTS_LOST,
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }

    /// Waits until events are waiting (the ring buffer's fd polls readable).
    pub fn into_async(self) -> std::io::Result<AsyncPolicyEvents> {
        // SAFETY: the fd is the ring buffer map's, owned by `self.ring`: open, and the
        // same one, for as long as the `AsyncFd` owns `self`.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        };
        Ok(AsyncPolicyEvents {
            fd: fd.map_err(std::io::Error::from)?,
        })
    }
}

impl std::os::fd::AsRawFd for PolicyEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// [`PolicyEvents`] on the async runtime.
#[derive(Debug)]
pub struct AsyncPolicyEvents {
    fd: tokio::io::unix::AsyncFd<PolicyEvents>,
}

impl AsyncPolicyEvents {
    /// Waits for events and appends them to `out`.
    pub async fn next_batch(&mut self, out: &mut Vec<PolicyEvent>) -> std::io::Result<()> {
        let mut guard = self.fd.readable_mut().await?;
        // Cleared before reading: an event committed while we read wakes us again
        // (cleared after, that wake-up could be lost and the event left waiting).
        guard.clear_ready();
        guard.get_inner_mut().drain(out);
        Ok(())
    }

    pub fn lost(&self) -> Result<u64, DataplaneError> {
        self.fd.get_ref().lost()
    }
}
