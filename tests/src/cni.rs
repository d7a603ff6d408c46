//! Running the real vpc-ebpf-cni binary exactly as a container runtime does: environment
//! variables, the network config on stdin, the result or error JSON on stdout.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

/// The plugin binary cargo built next to this test binary, or `VPC_EBPF_CNI_BIN` (the
/// benchmarks run a release build from outside `target/<profile>/deps`).
pub fn plugin_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VPC_EBPF_CNI_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join("vpc-ebpf-cni");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo xtask test builds it)",
        bin.display()
    );
    bin
}

#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// The address an ADD result gives the pod, without its prefix length.
    pub fn ip(&self) -> String {
        let v = self.json();
        let a = v["ips"][0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no address in {v}"));
        a.split('/').next().unwrap_or(a).to_owned()
    }

    /// The CNI error code, asserting the spec's error shape.
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected failure, got {}", self.stdout);
        let v = self.json();
        assert!(v["msg"].is_string() && v["cniVersion"].is_string(), "{v}");
        v["code"].as_u64().expect("code")
    }
}

/// One plugin invocation.
#[derive(Clone, Debug)]
pub struct Call {
    /// The "node": the namespace the plugin runs in (the host side of the pod's veth).
    pub node_ns: String,
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub conf: Value,
}

pub fn conf(version: &str, socket: &Path, log: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "aws-cni",
        "type": "vpc-ebpf-cni",
        "agentSocket": socket,
        "logFile": log,
        "logLevel": "debug",
    })
}

impl Call {
    pub fn run(&self) -> Outcome {
        self.run_raw(self.conf.to_string().as_bytes())
    }

    pub fn run_raw(&self, stdin: &[u8]) -> Outcome {
        self.run_plugin(&plugin_path(), stdin)
    }

    /// Runs another plugin (`bin`) as the runtime would next in the chain: same
    /// environment, its own configuration on stdin.
    pub fn run_plugin(&self, bin: &Path, stdin: &[u8]) -> Outcome {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns])
            .arg(bin)
            .env_clear()
            .env("CNI_COMMAND", &self.command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", &self.ifname)
            .env("CNI_ARGS", &self.args)
            .env("CNI_PATH", "/opt/cni/bin")
            // Runtimes pass on their PATH; portmap runs iptables from it.
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn plugin");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        Outcome {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}
