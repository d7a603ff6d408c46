//! `cargo xtask bench <what>`: builds release binaries and runs the measurements in bench/.

use std::process::Command;

use anyhow::bail;

use crate::{
    deps,
    util::{cargo, root, run, target_dir},
};

pub fn run_bench(args: &[String]) -> anyhow::Result<()> {
    let Some(what) = args.first() else {
        bail!("usage: cargo xtask bench cni [--pods N] [--rounds N] [--json FILE]");
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
        other => bail!("unknown benchmark {other:?}: available: cni"),
    }
}
