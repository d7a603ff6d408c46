//! vpc-ebpf-cni driven as a container runtime drives it, against the agent's real CNI
//! backend, with pods and the node as network namespaces.

use std::path::PathBuf;

use serde_json::{Value, json};
use vpc_ebpf_tests::{
    agent::TestAgent,
    cni::{Call, conf},
    netns::NetNs,
    require_root,
};

struct Env {
    dir: PathBuf,
    node: NetNs,
}

impl Env {
    fn new(tag: &str) -> Self {
        require_root();
        let dir = std::env::temp_dir().join(format!("vpc-ebpf-cni-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let node = NetNs::new(&format!("cn{tag}"));
        // The node's own address, so it can reach its pods (as kubelet probes do).
        node.ip(&["addr", "add", "192.0.2.100/32", "dev", "lo"]);
        Self { dir, node }
    }

    fn call(&self, command: &str, container: &str, pod: Option<&NetNs>, version: &str) -> Call {
        Call {
            node_ns: self.node.name().to_owned(),
            command: command.into(),
            container_id: container.into(),
            netns: pod
                .map(|p| format!("/run/netns/{}", p.name()))
                .unwrap_or_default(),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{container}"),
            conf: conf(
                version,
                &self.dir.join("agent.sock"),
                &self.dir.join("plugin.log"),
            ),
        }
    }

    fn links(&self) -> Vec<String> {
        let out = self.node.exec(&["ip", "-j", "link", "show"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect()
    }

    fn routes(&self) -> String {
        self.node.exec(&["ip", "route", "show"])
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn with_prev(mut c: Call, prev: &Value) -> Call {
    c.conf["prevResult"] = prev.clone();
    c
}

#[test]
fn add_check_del_across_versions() {
    let env = Env::new("a");
    let agent = TestAgent::start(&env.dir, 8);
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let pod = NetNs::new("cpod");
        let c = format!("c{i}");
        let add = env.call("ADD", &c, Some(&pod), version).run();
        assert!(add.ok, "ADD {version}: {}\n{}", add.stdout, add.stderr);
        let r = add.json();
        assert_eq!(r["cniVersion"], *version);
        let addr = r["ips"][0]["address"].as_str().unwrap().to_owned();
        let ip = addr.trim_end_matches("/32").to_owned();
        assert_eq!(r["ips"][0].get("version").is_some(), *version == "0.4.0");
        let host = r["interfaces"][0]["name"].as_str().unwrap().to_owned();
        assert!(host.starts_with("eni") && host.len() == 14, "{host}");

        // The pod: its /32, the gateway route, the default route, the gateway's MAC.
        let pod_addr = pod.exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(pod_addr.contains(&addr), "{pod_addr}");
        let pod_routes = pod.exec(&["ip", "route"]);
        assert!(
            pod_routes.contains("default via 169.254.1.1 dev eth0"),
            "{pod_routes}"
        );
        assert!(
            pod_routes
                .lines()
                .any(|l| l.starts_with("169.254.1.1 dev eth0") && l.contains("scope link")),
            "{pod_routes}"
        );
        // The host: the veth and the /32 route to the pod.
        assert!(env.links().contains(&host));
        assert!(
            env.routes()
                .lines()
                .any(|l| l.starts_with(&format!("{ip} dev {host} ")) && l.contains("scope link")),
            "{}",
            env.routes()
        );
        // Traffic: the node reaches the pod, the pod answers through its gateway.
        env.node.exec(&["ping", "-c", "1", "-W", "2", &ip]);

        let check = with_prev(env.call("CHECK", &c, Some(&pod), version), &r).run();
        assert!(check.ok, "CHECK {version}: {}", check.stdout);

        // A repeated ADD answers the same address and leaves the pod as it is.
        let again = env.call("ADD", &c, Some(&pod), version).run();
        assert!(again.ok, "{}", again.stdout);
        assert_eq!(again.json()["ips"][0]["address"], addr.as_str());

        let del = with_prev(env.call("DEL", &c, Some(&pod), version), &r).run();
        assert!(del.ok, "DEL: {}", del.stdout);
        assert!(
            del.stdout.is_empty(),
            "DEL prints nothing on success: {}",
            del.stdout
        );
        assert!(!env.links().contains(&host));
        assert!(!env.routes().contains(&ip));
        let del2 = env.call("DEL", &c, Some(&pod), version).run();
        assert!(del2.ok, "repeated DEL: {}", del2.stdout);
        // CHECK after DEL reports precisely what is wrong.
        let check = with_prev(env.call("CHECK", &c, Some(&pod), version), &r).run();
        assert_eq!(check.code(), 103, "{}", check.stdout);
    }
    assert_eq!(agent.assignments(), 0);
}

#[test]
fn del_works_without_netns_and_without_the_agent() {
    let env = Env::new("d");
    let agent = TestAgent::start(&env.dir, 4);
    let pod = NetNs::new("cpod");
    let add = env.call("ADD", "gone", Some(&pod), "1.1.0").run();
    assert!(add.ok, "{}", add.stdout);
    let host = add.json()["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(pod); // the runtime already removed the netns
    let del = env.call("DEL", "gone", None, "1.1.0").run();
    assert!(del.ok, "DEL with empty CNI_NETNS: {}", del.stdout);
    assert!(!env.links().contains(&host));
    assert_eq!(agent.assignments(), 0);

    // ADD again, then DEL while the agent is down: host side cleaned, release remembered.
    let pod = NetNs::new("cpod");
    let add = env.call("ADD", "later", Some(&pod), "1.1.0").run();
    assert!(add.ok);
    let host = add.json()["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    agent.stop();
    let status = env.call("STATUS", "", None, "1.1.0").run();
    assert_eq!(status.code(), 50, "STATUS with the agent down");
    let del = env.call("DEL", "later", Some(&pod), "1.1.0").run();
    assert!(del.ok, "DEL with the agent down: {}", del.stdout);
    assert!(!env.links().contains(&host));
    let pending: Vec<_> = std::fs::read_dir(env.dir.join("pending-release"))
        .unwrap()
        .collect();
    assert_eq!(pending.len(), 1, "the release is remembered for the agent");
    let add = env.call("ADD", "x", Some(&pod), "1.1.0").run();
    assert_eq!(
        add.code(),
        11,
        "ADD with the agent down: try again later: {}",
        add.stdout
    );
    assert!(add.json()["details"].as_str().unwrap().contains("running"));

    let agent = TestAgent::restart(&env.dir);
    assert_eq!(
        agent.assignments(),
        0,
        "the remembered release was applied at start"
    );
    assert!(
        std::fs::read_dir(env.dir.join("pending-release"))
            .unwrap()
            .next()
            .is_none(),
        "applied records are removed"
    );
    let status = env.call("STATUS", "", None, "1.1.0").run();
    assert!(status.ok, "STATUS with the agent up: {}", status.stdout);
    drop(agent);
}

#[test]
fn every_error_code_with_its_trigger() {
    let env = Env::new("e");
    let agent = TestAgent::start(&env.dir, 1);
    let pod = NetNs::new("cpod");
    let base = env.call("ADD", "e1", Some(&pod), "1.0.0");

    let mut c = base.clone();
    c.ifname = "this-name-is-too-long".into();
    assert_eq!(c.run().code(), 4, "bad CNI_IFNAME");
    let mut c = base.clone();
    c.container_id = String::new();
    assert_eq!(c.run().code(), 4, "missing CNI_CONTAINERID");
    assert_eq!(base.run_raw(b"{not json").code(), 6, "undecodable config");
    let mut c = base.clone();
    c.conf["mtu"] = json!(42);
    let out = c.run();
    assert_eq!(out.code(), 7, "invalid config");
    assert!(out.json()["msg"].as_str().unwrap().contains("mtu"));
    let mut c = base.clone();
    c.conf["cniVersion"] = json!("0.3.1");
    assert_eq!(c.run().code(), 1, "unsupported version");
    let mut c = base.clone();
    c.netns = "/run/netns/does-not-exist".into();
    assert_eq!(c.run().code(), 3, "missing netns");

    // One address: the first ADD gets it, the second must wait for the pool.
    assert!(base.run().ok);
    let pod2 = NetNs::new("cpod");
    let second = env.call("ADD", "e2", Some(&pod2), "1.0.0").run();
    assert_eq!(
        second.code(),
        11,
        "pool refilling: try again later: {}",
        second.stdout
    );
    agent.set_blocked(Some(vpc_ebpf_agent::ipam::GrowthBlock::Pool(
        vpc_ebpf_agent::ipam::pool::Blocked::EniLimit,
    )));
    let third = env.call("ADD", "e3", Some(&pod2), "1.0.0").run();
    assert_eq!(
        third.code(),
        101,
        "ENI limit: a real failure: {}",
        third.stdout
    );
    assert!(third.stdout.contains("ENI"), "{}", third.stdout);
    // Nothing of the failed ADDs is left on the node.
    assert_eq!(
        env.links().iter().filter(|l| l.starts_with("eni")).count(),
        1
    );

    let version = env
        .call("VERSION", "", None, "1.0.0")
        .run_raw(br#"{"cniVersion":"1.0.0"}"#);
    assert!(version.ok);
    assert_eq!(
        version.json()["supportedVersions"],
        json!(["0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn gc_removes_everything_not_in_valid_attachments() {
    let env = Env::new("g");
    let agent = TestAgent::start(&env.dir, 4);
    let pods: Vec<NetNs> = (0..3).map(|_| NetNs::new("cpod")).collect();
    let mut hosts = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let r = env.call("ADD", &format!("g{i}"), Some(p), "1.1.0").run();
        assert!(r.ok, "{}", r.stdout);
        hosts.push(
            r.json()["interfaces"][0]["name"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut gc = env.call("GC", "", None, "1.1.0");
    // The legacy key is accepted too.
    gc.conf["cni.dev/attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    let out = gc.run();
    assert!(out.ok, "GC: {}", out.stdout);
    let links = env.links();
    assert!(!links.contains(&hosts[0]) && links.contains(&hosts[1]) && !links.contains(&hosts[2]));
    assert_eq!(agent.assignments(), 1);
}

/// A CNI_NETNS that is not a network namespace (a plain file, another kind of namespace)
/// is named as such, with the spec's code for a bad environment, and changes nothing.
#[test]
fn add_into_something_that_is_not_a_netns_says_so() {
    let env = Env::new("nn");
    let agent = TestAgent::start(&env.dir, 2);
    let plain = env.dir.join("not-a-netns");
    std::fs::write(&plain, b"").unwrap();
    for path in [plain.display().to_string(), "/proc/self/ns/mnt".to_owned()] {
        let mut add = env.call("ADD", "nn0", None, "1.1.0");
        add.netns.clone_from(&path);
        let out = add.run();
        assert_eq!(out.code(), 4, "ADD into {path}: {}", out.stdout);
        assert!(
            out.stdout.contains("not a network namespace"),
            "{path}: {}",
            out.stdout
        );
        assert_eq!(agent.assignments(), 0, "{path}: an address was taken");
    }
    assert_eq!(env.links(), vec!["lo".to_owned()]);
}

/// GC with no list of valid attachments must not take every pod for stale.
#[test]
fn gc_without_the_list_releases_nothing_and_says_why() {
    let env = Env::new("gn");
    let agent = TestAgent::start(&env.dir, 4);
    let pod = NetNs::new("cpod");
    let r = env.call("ADD", "gn0", Some(&pod), "1.1.0").run();
    assert!(r.ok, "{}", r.stdout);
    let host = r.json()["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = env.call("GC", "", None, "1.1.0").run();
    assert_eq!(out.code(), 7, "GC without the list: {}", out.stdout);
    assert!(out.stdout.contains("valid-attachments"), "{}", out.stdout);
    assert!(env.links().contains(&host), "GC removed a live pod's veth");
    assert_eq!(agent.assignments(), 1, "GC released a live pod's address");
}

/// STATUS answers whether the plugin can set pods up, not whether an address is free this
/// instant: a full node's network must not be reported NotReady.
#[test]
fn status_stays_ok_on_a_node_with_every_address_in_use() {
    let env = Env::new("sf");
    let agent = TestAgent::start(&env.dir, 2);
    let pods: Vec<NetNs> = (0..2).map(|_| NetNs::new("cpod")).collect();
    for (i, p) in pods.iter().enumerate() {
        let r = env.call("ADD", &format!("sf{i}"), Some(p), "1.1.0").run();
        assert!(r.ok, "{}", r.stdout);
    }
    assert_eq!(agent.assignments(), 2);
    let status = env.call("STATUS", "", None, "1.1.0").run();
    assert!(status.ok, "STATUS on a full node: {}", status.stdout);
}

#[test]
fn sixty_four_concurrent_adds_then_dels_leave_nothing() {
    let env = Env::new("p");
    let agent = TestAgent::start(&env.dir, 70);
    let pods: Vec<NetNs> = (0..64).map(|_| NetNs::new("cpod")).collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let call = env.call("ADD", &format!("p{i}"), Some(p), "1.1.0");
                s.spawn(move || call.run())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips = std::collections::HashSet::new();
    for r in &results {
        assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
        assert!(
            ips.insert(r.json()["ips"][0]["address"].as_str().unwrap().to_owned()),
            "IP handed out twice"
        );
    }
    assert_eq!(agent.assignments(), 64);
    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let call = env.call("DEL", &format!("p{i}"), Some(p), "1.1.0");
            s.spawn(move || assert!(call.run().ok));
        }
    });
    assert_eq!(env.links(), vec!["lo".to_owned()], "leftover interfaces");
    assert!(
        !env.routes().contains("10.0.0."),
        "leftover routes: {}",
        env.routes()
    );
    assert_eq!(agent.assignments(), 0, "leftover allocations");
}

/// kubelet re-creates a pod's sandbox (same namespace and name, new container ID) and
/// later tears the old one down: the old sandbox's DEL must not take the new sandbox's
/// host veth, whose name (derived from namespace and name) it shares.
#[test]
fn del_of_an_old_sandbox_leaves_the_new_one_alone() {
    let env = Env::new("sb");
    let agent = TestAgent::start(&env.dir, 4);
    let (old_pod, new_pod) = (NetNs::new("sbold"), NetNs::new("sbnew"));
    let same_pod = |mut c: Call| {
        c.args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web".into();
        c
    };
    let old = same_pod(env.call("ADD", "sandbox-old", Some(&old_pod), "1.0.0")).run();
    assert!(old.ok, "{}", old.stdout);
    // The old sandbox dies; the new one's ADD replaces the veth of the same name.
    let new = same_pod(env.call("ADD", "sandbox-new", Some(&new_pod), "1.0.0")).run();
    assert!(new.ok, "{}", new.stdout);
    let veth = new.json()["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let new_ip = new.json()["ips"][0]["address"].as_str().unwrap().to_owned();
    let del = same_pod(env.call("DEL", "sandbox-old", Some(&old_pod), "1.0.0")).run();
    assert!(del.ok, "{}", del.stdout);
    assert!(
        env.links().contains(&veth),
        "the new sandbox lost {veth}: {:?}",
        env.links()
    );
    let ip = new_ip.split('/').next().unwrap();
    assert!(
        env.routes().contains(&format!("{ip} dev {veth}")),
        "the new sandbox lost its route: {}",
        env.routes()
    );
    assert_eq!(
        agent.assignments(),
        1,
        "the old sandbox's address is released"
    );
    let del = same_pod(env.call("DEL", "sandbox-new", Some(&new_pod), "1.0.0")).run();
    assert!(del.ok);
    assert!(!env.links().contains(&veth));
    assert_eq!(agent.assignments(), 0);
}
