//! bpf(2) commands aya does not wrap: link detach by pin, and batched map updates and
//! deletes. Re-programming a policy writes a rule set of hundreds of peers; one
//! `BPF_MAP_UPDATE_BATCH` does in about a third of the time what as many
//! `BPF_MAP_UPDATE_ELEM`s do, and a batched delete in about a tenth.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

pub const BPF_OBJ_GET: libc::c_long = 7;
pub const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The bpf(2) syscall with `attr` (a `#[repr(C)]` prefix of `union bpf_attr`, with no
/// implicit padding: the kernel wants every byte past the command's fields zero). The
/// kernel may write back into `attr` (a batch's count).
pub fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is valid for reads and writes of its size for the whole call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A batch command that failed at element `done` (those before it took effect).
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub source: io::Error,
}

impl BatchError {
    /// The kernel has no batch command for this map type (older kernels), and nothing
    /// was done: the caller falls back to one command per element.
    pub fn unsupported(&self) -> bool {
        // ENOTSUPP (524) is the kernel-internal code the syscall leaks for this.
        matches!(
            self.source.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::EINVAL | 524)
        ) && self.done == 0
    }
}

fn batch(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    keys: u64,
    values: u64,
    count: usize,
) -> Result<(), BatchError> {
    if count == 0 {
        return Ok(());
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys,
        values,
        count: u32::try_from(count).map_err(|_| BatchError {
            done: 0,
            source: io::Error::from_raw_os_error(libc::E2BIG),
        })?,
        map_fd: map.as_raw_fd().cast_unsigned(),
        elem_flags: 0,
        flags: 0,
    };
    sys_bpf(cmd, &mut attr)
        .map(|_| ())
        .map_err(|source| BatchError {
            // On failure the kernel reports how many elements it had done.
            done: attr.count as usize,
            source,
        })
}

/// Writes `keys[i]` → `values[i]` in order (`BPF_MAP_UPDATE_BATCH`, flags `BPF_ANY`).
/// `K` and `V` must be the map's key and value types, `#[repr(C)]` with no padding.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    if keys.len() != values.len() {
        return Err(BatchError {
            done: 0,
            source: io::Error::new(io::ErrorKind::InvalidInput, "not one value per key"),
        });
    }
    batch(
        BPF_MAP_UPDATE_BATCH,
        map,
        keys.as_ptr() as u64,
        values.as_ptr() as u64,
        keys.len(),
    )
}

/// Deletes `keys` in order (`BPF_MAP_DELETE_BATCH`); stops at the first key absent
/// (ENOENT, with `done` its index).
pub fn delete_batch<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    batch(
        BPF_MAP_DELETE_BATCH,
        map,
        keys.as_ptr() as u64,
        0,
        keys.len(),
    )
}
