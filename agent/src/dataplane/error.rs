use std::path::PathBuf;

use aya::{
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError, tc::TcError},
};

/// Failures of the dataplane, each naming the operation (and so the syscall family) that
/// failed and what it was applied to.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "bpffs is not mounted at {path} and mount(2) of it failed; mount it with \
         `mount -t bpf bpf /sys/fs/bpf` (in Kubernetes: a hostPath volume for /sys/fs/bpf)"
    )]
    BpffsMount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("statfs(2) of {path} failed")]
    BpffsStat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not on a bpffs mount, so pinned maps could not survive a restart there")]
    NotBpffs { path: PathBuf },
    #[error("creating pin directory {path}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object (maps pinned in {pin_dir})")]
    Load {
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {0} is missing from the embedded eBPF object (build mismatch)")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the embedded eBPF object (build mismatch)")]
    MissingMap(&'static str),
    #[error("loading program {name} into the kernel (bpf_prog_load)")]
    ProgramLoad {
        name: &'static str,
        source: ProgramError,
    },
    #[error("adding the clsact qdisc to {iface}")]
    Clsact { iface: String, source: TcError },
    #[error("attaching {name} to {iface}")]
    Attach {
        iface: String,
        name: &'static str,
        source: ProgramError,
    },
    #[error("detaching {name} from {iface}")]
    Detach {
        iface: String,
        name: &'static str,
        source: ProgramError,
    },
    #[error("BPF_PROG_TEST_RUN of {name}")]
    TestRun {
        name: &'static str,
        source: ProgramError,
    },
    #[error("accessing map {name}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("pinning a link at {path}")]
    PinLink { path: PathBuf, source: PinError },
    #[error("re-opening the pinned link {path}")]
    Link { path: PathBuf, source: LinkError },
    #[error("no interface with ifindex {ifindex} in this network namespace")]
    NoInterface {
        ifindex: u32,
        source: std::io::Error,
    },
    #[error("invalid dataplane input: {0}")]
    InvalidSpec(String),
    #[error("the ENI {0} is not up in the kernel yet")]
    EniNotUp(String),
    #[error("netlink")]
    Netlink(#[from] crate::host::HostError),
    #[error("the dataplane owner has stopped")]
    Stopped,
    #[error("reading {path} to size the maps")]
    Meminfo {
        path: PathBuf,
        source: std::io::Error,
    },
}
