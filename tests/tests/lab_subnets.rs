//! Subnet discovery in the lab (the real agent and plugin, the lab's EC2 front enforcing
//! zones and subnet exhaustion): new ENIs go to the zone's subnets tagged
//! `kubernetes.io/role/cni`, most free addresses first, never to a subnet tagged `0` or an
//! untagged one; an ENI in a subnet tagged `0` (here the node's own) holds no pod address;
//! a full subnet moves growth to the next; pods in those subnets route and SNAT as pods on
//! the node's subnet do.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use serde_json::Value;
use vpc_ebpf_tests::{
    cni::Outcome,
    lab::Lab,
    lab_agent::LabAgent,
    lab_pods::{ping, sh},
    netns::NetNs,
};

const ROLE: &str = "kubernetes.io/role/cni";

fn subnet(lab: &Lab, cidr: &str, az: &str, role: Option<&str>) -> String {
    let tag = role.map(|v| format!("{ROLE}={v}"));
    let mut args = vec!["subnet", "--cidr", cidr, "--az", az];
    if let Some(t) = &tag {
        args.extend(["--tag", t]);
    }
    lab.vpclab(&args).trim().to_owned()
}

fn tag(lab: &Lab, resource: &str, value: &str) {
    lab.vpclab(&[
        "tag",
        "--resource",
        resource,
        "--tag",
        &format!("{ROLE}={value}"),
    ]);
}

/// node index (0-based) -> its ENIs as EC2 has them: (subnet, device index, secondaries).
fn enis(lab: &Lab, node: usize) -> Vec<(String, u64, usize)> {
    let status: Value = serde_json::from_str(&lab.vpclab(&["status", "--json"])).unwrap();
    status["nodes"][node]["enis"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["subnet_id"].as_str().unwrap().to_owned(),
                e["device_index"].as_u64().unwrap(),
                e["secondary_ips"].as_array().unwrap().len(),
            )
        })
        .collect()
}

/// ADD as kubelet does it (code 11 retried); the outcome and the pod's address.
fn add(agent: &LabAgent, name: &str, pod: &NetNs) -> (Outcome, Option<Ipv4Addr>) {
    let t0 = Instant::now();
    loop {
        let out = agent.cni_call("ADD", name, Some(pod), "1.1.0").run();
        if out.ok || out.code() != 11 || t0.elapsed() > Duration::from_secs(30) {
            let ip = out.ok.then(|| {
                out.json()["ips"][0]["address"]
                    .as_str()
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            });
            return (out, ip);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn inside(ip: Ipv4Addr, cidr: &str) -> bool {
    cidr.parse::<Ipv4Net>().unwrap().contains(&ip)
}

#[test]
#[allow(clippy::too_many_lines)] // one walk: placement, exhaustion, then traffic
fn subnet_discovery_places_enis_in_tagged_subnets_and_moves_on_when_one_is_full() {
    // m5.xlarge: 15 addresses per ENI, more than the small subnets hold, so a subnet
    // runs out before its ENI does.
    let lab = Lab::up_with("sd", 2, &["--zones", "2", "--instance-type", "m5.xlarge"]);
    let node_subnets: Vec<String> = lab.status["node_subnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    // The nodes' own subnets are tagged 0: their ENIs (the primaries) hold no pods.
    for s in &node_subnets {
        tag(&lab, s, "0");
    }
    // Zone a: 11 free addresses, 3 free, and two bigger ones discovery must not use.
    let big = subnet(&lab, "100.64.64.0/28", "us-west-2a", Some("1"));
    let small = subnet(&lab, "100.64.65.0/29", "us-west-2a", Some("yes"));
    let zero = subnet(&lab, "100.64.66.0/24", "us-west-2a", Some("0"));
    let untagged = subnet(&lab, "100.64.67.0/24", "us-west-2a", None);
    // Zone b: its pod subnet of the secondary CIDR, tagged.
    let zone_b = lab.status["pod_subnets"][1].as_str().unwrap().to_owned();
    tag(&lab, &zone_b, "1");

    let dir = std::env::temp_dir().join(format!("vpc-ebpf-sd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let env = [("WARM_IP_TARGET", "1"), ("MINIMUM_IP_TARGET", "1")];
    let mut a1 = LabAgent::start(&lab, 1, &dir.join("node1"), &env);
    let mut a2 = LabAgent::start(&lab, 2, &dir.join("node2"), &env);
    a1.wait_ready(Duration::from_secs(30));
    a2.wait_ready(Duration::from_secs(30));

    // Node 1: ten pods fill the 11 addresses of the big subnet (its ENI's primary and
    // ten secondaries), the next two go to the small one, the one after finds no room.
    let pods: Vec<NetNs> = (0..13).map(|i| NetNs::new(&format!("sd{i}"))).collect();
    let mut ips = Vec::new();
    for (i, pod) in pods.iter().take(12).enumerate() {
        let (out, ip) = add(&a1, &format!("sd-{i}"), pod);
        assert!(out.ok, "ADD sd-{i}: {}\n{}", out.stdout, a1.log_text());
        ips.push(ip.unwrap());
    }
    let in_big = ips
        .iter()
        .filter(|ip| inside(**ip, "100.64.64.0/28"))
        .count();
    let in_small = ips
        .iter()
        .filter(|ip| inside(**ip, "100.64.65.0/29"))
        .count();
    assert_eq!((in_big, in_small), (10, 2), "pods' addresses: {ips:?}");
    let (out, _) = add(&a1, "sd-12", &pods[12]);
    assert!(!out.ok, "a 13th pod got an address from full subnets");
    let why = out.json().to_string();
    assert!(why.contains("subnet"), "{why}");
    let log = a1.log_text();
    assert!(
        log.contains("growing in another subnet"),
        "no sign of moving on from the full subnet:\n{log}"
    );

    // EC2: the primary holds nothing; one ENI in each tagged subnet; none elsewhere.
    let mut by_subnet: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for (s, dev, n) in enis(&lab, 0) {
        assert!(
            by_subnet.insert(s.clone(), (dev, n)).is_none(),
            "two ENIs in {s}: {:?}",
            enis(&lab, 0)
        );
    }
    assert_eq!(
        by_subnet.get(&node_subnets[0]),
        Some(&(0, 0)),
        "{by_subnet:?}"
    );
    assert_eq!(by_subnet.get(&big).map(|v| v.1), Some(10), "{by_subnet:?}");
    assert_eq!(by_subnet.get(&small).map(|v| v.1), Some(2), "{by_subnet:?}");
    assert!(
        !by_subnet.contains_key(&zero) && !by_subnet.contains_key(&untagged),
        "an ENI in a subnet discovery must skip: {by_subnet:?}"
    );
    let shown = a1.introspect("/v1/enis").unwrap();
    assert_eq!(shown["placement"]["mode"], "subnet-discovery", "{shown}");
    let primary = shown["enis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["device_index"] == 0)
        .unwrap();
    assert_eq!(primary["excluded"], true, "{shown}");
    let secondary_subnets: Vec<&str> = shown["enis"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["device_index"] != 0)
        .map(|e| e["subnet_cidr"].as_str().unwrap())
        .collect();
    assert!(
        secondary_subnets.contains(&"100.64.64.0/28")
            && secondary_subnets.contains(&"100.64.65.0/29"),
        "{shown}"
    );

    // Node 2, zone b: its pod goes to the zone's tagged subnet.
    let q = NetNs::new("sdq");
    let (out, q_ip) = add(&a2, "sdq-0", &q);
    assert!(out.ok, "ADD on node2: {}\n{}", out.stdout, a2.log_text());
    let q_ip = q_ip.unwrap();
    assert!(inside(q_ip, "100.64.32.0/19"), "node2's pod: {q_ip}");

    // Traffic: across nodes, zones and subnets, out to the internet, node to pod.
    let first_small = ips
        .iter()
        .position(|ip| inside(*ip, "100.64.65.0/29"))
        .unwrap();
    let internet = lab.str("public_test_ip").to_owned();
    for (what, from, to) in [
        (
            "big-subnet pod -> zone-b pod",
            pods[0].name(),
            q_ip.to_string(),
        ),
        (
            "small-subnet pod -> zone-b pod",
            pods[first_small].name(),
            q_ip.to_string(),
        ),
        (
            "zone-b pod -> small-subnet pod",
            q.name(),
            ips[first_small].to_string(),
        ),
        (
            "pod -> pod, same node, across subnets",
            pods[0].name(),
            ips[first_small].to_string(),
        ),
        (
            "small-subnet pod -> internet (SNAT)",
            pods[first_small].name(),
            internet.clone(),
        ),
        ("zone-b pod -> internet (SNAT)", q.name(), internet.clone()),
        (
            "node -> pod (kubelet probes)",
            &a1.node_ns,
            ips[first_small].to_string(),
        ),
    ] {
        assert!(ping(from, &to), "{what}: {from} -> {to}");
    }
    // The VPC's router sees pods by their own addresses (no SNAT inside the VPC): its
    // route to the zone-b pod goes to node 2's ENI in that subnet.
    let (_, routes) = sh(&lab.ns("vpc"), &["ip", "route", "get", &q_ip.to_string()]);
    assert!(routes.contains("n2e"), "{routes}");
    eprintln!(
        "sd: node1 pods {in_big} in {big} (11 free), {in_small} in {small} (3 free), primary excluded; node2 pod {q_ip} in {zone_b}"
    );
    drop(a2);
}
