//! A lab of a test's own (`cargo xtask lab` under a private prefix), torn down on drop.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

/// The Python that runs the lab: `VPC_EBPF_LAB_PYTHON` (set by `cargo xtask test`), else
/// the virtualenv `cargo xtask setup` makes.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("VPC_EBPF_LAB_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let venv = home.join(".cache/vpc-ebpf/lab-venv/bin/python3");
    assert!(
        venv.exists(),
        "the lab's Python (with moto) is not installed: run the tests with `cargo xtask \
         test`, or run `cargo xtask setup` first, or set VPC_EBPF_LAB_PYTHON"
    );
    venv
}

fn lab_dir() -> PathBuf {
    crate::repo_root().join("xtask/lab")
}

#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    /// `lab up --json`: VPC, subnet, nodes with their ENIs, endpoints.
    pub status: Value,
}

impl Lab {
    /// Brings up a lab with `nodes` nodes under a prefix unique to this process.
    pub fn up(tag: &str, nodes: u32) -> Self {
        Self::up_with(tag, nodes, &[])
    }

    /// [`Self::up`] with more `lab up` arguments (`--zones 2`, `--instance-type ...`).
    pub fn up_with(tag: &str, nodes: u32, extra: &[&str]) -> Self {
        crate::require_root();
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        // Built first so that a failing `up` is still torn down by Drop.
        let mut lab = Self {
            prefix,
            status: Value::Null,
        };
        let nodes = nodes.to_string();
        let mut args = vec!["up", "--nodes", &nodes, "--imds-lag", "0", "--json"];
        args.extend(extra);
        let out = lab.vpclab(&args);
        lab.status = serde_json::from_str(&out).expect("lab up --json");
        lab
    }

    /// Runs `python -m vpclab --prefix <prefix> <args>`; panics with its output on failure.
    pub fn vpclab(&self, args: &[&str]) -> String {
        crate::netns::run(
            Command::new(python())
                .args(["-m", "vpclab", "--prefix", &self.prefix])
                .args(args)
                .env("PYTHONPATH", lab_dir()),
        )
    }

    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    pub fn str(&self, key: &str) -> &str {
        self.status[key]
            .as_str()
            .unwrap_or_else(|| panic!("lab status has no {key}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = Command::new(python())
            .args(["-m", "vpclab", "--prefix", &self.prefix, "down"])
            .env("PYTHONPATH", lab_dir())
            .output();
        if let Ok(o) = out
            && !o.status.success()
        {
            eprintln!(
                "warning: lab down {}: {}",
                self.prefix,
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}
