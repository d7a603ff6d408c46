//! Idempotent installation of what the project needs: quick when all is present.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{have, output, run};

/// (command that must exist, Debian package providing it) for tests and the lab.
pub const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ping", "iputils-ping"),
    ("python3", "python3"),
    // tests/tests/containerd.rs: a real libcni client (ctr run --cni) and a static busybox
    // as the container's only binary.
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("busybox", "busybox-static"),
    // tests/tests/lab_dataplane.rs: proves the dataplane installs no netfilter rules and
    // that same-node pod traffic never crosses the node's FORWARD chain.
    ("iptables", "iptables"),
    ("nft", "nftables"),
];

/// `cargo xtask bench dataplane`: namespaces, the VPC-CNI-style iptables rules, iperf3
/// for throughput.
pub const DATAPLANE_BENCH_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("iperf3", "iperf3"),
];

/// (file that must exist, Debian package providing it): the plot's font.
pub const DATAPLANE_BENCH_FILES: &[(&str, &str)] = &[(
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "fonts-dejavu-core",
)];

pub const BPF_LINKER_VERSION: &str = "0.10.0";
const NIGHTLY: &str = "nightly";

/// Installs the Debian packages whose commands are missing.
pub fn ensure_system_packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    apt_install(&missing)
}

/// Installs the Debian packages whose files are missing.
pub fn ensure_files(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(path, _)| !std::path::Path::new(path).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    apt_install(&missing)
}

/// `apt-get install` of `packages` (nothing when empty); root only.
pub fn apt_install(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `sudo apt-get install -y {}` (or run as root)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// nightly with rust-src (for `-Z build-std=core`) and bpf-linker of the version that links
/// with nightly's own LLVM.
pub fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs: install it from rustup.rs")?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
            .context("installing the nightly toolchain (needed for the eBPF target)")?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
            .context(
                "adding rust-src to nightly; run `rustup component add rust-src --toolchain nightly`",
            )?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!(
            "bpf-linker {BPF_LINKER_VERSION} not found (have: {}); installing it (about a minute)",
            if linker.is_empty() {
                "none"
            } else {
                linker.trim()
            }
        );
        run(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]))
        .with_context(|| {
            format!("installing bpf-linker; run `cargo install bpf-linker@{BPF_LINKER_VERSION} --locked`")
        })?;
    }
    Ok(())
}

/// A virtualenv under the user's cache with the lab's Python requirements (moto, boto3,
/// pytest), so the system Python is never modified; reinstalled only when
/// requirements.txt changes. Returns its python.
pub fn ensure_lab_python() -> anyhow::Result<PathBuf> {
    let reqs_path = crate::util::root().join("xtask/lab/requirements.txt");
    let reqs = std::fs::read_to_string(&reqs_path)
        .with_context(|| format!("reading {}", reqs_path.display()))?;
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let venv = home.join(".cache/vpc-ebpf/lab-venv");
    let python = venv.join("bin/python3");
    let marker = venv.join("requirements.installed");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(reqs.as_str()) && python.exists() {
        return Ok(python);
    }
    if !python.exists() {
        // Debian splits venv and ensurepip out of python3.
        if output(Command::new("python3").args(["-c", "import venv, ensurepip"])).is_none() {
            apt_install(&["python3-venv"])?;
        }
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
            "creating the lab's Python virtualenv (Debian: apt-get install python3-venv)",
        )?;
    }
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&reqs_path))
    .context("installing the lab's Python requirements (moto, boto3, pytest) from PyPI")?;
    std::fs::write(&marker, &reqs)?;
    Ok(python)
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}
