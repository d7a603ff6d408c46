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
        "bpffs is not mounted at {path} and mount(2) of it failed: {source}; mount it with \
         `mount -t bpf bpf /sys/fs/bpf` (in Kubernetes: a hostPath volume for /sys/fs/bpf)"
    )]
    BpffsMount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("statfs(2) of {path} failed: {source}")]
    BpffsStat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not on a bpffs mount, so pinned maps could not survive a restart there")]
    NotBpffs { path: PathBuf },
    #[error("creating pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object (maps pinned in {pin_dir}): {source}")]
    Load {
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {0} is missing from the embedded eBPF object (build mismatch)")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the embedded eBPF object (build mismatch)")]
    MissingMap(&'static str),
    #[error("loading program {name} into the kernel (bpf_prog_load): {source}")]
    ProgramLoad {
        name: &'static str,
        source: ProgramError,
    },
    #[error("adding the clsact qdisc to {iface}: {source}")]
    Clsact { iface: String, source: TcError },
    #[error("attaching {name} to {iface}: {source}")]
    Attach {
        iface: String,
        name: &'static str,
        source: ProgramError,
    },
    #[error("detaching {name} from {iface}: {source}")]
    Detach {
        iface: String,
        name: &'static str,
        source: ProgramError,
    },
    #[error("BPF_PROG_TEST_RUN of {name}: {source}")]
    TestRun {
        name: &'static str,
        source: ProgramError,
    },
    #[error("accessing map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("pinning a link at {path}: {source}")]
    PinLink { path: PathBuf, source: PinError },
    #[error("re-opening the pinned link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("no interface with ifindex {ifindex} in this network namespace: {source}")]
    NoInterface {
        ifindex: u32,
        source: std::io::Error,
    },
    #[error("invalid dataplane input: {0}")]
    InvalidSpec(String),
    #[error("reading {path} to size the maps: {source}")]
    Meminfo {
        path: PathBuf,
        source: std::io::Error,
    },
}
