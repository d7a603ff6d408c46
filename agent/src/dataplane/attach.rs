//! Attaching the dataplane programs so that they outlive the agent.
//!
//! tcx: each attachment is a bpf_link pinned under `<pin dir>/links/`, named
//! `<ifindex>-<hook>-<program>`. A restarted agent swaps its freshly loaded program into
//! every pinned link (`BPF_LINK_UPDATE`, atomic, nothing detached in between); removing
//! the pin detaches. clsact: filters live in the kernel on their own; every one of ours
//! has a fixed priority and handle, so re-attaching replaces it in place.

use std::{
    collections::HashSet,
    ffi::CStr,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramError, SchedClassifier,
        links::{FdLink, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use tracing::{debug, info, warn};

use super::{
    AttachMode, DataplaneError, Hook, add_clsact, classifier,
    sys::{BPF_LINK_DETACH, BPF_OBJ_GET, sys_bpf},
};

/// Priority and handle of our clsact filters: fixed, so that they can be found again.
const CLSACT_PRIORITY: u16 = 0x0300;
const CLSACT_HANDLE: TcHandle = TcHandle::new(0, 0x0eb5);

pub struct Attachments {
    mode: AttachMode,
    dir: PathBuf,
    /// What this process attached or re-opened: (ifindex, hook, program).
    known: HashSet<(u32, Hook, &'static str)>,
}

impl Attachments {
    /// Re-opens the pinned links of an earlier run and moves them to the programs just
    /// loaded; drops the pins of links whose interface is gone.
    pub fn restore(
        ebpf: &mut Ebpf,
        mode: AttachMode,
        pin_dir: &Path,
        programs: &[&'static str],
    ) -> Result<Self, DataplaneError> {
        let dir = pin_dir.join("links");
        std::fs::create_dir_all(&dir).map_err(|source| DataplaneError::PinDir {
            path: dir.clone(),
            source,
        })?;
        let mut me = Self {
            mode,
            dir,
            known: HashSet::new(),
        };
        let entries = std::fs::read_dir(&me.dir).map_err(|source| DataplaneError::PinDir {
            path: me.dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some((ifindex, hook, program)) = name.to_str().and_then(|n| parse_pin(n, programs))
            else {
                warn!(pin = ?entry.path(), "unknown file among pinned links; left alone");
                continue;
            };
            match update_pinned(ebpf, &entry.path(), program) {
                Ok(()) => {
                    me.known.insert((ifindex, hook, program));
                }
                Err(e) => {
                    info!(pin = %entry.path().display(), error = %e, "dropping a pinned link whose interface is gone");
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        if !me.known.is_empty() {
            info!(links = me.known.len(), "re-opened pinned links");
        }
        Ok(me)
    }

    fn pin_path(&self, ifindex: u32, hook: Hook, program: &str) -> PathBuf {
        self.dir
            .join(format!("{ifindex}-{}-{program}", hook.name()))
    }

    /// Attaches `program` to `hook` of `ifindex` unless it already is; replaces another
    /// version of it there.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        ifindex: u32,
        hook: Hook,
        program: &'static str,
    ) -> Result<(), DataplaneError> {
        if self.known.contains(&(ifindex, hook, program))
            && self.is_attached(ebpf, ifindex, hook, program)
        {
            return Ok(());
        }
        let iface = ifname(ifindex)?;
        match self.mode {
            AttachMode::Tcx => {
                let pin = self.pin_path(ifindex, hook, program);
                if pin.exists() {
                    // A link of an earlier attachment: take it over, or drop it if its
                    // interface was replaced (same ifindex, new device: the update of a
                    // link whose device is gone fails). A link that took the update is
                    // kept whatever a query says: dropping it detaches the program that
                    // carries the pod's traffic, and attaching the same program again
                    // fails with EEXIST while the old link is being released (seen on
                    // agent restarts: pods cut off until the next re-program).
                    if update_pinned(ebpf, &pin, program).is_ok() {
                        self.known.insert((ifindex, hook, program));
                        return Ok(());
                    }
                    let _ = std::fs::remove_file(&pin);
                }
                let prog = classifier(ebpf, program)?;
                let id = prog
                    .attach_with_options(
                        &iface,
                        hook.attach_type(),
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|source| attach_error(&iface, program, source))?;
                let link = prog
                    .take_link(id)
                    .map_err(|source| attach_error(&iface, program, source))?;
                let fd: FdLink = link.try_into().map_err(|source| DataplaneError::Link {
                    path: pin.clone(),
                    source,
                })?;
                // Dropping the returned PinnedLink only closes our fd; the pin holds it.
                fd.pin(&pin).map_err(|source| DataplaneError::PinLink {
                    path: pin.clone(),
                    source,
                })?;
            }
            AttachMode::Clsact => {
                add_clsact(&iface)?;
                let prog = classifier(ebpf, program)?;
                let existing = SchedClassifierLink::attached(
                    &iface,
                    hook.attach_type(),
                    CLSACT_PRIORITY,
                    CLSACT_HANDLE,
                    None,
                )
                .map_err(|e| attach_error(&iface, program, ProgramError::IOError(e)))?;
                let id = match prog.attach_to_link(existing) {
                    Ok(id) => id,
                    // Nothing to replace yet.
                    Err(_) => prog
                        .attach_with_options(
                            &iface,
                            hook.attach_type(),
                            TcAttachOptions::Netlink(NlOptions {
                                priority: CLSACT_PRIORITY,
                                handle: CLSACT_HANDLE,
                                classid: None,
                            }),
                        )
                        .map_err(|source| attach_error(&iface, program, source))?,
                };
                let link = prog
                    .take_link(id)
                    .map_err(|source| attach_error(&iface, program, source))?;
                // The filter must outlive this process; dropping the link would delete it.
                std::mem::forget(link);
            }
        }
        debug!(iface, ifindex, ?hook, program, mode = ?self.mode, "attached");
        self.known.insert((ifindex, hook, program));
        Ok(())
    }

    /// Detaches `program` from `hook` of `ifindex`. What is not attached, or an interface
    /// that is gone, is success.
    pub fn detach(
        &mut self,
        ifindex: u32,
        hook: Hook,
        program: &'static str,
    ) -> Result<(), DataplaneError> {
        self.known.remove(&(ifindex, hook, program));
        match self.mode {
            AttachMode::Tcx => {
                let pin = self.pin_path(ifindex, hook, program);
                // Removing the pin alone frees the link later, from a kernel work queue:
                // the program would go on running for a moment after detach returned.
                if let Err(source) = detach_pinned(&pin)
                    && !matches!(
                        source.raw_os_error(),
                        Some(libc::ENOENT | libc::ENOLINK | libc::ENODEV)
                    )
                {
                    // Unpinning still detaches it, a moment later.
                    warn!(pin = %pin.display(), error = %source, "detaching a pinned link (BPF_OBJ_GET, BPF_LINK_DETACH)");
                }
                match std::fs::remove_file(&pin) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(source) => Err(DataplaneError::PinDir { path: pin, source }),
                }
            }
            AttachMode::Clsact => {
                let Ok(iface) = ifname(ifindex) else {
                    return Ok(());
                };
                let link = SchedClassifierLink::attached(
                    &iface,
                    hook.attach_type(),
                    CLSACT_PRIORITY,
                    CLSACT_HANDLE,
                    None,
                );
                if let Ok(link) = link {
                    use aya::programs::Link as _;
                    // ENOENT (nothing there) is the state we want.
                    if let Err(source) = link.detach()
                        && !is_enoent(&source)
                    {
                        return Err(DataplaneError::Detach {
                            iface,
                            name: program,
                            source,
                        });
                    }
                }
                Ok(())
            }
        }
    }

    /// Whether `program` (this process's instance) runs on `hook` of `ifindex` now.
    pub fn is_attached(
        &self,
        ebpf: &Ebpf,
        ifindex: u32,
        hook: Hook,
        program: &'static str,
    ) -> bool {
        let Ok(iface) = ifname(ifindex) else {
            return false;
        };
        match self.mode {
            AttachMode::Tcx => {
                let Some(id) = program_id(ebpf, program) else {
                    return false;
                };
                SchedClassifier::query_tcx(&iface, hook.attach_type())
                    .is_ok_and(|(_, progs)| progs.iter().any(|p| p.id() == id))
            }
            // netlink filters cannot be listed through aya; trust what this process did.
            AttachMode::Clsact => self.known.contains(&(ifindex, hook, program)),
        }
    }
}

fn program_id(ebpf: &Ebpf, program: &str) -> Option<u32> {
    let p: &SchedClassifier = ebpf.program(program)?.try_into().ok()?;
    p.info().ok().map(|i| i.id())
}

/// Swaps `program` into the pinned tcx link at `pin`.
fn update_pinned(ebpf: &mut Ebpf, pin: &Path, program: &'static str) -> Result<(), DataplaneError> {
    let link_err = |source: LinkError| DataplaneError::Link {
        path: pin.to_path_buf(),
        source,
    };
    let pinned = PinnedLink::from_pin(pin).map_err(link_err)?;
    let link: SchedClassifierLink = FdLink::from(pinned).try_into().map_err(link_err)?;
    let prog = classifier(ebpf, program)?;
    let fail = |source: ProgramError| DataplaneError::Attach {
        iface: pin.display().to_string(),
        name: program,
        source,
    };
    let id = prog.attach_to_link(link).map_err(fail)?;
    let link = prog.take_link(id).map_err(fail)?;
    // Back to a plain fd link: dropping it closes our fd and leaves the pin attached.
    let _fd: FdLink = link.try_into().map_err(link_err)?;
    Ok(())
}

/// Detaches the tcx link pinned at `pin` now (`BPF_OBJ_GET`, then `BPF_LINK_DETACH`);
/// the pin stays and refers to a defunct link.
fn detach_pinned(pin: &Path) -> io::Result<()> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // Explicit: the kernel refuses the call (EINVAL) when any byte past `path_fd`
        // is not zero, and implicit padding holds whatever the stack held.
        pad: u32,
    }
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    // `path` outlives `get`, which points to it.
    let fd = sys_bpf(BPF_OBJ_GET, &mut get)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; the OwnedFd closes it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut detach = LinkDetach {
        link_fd: std::os::fd::AsRawFd::as_raw_fd(&fd).cast_unsigned(),
    };
    sys_bpf(BPF_LINK_DETACH, &mut detach).map(|_| ())
}

fn parse_pin(name: &str, programs: &[&'static str]) -> Option<(u32, Hook, &'static str)> {
    let mut parts = name.splitn(3, '-');
    let ifindex = parts.next()?.parse().ok()?;
    let hook = Hook::from_name(parts.next()?)?;
    let program = parts.next()?;
    let program = programs.iter().find(|p| **p == program)?;
    Some((ifindex, hook, program))
}

fn attach_error(iface: &str, name: &'static str, source: ProgramError) -> DataplaneError {
    DataplaneError::Attach {
        iface: iface.to_owned(),
        name,
        source,
    }
}

fn is_enoent(e: &ProgramError) -> bool {
    match e {
        ProgramError::NetlinkError(n) => n.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// The name of `ifindex` in the calling thread's network namespace.
pub fn ifname(ifindex: u32) -> Result<String, DataplaneError> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(DataplaneError::NoInterface {
            ifindex,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}
