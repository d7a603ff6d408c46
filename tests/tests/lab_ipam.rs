//! The agent's IPAM end to end in the lab: the real agent binary in a lab node against
//! the lab's EC2 (moto behind the EC2 front) and IMDS, pods added and deleted by the real
//! plugin binary.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;
use vpc_ebpf_tests::{
    cni::{Call, conf},
    lab::Lab,
    lab_agent::LabAgent,
    netns::NetNs,
};

struct Node<'a> {
    lab: &'a Lab,
    agent: LabAgent,
    dir: PathBuf,
}

impl Node<'_> {
    fn call(&self, command: &str, container: &str, pod: Option<&NetNs>) -> Call {
        Call {
            node_ns: self.agent.node_ns.clone(),
            command: command.into(),
            container_id: container.into(),
            netns: pod
                .map(|p| format!("/run/netns/{}", p.name()))
                .unwrap_or_default(),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={container}"),
            conf: conf("1.1.0", &self.agent.socket(), &self.dir.join("plugin.log")),
        }
    }

    /// EC2's view of node 1: ENI id -> (secondary IPs, prefixes).
    fn ec2(&self) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
        let status: Value =
            serde_json::from_str(&self.lab.vpclab(&["status", "--json"])).expect("status");
        status["nodes"][0]["enis"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let list = |k: &str| -> Vec<String> {
                    e[k].as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_owned())
                        .collect()
                };
                (
                    e["id"].as_str().unwrap().to_owned(),
                    (list("secondary_ips"), list("prefixes")),
                )
            })
            .collect()
    }

    fn ec2_units(&self, prefixes: bool) -> usize {
        self.ec2()
            .values()
            .map(|(ips, pfx)| if prefixes { pfx.len() } else { ips.len() })
            .sum()
    }

    fn unattached_enis(&self) -> usize {
        let status: Value =
            serde_json::from_str(&self.lab.vpclab(&["status", "--json"])).expect("status");
        status["unattached_enis"].as_array().map_or(0, Vec::len)
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Duration {
        let t0 = Instant::now();
        while !ok() {
            assert!(
                t0.elapsed() < timeout,
                "{what}: not within {timeout:?}; EC2: {:?}\nagent log:\n{}",
                self.ec2(),
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t0.elapsed()
    }
}

fn node<'a>(lab: &'a Lab, tag: &str, env: &[(&str, &str)]) -> Node<'a> {
    let dir = std::env::temp_dir().join(format!("vpc-ebpf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut agent = LabAgent::start(lab, 1, &dir, env);
    let ready = agent.wait_ready(Duration::from_secs(30));
    eprintln!("{tag}: agent ready after {ready:?}");
    Node { lab, agent, dir }
}

/// WARM_IP_TARGET=3, MINIMUM_IP_TARGET=8: at least 8 addresses on a fresh node; 20 pods
/// get addresses with no ADD failing (a second ENI is attached in time); after deleting
/// them and the cooldown, the excess goes back to EC2.
fn warm_targets(prefixes: bool) {
    let tag = if prefixes { "ipp" } else { "ips" };
    let lab = Lab::up(tag, 1);
    let mut env = vec![
        ("WARM_IP_TARGET", "3"),
        ("MINIMUM_IP_TARGET", "8"),
        ("IP_COOLDOWN_PERIOD", "2"),
    ];
    if prefixes {
        env.push(("ENABLE_PREFIX_DELEGATION", "true"));
    }
    let n = node(&lab, tag, &env);
    // Prefix mode meets address targets with whole /28s: 8 addresses are one prefix.
    let (min_units, unit) = if prefixes { (1, 16) } else { (8, 1) };
    let took = n.wait_for("minimum addresses in EC2", Duration::from_secs(20), || {
        n.ec2_units(prefixes) >= min_units
    });
    eprintln!("{tag}: {min_units} units in EC2 after {took:?}");

    let pods: Vec<NetNs> = (0..20).map(|i| NetNs::new(&format!("{tag}{i}"))).collect();
    let mut latencies = Vec::new();
    let mut ips = BTreeSet::new();
    for (i, pod) in pods.iter().enumerate() {
        let t0 = Instant::now();
        let out = n.call("ADD", &format!("{tag}-pod{i}"), Some(pod)).run();
        latencies.push(t0.elapsed());
        assert!(
            out.ok,
            "ADD of pod {i} failed: {}\n{}",
            out.stdout,
            n.agent.log_text()
        );
        let ip = out.json()["ips"][0]["address"].as_str().unwrap().to_owned();
        assert!(ips.insert(ip.clone()), "{ip} handed out twice");
    }
    latencies.sort();
    eprintln!(
        "{tag}: 20 ADDs, median {:?}, max {:?}",
        latencies[10], latencies[19]
    );
    let enis = n.ec2();
    assert!(
        enis.len() >= 2 || prefixes,
        "20 pods on m5.large need a second ENI: {enis:?}"
    );
    // The pool stays WARM_IP_TARGET ahead of the pods.
    n.wait_for(
        "3 warm addresses above 20 pods",
        Duration::from_secs(20),
        || n.ec2_units(prefixes) * unit >= 23,
    );
    // Every address a pod has is one EC2 gave this node.
    let held: BTreeSet<String> = n
        .ec2()
        .values()
        .flat_map(|(ips, pfx)| {
            ips.iter().cloned().chain(pfx.iter().flat_map(|p| {
                let base: std::net::Ipv4Addr = p.split('/').next().unwrap().parse().unwrap();
                (0..16u32).map(move |i| std::net::Ipv4Addr::from(u32::from(base) + i).to_string())
            }))
        })
        .collect();
    for ip in &ips {
        let bare = ip.split('/').next().unwrap();
        assert!(held.contains(bare), "{bare} is not held in EC2");
    }

    for (i, pod) in pods.iter().enumerate() {
        let out = n.call("DEL", &format!("{tag}-pod{i}"), Some(pod)).run();
        assert!(out.ok, "DEL {i}: {}", out.stdout);
    }
    // After the cooldown the pool shrinks back to MINIMUM_IP_TARGET (in prefix mode: the
    // one prefix that covers it) and surplus ENIs go.
    let took = n.wait_for("shrink after cooldown", Duration::from_secs(40), || {
        let e = n.ec2();
        let units = n.ec2_units(prefixes);
        units == min_units && e.len() == 1
    });
    eprintln!("{tag}: back to {min_units} units on one ENI {took:?} after the last DEL");
    assert_eq!(n.unattached_enis(), 0, "a detached ENI was left behind");
    let status: Value = serde_json::from_str(&lab.vpclab(&["status", "--json"])).expect("status");
    eprintln!(
        "{tag}: EC2 calls for the whole run: {}",
        status["ec2_calls"]
    );
    let assigned = n.agent.metric("assigned_ip_addresses").expect("metric");
    assert!(assigned.abs() < f64::EPSILON, "assigned gauge {assigned}");
}

#[test]
fn warm_ip_targets_secondary_ips() {
    warm_targets(false);
}

#[test]
fn warm_ip_targets_prefix_delegation() {
    warm_targets(true);
}
