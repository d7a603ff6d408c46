//! `cargo xtask bench <what>`: builds release binaries and runs the measurements in bench/.

use std::process::Command;

use anyhow::bail;

use crate::{
    deps,
    util::{cargo, root, run, target_dir},
};

pub fn run_bench(args: &[String]) -> anyhow::Result<()> {
    let Some(what) = args.first() else {
        bail!(
            "usage: cargo xtask bench cni [--pods N] [--rounds N] [--json FILE]\n       \
             cargo xtask bench dataplane [--rounds N] [--secs S] [--json FILE] [--plot FILE]\n       \
             cargo xtask bench ipam [--modes secondary|prefix|both] [--pods N] [--restarts N] [--json FILE]\n       \
             cargo xtask bench progcost [--runs N] [--object FILE] [--json FILE]"
        );
    };
    match what.as_str() {
        "cni" => {
            deps::ensure_system_packages(&[("ip", "iproute2")])?;
            if !std::path::Path::new("/usr/lib/cni/ptp").exists() {
                deps::apt_install(&["containernetworking-plugins"])?;
            }
            deps::ensure_ebpf_toolchain()?;
            crate::ebpf::build(true)?;
            run(Command::new(cargo())
                .args([
                    "build",
                    "--release",
                    "-p",
                    "vpc-ebpf-cni",
                    "-p",
                    "vpc-ebpf-bench",
                ])
                .current_dir(root()))?;
            let release = target_dir()?.join("release");
            run(Command::new(release.join("vpc-ebpf-bench"))
                .arg("cni")
                .arg("--plugin")
                .arg(release.join("vpc-ebpf-cni"))
                .args(&args[1..]))
        }
        "dataplane" => dataplane(&args[1..]),
        "ipam" => ipam(&args[1..]),
        "progcost" => {
            deps::ensure_system_packages(&[("ip", "iproute2")])?;
            deps::ensure_ebpf_toolchain()?;
            crate::ebpf::build(true)?;
            run(Command::new(cargo())
                .args(["build", "--release", "-p", "vpc-ebpf-bench"])
                .current_dir(root()))?;
            run(Command::new(target_dir()?.join("release/vpc-ebpf-bench"))
                .arg("progcost")
                .args(&args[1..]))
        }
        other => bail!("unknown benchmark {other:?}: available: cni, dataplane, ipam, progcost"),
    }
}

/// Builds the eBPF object and the bench in release, then runs the dataplane comparison;
/// the plot goes to `<target-dir>/bench/dataplane.png` unless `--plot` says otherwise.
fn dataplane(args: &[String]) -> anyhow::Result<()> {
    deps::ensure_system_packages(deps::DATAPLANE_BENCH_PACKAGES)?;
    deps::ensure_files(deps::DATAPLANE_BENCH_FILES)?;
    deps::ensure_ebpf_toolchain()?;
    crate::ebpf::build(true)?;
    run(Command::new(cargo())
        .args(["build", "--release", "-p", "vpc-ebpf-bench"])
        .current_dir(root()))?;
    let target = target_dir()?;
    let mut args = args.to_vec();
    if !args.iter().any(|a| a == "--plot") {
        let dir = target.join("bench");
        std::fs::create_dir_all(&dir)?;
        args.push("--plot".into());
        args.push(dir.join("dataplane.png").display().to_string());
    }
    run(Command::new(target.join("release/vpc-ebpf-bench"))
        .arg("dataplane")
        .args(&args))
}

/// Release builds of the agent, plugin and bench, then the IPAM measurements in a lab of
/// the bench's own; the bench is pointed at the release agent and plugin, which live
/// outside the `target/<profile>/deps` layout the test helpers look in by default.
fn ipam(args: &[String]) -> anyhow::Result<()> {
    deps::ensure_system_packages(&[("ip", "iproute2"), ("nsenter", "util-linux")])?;
    let python = deps::ensure_lab_python()?;
    deps::ensure_ebpf_toolchain()?;
    crate::ebpf::build(true)?;
    // Agent and plugin as they ship, apart from the bench: one cargo invocation unifies
    // features across its packages, which would change what is measured (and rebuild the
    // AWS SDK once more for that feature set).
    run(Command::new(cargo())
        .args([
            "build",
            "--release",
            "-p",
            "vpc-ebpf-agent",
            "-p",
            "vpc-ebpf-cni",
        ])
        .current_dir(root()))?;
    run(Command::new(cargo())
        .args(["build", "--release", "-p", "vpc-ebpf-bench"])
        .current_dir(root()))?;
    let release = target_dir()?.join("release");
    run(Command::new(release.join("vpc-ebpf-bench"))
        .arg("ipam")
        .args(args)
        .env("VPC_EBPF_AGENT_BIN", release.join("vpc-ebpf-agent"))
        .env("VPC_EBPF_CNI_BIN", release.join("vpc-ebpf-cni"))
        .env("VPC_EBPF_LAB_PYTHON", &python))
}
