//! `cargo xtask lab`: the local VPC lab. The lab itself is the Python package in
//! `xtask/lab/vpclab` (moto is Python); this installs what it needs and runs it.

use std::process::Command;

use anyhow::bail;

use crate::{
    deps,
    util::{self, cargo, root},
};

const USAGE_AFTER_UP: &str = "\
Look around:
  cargo xtask lab status [--json]        nodes, ENIs, addresses, endpoints
  cargo xtask lab check                  the infrastructure checks again (EC2, IMDS, fabric)
  ip netns list                          the lab's namespaces (<prefix>-aws, -vpc, -inet, -nodeN)
  ip netns exec vpcl-node1 bash          a shell on node1 (IMDS at 169.254.169.254)
  the agent's introspection and metrics  http://127.0.0.1:61679/v1/enis, /v1/assignments,
                                         /v1/config and :61678/metrics inside each node
  ip netns exec vpcl-a1 ping 10.0.x.y    from a pod (vpcl-a0..a9 on node1, vpcl-b0 on node2)
  /run/vpc-ebpf-lab/vpcl/workload/       agent and plugin logs
Tear it down:
  cargo xtask lab down";

pub fn run(args: &[String]) -> anyhow::Result<()> {
    deps::ensure_system_packages(deps::TEST_PACKAGES)?;
    let python = deps::ensure_lab_python()?;
    let vpclab = |extra: &[&str]| -> anyhow::Result<bool> {
        let status = Command::new(&python)
            .args(["-m", "vpclab"])
            .args(extra)
            .env("PYTHONPATH", root().join("xtask/lab"))
            .status()?;
        Ok(status.success())
    };
    if args.is_empty() {
        // The agent embeds the eBPF object; both binaries run from the debug profile.
        deps::ensure_ebpf_toolchain()?;
        crate::ebpf::build(true)?;
        util::run(
            Command::new(cargo())
                .args(["build", "-p", "vpc-ebpf-agent", "-p", "vpc-ebpf-cni"])
                .current_dir(root()),
        )?;
        // A fresh lab every time, so every check starts from a clean node.
        if !vpclab(&["down"])? {
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
        println!(
            "lab {} up in {}s: {} nodes, EC2 at {}",
            status["prefix"],
            status["up_seconds"],
            status["nodes"].as_array().map_or(0, Vec::len),
            status["ec2_endpoint"]
        );
        println!("\nthe lab's infrastructure (EC2, IMDS, fabric):");
        let infra = vpclab(&["check"])?;
        println!("\nagents and pods:");
        let paths = crate::lab_pods::up_and_check(&status)?;
        println!("\n{USAGE_AFTER_UP}");
        if !(infra && paths) {
            bail!("lab check failed");
        }
        return Ok(());
    }
    let passthrough: Vec<&str> = args.iter().map(String::as_str).collect();
    if !vpclab(&passthrough)? {
        bail!("cargo xtask lab {} failed", args.join(" "));
    }
    Ok(())
}
