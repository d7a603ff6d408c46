//! Building the eBPF object.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::util::{root, run, target_dir};

pub const TARGET: &str = "bpfel-unknown-none";

/// Builds the program crate and copies the object to `<target-dir>/ebpf/vpc-ebpf.o`, where
/// the agent's build script finds it. The copy is skipped when the bytes are unchanged so
/// the agent is not rebuilt for nothing.
/// `cargo +nightly <subcommand>` for the program crate, for the BPF target, in its own
/// target directory.
pub fn nightly_cargo(subcommand: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "+nightly",
        subcommand,
        "--target",
        TARGET,
        "-Z",
        "build-std=core",
    ])
    .arg("--target-dir")
    .arg(target_dir()?.join("ebpf"))
    .current_dir(root().join("ebpf/programs"))
    // bpf-linker turns the debug info into BTF, which makes maps and programs readable
    // in bpftool and lets the kernel check map layouts.
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f"),
    )
    // Set by the outer (stable) cargo and rustup; must not leak into nightly's build.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("RUSTUP_TOOLCHAIN");
    Ok(cmd)
}

pub fn build(release: bool) -> anyhow::Result<PathBuf> {
    let ebpf_target = target_dir()?.join("ebpf");
    let mut cmd = nightly_cargo("build")?;
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    let built = ebpf_target.join(TARGET).join(profile).join("vpc-ebpf");
    let object = ebpf_target.join("vpc-ebpf.o");
    let new = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    if std::fs::read(&object).ok().as_deref() != Some(&new[..]) {
        std::fs::write(&object, &new).with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(object)
}
