//! Custom networking on the lab cluster (real API server and kubelets, nodes in two
//! zones, the chart's ENIConfigs per zone): pods get addresses of the secondary VPC CIDR
//! on ENIs in their zone's ENIConfig subnet with its security groups, the primary ENI
//! holds none, traffic flows as for any pod; a missing ENIConfig is said on the Node and
//! in the pod's error and fixing it needs no restart; a node switched to another
//! ENIConfig puts its next ENI there.

use std::{
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use serde_json::Value;
use vpc_ebpf_tests::cluster::{Cluster, name, pod_ip};

fn pod(c: &Cluster, name: &str, node: &str, app: &str) -> String {
    format!(
        r"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}
spec:
  terminationGracePeriodSeconds: 1
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  containers:
  - name: srv
    image: {image}
    ports: [{{name: hello, containerPort: 8080}}, {{name: http, containerPort: 8090}}]
    readinessProbe: {{httpGet: {{path: /healthz, port: http}}, periodSeconds: 2}}
",
        image = c.workload_image()
    )
}

fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let t0 = Instant::now();
    while let Err(saw) = check() {
        assert!(
            t0.elapsed() < within,
            "{what}: not within {within:?}; last saw {saw}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The lab's EC2 view of node `n` (0-based): (subnet, device index, secondaries, groups).
fn enis(c: &Cluster, n: usize) -> Vec<(String, u64, usize, Vec<String>)> {
    let status: Value = serde_json::from_str(&c.lab.vpclab(&["status", "--json"])).unwrap();
    status["nodes"][n]["enis"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["subnet_id"].as_str().unwrap().to_owned(),
                e["device_index"].as_u64().unwrap(),
                e["secondary_ips"].as_array().unwrap().len(),
                e["security_groups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

/// Events about `object` (any namespace) as "reason: message" lines.
fn events_of(c: &Cluster, kind: &str, object: &str) -> Vec<String> {
    c.kubectl_json(&["get", "events", "-A"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["involvedObject"]["kind"] == kind && e["involvedObject"]["name"] == object)
        .map(|e| {
            format!(
                "{}: {}",
                e["reason"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            )
        })
        .collect()
}

fn inside(ip: &str, cidr: &str) -> bool {
    cidr.parse::<Ipv4Net>()
        .unwrap()
        .contains(&ip.parse::<Ipv4Addr>().unwrap())
}

/// A TCP listener on the lab's internet address, which routes back only to the nodes'
/// own addresses: a pod reaches it only through SNAT.
fn internet_listener(c: &Cluster, port: u16) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &c.lab.ns("inet"), "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',{port}));s.listen(16)\nwhile True:\n c,_=s.accept();c.close()"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3")
}

#[test]
#[allow(clippy::too_many_lines)] // one walk, in the order an EKS user meets it
fn custom_networking_puts_pods_in_the_eniconfig_subnets() {
    let c = Cluster::up_in_zones("cn", 2);
    let tag = c.inputs.tag.clone();
    let nodes = c.node_names();
    let s = &c.lab.status;
    let zones: Vec<String> = s["zones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z.as_str().unwrap().to_owned())
        .collect();
    let pod_subnets: Vec<String> = s["pod_subnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z.as_str().unwrap().to_owned())
        .collect();
    let node_subnets: Vec<String> = s["node_subnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z.as_str().unwrap().to_owned())
        .collect();
    let pods_sg = s["pods_security_group"].as_str().unwrap().to_owned();
    let cidr_of = |id: &str| -> String {
        s["subnets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap()["cidr"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // Node 2 names an ENIConfig nobody made (an annotation wins over the zone label).
    c.kubectl(&[
        "annotate",
        "node",
        &nodes[1],
        "k8s.amazonaws.com/eniConfig=missing-b",
    ]);

    let mut sets = vec!["eniConfig.create=true".to_owned()];
    for (z, subnet) in zones.iter().zip(&pod_subnets) {
        sets.push(format!("eniConfig.subnets.{z}.id={subnet}"));
        sets.push(format!(
            "eniConfig.subnets.{z}.securityGroups={{{pods_sg}}}"
        ));
    }
    c.install_with(
        &tag,
        &[
            ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true"),
            ("ENI_CONFIG_LABEL_DEF", "topology.kubernetes.io/zone"),
            ("WARM_IP_TARGET", "1"),
            ("MINIMUM_IP_TARGET", "1"),
        ],
        &sets,
    );
    let made = c.kubectl(&["get", "eniconfigs", "-o", "name"]);
    assert!(
        made.contains(&zones[0]) && made.contains(&zones[1]),
        "{made}"
    );

    // The missing ENIConfig is said on the Node, and in the pod's error.
    wait_for("an Event on node 2", Duration::from_mins(1), || {
        let ev = events_of(&c, "Node", &nodes[1]);
        ev.iter()
            .any(|e| e.starts_with("ENIConfigMissing") && e.contains("missing-b"))
            .then_some(())
            .ok_or(format!("{ev:?}"))
    });
    c.apply(&pod(&c, "a1", &nodes[0], "cn"));
    c.apply(&pod(&c, "b1", &nodes[1], "cn"));
    wait_for("b1's sandbox error", Duration::from_mins(1), || {
        let ev = events_of(&c, "Pod", "b1");
        ev.iter()
            .any(|e| e.contains("missing-b") && e.contains("does not exist"))
            .then_some(())
            .ok_or(format!("{ev:?}"))
    });
    eprintln!("cn: b1 told: {:?}", events_of(&c, "Pod", "b1").last());
    // An ENIConfig of the other zone: EC2 would refuse the attach; said before trying.
    c.kubectl(&[
        "annotate",
        "node",
        &nodes[1],
        &format!("k8s.amazonaws.com/eniConfig={}", zones[0]),
        "--overwrite",
    ]);
    wait_for(
        "the wrong zone said on node 2",
        Duration::from_mins(1),
        || {
            let ev = events_of(&c, "Node", &nodes[1]);
            ev.iter()
                .any(|e| {
                    e.starts_with("ENIConfigInvalid")
                        && e.contains(&format!("but the node is in {}", zones[1]))
                })
                .then_some(())
                .ok_or(format!("{ev:?}"))
        },
    );
    // Fixed without a restart: node 2 falls back to its zone's label.
    c.kubectl(&[
        "annotate",
        "node",
        &nodes[1],
        "k8s.amazonaws.com/eniConfig-",
    ]);
    let pods = c.wait_ready("default", "app=cn", 2, Duration::from_mins(3));
    let ip_of = |n: &str| pod_ip(pods.iter().find(|p| name(p) == n).unwrap()).to_owned();
    let (a1, b1) = (ip_of("a1"), ip_of("b1"));
    assert!(
        inside(&a1, &cidr_of(&pod_subnets[0])),
        "a1 {a1} not in zone a's ENIConfig subnet"
    );
    assert!(
        inside(&b1, &cidr_of(&pod_subnets[1])),
        "b1 {b1} not in zone b's ENIConfig subnet"
    );

    // EC2: the primary ENIs hold no pod address; the others are in the ENIConfig subnet
    // with its security group.
    for n in 0..2 {
        let e = enis(&c, n);
        let primary = e.iter().find(|x| x.1 == 0).unwrap();
        assert_eq!(
            (&primary.0, primary.2),
            (&node_subnets[n], 0),
            "node {n}: {e:?}"
        );
        let secondary: Vec<_> = e.iter().filter(|x| x.1 != 0).collect();
        assert!(!secondary.is_empty(), "node {n}: {e:?}");
        for x in secondary {
            assert_eq!(
                (&x.0, &x.3),
                (&pod_subnets[n], &vec![pods_sg.clone()]),
                "node {n}: {e:?}"
            );
        }
    }
    let shown: Value = serde_json::from_str(&c.agent_get(1, 61679, "/v1/enis").unwrap()).unwrap();
    assert_eq!(shown["placement"]["mode"], "custom-networking", "{shown}");
    assert_eq!(
        shown["placement"]["eniconfig"]["name"],
        zones[0].as_str(),
        "{shown}"
    );
    assert_eq!(
        shown["placement"]["eniconfig"]["source"], "label topology.kubernetes.io/zone",
        "{shown}"
    );
    // m5.large: (3 ENIs - the primary) x 9 addresses + 2.
    assert_eq!(shown["max_pods"], 20, "{shown}");

    // Traffic: pod to pod across nodes and subnets, through a ClusterIP, to the internet
    // through SNAT; the readiness probes (node to pod) already passed.
    assert_eq!(
        c.hello("default", "a1", "tcp", &format!("{b1}:8080"))
            .as_deref(),
        Some(format!("hello from {a1}").as_str())
    );
    c.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: cn, namespace: default}\nspec:\n  selector: {app: cn}\n  ports: [{name: hello, port: 80, targetPort: 8080}]\n",
    );
    let cluster_ip =
        c.kubectl_json(&["-n", "default", "get", "service", "cn"])["spec"]["clusterIP"]
            .as_str()
            .unwrap()
            .to_owned();
    wait_for(
        "hello through the ClusterIP",
        Duration::from_secs(30),
        || {
            let got = c.hello("default", "b1", "tcp", &format!("{cluster_ip}:80"));
            got.is_some().then_some(()).ok_or(format!("{got:?}"))
        },
    );
    let mut listener = internet_listener(&c, 8443);
    std::thread::sleep(Duration::from_millis(500));
    let internet = format!("{}:8443", c.lab.str("public_test_ip"));
    for p in ["a1", "b1"] {
        let r = c.exec(
            "default",
            p,
            &["vpc-ebpf-testsrv", "probe", "tcp", "3000", &internet],
        );
        assert!(
            r.stdout.contains(":true"),
            "{p} -> internet: {} {}",
            r.stdout,
            r.stderr
        );
    }
    let _ = listener.kill();
    let _ = listener.wait();

    // Node 1 switched to another ENIConfig by the label that names it first (a subnet
    // of its zone, no groups given): its next ENI goes there, with the primary ENI's
    // groups.
    let alt = c
        .lab
        .vpclab(&["subnet", "--cidr", "100.64.128.0/24", "--az", &zones[0]])
        .trim()
        .to_owned();
    c.apply(&format!(
        "apiVersion: crd.k8s.amazonaws.com/v1alpha1\nkind: ENIConfig\nmetadata: {{name: alt-a}}\nspec: {{subnet: {alt}}}\n"
    ));
    c.kubectl(&[
        "label",
        "node",
        &nodes[0],
        "vpc.amazonaws.com/externalEniConfig=alt-a",
    ]);
    let primary_groups = enis(&c, 0).into_iter().find(|x| x.1 == 0).unwrap().3;
    for i in 0..9 {
        c.apply(&pod(&c, &format!("f{i}"), &nodes[0], "fill"));
    }
    c.wait_ready("default", "app=fill", 9, Duration::from_mins(3));
    wait_for(
        "an ENI in the new ENIConfig's subnet",
        Duration::from_mins(1),
        || {
            let e = enis(&c, 0);
            e.iter()
                .any(|x| x.0 == alt && x.3 == primary_groups)
                .then_some(())
                .ok_or(format!("{e:?}"))
        },
    );
    let in_alt = c
        .pods("default", "app=fill")
        .iter()
        .filter(|p| inside(pod_ip(p), "100.64.128.0/24"))
        .count();
    assert!(
        in_alt >= 1,
        "no new pod got an address of the new ENIConfig's subnet"
    );
    eprintln!("cn: a1 {a1}, b1 {b1}; after the switch to alt-a, {in_alt} of 9 new pods in {alt}");
}
