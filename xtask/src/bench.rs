//! `cargo xtask bench <what>`: builds release binaries and runs the measurements in bench/.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{
    deps,
    util::{cargo, root, run, target_dir},
};

pub fn run_bench(args: &[String]) -> anyhow::Result<()> {
    let Some(what) = args.first() else {
        bail!(
            "usage: cargo xtask bench cni [--pods N] [--rounds N] [--json FILE]\n       \
             cargo xtask bench dataplane [--rounds N] [--secs S] [--json FILE] [--plot FILE]\n       \
             cargo xtask bench ipam [--modes secondary|prefix|both] [--pods N] [--restarts N] [--ec2-window-s S] [--json FILE]\n       \
             cargo xtask bench progcost [--runs N] [--object FILE] [--json FILE] [--policy]\n       \
             cargo xtask bench policy [--rules 0,100,1000,10000] [--rounds N] [--secs S] [--json FILE] [--plot FILE]\n       \
             cargo xtask bench policy-scale [--pods N] [--namespaces N] [--local N] [--changes N] [--json FILE]\n       \
             cargo xtask bench pods [--pods N] [--rounds N] [--json FILE]"
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
        "pods" => pods(&args[1..]),
        "ipam" => ipam(&args[1..]),
        "policy" => policy(&args[1..]),
        "policy-scale" | "progcost" => in_netns(what, &args[1..]),
        other => {
            bail!(
                "unknown benchmark {other:?}: available: cni, dataplane, ipam, pods, policy, policy-scale, progcost"
            )
        }
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

/// The NetworkPolicy rule sweep: the redirect-only build of the programs (the floor it is
/// measured against, from the committed programs) and the release bench; the plot and
/// JSON go to `<target-dir>/bench/` unless told otherwise.
fn policy(args: &[String]) -> anyhow::Result<()> {
    deps::ensure_system_packages(deps::DATAPLANE_BENCH_PACKAGES)?;
    deps::ensure_system_packages(&[("ipset", "ipset")])?;
    deps::ensure_files(deps::DATAPLANE_BENCH_FILES)?;
    deps::ensure_ebpf_toolchain()?;
    crate::ebpf::build(true)?;
    let target = target_dir()?;
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir)?;
    let floor = dir.join("redirect-only.o");
    eprintln!(
        "building the redirect-only variant of the programs (the floor) into {}",
        floor.display()
    );
    run(Command::new(root().join("bench/variants/build.sh"))
        .arg("redirect-only")
        .arg(&floor)
        .env("CARGO_TARGET_DIR", &target))?;
    run(Command::new(cargo())
        .args(["build", "--release", "-p", "vpc-ebpf-bench"])
        .current_dir(root()))?;
    let mut args = args.to_vec();
    for (flag, file) in [("--plot", "policy.png"), ("--json", "policy.json")] {
        if !args.iter().any(|a| a == flag) {
            args.push(flag.into());
            args.push(dir.join(file).display().to_string());
        }
    }
    run(Command::new(target.join("release/vpc-ebpf-bench"))
        .arg("policy")
        .arg("--floor-object")
        .arg(&floor)
        .args(&args))
}

/// Release builds of the agent, plugin and bench, then the IPAM measurements in a lab of
/// the bench's own; the bench is pointed at the release agent and plugin, which live
/// outside the `target/<profile>/deps` layout the test helpers look in by default.
/// A release `vpc-ebpf-bench <what>` that makes its own network namespace and pins.
fn in_netns(what: &str, args: &[String]) -> anyhow::Result<()> {
    deps::ensure_system_packages(&[("ip", "iproute2")])?;
    deps::ensure_ebpf_toolchain()?;
    crate::ebpf::build(true)?;
    run(Command::new(cargo())
        .args(["build", "--release", "-p", "vpc-ebpf-bench"])
        .current_dir(root()))?;
    run(Command::new(target_dir()?.join("release/vpc-ebpf-bench"))
        .arg(what)
        .args(args))
}

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

/// Pod start on the lab cluster, vpc-ebpf (release image, chart defaults) against Debian's
/// bridge + host-local in the same run; a lab of its own (prefix `bp`), removed after.
fn pods(args: &[String]) -> anyhow::Result<()> {
    let python = crate::lab::ensure_cluster_deps()?;
    let kube_bin = crate::lab::kubernetes(&python)?;
    let tag = crate::image::default_tag();
    eprintln!("building the images ({tag})");
    crate::image::build_all(&tag, true)?;
    let images = crate::image::images_dir(true)?;
    let mut json = target_dir()?.join("bench/pods.json");
    let mut pass: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--pods" | "--rounds" => {
                pass.push(a.clone());
                pass.push(it.next().context("--pods/--rounds need a value")?.clone());
            }
            "--json" => json = it.next().context("--json needs a file")?.into(),
            other => bail!(
                "unknown argument {other:?}: cargo xtask bench pods [--pods N] [--rounds N] [--json FILE]"
            ),
        }
    }
    if let Some(dir) = json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lab = |a: &[&str]| crate::lab::python_lab(&python, &[&["--prefix", "bp"], a].concat());
    if !lab(&["down"])? || !lab(&["up"])? {
        bail!("bringing the bench's lab up failed");
    }
    let kube_bin = kube_bin.display().to_string();
    let images = images.display().to_string();
    let chart = root().join("charts/vpc-ebpf").display().to_string();
    let json = json.display().to_string();
    let mut cluster_args = vec![
        "cluster",
        "bench-pods",
        "--kube-bin",
        &kube_bin,
        "--images",
        &images,
        "--tag",
        &tag,
        "--chart",
        &chart,
        "--json",
        &json,
    ];
    cluster_args.extend(pass.iter().map(String::as_str));
    let ok = lab(&cluster_args)?;
    lab(&["down"])?;
    if !ok {
        bail!("cargo xtask bench pods failed (see above)");
    }
    Ok(())
}
