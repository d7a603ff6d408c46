//! `cargo xtask lab`: the local VPC lab. The lab itself is the Python package in
//! `xtask/lab/vpclab` (moto is Python); this installs what it needs and runs it.

use std::process::Command;

use anyhow::bail;

use crate::{deps, util::root};

const USAGE_AFTER_UP: &str = "\
Look around:
  cargo xtask lab status [--json]        nodes, ENIs, addresses, endpoints
  cargo xtask lab check                  every packet path the installed components support
  ip netns list                          the lab's namespaces (<prefix>-aws, -vpc, -inet, -nodeN)
  ip netns exec vpcl-node1 bash          a shell on node1 (IMDS at 169.254.169.254)
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
        if !vpclab(&["up"])? {
            bail!("lab up failed");
        }
        println!(
            "\nPods come with the CNI plugin issue; until then `lab check` covers the \
             infrastructure (EC2, IMDS, fabric).\n"
        );
        let ok = vpclab(&["check"])?;
        println!("\n{USAGE_AFTER_UP}");
        if !ok {
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
