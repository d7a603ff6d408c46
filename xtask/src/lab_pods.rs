//! The lab's workload: the real agent on every node (as the DaemonSet runs it), pods
//! made by the real plugin (as a container runtime makes them), and a check of every
//! packet path through them. Everything lives in the lab's namespaces; `lab down` removes
//! it with the rest (it kills what runs in `<prefix>-*` namespaces and deletes them, and
//! the pins under `/sys/fs/bpf/vpc-ebpf-lab-<prefix>-*`).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::util::target_dir;

pub const PREFIX: &str = "vpcl";
const HOSTPORT: u16 = 30080;
const POD_PORT: u16 = 8080;
const CLUSTER_IP: &str = "172.20.0.10";

fn run_dir() -> PathBuf {
    PathBuf::from(format!("/run/vpc-ebpf-lab/{PREFIX}/workload"))
}

fn ns_exec(ns: &str, argv: &[&str]) -> (bool, String) {
    match Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
    {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Starts a detached process inside `ns` (nsenter keeps the host's /sys/fs/bpf, so the
/// agent's pins outlive it as on a real node) and records its pid for `lab down`.
fn spawn_in(ns: &str, name: &str, argv: &[&str], env: &[(String, String)]) -> anyhow::Result<()> {
    let dir = run_dir();
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(argv)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    // The lab's own run dir: `lab down` kills every *.pid it finds there.
    std::fs::write(
        PathBuf::from(format!("/run/vpc-ebpf-lab/{PREFIX}/{name}.pid")),
        child.id().to_string(),
    )?;
    Ok(())
}

fn introspect(node_ns: &str, path: &str) -> Option<Value> {
    let code = format!(
        "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:61679{path}',timeout=2).read().decode())"
    );
    let (ok, out) = ns_exec(node_ns, &["python3", "-c", &code]);
    ok.then(|| serde_json::from_str(&out).ok()).flatten()
}

struct Pod {
    ns: String,
    ip: String,
    eni_device: u64,
}

fn add_pod(
    plugin: &Path,
    node_ns: &str,
    socket: &Path,
    name: &str,
    hostport: bool,
) -> anyhow::Result<Pod> {
    let ns = format!("{PREFIX}-{name}");
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    crate::util::run(Command::new("ip").args(["netns", "add", &ns]))?;
    let mut conf = json!({
        "cniVersion": "1.0.0", "name": "aws-cni", "type": "vpc-ebpf-cni",
        "agentSocket": socket, "logFile": run_dir().join("plugin.log"), "logLevel": "debug",
    });
    if hostport {
        conf["runtimeConfig"] = json!({"portMappings": [
            {"hostPort": HOSTPORT, "containerPort": POD_PORT, "protocol": "tcp"}
        ]});
    }
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{node_ns}"))
        .arg(plugin)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", name)
        .env("CNI_NETNS", format!("/run/netns/{ns}"))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"),
        )
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() {
        bail!("ADD of pod {name} failed: {v}");
    }
    let ip = v["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .context("ADD result without an address")?
        .to_owned();
    let eni_device = introspect(node_ns, "/v1/assignments")
        .and_then(|a| {
            a["assignments"]
                .as_array()?
                .iter()
                .find(|x| x["container_id"] == name)?["device_index"]
                .as_u64()
        })
        .unwrap_or(0);
    Ok(Pod { ns, ip, eni_device })
}

/// A tiny TCP echo server in a pod (python3 is in the lab's package set).
fn serve_tcp(pod: &Pod, name: &str) -> anyhow::Result<()> {
    let code = format!(
        "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('0.0.0.0',{POD_PORT}));s.listen(64)\nwhile True:\n c,a=s.accept();c.sendall(('hello from '+a[0]).encode());c.close()\n"
    );
    spawn_in(&pod.ns, name, &["python3", "-c", &code], &[])
}

fn tcp_get(ns: &str, ip: &str, port: u16) -> Option<String> {
    let code = format!(
        "import socket;c=socket.create_connection(('{ip}',{port}),timeout=3);print(c.recv(100).decode())"
    );
    let (ok, out) = ns_exec(ns, &["python3", "-c", &code]);
    ok.then(|| out.trim().to_owned())
}

/// Sends a datagram larger than the 9001 MTU from `pod_ns` to an echo server on
/// `public` in `inet_ns`; returns the address the server saw when the same bytes came
/// back whole.
fn udp_big(pod_ns: &str, inet_ns: &str, public: &str) -> Option<String> {
    let server = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('{public}',9002));s.settimeout(10)\n\
         b,a=s.recvfrom(65535);s.sendto(b,a);print(a[0])"
    );
    let server = Command::new("ip")
        .args(["netns", "exec", inet_ns, "python3", "-c", &server])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let client = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(5)\n\
         m=bytes(i%251 for i in range(12000));s.sendto(m,('{public}',9002));b,_=s.recvfrom(65535)\n\
         assert b==m"
    );
    let (ok, _) = ns_exec(pod_ns, &["python3", "-c", &client]);
    let out = server.wait_with_output().ok()?;
    let seen = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (ok && out.status.success()).then_some(seen)
}

fn ping(ns: &str, ip: &str) -> bool {
    ns_exec(ns, &["ping", "-c", "2", "-i", "0.2", "-W", "2", ip]).0
}

/// Brings the workload up on a running lab and checks every path; returns whether all
/// passed.
pub fn up_and_check(status: &Value) -> anyhow::Result<bool> {
    let bin = target_dir()?.join("debug");
    let (agent, plugin) = (bin.join("vpc-ebpf-agent"), bin.join("vpc-ebpf-cni"));
    let nodes = status["nodes"]
        .as_array()
        .context("lab status has no nodes")?;
    if nodes.len() < 2 {
        bail!("the workload needs 2 nodes (cargo xtask lab down, then up again)");
    }
    let endpoint = status["ec2_endpoint"].as_str().unwrap_or_default();
    let mut sockets = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let ns = n["netns"].as_str().context("node netns")?.to_owned();
        let dir = run_dir().join(format!("node{}", i + 1));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("agent.sock");
        let mut env: Vec<(String, String)> = [
            ("AWS_EC2_ENDPOINT", endpoint),
            ("AWS_ACCESS_KEY_ID", "lab"),
            ("AWS_SECRET_ACCESS_KEY", "lab"),
            ("WARM_IP_TARGET", "2"),
            ("IP_COOLDOWN_PERIOD", "5"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        // Node 1 holds more than its primary ENI can, so it gets a second ENI.
        if i == 0 {
            env.push(("MINIMUM_IP_TARGET".into(), "12".into()));
        }
        env.push(("VPC_EBPF_AGENT_SOCKET".into(), socket.display().to_string()));
        env.push((
            "VPC_EBPF_CHECKPOINT".into(),
            dir.join("ipam.json").display().to_string(),
        ));
        env.push((
            "VPC_EBPF_PIN_ROOT".into(),
            format!("/sys/fs/bpf/vpc-ebpf-lab-{PREFIX}-node{}", i + 1),
        ));
        env.push(("PATH".into(), std::env::var("PATH").unwrap_or_default()));
        let agent_s = agent.display().to_string();
        spawn_in(&ns, &format!("agent-node{}", i + 1), &[&agent_s], &env)?;
        sockets.push((ns, socket));
    }
    for (ns, _) in &sockets {
        let t0 = Instant::now();
        while introspect(ns, "/v1/enis").is_none_or(|v| v["ready"] != true) {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the agent on {ns} is not ready after 30 s; see {}",
                    run_dir().display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("agent on {ns}: ready in {:.2?}", t0.elapsed());
    }
    let (n1, s1) = &sockets[0];
    let (n2, s2) = &sockets[1];
    let mut p = Vec::new();
    for i in 0..10 {
        p.push(add_pod(&plugin, n1, s1, &format!("a{i}"), i == 0)?);
    }
    let q = add_pod(&plugin, n2, s2, "b0", false)?;
    println!(
        "pods: {} on node1 ({} on its secondary ENI), 1 on node2",
        p.len(),
        p.iter().filter(|x| x.eni_device != 0).count()
    );
    serve_tcp(&p[0], "server-a0")?;
    serve_tcp(&q, "server-b0")?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(check(status, &p, &q, n1, n2))
}

#[allow(clippy::too_many_lines)] // one list of checks, in the order a reader verifies them
fn check(status: &Value, p: &[Pod], q: &Pod, n1: &str, n2: &str) -> bool {
    let node1_ip = status["nodes"][0]["primary_ip"]
        .as_str()
        .unwrap_or_default();
    let inet = status["internet_namespace"].as_str().unwrap_or_default();
    let public = status["public_test_ip"].as_str().unwrap_or_default();
    let sec = p.iter().find(|x| x.eni_device != 0);
    let mut results: Vec<(String, bool)> = Vec::new();
    let mut record = |what: &str, ok: bool| {
        println!("  {} {what}", if ok { "ok  " } else { "FAIL" });
        results.push((what.to_owned(), ok));
    };
    println!("\nchecking the packet paths:");
    let (_, rules) = ns_exec(n1, &["nft", "list", "ruleset"]);
    record(
        "no netfilter rules of ours on the node (nft list ruleset is empty)",
        rules.trim().is_empty(),
    );
    let (_, neigh) = ns_exec(&p[0].ns, &["ip", "neigh", "show", "169.254.1.1"]);
    record(
        "no static ARP entry in pods: the dataplane answers for 169.254.1.1",
        !neigh.contains("PERMANENT"),
    );
    let _ = ns_exec(
        n1,
        &[
            "iptables",
            "-A",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "lab-count",
        ],
    );
    record("pod -> pod, same node", ping(&p[1].ns, &p[2].ip));
    let (_, fwd) = ns_exec(n1, &["iptables", "-L", "FORWARD", "-v", "-n", "-x"]);
    let forwarded = fwd
        .lines()
        .find(|l| l.contains("lab-count"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("?")
        .to_owned();
    record(
        &format!("same-node pod traffic skips the node's FORWARD chain ({forwarded} packets)"),
        forwarded == "0",
    );
    let _ = ns_exec(
        n1,
        &[
            "iptables",
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            "lab-count",
        ],
    );
    record(
        "pod -> pod, across nodes (through the VPC router)",
        ping(&p[1].ns, &q.ip),
    );
    if let Some(s) = sec {
        record(
            "pod on the secondary ENI -> other node (leaves by its own ENI)",
            ping(&s.ns, &q.ip),
        );
        record("other node -> pod on the secondary ENI", ping(&q.ns, &s.ip));
        record(
            "pod on the secondary ENI -> internet (SNAT)",
            ping(&s.ns, public),
        );
    } else {
        record("a pod on a secondary ENI exists", false);
    }
    record(
        "pod -> internet through SNAT, reply back (ping)",
        ping(&p[1].ns, public),
    );
    let big = udp_big(&p[1].ns, inet, public);
    record(
        &format!(
            "pod -> internet, a 12000-byte UDP datagram (fragments) and its answer: seen from {big:?}"
        ),
        big.as_deref() == Some(node1_ip),
    );
    record("node -> pod (kubelet probe)", ping(n1, &p[1].ip));
    let probe = tcp_get(n1, &p[0].ip, POD_PORT);
    record(
        &format!("node -> pod TCP (a kubelet HTTP probe), unNATed: {probe:?}"),
        probe.is_some_and(|s| s.starts_with("hello from ") && !s.ends_with(node1_ip)),
    );
    let hp = tcp_get(n2, node1_ip, HOSTPORT);
    record(
        &format!("hostPort {HOSTPORT} from the other node: {hp:?}"),
        hp.is_some_and(|s| s.starts_with("hello from")),
    );
    let hp = tcp_get(inet, node1_ip, HOSTPORT);
    record(
        &format!("hostPort {HOSTPORT} from the internet: {hp:?}"),
        hp.is_some_and(|s| s.starts_with("hello from")),
    );
    // kube-proxy's part, emulated: a ClusterIP DNATed to the pod on node 2.
    let dnat = format!("{}:{POD_PORT}", q.ip);
    let _ = ns_exec(
        n1,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            CLUSTER_IP,
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &dnat,
        ],
    );
    let svc = tcp_get(&p[1].ns, CLUSTER_IP, 80);
    record(
        &format!(
            "pod -> ClusterIP {CLUSTER_IP}:80 (kube-proxy-style DNAT) -> pod on node 2: {svc:?}"
        ),
        svc.as_deref() == Some(&format!("hello from {}", p[1].ip)),
    );
    if let Some(s) = sec {
        let svc = tcp_get(&s.ns, CLUSTER_IP, 80);
        record(
            &format!(
                "secondary-ENI pod -> ClusterIP -> pod on node 2, via its ENI's table: {svc:?}"
            ),
            svc.as_deref() == Some(&format!("hello from {}", s.ip)),
        );
    }
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    println!(
        "\n{} of {} paths work{}",
        results.len() - failed,
        results.len(),
        if failed == 0 {
            ""
        } else {
            " — see the FAIL lines"
        }
    );
    failed == 0
}
