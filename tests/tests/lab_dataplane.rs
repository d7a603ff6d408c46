//! The packet paths end to end in the lab: two nodes running the real agent (IPAM and
//! eBPF dataplane), pods made by the real plugin, traffic through the lab's VPC router
//! (which drops packets leaving by an ENI that does not own their source) and internet.

use std::{process::Command, time::Duration};

use vpc_ebpf_tests::{
    lab::Lab,
    lab_agent::LabAgent,
    lab_pods::{add_pods, ping, sh},
    netns::run,
};

fn forward_packets(node_ns: &str) -> u64 {
    let (_, out) = sh(node_ns, &["iptables", "-L", "FORWARD", "-v", "-n", "-x"]);
    // The test's own counting rule: "pkts bytes target ..." then one line per rule.
    out.lines()
        .find(|l| l.contains("vpc-ebpf-test-count"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no counting rule in:\n{out}"))
}

#[test]
#[allow(clippy::too_many_lines)] // one walk through every path, in the order a reader checks them
fn every_packet_path() {
    let lab = Lab::up("dp", 2);
    let dir = std::env::temp_dir().join(format!("vpc-ebpf-dp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Node 1 holds more than its primary ENI can (9 pod addresses on m5.large), so a
    // second ENI is attached and the tenth pod gets an address from it.
    let mut a1 = LabAgent::start(
        &lab,
        1,
        &dir.join("node1"),
        &[("MINIMUM_IP_TARGET", "12"), ("WARM_IP_TARGET", "2")],
    );
    // Node 2's ENIs take another MTU than EC2 gave them (the lab's are 9001, as EC2's).
    let mut a2 = LabAgent::start(
        &lab,
        2,
        &dir.join("node2"),
        &[("WARM_IP_TARGET", "2"), ("AWS_VPC_ENI_MTU", "8500")],
    );
    a1.wait_ready(Duration::from_secs(30));
    a2.wait_ready(Duration::from_secs(30));
    let node1 = a1.node_ns.clone();
    for (ns, want) in [(&node1, "mtu 9001"), (&a2.node_ns, "mtu 8500")] {
        let (_, links) = sh(ns, &["ip", "-o", "link", "show"]);
        // The lab's ENIs are eth<device index>, as on an instance (the pods' host veths
        // are eni…, as aws-node names them).
        let enis: Vec<&str> = links.lines().filter(|l| l.contains(": eth")).collect();
        assert!(!enis.is_empty(), "no ENI in {ns}:\n{links}");
        assert!(
            enis.iter().all(|l| l.contains(want)),
            "AWS_VPC_ENI_MTU: want {want} on every ENI of {ns}:\n{links}"
        );
    }
    let p = add_pods(&a1, &dir, "dpa", 10);
    let q = add_pods(&a2, &dir, "dpb", 1);
    let assignments = a1.introspect("/v1/assignments").unwrap();
    let on_secondary: Vec<&str> = assignments["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["device_index"] != 0)
        .map(|a| a["ip"].as_str().unwrap())
        .collect();
    assert_eq!(on_secondary, [p[9].ip.as_str()], "{assignments}");

    // Nothing of ours in netfilter, and no static ARP in the pods.
    let (_, rules) = sh(&node1, &["nft", "list", "ruleset"]);
    assert!(rules.trim().is_empty(), "node netfilter ruleset:\n{rules}");
    let (_, neigh) = sh(p[0].ns.name(), &["ip", "neigh", "show", "169.254.1.1"]);
    assert!(
        !neigh.contains("PERMANENT"),
        "static gateway entry: {neigh}"
    );

    // A counting rule of the test's own, to see what crosses the node's FORWARD chain.
    run(Command::new("ip").args([
        "netns",
        "exec",
        &node1,
        "iptables",
        "-A",
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        "vpc-ebpf-test-count",
    ]));

    assert!(ping(p[0].ns.name(), &p[1].ip), "pod -> pod, same node");
    assert_eq!(
        forward_packets(&node1),
        0,
        "same-node pod traffic went through the host's FORWARD chain"
    );
    assert!(ping(p[0].ns.name(), &q[0].ip), "pod -> pod, across nodes");
    assert!(
        ping(p[9].ns.name(), &q[0].ip),
        "pod on the secondary ENI -> other node (must leave by its own ENI)"
    );
    assert!(
        ping(q[0].ns.name(), &p[9].ip),
        "other node -> pod on the secondary ENI"
    );
    let internet = lab.str("public_test_ip").to_owned();
    assert!(
        ping(p[0].ns.name(), &internet),
        "pod -> internet through SNAT"
    );
    assert!(
        ping(p[9].ns.name(), &internet),
        "secondary-ENI pod -> internet through SNAT"
    );
    // UDP datagrams larger than the 9001 MTU leave in fragments, all translated, and the
    // internet's fragmented answers come back whole (for a pod on each ENI).
    let inet_ns = lab.str("internet_namespace").to_owned();
    let server = spawn_py(&inet_ns, UDP_ECHO, &[&internet, "2"]);
    std::thread::sleep(Duration::from_millis(500));
    for pod in [&p[0], &p[9]] {
        let got = finish(
            spawn_py(pod.ns.name(), UDP_BIG, &[&internet]),
            "fragmented UDP",
        );
        assert_eq!(got["whole"], true, "{} -> internet: {got}", pod.ip);
    }
    let seen = finish(server, "UDP echo in the internet");
    let node1_ip = lab.status["nodes"][0]["primary_ip"].clone();
    assert_eq!(
        seen["from"],
        serde_json::json!([node1_ip, node1_ip]),
        "every fragment left translated to the node address"
    );
    assert!(ping(&node1, &p[0].ip), "node -> pod (kubelet probe)");
    assert_eq!(
        forward_packets(&node1),
        0,
        "pod traffic went through the host's FORWARD chain"
    );
    // The counter counts: traffic the programs hand to the kernel (a Service address no
    // kube-proxy answers here) does cross FORWARD.
    let _ = ping(p[0].ns.name(), "172.20.0.10");
    assert!(
        forward_packets(&node1) > 0,
        "the FORWARD counter never counts"
    );

    // CHECK asks the agent whether the pod's programs are attached.
    let mut check = p[0].call.clone();
    check.command = "CHECK".into();
    check.conf["prevResult"] = p[0].result.clone();
    let out = check.run();
    assert!(out.ok, "CHECK: {}", out.stdout);

    // The dataplane counted what it did.
    let metrics = a1.get(61678, "/metrics").unwrap_or_default();
    eprintln!(
        "{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("vpc_ebpf_dataplane_packets_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // kill -9 the agent: the pinned programs keep forwarding; a new agent takes over.
    a1.kill9();
    assert!(
        ping(p[0].ns.name(), &q[0].ip),
        "traffic with the agent down"
    );
    a1.restart();
    a1.wait_ready(Duration::from_secs(30));
    assert!(
        ping(p[0].ns.name(), &p[1].ip),
        "after the restart, same node"
    );
    let log = a1.log_text();
    assert!(
        log.contains("node_known=true") && log.contains("programmed=10"),
        "the restarted agent did not adopt the 10 pods:\n{log}"
    );
    drop(a2);
}

/// Python one-liners run in pods: a sink that reports the longest gap between reads, a
/// stream source, an echo server and a request/response client reporting its slowest
/// round trip. Each prints one JSON line and fails on a reset.
const SINK: &str = "import socket,time,json\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',9000));s.listen(1)\nc,_=s.accept();n=0;gap=0;last=time.monotonic()\nwhile True:\n b=c.recv(65536)\n now=time.monotonic()\n if not b: break\n gap=max(gap,now-last);last=now;n+=len(b)\nprint(json.dumps({'bytes':n,'max_gap_ms':gap*1000}))";
const SOURCE: &str = "import socket,time,sys\nc=socket.create_connection((sys.argv[1],9000),timeout=10);end=time.monotonic()+float(sys.argv[2]);buf=b'x'*16384\nwhile time.monotonic()<end: c.sendall(buf)\nc.close()";
const ECHO: &str = "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',9001));s.listen(1)\nc,_=s.accept()\nwhile True:\n b=c.recv(1)\n if not b: break\n c.sendall(b)";
const RR: &str = "import socket,time,sys,json\nc=socket.create_connection((sys.argv[1],9001),timeout=10);c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1);end=time.monotonic()+float(sys.argv[2]);n=0;worst=0\nwhile time.monotonic()<end:\n t=time.monotonic();c.sendall(b'x');assert c.recv(1)==b'x';worst=max(worst,time.monotonic()-t);n+=1\nc.close();print(json.dumps({'transactions':n,'max_rtt_ms':worst*1000}))";

/// A UDP echo server on port 9002 of argv[1] for argv[2] datagrams, reporting whom it
/// answered; a client sending one 12000-byte datagram there and reporting whether the
/// same bytes came back.
const UDP_ECHO: &str = "import socket,sys,json\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind((sys.argv[1],9002));s.settimeout(20);seen=[]\nfor _ in range(int(sys.argv[2])):\n b,a=s.recvfrom(65535);s.sendto(b,a);seen.append(a[0])\nprint(json.dumps({'from':seen}))";
const UDP_BIG: &str = "import socket,sys,json\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(5);m=bytes(i%251 for i in range(12000))\ns.sendto(m,(sys.argv[1],9002));b,_=s.recvfrom(65535)\nprint(json.dumps({'whole':b==m,'len':len(b)}))";

fn spawn_py(ns: &str, code: &str, args: &[&str]) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", code])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3")
}

fn finish(c: std::process::Child, what: &str) -> serde_json::Value {
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed (a reset?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap_or_default()
}

/// kill -9 of the agent during a long TCP stream (across nodes) and a TCP request/response
/// run (same node): neither connection resets; the longest stall is reported.
#[test]
fn kill9_during_tcp_stream_and_rr() {
    let lab = Lab::up("ks", 2);
    let dir = std::env::temp_dir().join(format!("vpc-ebpf-ks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut a1 = LabAgent::start(&lab, 1, &dir.join("node1"), &[("WARM_IP_TARGET", "2")]);
    let mut a2 = LabAgent::start(&lab, 2, &dir.join("node2"), &[("WARM_IP_TARGET", "2")]);
    a1.wait_ready(Duration::from_secs(30));
    a2.wait_ready(Duration::from_secs(30));
    let p = add_pods(&a1, &dir, "ksa", 2);
    let q = add_pods(&a2, &dir, "ksb", 1);
    let sink = spawn_py(q[0].ns.name(), SINK, &[]);
    let echo = spawn_py(p[1].ns.name(), ECHO, &[]);
    std::thread::sleep(Duration::from_millis(500));
    let source = spawn_py(p[0].ns.name(), SOURCE, &[&q[0].ip, "8"]);
    let rr = spawn_py(p[0].ns.name(), RR, &[&p[1].ip, "8"]);
    std::thread::sleep(Duration::from_secs(2));
    a1.kill9();
    std::thread::sleep(Duration::from_secs(1));
    a1.restart();
    let ready = a1.wait_ready(Duration::from_secs(30));
    let sent = source.wait_with_output().unwrap();
    assert!(
        sent.status.success(),
        "the stream was cut: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let stream = finish(sink, "stream sink");
    let rr = finish(rr, "request/response");
    let _ = finish(echo, "echo server");
    eprintln!(
        "ks: agent down 1 s, back in {ready:?}; stream {} bytes, longest stall {:.1} ms; \
         RR {} transactions, slowest {:.1} ms",
        stream["bytes"],
        stream["max_gap_ms"].as_f64().unwrap_or(f64::NAN),
        rr["transactions"],
        rr["max_rtt_ms"].as_f64().unwrap_or(f64::NAN)
    );
    assert!(
        stream["bytes"].as_u64().unwrap_or(0) > 1_000_000,
        "{stream}"
    );
    assert!(rr["transactions"].as_u64().unwrap_or(0) > 100, "{rr}");
    drop(a2);
}

/// A sink on port 9100 reporting the bytes of one connection and the time between its
/// first and last byte; a source sending to it for argv[2] seconds.
const RATE_SINK: &str = "import socket,time,json\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',9100));s.listen(1)\nc,_=s.accept();n=0;first=None;last=0\nwhile True:\n b=c.recv(65536)\n if not b: break\n now=time.monotonic();first=first or now;last=now;n+=len(b)\nprint(json.dumps({'bytes':n,'secs':last-first}))";
const RATE_SOURCE: &str = "import socket,time,sys\nc=socket.create_connection((sys.argv[1],9100),timeout=10);end=time.monotonic()+float(sys.argv[2]);buf=b'x'*16384\nwhile time.monotonic()<end: c.sendall(buf)\nc.close()";

fn first_ips(out: &vpc_ebpf_tests::cni::Outcome) -> serde_json::Value {
    out.json()["ips"].clone()
}

/// The rest of a chain after vpc-ebpf, as runtimes run it (ADD in order, DEL in reverse),
/// each plugin given the result before it: portmap and tuning (which users chain after
/// aws-node too), then bandwidth. An ADD's every result must carry `ips`. Returns the
/// last result.
fn run_chain(
    call: &vpc_ebpf_tests::cni::Call,
    first: serde_json::Value,
    ips: &serde_json::Value,
) -> serde_json::Value {
    let chain = [
        (
            "portmap",
            serde_json::json!({"capabilities": {"portMappings": true}}),
        ),
        (
            "tuning",
            serde_json::json!({"sysctl": {"net.core.somaxconn": "1234"}}),
        ),
        (
            "bandwidth",
            serde_json::json!({"capabilities": {"bandwidth": true}}),
        ),
    ];
    let mut order: Vec<_> = chain.iter().collect();
    if call.command == "DEL" {
        order.reverse();
    }
    let mut prev = first;
    for (plugin, extra) in order {
        let mut conf = call.conf.clone();
        conf["type"] = (*plugin).into();
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        conf["prevResult"] = prev.clone();
        let out = call.run_plugin(
            &std::path::Path::new("/usr/lib/cni").join(plugin),
            conf.to_string().as_bytes(),
        );
        assert!(
            out.ok,
            "{} of the chained {plugin}: {}\n{}",
            call.command, out.stdout, out.stderr
        );
        if call.command == "ADD" {
            prev = out.json();
            assert_eq!(&prev["ips"], ips, "{plugin} passed on another result");
        }
    }
    prev
}

/// Mbit/s of a 3 s TCP stream from `from` to `to` (`to_ip`).
fn stream_mbps(from: &str, to: &str, to_ip: &str) -> f64 {
    let sink = spawn_py(to, RATE_SINK, &[]);
    std::thread::sleep(Duration::from_millis(400));
    let source = spawn_py(from, RATE_SOURCE, &[to_ip, "3"]);
    finish(source, "rate source");
    let got = finish(sink, "rate sink");
    let (bytes, secs) = (
        got["bytes"].as_f64().unwrap(),
        got["secs"].as_f64().unwrap(),
    );
    bytes * 8.0 / secs / 1e6
}

/// A pod with `kubernetes.io/ingress-bandwidth: 20M` and `egress-bandwidth: 10M`, as
/// kubelet passes them (the `bandwidth` capability), with `portmap`, `tuning` and the
/// `bandwidth` plugin chained after vpc-ebpf (each gets the result before it, and passes
/// it on): both limits hold with the eBPF dataplane on, while a pod without limits on the
/// same node is not held back; DEL runs through the chain.
#[test]
fn a_bandwidth_limited_pod_is_held_to_its_rates() {
    let lab = Lab::up("bw", 1);
    let dir = std::env::temp_dir().join(format!("vpc-ebpf-bw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut a = LabAgent::start(&lab, 1, &dir, &[("WARM_IP_TARGET", "3")]);
    a.wait_ready(Duration::from_secs(30));
    let free = add_pods(&a, &dir, "bwf", 2);

    let limited = vpc_ebpf_tests::netns::NetNs::new("bwl");
    let mut add = a.cni_call("ADD", "bwl", Some(&limited), "1.0.0");
    // containerd's CRI sends the Go field names; bursts as its 4 Gibit would make the
    // first seconds unlimited, so a small bucket here.
    let bandwidth = serde_json::json!({
        "IngressRate": 20_000_000, "IngressBurst": 800_000,
        "EgressRate": 10_000_000, "EgressBurst": 800_000,
    });
    add.conf["runtimeConfig"] = serde_json::json!({
        "bandwidth": bandwidth,
        "portMappings": [{"hostPort": 30180, "containerPort": 8080, "protocol": "tcp"}],
    });
    let ours = add.run();
    assert!(ours.ok, "ADD: {}\n{}", ours.stdout, a.log_text());
    let last = run_chain(&add, ours.json(), &first_ips(&ours));
    // bandwidth adds its ifb after vpc-ebpf's two.
    assert_eq!(
        last["interfaces"].as_array().unwrap()[..2],
        ours.json()["interfaces"].as_array().unwrap()[..]
    );
    let (_, somaxconn) = sh(limited.name(), &["sysctl", "-n", "net.core.somaxconn"]);
    assert_eq!(somaxconn.trim(), "1234", "tuning's sysctl in the pod");
    let ip = ours.ip();
    // The plugin's tbf on the host veth is there; vpc-ebpf's on the pod's eth0.
    let host_veth = ours.json()["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, qd) = sh(&a.node_ns, &["tc", "qdisc", "show", "dev", &host_veth]);
    assert!(qd.contains("tbf"), "no tbf on {host_veth}: {qd}");
    let (_, qd) = sh(limited.name(), &["tc", "qdisc", "show", "dev", "eth0"]);
    assert!(qd.contains("tbf"), "no tbf on the pod's eth0: {qd}");

    let unlimited = stream_mbps(free[0].ns.name(), free[1].ns.name(), &free[1].ip);
    let into = stream_mbps(free[0].ns.name(), limited.name(), &ip);
    let out_of = stream_mbps(limited.name(), free[1].ns.name(), &free[1].ip);
    eprintln!(
        "same node, TCP: unlimited {unlimited:.0} Mbit/s; into the limited pod {into:.1} \
         Mbit/s (limit 20); out of it {out_of:.1} Mbit/s (limit 10)"
    );
    assert!(
        (14.0..=22.0).contains(&into),
        "ingress limit 20 Mbit/s: {into:.1}"
    );
    assert!(
        (7.0..=11.0).contains(&out_of),
        "egress limit 10 Mbit/s: {out_of:.1}"
    );
    assert!(
        unlimited > 100.0,
        "the unlimited pair: {unlimited:.0} Mbit/s"
    );
    let metrics = a.get(61678, "/metrics").unwrap_or_default();
    let qdisc_packets: f64 = metrics
        .lines()
        .filter(|l| l.contains("pass_to_pod_qdisc") && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // (GSO packets of up to 64 KiB: 7.5 MB in 3 s is a hundred or more.)
    assert!(
        qdisc_packets > 50.0,
        "packets into the limited pod through the host veth's qdisc: {qdisc_packets}"
    );
    // DEL through the chain, last plugin first, then vpc-ebpf.
    let mut del = add.clone();
    del.command = "DEL".into();
    del.conf["prevResult"] = last.clone();
    run_chain(&del, last, &serde_json::Value::Null);
    let out = del.run();
    assert!(out.ok, "DEL: {}", out.stdout);
}
