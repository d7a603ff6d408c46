//! EC2 failing under the agent, injected through the lab's EC2 front: EC2 down at start,
//! throttling storms, subnet exhaustion. The agent never crashes, keeps serving from what
//! it holds, says why it cannot give more, and recovers on its own.

use std::time::{Duration, Instant};

use vpc_ebpf_tests::{cni::Outcome, lab::Lab, lab_agent::LabAgent, netns::NetNs};

struct Node {
    agent: LabAgent,
}

impl Node {
    fn start(lab: &Lab, tag: &str, env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("vpc-ebpf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self {
            agent: LabAgent::start(lab, 1, &dir, env),
        }
    }

    fn cni(&self, command: &str, container: &str, pod: Option<&NetNs>) -> Outcome {
        self.agent.cni_call(command, container, pod, "1.1.0").run()
    }

    /// ADD as kubelet does it: code 11 ("try again later") is retried after a pause.
    fn add_retrying(&self, container: &str, pod: &NetNs, within: Duration) -> (Outcome, u32) {
        let t0 = Instant::now();
        let mut retries = 0;
        loop {
            let out = self.cni("ADD", container, Some(pod));
            if out.ok || out.code() != 11 || t0.elapsed() > within {
                return (out, retries);
            }
            retries += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn metric_line(&self, starts: &str) -> Option<f64> {
        let text = self.agent.get(61678, "/metrics")?;
        text.lines()
            .find(|l| l.starts_with(starts))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

fn fault(lab: &Lab, action: &str, code: &str, count: u32) {
    lab.vpclab(&[
        "fault",
        "--action",
        action,
        "--code",
        code,
        "--count",
        &count.to_string(),
    ]);
}

#[test]
fn ec2_down_at_start_is_waited_out() {
    let lab = Lab::up("fd", 1);
    fault(&lab, "*", "InternalError", 100_000);
    let mut n = Node::start(&lab, "fd", &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        n.agent.alive(),
        "the agent crashed:\n{}",
        n.agent.log_text()
    );
    let v = n
        .agent
        .introspect("/v1/enis")
        .expect("introspection answers while EC2 is down");
    assert_eq!(v["ready"], false);
    let why = v["not_ready_reason"].as_str().unwrap();
    assert!(
        why.contains("EC2") && why.contains("InternalError"),
        "{why}"
    );
    // The plugin hears "not ready": STATUS 50, ADD 11 (kubelet retries).
    let status = n.cni("STATUS", "", None);
    assert_eq!(status.code(), 50, "{}", status.stdout);
    let pod = NetNs::new("fd0");
    let add = n.cni("ADD", "fd-0", Some(&pod));
    assert_eq!(add.code(), 11, "{}", add.stdout);

    lab.vpclab(&["clear-faults"]);
    let took = n.agent.wait_ready(Duration::from_secs(20));
    eprintln!("fd: ready {took:?} after EC2 came back");
    let (out, retries) = n.add_retrying("fd-0", &pod, Duration::from_secs(20));
    assert!(out.ok, "{}\n{}", out.stdout, n.agent.log_text());
    eprintln!("fd: first ADD after recovery needed {retries} retries");
}

/// A restart while EC2 is unreachable: the agent serves ADDs at once from the free
/// addresses its checkpoint holds (it knows the node from its cache), and catches up with
/// EC2 once it is back.
#[test]
fn a_restart_while_ec2_is_down_serves_from_the_checkpoint() {
    let lab = Lab::up("fr", 1);
    let mut n = Node::start(
        &lab,
        "fr",
        &[("WARM_IP_TARGET", "3"), ("MINIMUM_IP_TARGET", "4")],
    );
    n.agent.wait_ready(Duration::from_secs(30));
    // The pool fills up before EC2 goes away.
    let t0 = Instant::now();
    while n.metric_line("vpc_ebpf_total_ip_addresses ").unwrap_or(0.0) < 4.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the pool did not fill"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    n.agent.kill9();
    fault(&lab, "*", "InternalError", 100_000);
    n.agent.restart();
    let took = n.agent.wait_ready(Duration::from_secs(10));
    eprintln!("fr: ready {took:?} after a restart with EC2 down");
    let pods: Vec<NetNs> = (0..3).map(|i| NetNs::new(&format!("fr{i}"))).collect();
    for (i, pod) in pods.iter().enumerate() {
        let out = n.cni("ADD", &format!("fr-{i}"), Some(pod));
        assert!(
            out.ok,
            "ADD {i} with EC2 down: {}\n{}",
            out.stdout,
            n.agent.log_text()
        );
    }
    let status = n.cni("STATUS", "", None);
    assert!(status.ok, "STATUS with EC2 down: {}", status.stdout);
    lab.vpclab(&["clear-faults"]);
    // Back: the reconciler refills the pool to its targets.
    let t0 = Instant::now();
    while n.metric_line("vpc_ebpf_total_ip_addresses ").unwrap_or(0.0) < 6.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the pool did not grow after EC2 came back:\n{}",
            n.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(n.agent.alive());
}

#[test]
fn throttling_storms_back_off_and_recover() {
    let lab = Lab::up("ft", 1);
    let n = Node::start(
        &lab,
        "ft",
        &[("WARM_IP_TARGET", "2"), ("MINIMUM_IP_TARGET", "3")],
    );
    let mut n = n;
    n.agent.wait_ready(Duration::from_secs(30));
    // Let the pool fill, then throttle every call that would grow it.
    std::thread::sleep(Duration::from_secs(2));
    fault(&lab, "AssignPrivateIpAddresses", "RequestLimitExceeded", 6);
    fault(&lab, "CreateNetworkInterface", "RequestLimitExceeded", 6);
    let pods: Vec<NetNs> = (0..6).map(|i| NetNs::new(&format!("ft{i}"))).collect();
    let t0 = Instant::now();
    let mut retries = 0;
    for (i, pod) in pods.iter().enumerate() {
        let (out, r) = n.add_retrying(&format!("ft-{i}"), pod, Duration::from_mins(1));
        assert!(out.ok, "ADD {i}: {}\n{}", out.stdout, n.agent.log_text());
        retries += r;
    }
    eprintln!(
        "ft: 6 pods through a throttling storm in {:?}, {retries} kubelet-style retries",
        t0.elapsed()
    );
    assert!(n.agent.alive());
    let throttled = n
        .metric_line(
            r#"vpc_ebpf_aws_api_errors_total{api="AssignPrivateIpAddresses",error="RequestLimitExceeded"}"#,
        )
        .unwrap_or(0.0);
    assert!(throttled >= 6.0, "throttled calls counted: {throttled}");
    let log = n.agent.log_text();
    assert!(log.contains("backing off"), "no backoff in the log");
}

#[test]
fn subnet_exhaustion_is_reported_and_growth_resumes() {
    let lab = Lab::up("fx", 1);
    let mut n = Node::start(
        &lab,
        "fx",
        &[
            ("WARM_IP_TARGET", "1"),
            ("MINIMUM_IP_TARGET", "2"),
            ("VPC_EBPF_SUBNET_FULL_PAUSE", "3"),
        ],
    );
    n.agent.wait_ready(Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    fault(
        &lab,
        "AssignPrivateIpAddresses",
        "InsufficientFreeAddressesInSubnet",
        100_000,
    );
    fault(
        &lab,
        "CreateNetworkInterface",
        "InsufficientFreeAddressesInSubnet",
        100_000,
    );
    let pods: Vec<NetNs> = (0..4).map(|i| NetNs::new(&format!("fx{i}"))).collect();
    // What the node holds is still served...
    let mut served = 0;
    let mut refused = None;
    for (i, pod) in pods.iter().enumerate() {
        let out = n.cni("ADD", &format!("fx-{i}"), Some(pod));
        if out.ok {
            served += 1;
        } else {
            refused = Some((i, out));
            break;
        }
    }
    assert!(served >= 2, "the warm pool was not served: {served}");
    // ... and then the refusal says why, as a real failure (not "try again").
    let (i, out) = refused.expect("an ADD beyond the pool must be refused");
    let v = out.json();
    assert_ne!(v["code"], 11, "{v}");
    let text = v.to_string();
    assert!(text.contains("subnet"), "{text}");
    assert_eq!(
        n.metric_line(r#"vpc_ebpf_pool_growth_blocked{reason="subnet_exhausted"}"#),
        Some(1.0)
    );
    assert!(n.agent.alive());

    lab.vpclab(&["clear-faults"]);
    let (out, retries) = n.add_retrying(&format!("fx-{i}"), &pods[i], Duration::from_secs(30));
    // A failed ADD that is not "try again" is retried by kubelet too; do it ourselves.
    let out = if out.ok {
        out
    } else {
        let t0 = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let o = n.cni("ADD", &format!("fx-{i}"), Some(&pods[i]));
            if o.ok || t0.elapsed() > Duration::from_secs(30) {
                break o;
            }
        }
    };
    assert!(
        out.ok,
        "growth did not resume: {}\n{}",
        out.stdout,
        n.agent.log_text()
    );
    eprintln!(
        "fx: served {served} from the pool while the subnet was full; resumed after {retries} retries"
    );
    assert_eq!(
        n.metric_line(r#"vpc_ebpf_pool_growth_blocked{reason="subnet_exhausted"}"#),
        Some(0.0)
    );
}

fn lab_status(lab: &Lab) -> serde_json::Value {
    serde_json::from_str(&lab.vpclab(&["status", "--json"])).expect("lab status")
}

fn ec2_calls(lab: &Lab, action: &str) -> u64 {
    lab_status(lab)["ec2_calls"][action].as_u64().unwrap_or(0)
}

/// EC2 attaches a new ENI, then refuses to mark it delete-on-termination. The ENI is
/// attached all the same: the agent keeps it and uses it (before, it forgot it, tried to
/// delete it, and looped create/attach/delete against the device index it held), and
/// sets delete-on-termination at a later reconcile once EC2 takes it.
#[test]
fn an_eni_attached_before_a_failure_is_kept() {
    let lab = Lab::up("fa", 1);
    fault(
        &lab,
        "ModifyNetworkInterfaceAttribute",
        "InternalError",
        100_000,
    );
    // 12 addresses: more than the primary ENI of an m5.large holds (9).
    let mut n = Node::start(
        &lab,
        "fa",
        &[("WARM_IP_TARGET", "1"), ("MINIMUM_IP_TARGET", "12")],
    );
    n.agent.wait_ready(Duration::from_secs(30));
    let held = |n: &Node| {
        n.agent.introspect("/v1/enis").map_or(0, |v| {
            v["enis"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|e| e["id"].is_string()).count())
        })
    };
    let t0 = Instant::now();
    while held(&n) < 2 || n.metric_line("vpc_ebpf_total_ip_addresses ").unwrap_or(0.0) < 12.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the second ENI was not taken into the pool: {}\n{}",
            lab_status(&lab)["nodes"][0]["enis"],
            n.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let calls = |a| ec2_calls(&lab, a);
    let before = (
        calls("CreateNetworkInterface"),
        calls("AttachNetworkInterface"),
        calls("DeleteNetworkInterface"),
    );
    std::thread::sleep(Duration::from_secs(5));
    let after = (
        calls("CreateNetworkInterface"),
        calls("AttachNetworkInterface"),
        calls("DeleteNetworkInterface"),
    );
    assert_eq!(
        before,
        after,
        "create/attach/delete went on after the ENI was in the pool:\n{}",
        n.agent.log_text()
    );
    assert_eq!(
        after,
        (1, 1, 0),
        "one ENI created and attached, none deleted"
    );
    let status = lab_status(&lab);
    assert_eq!(status["nodes"][0]["enis"].as_array().unwrap().len(), 2);
    assert_eq!(status["unattached_enis"].as_array().unwrap().len(), 0);
    // A pod gets an address (the pool spans both ENIs).
    let pod = NetNs::new("fa0");
    let out = n.cni("ADD", "fa-0", Some(&pod));
    assert!(out.ok, "{}", out.stdout);
    // aws-node's series say the same, under aws-node's names and labels.
    assert_eq!(n.metric_line("awscni_eni_allocated "), Some(2.0));
    assert_eq!(n.metric_line("awscni_add_ip_req_count "), Some(1.0));
    assert!(
        n.metric_line(r#"awscni_ec2api_error_count{fn="ModifyNetworkInterfaceAttribute"}"#)
            .is_some_and(|v| v >= 1.0)
    );
    assert!(
        n.metric_line(r#"awscni_aws_api_latency_ms_count{api="AttachNetworkInterface",error="false",status="200"}"#)
            == Some(1.0)
    );

    // EC2 takes the attribute again: the next reconcile (a minute) sets it.
    let tries = calls("ModifyNetworkInterfaceAttribute");
    lab.vpclab(&["clear-faults"]);
    let t0 = Instant::now();
    while !n.agent.log_text().contains("delete-on-termination set") {
        assert!(
            t0.elapsed() < Duration::from_secs(80),
            "delete-on-termination was not set again after EC2 recovered:\n{}",
            n.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(calls("ModifyNetworkInterfaceAttribute") > tries);
    eprintln!(
        "fa: delete-on-termination set {:?} after EC2 recovered",
        t0.elapsed()
    );
}

/// A CIDR block associated with the VPC while the agent runs is taken at the next
/// minute's reconcile (from IMDS, no EC2 call), without a restart.
#[test]
fn a_cidr_added_to_the_vpc_is_taken_without_a_restart() {
    let lab = Lab::up("fv", 1);
    let mut n = Node::start(&lab, "fv", &[]);
    n.agent.wait_ready(Duration::from_secs(30));
    let cidrs = |n: &Node| -> Vec<String> {
        n.agent
            .introspect("/v1/enis")
            .and_then(|v| {
                v["instance"]["vpc_cidrs"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    // Past the start's own calls (the first leaked-ENI check among them).
    std::thread::sleep(Duration::from_secs(3));
    let start = cidrs(&n);
    assert!(!start.iter().any(|c| c == "10.77.0.0/16"), "{start:?}");
    let describes = ec2_calls(&lab, "DescribeNetworkInterfaces");
    lab.vpclab(&["vpc-cidr", "--cidr", "10.77.0.0/16"]);
    let t0 = Instant::now();
    while !cidrs(&n).iter().any(|c| c == "10.77.0.0/16") {
        assert!(
            t0.elapsed() < Duration::from_secs(80),
            "the VPC's new CIDR was not taken: {:?}\n{}",
            cidrs(&n),
            n.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "fv: the new VPC CIDR taken {:?} after it was added",
        t0.elapsed()
    );
    // The reconcile read IMDS, not EC2: the pool agreed, so no describe was needed.
    assert_eq!(ec2_calls(&lab, "DescribeNetworkInterfaces"), describes);
    assert!(n.agent.alive());
}
