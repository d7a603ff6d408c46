//! The eBPF dataplane: loads the embedded object, attaches its TC programs to interfaces
//! and reads its maps.
//!
//! Maps are pinned under a versioned bpffs directory so their contents outlive the agent;
//! programs are attached with tcx on kernels that have it (>= 6.6) and with a clsact qdisc
//! otherwise.

mod bpffs;
mod counters;
mod error;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
    },
    util::KernelVersion,
};
pub use counters::CounterRow;
pub use error::DataplaneError;
use tracing::{debug, info};
use vpc_ebpf_common::{PIN_VERSION, programs};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded so the agent binary is
/// self-contained.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("VPC_EBPF_OBJECT"));

/// Default root of the agent's pinned objects in bpffs.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/vpc-ebpf";

/// How programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (Linux >= 6.6): no qdisc, ordered multi-program attachment.
    Tcx,
    /// A clsact qdisc with direct-action BPF filters, for older kernels.
    Clsact,
}

impl AttachMode {
    /// The best mode the running kernel supports.
    pub fn detect() -> Self {
        // A kernel whose version cannot be read is treated as old: clsact works everywhere.
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => Self::Tcx,
            _ => Self::Clsact,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// bpffs directory under which the versioned pin directory is created.
    pub pin_root: PathBuf,
    /// `None`: detect from the kernel version.
    pub attach_mode: Option<AttachMode>,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            attach_mode: None,
        }
    }
}

/// Which hook of an interface a program is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn attach_type(self) -> TcAttachType {
        match self {
            Self::Ingress => TcAttachType::Ingress,
            Self::Egress => TcAttachType::Egress,
        }
    }
}

/// The loaded object and the attachments this process made.
///
/// Dropping it detaches the programs it attached (links are not pinned yet); pinned maps
/// stay in bpffs.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    mode: AttachMode,
    attached: HashMap<(String, Hook), (&'static str, SchedClassifierLinkId)>,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pin_dir", &self.pin_dir)
            .field("mode", &self.mode)
            .field("attached", &self.attached.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Loads the embedded object, re-using maps already pinned by an earlier run, and
    /// loads every program into the kernel (attaching is separate).
    pub fn load(config: &DataplaneConfig) -> Result<Self, DataplaneError> {
        bpffs::ensure_mounted(&config.pin_root)?;
        let pin_dir = config.pin_root.join(PIN_VERSION);
        std::fs::create_dir_all(&pin_dir).map_err(|source| DataplaneError::PinDir {
            path: pin_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(OBJECT)
            .map_err(|source| DataplaneError::Load {
                pin_dir: pin_dir.clone(),
                source: Box::new(source),
            })?;
        for name in [programs::COUNT_INGRESS, programs::COUNT_EGRESS] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::ProgramLoad { name, source })?;
        }
        let mode = config.attach_mode.unwrap_or_else(AttachMode::detect);
        info!(pin_dir = %pin_dir.display(), ?mode, "eBPF object loaded");
        Ok(Self {
            ebpf,
            pin_dir,
            mode,
            attached: HashMap::new(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// Attaches the packet counters to both hooks of `iface` (in the calling thread's
    /// network namespace). Attaching twice is a no-op.
    pub fn attach_counters(&mut self, iface: &str) -> Result<(), DataplaneError> {
        self.attach(iface, Hook::Ingress, programs::COUNT_INGRESS)?;
        self.attach(iface, Hook::Egress, programs::COUNT_EGRESS)
    }

    /// Detaches whatever this process attached to `iface`. Detaching what is not attached,
    /// or from an interface that is gone, succeeds.
    pub fn detach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let mut first_error = None;
        for hook in [Hook::Ingress, Hook::Egress] {
            let Some((name, link)) = self.attached.remove(&(iface.to_owned(), hook)) else {
                continue;
            };
            let result = classifier(&mut self.ebpf, name).and_then(|p| {
                p.detach(link).map_err(|source| DataplaneError::Detach {
                    iface: iface.to_owned(),
                    name,
                    source,
                })
            });
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn attach(
        &mut self,
        iface: &str,
        hook: Hook,
        name: &'static str,
    ) -> Result<(), DataplaneError> {
        if self.attached.contains_key(&(iface.to_owned(), hook)) {
            return Ok(());
        }
        let options = match self.mode {
            AttachMode::Tcx => TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
            AttachMode::Clsact => {
                add_clsact(iface)?;
                TcAttachOptions::Netlink(NlOptions::default())
            }
        };
        let link = classifier(&mut self.ebpf, name)?
            .attach_with_options(iface, hook.attach_type(), options)
            .map_err(|source| DataplaneError::Attach {
                iface: iface.to_owned(),
                name,
                source,
            })?;
        debug!(iface, ?hook, program = name, mode = ?self.mode, "attached");
        self.attached.insert((iface.to_owned(), hook), (name, link));
        Ok(())
    }

    /// Runs `program` once on `frame` with `BPF_PROG_TEST_RUN` and returns its verdict.
    /// The kernel presents the frame as received on the loopback device of the calling
    /// thread's network namespace.
    pub fn test_run(&mut self, program: &'static str, frame: &[u8]) -> Result<i32, DataplaneError> {
        let prog = classifier(&mut self.ebpf, program)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        let result = prog
            .test_run(opts)
            .map_err(|source| DataplaneError::TestRun {
                name: program,
                source,
            })?;
        Ok(result.return_value.cast_signed())
    }

    /// Current value of every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<CounterRow>, DataplaneError> {
        counters::read(&self.ebpf)
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::ProgramLoad { name, source })
}

/// Adds the clsact qdisc, accepting one that is already there.
fn add_clsact(iface: &str) -> Result<(), DataplaneError> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(()),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(DataplaneError::Clsact {
            iface: iface.to_owned(),
            source,
        }),
    }
}
