//! Pods in the lab made by the real plugin, and traffic between them, for the lab tests.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    cni::{Call, conf},
    lab_agent::LabAgent,
    netns::NetNs,
};

/// A pod the plugin set up, with its ADD's call and result (for CHECK and DEL).
pub struct Pod {
    pub ns: NetNs,
    pub ip: String,
    /// The ADD's CNI call and result, for CHECK.
    pub call: Call,
    pub result: serde_json::Value,
}

pub fn sh(ns: &str, argv: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .expect("ip netns exec");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

pub fn ping(from: &str, to: &str) -> bool {
    sh(from, &["ping", "-c", "2", "-i", "0.2", "-W", "2", to]).0
}

pub fn add_pods(agent: &LabAgent, dir: &std::path::Path, tag: &str, n: usize) -> Vec<Pod> {
    (0..n)
        .map(|i| {
            let ns = NetNs::new(&format!("{tag}{i}"));
            let call = Call {
                node_ns: agent.node_ns.clone(),
                command: "ADD".into(),
                container_id: format!("{tag}-{i}"),
                netns: format!("/run/netns/{}", ns.name()),
                ifname: "eth0".into(),
                args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={tag}-{i}"),
                conf: conf("1.0.0", &agent.socket(), &dir.join("plugin.log")),
            };
            let out = call.run();
            assert!(
                out.ok,
                "ADD {tag}-{i}: {}\n{}",
                out.stdout,
                agent.log_text()
            );
            let ip = out.ip();
            let result = out.json();
            Pod {
                ns,
                ip,
                call,
                result,
            }
        })
        .collect()
}

/// One ping with a short wait: for polling a path until it works.
pub fn reaches(from: &str, to: &str) -> bool {
    sh(from, &["ping", "-c", "1", "-W", "0.2", to]).0
}

/// Polls every path until all work at once; how long that took, or `None` after
/// `timeout`.
pub fn until_all_reach(paths: &[(&str, &str)], timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if paths.iter().all(|(from, to)| reaches(from, to)) {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
