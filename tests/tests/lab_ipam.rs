//! The agent's IPAM end to end in the lab: the real agent binary in a lab node against
//! the lab's EC2 (moto behind the EC2 front) and IMDS, pods added and deleted by the real
//! plugin binary.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;
use vpc_ebpf_tests::{cni::Call, lab::Lab, lab_agent::LabAgent, netns::NetNs};

struct Node<'a> {
    lab: &'a Lab,
    agent: LabAgent,
    dir: PathBuf,
}

impl Node<'_> {
    fn call(&self, command: &str, container: &str, pod: Option<&NetNs>) -> Call {
        self.agent.cni_call(command, container, pod, "1.1.0")
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
    // How long the agent itself took per ADD (lock, assignment, checkpoint), as it
    // reports it.
    let metrics = n.agent.get(61678, "/metrics").unwrap_or_default();
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("vpc_ebpf_add_ip_latency_seconds"))
    {
        eprintln!("{tag}: {l}");
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
    // one prefix that covers it) and surplus ENIs go: an ENI once it is a minute old
    // (ipamd's minimum ENI lifetime), the addresses at most every 30 s.
    let took = n.wait_for("shrink after cooldown", Duration::from_secs(100), || {
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

/// The agent's view of who holds what: container id -> address.
fn assignments(agent: &LabAgent) -> BTreeMap<String, String> {
    let v = agent.introspect("/v1/assignments").expect("introspection");
    let mut out = BTreeMap::new();
    for a in v["assignments"].as_array().unwrap() {
        let ip = a["ip"].as_str().unwrap().to_owned();
        let prev = out.insert(a["container_id"].as_str().unwrap().to_owned(), ip.clone());
        assert!(prev.is_none(), "one container holds two addresses");
    }
    out
}

/// The agent, its checkpoint, EC2 and the kernel all agree with what the runtime
/// believes is present.
fn check_agreement(n: &Node, present: &BTreeMap<usize, String>, round: usize) {
    // The agent holds exactly what the runtime believes, with the same addresses.
    let held = assignments(&n.agent);
    let want: BTreeMap<String, String> = present
        .iter()
        .map(|(i, ip)| (format!("k9-pod{i}"), ip.clone()))
        .collect();
    assert_eq!(held, want, "round {round}: agent and runtime disagree");
    let unique: BTreeSet<&String> = held.values().collect();
    assert_eq!(
        unique.len(),
        held.len(),
        "round {round}: an address held twice"
    );
    // The checkpoint on disk says the same.
    let store = vpc_ebpf_agent::ipam::checkpoint::load(&n.dir.join("ipam.json"))
        .unwrap()
        .expect("checkpoint");
    let on_disk: BTreeMap<String, String> = store
        .assignments()
        .map(|(k, _, ip, _)| (k.container_id.clone(), ip.to_string()))
        .collect();
    assert_eq!(on_disk, want, "round {round}: checkpoint disagrees");
    // Every address is one EC2 gave this node.
    let ec2: BTreeSet<String> = n.ec2().into_values().flat_map(|(ips, _)| ips).collect();
    for ip in want.values() {
        assert!(ec2.contains(ip), "round {round}: {ip} not held in EC2");
    }
    // The kernel routes exactly the present pods.
    let route_table = vpc_ebpf_tests::netns::run(
        std::process::Command::new("ip")
            .args(["netns", "exec", &n.agent.node_ns])
            .args(["ip", "-4", "route", "show", "scope", "link"]),
    );
    let routed: BTreeSet<String> = route_table
        .lines()
        .filter(|l| l.contains(" dev eni"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let want_routed: BTreeSet<String> = want.values().cloned().collect();
    assert_eq!(routed, want_routed, "round {round}: kernel routes disagree");
    // The endpoint registry and the dataplane's (pinned) endpoints map hold exactly the
    // present pods.
    let registry: BTreeSet<String> = n.agent.introspect("/v1/endpoints").unwrap()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ip"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        registry, want_routed,
        "round {round}: the endpoint registry disagrees"
    );
    let pinned: BTreeSet<String> = vpc_ebpf_tests::dataplane::pinned_endpoints(&n.agent.pin_root())
        .into_iter()
        .map(|ip| ip.to_string())
        .collect();
    assert_eq!(
        pinned, want_routed,
        "round {round}: the pinned endpoints map disagrees"
    );
}

/// The plugin calls for `ops`: ADD of an absent pod, DEL of a present one.
fn calls(
    n: &Node,
    pods: &[NetNs],
    present: &BTreeMap<usize, String>,
    ops: &[usize],
) -> Vec<(usize, bool, Call)> {
    ops.iter()
        .map(|&i| {
            let add = !present.contains_key(&i);
            let call = n.call(
                if add { "ADD" } else { "DEL" },
                &format!("k9-pod{i}"),
                Some(&pods[i]),
            );
            (i, add, call)
        })
        .collect()
}

/// Runs `calls` at once; while they run, `during` (a kill, a restart) happens. Returns
/// (pod, was ADD, address the ADD got).
fn storm(
    calls: Vec<(usize, bool, Call)>,
    during: impl FnOnce(),
) -> Vec<(usize, bool, Option<String>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = calls
            .into_iter()
            .map(|(i, add, call)| {
                s.spawn(move || {
                    let out = call.run();
                    let ip = (add && out.ok).then(|| {
                        out.json()["ips"][0]["address"]
                            .as_str()
                            .unwrap()
                            .split('/')
                            .next()
                            .unwrap()
                            .to_owned()
                    });
                    if !add {
                        assert!(
                            out.ok,
                            "DEL must succeed even with the agent killed or starting: {}",
                            out.stdout
                        );
                    }
                    (i, add, ip)
                })
            })
            .collect();
        during();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// kill -9 of the agent in the middle of up to 50 concurrent ADD/DELs, then a restart
/// with more ADD/DELs landing while it starts, 100 times: every pod that got an address
/// keeps it, every DEL is honoured (served, or recorded by the plugin and applied), no
/// address is held twice, and EC2, the checkpoint, the kernel's routes, the endpoint
/// registry and the pinned endpoints map all agree; no ENI leaks.
#[test]
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
fn kill9_storms_lose_nothing() {
    const PODS: usize = 24;
    const ROUNDS: usize = 100;
    let lab = Lab::up("k9", 1);
    let mut n = node(
        &lab,
        "k9",
        &[
            ("WARM_IP_TARGET", "4"),
            ("MINIMUM_IP_TARGET", "12"),
            ("IP_COOLDOWN_PERIOD", "1"),
            ("VPC_EBPF_LEAKED_ENI_AGE", "2"),
        ],
    );
    let pods: Vec<NetNs> = (0..PODS).map(|i| NetNs::new(&format!("k9{i}"))).collect();
    // What the runtime believes: pod index -> address, for pods whose ADD succeeded and
    // that were not deleted since.
    let mut present: BTreeMap<usize, String> = BTreeMap::new();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let pending = vpc_ebpf_rpc::types::pending_dir(&n.agent.socket());
    let mut ready_times = Vec::new();
    let (mut adds_ok, mut adds_failed, mut dels, mut dels_at_start) = (0, 0, 0, 0);
    let mut apply = |present: &mut BTreeMap<usize, String>,
                     results: Vec<(usize, bool, Option<String>)>|
     -> usize {
        let mut d = 0;
        for (i, add, ip) in results {
            match (add, ip) {
                (true, Some(ip)) => {
                    adds_ok += 1;
                    present.insert(i, ip);
                }
                (true, None) => adds_failed += 1,
                (false, _) => {
                    d += 1;
                    present.remove(&i);
                }
            }
        }
        d
    };
    let mut pick = |k: u64| -> Vec<usize> {
        (0..k)
            .map(|_| usize::try_from(next() % PODS as u64).unwrap())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    for round in 0..ROUNDS {
        // Up to 50 operations over random pods: ADD the absent, DEL the present; the
        // agent is killed while they run.
        let ops = pick(50);
        let kill_after = Duration::from_millis(150 + (u64::try_from(round).unwrap() * 37) % 450);
        let results = storm(calls(&n, &pods, &present, &ops), || {
            std::thread::sleep(kill_after);
            n.agent.kill9();
        });
        dels += apply(&mut present, results);
        // The restart, with at least 8 more operations landing while it starts.
        let ops = pick(12);
        let results = storm(calls(&n, &pods, &present, &ops), || n.agent.restart());
        let d = apply(&mut present, results);
        dels += d;
        dels_at_start += d;
        ready_times.push(n.agent.wait_ready(Duration::from_secs(30)));
        // Releases the plugin recorded are applied by the agent's recovery sweep.
        n.wait_for("recorded releases applied", Duration::from_secs(10), || {
            std::fs::read_dir(&pending).map_or(true, |d| d.count() == 0)
        });
        check_agreement(&n, &present, round);
    }
    ready_times.sort();
    eprintln!(
        "k9: {ROUNDS} rounds: {adds_ok} ADDs ok, {adds_failed} ADDs refused while the agent was down or starting, {dels} DELs ({dels_at_start} while it started); restart to ready median {:?}, max {:?}",
        ready_times[ready_times.len() / 2],
        ready_times[ready_times.len() - 1]
    );
    assert!(adds_ok > 0 && dels > 0, "the storm did nothing");

    for (i, _) in std::mem::take(&mut present) {
        let out = n.call("DEL", &format!("k9-pod{i}"), Some(&pods[i])).run();
        assert!(out.ok);
    }
    // ENIs created by an agent killed before attaching are cleaned up by the next start.
    std::thread::sleep(Duration::from_secs(3));
    n.agent.restart();
    n.agent.wait_ready(Duration::from_secs(30));
    n.wait_for("no unattached ENI", Duration::from_secs(15), || {
        n.unattached_enis() == 0
    });
    assert!(assignments(&n.agent).is_empty());
}

/// An ENI another program attached (tagged `node.k8s.amazonaws.com/no_manage`, as
/// aws-node's users tag EFA or their own ENIs) takes one of the instance's ENI slots: the
/// pool stops at the limit (EniLimit) without trying an ENI EC2 would refuse, and never
/// touches that ENI.
#[test]
fn an_eni_of_other_software_counts_against_the_limit() {
    let lab = Lab::up("ium", 1);
    let theirs = lab
        .vpclab(&[
            "foreign-eni",
            "--node",
            "1",
            "--device-index",
            "1",
            "--tag",
            "node.k8s.amazonaws.com/no_manage=true",
        ])
        .trim()
        .to_owned();
    // m5.large: 3 ENIs of 10 addresses; with one taken, the pool can hold 2 x 9.
    let n = node(
        &lab,
        "ium",
        &[("MINIMUM_IP_TARGET", "20"), ("WARM_IP_TARGET", "1")],
    );
    n.wait_for("the two ENIs left filled", Duration::from_secs(30), || {
        n.ec2_units(false) == 18
    });
    let blocked = r#"vpc_ebpf_pool_growth_blocked{reason="eni_limit"} 1"#;
    n.wait_for(
        "growth blocked at the ENI limit",
        Duration::from_secs(10),
        || {
            n.agent
                .get(61678, "/metrics")
                .is_some_and(|m| m.contains(blocked))
        },
    );
    // Some time at the limit: no ENI created beyond it, nothing attached or deleted.
    std::thread::sleep(Duration::from_secs(5));
    let status: Value = serde_json::from_str(&n.lab.vpclab(&["status", "--json"])).unwrap();
    let calls = &status["ec2_calls"];
    assert_eq!(calls["CreateNetworkInterface"], 1, "{calls}");
    assert!(calls.get("DeleteNetworkInterface").is_none(), "{calls}");
    let ec2 = n.ec2();
    assert_eq!(ec2.len(), 3, "{ec2:?}");
    assert_eq!(
        ec2[&theirs],
        (vec![], vec![]),
        "its ENI was touched: {ec2:?}"
    );
    let pod = NetNs::new("ium0");
    let out = n.call("ADD", "ium-0", Some(&pod)).run();
    assert!(out.ok, "{}", out.stdout);
}

/// The `env:` of aws-node's stock manifest (aws-k8s-cni.yaml), as a user moving from
/// aws-node has it: the agent starts on it without a warning about any of it, pods get
/// addresses, and the pool keeps WARM_ENI_TARGET=1's whole free ENI beside them
/// (WARM_PREFIX_TARGET=1 is there with prefix delegation off, and ignored as ipamd does).
#[test]
fn the_stock_aws_node_manifest_values_serve_pods() {
    let lab = Lab::up("stk", 1);
    let n = node(&lab, "stk", vpc_ebpf_agent::config::AWS_NODE_STOCK_ENV);
    let log = n.agent.log_text();
    assert!(
        !log.contains("as aws-node does") && !log.contains("not supported"),
        "a stock value was not taken as given:\n{log}"
    );
    // m5.large: 10 addresses an ENI, 9 of them for pods.
    n.wait_for(
        "a whole ENI of free addresses",
        Duration::from_secs(20),
        || n.ec2_units(false) >= 9,
    );
    let pods: Vec<NetNs> = (0..3).map(|i| NetNs::new(&format!("stk{i}"))).collect();
    for (i, pod) in pods.iter().enumerate() {
        let out = n.call("ADD", &format!("stk-pod{i}"), Some(pod)).run();
        assert!(out.ok, "ADD {i}: {}\n{}", out.stdout, n.agent.log_text());
    }
    // Three taken: another ENI comes so that a whole one stays free.
    n.wait_for(
        "the warm ENI beside 3 pods",
        Duration::from_secs(30),
        || n.ec2().len() == 2 && n.ec2_units(false) >= 12,
    );
    for (i, pod) in pods.iter().enumerate() {
        let out = n.call("DEL", &format!("stk-pod{i}"), Some(pod)).run();
        assert!(out.ok, "DEL {i}: {}", out.stdout);
    }
}
