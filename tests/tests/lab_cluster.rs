//! vpc-ebpf on a real Kubernetes cluster in the lab: installed with its chart as an EKS
//! user installs it, pods made by the kubelet through containerd, an upgrade during live
//! traffic, removal, and the API server going away.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use vpc_ebpf_tests::cluster::{Cluster, is_ready, name, pod_ip};

/// A Deployment of the workload: `replicas` pods labelled `app=<name>`, on `node` when
/// given, with named ports and an HTTP readiness probe.
fn deployment(c: &Cluster, name: &str, replicas: u32, node: Option<&str>) -> String {
    let selector = node.map_or_else(String::new, |n| {
        format!("      nodeSelector: {{kubernetes.io/hostname: {n}}}\n")
    });
    format!(
        r"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: default}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}, tier: web}}}}
    spec:
      terminationGracePeriodSeconds: 1
{selector}      containers:
      - name: srv
        image: {image}
        ports:
        - {{name: hello, containerPort: 8080}}
        - {{name: echo, containerPort: 8082}}
        - {{name: http, containerPort: 8090}}
        readinessProbe: {{httpGet: {{path: /healthz, port: http}}, periodSeconds: 2}}
",
        image = c.workload_image()
    )
}

/// The endpoints the agent of node `n` holds: ip -> endpoint.
fn endpoints(c: &Cluster, n: u32) -> Vec<Value> {
    c.agent_get(n, 61679, "/v1/endpoints")
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v["endpoints"].as_array().cloned())
        .unwrap_or_default()
}

fn node_of(c: &Cluster, pod: &Value) -> u32 {
    let names = c.node_names();
    let node = pod["spec"]["nodeName"].as_str().unwrap();
    u32::try_from(names.iter().position(|n| n == node).unwrap() + 1).unwrap()
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    t0.elapsed()
}

/// Asks `cli`'s hello of `remote`:8080 until the answer is `want`, printing every failed
/// attempt in full; fails after `within`.
fn hello_within(c: &Cluster, cli: &str, remote: &str, want: &str, within: Duration) {
    let t0 = Instant::now();
    loop {
        let r = c.exec(
            "default",
            cli,
            &["vpc-ebpf-testsrv", "tcp", &format!("{remote}:8080")],
        );
        if r.stdout.contains(want) {
            return;
        }
        eprintln!(
            "ku: after uninstall, {:?} in: hello failed: stdout {:?} stderr {:?}",
            t0.elapsed(),
            r.stdout,
            r.stderr
        );
        assert!(
            t0.elapsed() < within,
            "pods lost their network after helm uninstall"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The agent's container log on node `n`, as the kubelet keeps it.
fn agent_log(c: &Cluster, n: u32) -> String {
    c.on_node(
        n,
        &[
            "sh",
            "-c",
            "cat /var/log/pods/kube-system_vpc-ebpf-*/vpc-ebpf/*.log",
        ],
    )
    .stdout
}

/// As `wait_until`, and on timeout says what the last round saw.
fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let t0 = Instant::now();
    while let Err(saw) = check() {
        assert!(
            t0.elapsed() < within,
            "{what}: not within {within:?}; last saw {saw}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
#[allow(clippy::too_many_lines)] // one walk through a pod's life on the cluster
fn the_chart_installs_and_pods_live_and_die_through_the_kubelet() {
    let c = Cluster::up("kc");
    let nodes = c.node_names();
    // Before vpc-ebpf: no network on the nodes.
    let n = c.kubectl_json(&["get", "nodes"]);
    assert!(
        n["items"].as_array().unwrap().iter().all(|n| !is_ready(n)),
        "nodes are Ready without a CNI: {n}"
    );
    // The chart lints, renders, and the API server accepts what it renders.
    let chart = vpc_ebpf_tests::repo_root().join("charts/vpc-ebpf");
    let chart = chart.to_str().unwrap();
    let lint = c.helm(&["lint", chart]);
    assert!(lint.ok, "helm lint: {}{}", lint.stdout, lint.stderr);
    let rendered = c.helm(&["template", "vpc-ebpf", chart, "-n", "kube-system"]);
    assert!(rendered.ok, "helm template: {}", rendered.stderr);
    let path = std::env::temp_dir().join(format!("vpc-ebpf-rendered-{}.yaml", std::process::id()));
    std::fs::write(&path, &rendered.stdout).unwrap();
    let dry = c.try_kubectl(&["apply", "--dry-run=server", "-f", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert!(dry.ok, "server-side dry run: {}", dry.stderr);

    // An ENI a terminated node of this cluster left detached; vpc-ebpf's node sweeping
    // the cluster deletes it (one node, under the sweep Lease).
    let leaked = c
        .lab
        .vpclab(&[
            "foreign-eni",
            "--node",
            "1",
            "--device-index",
            "-1",
            "--tag",
            "cluster.k8s.amazonaws.com/name=vpc-ebpf-lab",
            "--tag",
            "vpc-ebpf.io/managed-by=vpc-ebpf",
            "--tag",
            "node.k8s.amazonaws.com/instance_id=i-0terminated",
            "--tag",
            "node.k8s.amazonaws.com/createdAt=2026-01-01T00:00:00Z",
        ])
        .trim()
        .to_owned();
    c.install(
        &c.inputs.tag.clone(),
        &[
            ("ANNOTATE_POD_IP", "true"),
            ("CLUSTER_NAME", "vpc-ebpf-lab"),
        ],
    );
    wait_until("every node Ready", Duration::from_mins(1), || {
        c.kubectl_json(&["get", "nodes"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(is_ready)
    });
    wait_until("the leaked ENI swept", Duration::from_mins(1), || {
        let status: Value =
            serde_json::from_str(&c.lab.vpclab(&["status", "--json"])).expect("lab status");
        !status["unattached_enis"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str() == Some(leaked.as_str()))
    });
    let lease = c.kubectl_json(&[
        "-n",
        "kube-system",
        "get",
        "lease",
        "vpc-ebpf-leaked-eni-sweep",
    ]);
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
    assert!(
        nodes.iter().any(|n| n == holder),
        "sweep Lease held by {holder:?}: {lease}"
    );
    let swept: Vec<u32> = (1..=u32::try_from(nodes.len()).unwrap())
        .filter(|n| agent_log(&c, *n).contains("deleted a leaked ENI"))
        .collect();
    assert_eq!(swept.len(), 1, "one node sweeps, not {swept:?}");
    // Least privilege: what the agent's service account may and may not do.
    let sa = "--as=system:serviceaccount:kube-system:vpc-ebpf";
    for (verb, resource, allowed) in [
        ("list", "pods", true),
        ("watch", "pods", true),
        ("patch", "pods", true),
        ("get", "nodes", true),
        ("create", "events", true),
        ("delete", "pods", false),
        ("list", "secrets", false),
        ("list", "nodes", false),
        ("update", "nodes", false),
    ] {
        let r = c.try_kubectl(&["auth", "can-i", verb, resource, sa, "-A"]);
        assert_eq!(
            r.stdout.trim() == "yes",
            allowed,
            "the agent may{} {verb} {resource}",
            if allowed { " not" } else { "" }
        );
    }

    c.apply(&deployment(&c, "life", 4, None));
    let pods = c.wait_ready("default", "app=life", 4, Duration::from_secs(90));
    for p in &pods {
        let ip = pod_ip(p);
        assert!(ip.starts_with("10.0."), "{ip} is not a VPC address");
        assert_eq!(
            p["metadata"]["annotations"]["vpc.amazonaws.com/pod-ips"].as_str(),
            Some(ip),
            "ANNOTATE_POD_IP: {}",
            p["metadata"]
        );
    }
    // The agents know each pod from the watcher: labels and named ports, without a round
    // trip at ADD.
    for p in &pods {
        let n = node_of(&c, p);
        let eps = endpoints(&c, n);
        let ep = eps
            .iter()
            .find(|e| e["ip"] == pod_ip(p))
            .unwrap_or_else(|| panic!("node {n} has no endpoint for {}: {eps:?}", pod_ip(p)));
        assert_eq!(ep["labels"]["app"], "life", "{ep}");
        assert_eq!(ep["pod"]["name"], name(p), "{ep}");
        let named: Vec<&str> = ep["named_ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap())
            .collect();
        assert_eq!(named, ["hello", "echo", "http"], "{ep}");
    }
    // Every pod reaches every other, by its own address.
    for from in &pods {
        for to in &pods {
            let got = c.hello(
                "default",
                name(from),
                "tcp",
                &format!("{}:8080", pod_ip(to)),
            );
            assert_eq!(
                got.as_deref(),
                Some(format!("hello from {}", pod_ip(from)).as_str()),
                "{} -> {}",
                name(from),
                name(to)
            );
        }
    }
    // A label change reaches the agent's registry.
    let first = &pods[0];
    c.kubectl(&["label", "pod", name(first), "tier=db", "--overwrite"]);
    let n1 = node_of(&c, first);
    wait_until(
        "the new label in the registry",
        Duration::from_secs(10),
        || {
            endpoints(&c, n1)
                .iter()
                .any(|e| e["ip"] == pod_ip(first) && e["labels"]["tier"] == "db")
        },
    );

    // Scaled down, then deleted: addresses released, veths and routes gone.
    c.kubectl(&["scale", "deployment", "life", "--replicas=1"]);
    wait_until("three pods gone", Duration::from_mins(1), || {
        c.pods("default", "app=life").len() == 1
    });
    c.kubectl(&["delete", "deployment", "life", "--wait=true"]);
    wait_until("every pod gone", Duration::from_mins(1), || {
        c.pods("default", "app=life").is_empty()
    });
    for n in 1..=u32::try_from(nodes.len()).unwrap() {
        wait_until(
            &format!("node {n} holds no pod"),
            Duration::from_secs(20),
            || {
                let held = c.agent_get(n, 61679, "/v1/assignments").unwrap_or_default();
                let links = c.on_node(n, &["ip", "-o", "link", "show"]).stdout;
                let routes = c.on_node(n, &["ip", "route", "show"]).stdout;
                held.contains("\"assignments\": []")
                    && !links.contains(": eni")
                    && !routes.lines().any(|l| l.contains(" dev eni"))
            },
        );
    }
    // Nothing restarted on the way.
    for a in c.pods("kube-system", "app.kubernetes.io/name=vpc-ebpf") {
        assert_eq!(
            a["status"]["containerStatuses"][0]["restartCount"], 0,
            "{a}"
        );
    }
}

/// `kubectl exec` of a workload client in the background.
fn client(c: &Cluster, pod: &str, argv: &[&str]) -> Child {
    let kubeconfig = c.admin_kubeconfig();
    let mut all = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
    all.extend(["-n", "default", "exec", pod, "--"]);
    all.extend(argv);
    c.in_cp(&c.inputs.kube_bin.join("kubectl"))
        .args(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl exec")
}

fn finish(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap_or_else(|_| {
        panic!(
            "client output: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn helm_upgrade_mid_stream_resets_nothing_and_uninstall_leaves_pods_running() {
    let c = Cluster::up("ku");
    let tag = c.inputs.tag.clone();
    c.install(&tag, &[]);
    let nodes = c.node_names();
    c.apply(&deployment(&c, "near", 2, Some(&nodes[0])));
    c.apply(&deployment(&c, "far", 1, Some(&nodes[1])));
    let near = c.wait_ready("default", "app=near", 2, Duration::from_secs(90));
    let far = c.wait_ready("default", "app=far", 1, Duration::from_secs(90));
    let (cli, peer, remote) = (name(&near[0]), pod_ip(&near[1]), pod_ip(&far[0]));

    // Long-lived traffic through the upgrade: a stream across nodes, request/response
    // loops on the node and across nodes.
    let secs = "40";
    let stream = client(
        &c,
        cli,
        &[
            "vpc-ebpf-testsrv",
            "stream",
            &format!("{remote}:8082"),
            secs,
        ],
    );
    let rr_near = client(
        &c,
        cli,
        &["vpc-ebpf-testsrv", "rr", &format!("{peer}:8082"), secs],
    );
    let rr_far = client(
        &c,
        cli,
        &["vpc-ebpf-testsrv", "rr", &format!("{remote}:8082"), secs],
    );
    std::thread::sleep(Duration::from_secs(5));
    let next = format!("{tag}-next");
    c.push_as(&next);
    let t0 = Instant::now();
    c.install(&next, &[]);
    eprintln!("ku: helm upgrade rolled out in {:?}", t0.elapsed());
    for a in c.pods("kube-system", "app.kubernetes.io/name=vpc-ebpf") {
        assert!(
            a["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap()
                .ends_with(&next),
            "{a}"
        );
    }
    let (s, near_rr, far_rr) = (finish(stream), finish(rr_near), finish(rr_far));
    eprintln!(
        "ku: through the upgrade: stream {} bytes, longest gap {} ms; rr same node {} transactions, longest stall {} ms; rr across nodes {} transactions, longest stall {} ms",
        s["received"],
        s["max_gap_ms"],
        near_rr["transactions"],
        near_rr["max_stall_ms"],
        far_rr["transactions"],
        far_rr["max_stall_ms"]
    );
    assert_eq!(s["ok"], true, "the stream broke: {s}");
    assert_eq!(s["reset"], false, "{s}");
    assert_eq!(near_rr["ok"], true, "{near_rr}");
    assert_eq!(far_rr["ok"], true, "{far_rr}");
    for v in [
        &s["max_gap_ms"],
        &near_rr["max_stall_ms"],
        &far_rr["max_stall_ms"],
    ] {
        assert!(
            v.as_u64().unwrap() < 1000,
            "a stall of {v} ms through the upgrade"
        );
    }

    // Removal: the agents go, the pods they set up keep their network; the node's CNI
    // config and plugin stay (as aws-node's do), so a new pod's ADD says the agent is not
    // there, until vpc-ebpf is back.
    let r = c.helm(&["uninstall", "vpc-ebpf", "-n", "kube-system"]);
    assert!(r.ok, "helm uninstall: {}", r.stderr);
    wait_until("the agents gone", Duration::from_mins(1), || {
        c.pods("kube-system", "app.kubernetes.io/name=vpc-ebpf")
            .is_empty()
    });
    // Pods keep their network with no agent. Two of seven runs once saw the first
    // request right after the agents went fail (the output was not kept, so whether
    // `kubectl exec` or the packet path failed is not known): every failed attempt is
    // now printed in full, and the check allows 10 s before it fails.
    let want = format!("hello from {}", pod_ip(&near[0]));
    hello_within(&c, cli, remote, &want, Duration::from_secs(10));
    let conflist = c.on_node(1, &["cat", "/etc/cni/net.d/10-vpc-ebpf.conflist"]);
    assert!(conflist.ok, "the CNI config was removed");
    c.apply(&deployment(&c, "later", 1, Some(&nodes[0])));
    wait_until(
        "the new pod's sandbox failing",
        Duration::from_mins(1),
        || {
            c.try_kubectl(&[
                "get",
                "events",
                "--field-selector",
                "reason=FailedCreatePodSandBox",
            ])
            .stdout
            .contains("cannot reach the vpc-ebpf agent")
        },
    );
    c.install(&next, &[]);
    // The kubelet retries a pod whose sandbox failed at its resync interval (a minute,
    // with up to half again of jitter), so the pod may wait that long after the agent is
    // back.
    c.wait_ready("default", "app=later", 1, Duration::from_secs(150));
}

/// The PIDs of the pause processes of the pods at `ips`.
fn sandbox_pids(ips: &[&str]) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .as_deref()
            != Some(b"/pause\0")
        {
            continue;
        }
        let addrs = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n", "ip", "-4", "-o", "addr"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if ips.iter().any(|ip| addrs.contains(&format!(" {ip}/32"))) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn the_api_server_down_for_a_minute_stops_nothing() {
    let c = Cluster::up("ko");
    c.install(&c.inputs.tag.clone(), &[]);
    let nodes = c.node_names();
    c.apply(&deployment(&c, "steady", 4, Some(&nodes[0])));
    let pods = c.wait_ready("default", "app=steady", 4, Duration::from_secs(90));
    let agent_pid = || {
        c.on_node(1, &["pgrep", "-x", "vpc-ebpf-agent"])
            .stdout
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let agents_before = agent_pid();

    c.stop_apiserver();
    let t0 = Instant::now();
    // The kubelet re-creates two sandboxes on its own (their pause processes die): a DEL
    // and an ADD each, with nobody to ask but the agent.
    let ips: Vec<&str> = pods.iter().take(2).map(pod_ip).collect();
    let victims = sandbox_pids(&ips);
    assert_eq!(victims.len(), 2, "pause processes of {ips:?}: {victims:?}");
    for pid in &victims {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    // Two new sandboxes come up with addresses while the API server is away.
    let routed = || {
        c.on_node(1, &["ip", "route", "show"])
            .stdout
            .lines()
            .filter(|l| l.contains(" dev eni"))
            .count()
    };
    let took = wait_until(
        "the re-created sandboxes routed",
        Duration::from_secs(50),
        || {
            routed() == 4 && {
                let now: Vec<String> = c
                    .on_node(1, &["ip", "route", "show"])
                    .stdout
                    .lines()
                    .filter(|l| l.contains(" dev eni"))
                    .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                    .collect();
                ips.iter().all(|ip| !now.contains(&(*ip).to_owned()))
            }
        },
    );
    eprintln!("ko: two sandboxes re-created with new addresses {took:?} into the outage");
    let left = Duration::from_mins(1).saturating_sub(t0.elapsed());
    std::thread::sleep(left);
    assert_eq!(
        agent_pid(),
        agents_before,
        "the agent restarted during the outage"
    );
    let log = agent_log(&c, 1);
    assert!(
        log.contains("watching this node's pods failed"),
        "the outage went unnoticed by the pod watch"
    );

    c.start_apiserver();
    c.wait_ready("default", "app=steady", 4, Duration::from_secs(90));
    // The watch caught up: every pod, old and new, is known with its labels. The pods
    // are read each round: their status may still carry the old sandbox's address until
    // the kubelet's first update after the outage lands.
    wait_for(
        "the registry caught up with the pods",
        Duration::from_secs(30),
        || {
            let back = c.pods("default", "app=steady");
            let eps = endpoints(&c, 1);
            let ok = back.len() == 4
                && back.iter().all(|p| {
                    eps.iter()
                        .any(|e| e["ip"] == pod_ip(p) && e["labels"]["app"] == "steady")
                });
            if ok {
                return Ok(());
            }
            let ips: Vec<&str> = back.iter().map(pod_ip).collect();
            Err(format!("pods at {ips:?}, endpoints {eps:?}"))
        },
    );
    // The watch retries with client-go's backoff, as kube-rs has it: 0.8 s doubling to
    // 30 s, with jitter up to as much again; gentle on an API server that just came back.
    wait_for(
        "watching this node's pods again",
        Duration::from_secs(90),
        || {
            let log = agent_log(&c, 1);
            if log.contains("watching this node's pods again") {
                Ok(())
            } else {
                Err(log)
            }
        },
    );
    for a in c.pods("kube-system", "app.kubernetes.io/name=vpc-ebpf") {
        assert_eq!(
            a["status"]["containerStatuses"][0]["restartCount"], 0,
            "{a}"
        );
    }
}
