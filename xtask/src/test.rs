//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use std::process::Command;

use crate::{
    ebpf,
    util::{cargo, have, root, run},
};

pub fn all(extra: &[String]) -> anyhow::Result<()> {
    let python = crate::lab::ensure_cluster_deps()?;
    let root = root();
    let programs = root.join("ebpf/programs");

    run(Command::new(cargo())
        .args(["fmt", "--all", "--check"])
        .current_dir(&root))?;
    run(Command::new("cargo")
        .args(["+nightly", "fmt", "--all", "--check"])
        .current_dir(&programs)
        .env_remove("RUSTUP_TOOLCHAIN"))?;

    ebpf::build(true)?;
    run(ebpf::nightly_cargo("clippy")?.args(["--release", "--", "-D", "warnings"]))?;
    run(Command::new(cargo())
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(&root))?;
    plugin_stays_small(&root)?;

    // The lab's own tests (EC2 front against moto, fabric, IMDS) run before the Rust
    // suite so the run closes with nextest's summary line.
    run(Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "xtask/lab/tests",
        ])
        .env("PYTHONPATH", root.join("xtask/lab"))
        .current_dir(&root))?;

    // The root tests run the agent and plugin binaries as a node would; nothing else
    // builds them.
    run(Command::new(cargo())
        .args(["build", "-p", "vpc-ebpf-agent", "-p", "vpc-ebpf-cni"])
        .current_dir(&root))?;
    // The cluster tests: Kubernetes (built once from Debian's source, cached outside the
    // clone), helm, and the images from the dev build just made.
    let kube_bin = crate::lab::kubernetes(&python)?;
    let tag = format!("test-{}", crate::image::default_tag());
    crate::image::build_all(&tag, false)?;
    let images = crate::image::images_dir(false)?;
    let helm = std::env::var_os("HOME")
        .map_or_else(
            || std::path::PathBuf::from("/root"),
            std::path::PathBuf::from,
        )
        .join(".cache/vpc-ebpf/bin/helm");
    // nextest runs each test in its own process, so a crashing root test cannot take the
    // others down, and prints the usual closing summary line.
    let mut tests = Command::new(cargo());
    let nextest = have("cargo-nextest");
    if nextest {
        tests.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        eprintln!("cargo-nextest not found; using cargo test, one test at a time");
        tests.args(["test", "--workspace", "--no-fail-fast"]);
    }
    tests.args(extra);
    if !nextest {
        // Without nextest's test groups, labs and clusters of several tests in one
        // binary would run at once and starve each other on a small machine.
        tests.args(["--", "--test-threads=1"]);
    }
    // Rust tests that bring up a lab of their own use the same Python.
    run(tests
        .env("VPC_EBPF_LAB_PYTHON", &python)
        .env("VPC_EBPF_K8S_BIN", &kube_bin)
        .env("VPC_EBPF_IMAGES", &images)
        .env("VPC_EBPF_IMAGE_TAG", &tag)
        .env("VPC_EBPF_HELM", &helm)
        .current_dir(&root))
}

/// The plugin is exec'd for every pod: the AWS SDK, kube and aya belong in the agent only.
fn plugin_stays_small(root: &std::path::Path) -> anyhow::Result<()> {
    let out = Command::new(cargo())
        .args([
            "tree",
            "-p",
            "vpc-ebpf-cni",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(root)
        .output()?;
    anyhow::ensure!(out.status.success(), "cargo tree -p vpc-ebpf-cni failed");
    let tree = String::from_utf8_lossy(&out.stdout);
    let banned: Vec<&str> = tree
        .lines()
        .filter(|l| {
            ["aws-sdk", "aws-config", "kube", "aya "]
                .iter()
                .any(|b| l.starts_with(b))
        })
        .collect();
    anyhow::ensure!(
        banned.is_empty(),
        "vpc-ebpf-cni depends on crates that belong in the agent only: {banned:?}"
    );
    eprintln!("vpc-ebpf-cni dependency tree: no aws-sdk, kube or aya");
    Ok(())
}
