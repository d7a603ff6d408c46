//! Makes sure pins land on a bpffs mount.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path};

use super::DataplaneError;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf when `pin_root` lies under it and nothing is mounted there
/// (minimal hosts and fresh containers), then checks that `pin_root` is on bpffs.
pub fn ensure_mounted(pin_root: &Path) -> Result<(), DataplaneError> {
    let root = Path::new(BPFFS_ROOT);
    if pin_root.starts_with(root) && !is_bpffs(root)? {
        mount_bpffs(root)?;
    }
    let mut probe = pin_root;
    // The pin root itself may not exist yet: check its nearest existing ancestor.
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if is_bpffs(probe)? {
        Ok(())
    } else {
        Err(DataplaneError::NotBpffs {
            path: pin_root.to_path_buf(),
        })
    }
}

fn c_path(path: &Path) -> Result<CString, DataplaneError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| DataplaneError::BpffsStat {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"),
    })
}

fn is_bpffs(path: &Path) -> Result<bool, DataplaneError> {
    let c = c_path(path)?;
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(DataplaneError::BpffsStat {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(st.f_type == BPF_FS_MAGIC)
}

fn mount_bpffs(root: &Path) -> Result<(), DataplaneError> {
    let target = c_path(root)?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        tracing::info!(path = %root.display(), "mounted bpffs");
        Ok(())
    } else {
        Err(DataplaneError::BpffsMount {
            path: root.to_path_buf(),
            source: std::io::Error::last_os_error(),
        })
    }
}
