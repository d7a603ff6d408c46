//! Idempotent installation of what the project needs: quick when all is present.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::util::{have, output, run};

/// (command that must exist, Debian package providing it) for tests.
pub const TEST_PACKAGES: &[(&str, &str)] = &[("ip", "iproute2"), ("tc", "iproute2")];

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
        .args(&missing)
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

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}
