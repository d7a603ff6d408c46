//! The real `vpc-ebpf-agent` binary running inside a lab node, as the DaemonSet would run
//! it on an EC2 instance: IMDS at 169.254.169.254, EC2 through the lab's endpoint.
//! Killable with SIGKILL and restartable with the same state directory.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{lab::Lab, netns::run_in};

/// The agent binary cargo built next to this test binary, or `VPC_EBPF_AGENT_BIN` (the
/// benchmarks run a release build from outside `target/<profile>/deps`).
pub fn agent_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VPC_EBPF_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .join("vpc-ebpf-agent");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo xtask test builds it)",
        bin.display()
    );
    bin
}

pub struct LabAgent {
    pub node_ns: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
}

impl LabAgent {
    /// Starts the agent on lab node `node` (1-based) with extra environment `env`.
    pub fn start(lab: &Lab, node: u32, dir: &Path, env: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut all: Vec<(String, String)> = vec![
            ("AWS_EC2_ENDPOINT".into(), lab.str("ec2_endpoint").into()),
            ("AWS_ACCESS_KEY_ID".into(), "lab".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "lab".into()),
            (
                "VPC_EBPF_AGENT_SOCKET".into(),
                dir.join("agent.sock").display().to_string(),
            ),
            (
                "VPC_EBPF_CHECKPOINT".into(),
                dir.join("ipam.json").display().to_string(),
            ),
            ("VPC_EBPF_LOG".into(), "info,vpc_ebpf_agent=debug".into()),
            // Each node's pins apart, as each EC2 instance has its own bpffs.
            (
                "VPC_EBPF_PIN_ROOT".into(),
                format!("/sys/fs/bpf/vpc-ebpf-lab-{}-node{node}", lab.prefix),
            ),
        ];
        all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let mut a = Self {
            node_ns: lab.ns(&format!("node{node}")),
            dir: dir.to_path_buf(),
            log: dir.join("agent.log"),
            env: all,
            child: None,
            starts: 0,
        };
        a.spawn();
        a
    }

    /// A CNI call on this node as a runtime makes it, for pod `container` in `pod`.
    pub fn cni_call(
        &self,
        command: &str,
        container: &str,
        pod: Option<&crate::netns::NetNs>,
        version: &str,
    ) -> crate::cni::Call {
        crate::cni::Call {
            node_ns: self.node_ns.clone(),
            command: command.into(),
            container_id: container.into(),
            netns: pod
                .map(|p| format!("/run/netns/{}", p.name()))
                .unwrap_or_default(),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={container}"),
            conf: crate::cni::conf(version, &self.socket(), &self.dir.join("plugin.log")),
        }
    }

    /// The agent's bpffs pin root (each lab node has its own).
    pub fn pin_root(&self) -> PathBuf {
        self.env
            .iter()
            .find(|(k, _)| k == "VPC_EBPF_PIN_ROOT")
            .map(|(_, v)| PathBuf::from(v))
            .expect("VPC_EBPF_PIN_ROOT is always set")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.starts += 1;
        // nsenter, not `ip netns exec`: the latter gives the process a private mount
        // namespace with a fresh /sys, so its bpffs pins would die with it, unlike on a
        // node where /sys/fs/bpf is the host's (a hostPath volume in Kubernetes).
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_ns))
            .arg(agent_path())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.child = Some(child);
    }

    /// SIGKILL: no cleanup, no final checkpoint, as an OOM kill or node crash does.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The agent's pid: nsenter without --fork execs it in place.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the node's loopback (introspection :61679, metrics :61678).
    pub fn get(&self, port: u16, path: &str) -> Option<String> {
        let path = path.to_owned();
        run_in(&self.node_ns, move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let (head, body) = out.split_once("\r\n\r\n")?;
            head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
        })
    }

    pub fn introspect(&self, path: &str) -> Option<Value> {
        serde_json::from_str(&self.get(61679, path)?).ok()
    }

    /// Waits until introspection says ready; panics with the log otherwise.
    pub fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            if let Some(v) = self.introspect("/v1/enis")
                && v["ready"] == true
            {
                return t0.elapsed();
            }
            assert!(
                self.alive(),
                "the agent exited; its log:\n{}",
                self.log_text()
            );
            assert!(
                t0.elapsed() < timeout,
                "the agent was not ready within {timeout:?}; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of an unlabelled metric (`vpc_ebpf_<name>`), if exported.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = self.get(61678, "/metrics")?;
        let full = format!("vpc_ebpf_{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&full))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for LabAgent {
    fn drop(&mut self) {
        self.kill9();
        // The pinned maps and links of this node go with it (bpffs allows rm -r).
        if let Some((_, root)) = self.env.iter().find(|(k, _)| k == "VPC_EBPF_PIN_ROOT") {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}
