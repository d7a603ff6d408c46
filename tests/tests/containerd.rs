//! vpc-ebpf-cni driven by a real libcni client: Debian's containerd 1.6 and `ctr run --cni`
//! (go-cni and libcni run inside ctr) start a busybox container that gets its address from
//! the plugin and the agent, then delete it; the node is a network namespace of the test's.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use vpc_ebpf_tests::{
    agent::TestAgent,
    cni::plugin_path,
    containerd::{self, ChildGuard, Containerd, TempDir, pids_with_ns},
    netns::{self, NetNs},
    require_root,
};

const ID: &str = "vpce-pod";
const READY: &str = "vpce-ready";

/// The conflist the chart installs, pointed at the test agent and a log file of the test's.
fn shipped_conflist(dir: &Path, agent: &TestAgent) -> Value {
    let path = vpc_ebpf_tests::repo_root().join("cni/10-vpc-ebpf.conflist");
    let mut conf: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let plugin = &mut conf["plugins"][0];
    assert_eq!(plugin["type"], "vpc-ebpf-cni");
    plugin["agentSocket"] = agent.socket.to_str().unwrap().into();
    plugin["logFile"] = dir.join("plugin.log").to_str().unwrap().into();
    plugin["logLevel"] = "debug".into();
    conf
}

/// Whether `ifname` exists in the machine's own network namespace (only read, never changed).
fn in_root_netns(ifname: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", ifname])
        .output()
        .unwrap()
        .status
        .success()
}

/// The node (a netns of the test's) with the agent and a private containerd in it.
/// Fields drop in order: containerd first, the directory last.
struct Node {
    ctrd: Containerd,
    agent: TestAgent,
    netns: NetNs,
    rootfs: PathBuf,
    conflist: Value,
    dir: TempDir,
}

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);

impl Node {
    /// `cni_version`: the conflist's cniVersion, or the shipped one when `None`.
    fn start(tag: &str, cni_version: Option<&str>) -> Self {
        require_root();
        containerd::require_tools();
        let dir = TempDir::new(tag);
        let netns = NetNs::new(tag);
        // The node's own address, so it can reach the pod as kubelet probes do.
        netns.ip(&["addr", "add", "192.0.2.100/32", "dev", "lo"]);
        let agent = TestAgent::start_with(dir.path(), &[POD_IP]);
        let mut conflist = shipped_conflist(dir.path(), &agent);
        if let Some(v) = cni_version {
            conflist["cniVersion"] = v.into();
        }
        let rootfs =
            containerd::busybox_rootfs(&dir.path().join("rootfs"), &["sh", "ip", "cat", "sleep"]);
        let ctrd = Containerd::start(
            &dir.path().join("containerd"),
            netns.name(),
            &conflist,
            &plugin_path(),
        );
        Self {
            ctrd,
            agent,
            netns,
            rootfs,
            conflist,
            dir,
        }
    }

    fn plugin_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }

    fn links(&self) -> Vec<String> {
        let v: Value =
            serde_json::from_str(&self.netns.exec(&["ip", "-j", "link", "show"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect()
    }

    fn routes(&self) -> String {
        self.netns.exec(&["ip", "-4", "route", "show"])
    }

    /// `ctr run --cni --rm` of `script` as container `id`, left running once it printed
    /// READY; returns the guard of `ctr run` and what the container printed until then.
    fn run_until_ready(&self, id: &str, script: &str) -> (ChildGuard, Vec<String>) {
        let mut run = ChildGuard(
            self.ctrd
                .ctr(Duration::from_mins(2))
                .args(["run", "--cni", "--rm", "--rootfs"])
                .arg(&self.rootfs)
                .args([id, "/bin/sh", "-c", script])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn ctr run"),
        );
        let (tx, rx) = mpsc::channel();
        let stdout = run.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        while !seen.iter().any(|l: &String| l == READY) {
            match rx.recv_timeout(Duration::from_mins(1)) {
                Ok(line) => seen.push(line),
                Err(e) => {
                    run.stop();
                    let mut err = String::new();
                    let _ = run.0.stderr.take().unwrap().read_to_string(&mut err);
                    panic!(
                        "the container never reported ready ({e}); its output: {seen:?}\n\
                         ctr stderr: {err}\nplugin log:\n{}\ncontainerd log:\n{}",
                        self.plugin_log(),
                        self.ctrd.log()
                    );
                }
            }
        }
        (run, seen)
    }

    /// The node side of a running pod: one host veth and the /32 route to the pod, in the
    /// node netns only, and the agent's assignment keyed as libcni names the attachment.
    fn assert_pod_wired(&self, cni_id: &str) {
        let hosts: Vec<String> = self
            .links()
            .into_iter()
            .filter(|l| l.starts_with("eni"))
            .collect();
        assert_eq!(hosts.len(), 1, "one host veth in the node netns: {hosts:?}");
        let host = &hosts[0];
        assert!(
            !in_root_netns(host),
            "{host} must not exist in the machine's netns"
        );
        let routes = self.routes();
        assert!(
            routes.lines().any(
                |l| l.starts_with(&format!("{POD_IP} dev {host} ")) && l.contains("scope link")
            ),
            "node routes: {routes}"
        );
        {
            let assigned: Vec<_> = self
                .agent
                .assigned()
                .into_iter()
                .map(|(key, ip)| (key.network, key.container_id, key.ifname, ip))
                .collect();
            // The attachment as libcni names it: the conflist's network, go-cni's
            // "<namespace>-<id>" and its eth0.
            assert_eq!(
                assigned,
                [("aws-cni".into(), cni_id.to_owned(), "eth0".into(), POD_IP)]
            );
        }
    }

    /// Nothing of container `id`'s network is left: allocation, host veth, route, libcni's
    /// cached result.
    fn assert_network_clean(&self, id: &str) {
        assert_eq!(
            self.agent.assignments(),
            0,
            "CNI DEL reached the agent and released {POD_IP}; plugin log:\n{}",
            self.plugin_log()
        );
        assert!(
            self.plugin_log().contains("released"),
            "{}",
            self.plugin_log()
        );
        assert_eq!(self.links(), vec!["lo".to_owned()], "leftover interfaces");
        let routes = self.routes();
        assert!(
            !routes.contains(&POD_IP.to_string()),
            "leftover route: {routes}"
        );
        let cache = self.ctrd.upper("/var/lib").join("cni/results");
        let cached: Vec<_> = std::fs::read_dir(&cache)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(id))
                    .collect()
            })
            .unwrap_or_default();
        assert!(cached.is_empty(), "libcni cache left: {cached:?}");
    }
}

/// The whole life of a pod as a runtime drives it: ADD when the task is created, the pod
/// running with its address, DEL when it is deleted.
///
/// cniVersion 1.0.0: containerd 1.6 (and 1.7) embed libcni 1.1, which cannot parse a 1.1.0
/// result; `shipped_conflist_works_with_containerd` checks the shipped version.
#[test]
fn ctr_run_with_cni_gets_its_address_from_the_plugin_and_is_deleted_cleanly() {
    let started = Instant::now();
    let node = Node::start("ctrd", Some("1.0.0"));
    let containerd_up = started.elapsed();
    let cni_id = format!("{}-{ID}", node.ctrd.namespace);

    // The container reports its network as it sees it, then waits for SIGTERM (PID 1 only
    // gets the signals it handles, hence the trap).
    let script = format!(
        "trap 'exit 0' TERM; ip -4 -o addr show dev eth0; ip -4 route show; \
         cat /sys/class/net/eth0/mtu; echo {READY}; while :; do sleep 0.2; done"
    );
    let started = Instant::now();
    let (mut run, seen) = node.run_until_ready(ID, &script);
    let running = started.elapsed();
    let output = seen.join("\n");

    // What the container itself sees: the agent's address as a /32, the route through the
    // link-local gateway, the conflist's MTU.
    assert!(
        output.contains(&format!("inet {POD_IP}/32")),
        "container's eth0: {output}"
    );
    assert!(
        output.contains("default via 169.254.1.1 dev eth0"),
        "container's routes: {output}"
    );
    let mtu = node.conflist["plugins"][0]["mtu"].as_u64().unwrap();
    assert!(
        seen.iter().any(|l| l.trim() == mtu.to_string()),
        "container's eth0 MTU should be {mtu}: {output}"
    );

    // The same, checked from outside through the task's network namespace.
    let pid = node.ctrd.task_pid(ID);
    let pod_netns = format!("/proc/{pid}/ns/net");
    let pod_netns_id = std::fs::read_link(&pod_netns).unwrap();
    assert_ne!(
        pod_netns_id,
        std::fs::read_link(format!("/proc/{}/ns/net", node.ctrd.pid())).unwrap(),
        "the container has a netns of its own"
    );
    let seen_outside = netns::run(
        Command::new("nsenter")
            .arg(format!("--net={pod_netns}"))
            .args(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]),
    );
    assert!(
        seen_outside.contains(&format!("inet {POD_IP}/32")),
        "{seen_outside}"
    );

    node.assert_pod_wired(&cni_id);
    // Real traffic between the node and the container.
    node.netns
        .exec(&["ping", "-c", "1", "-W", "2", &POD_IP.to_string()]);

    // Delete: SIGTERM through containerd; `ctr run` then deletes the task, calls CNI DEL and
    // (--rm) deletes the container.
    let started = Instant::now();
    node.ctrd
        .ctr_ok(&["task", "kill", "--signal", "SIGTERM", ID]);
    let status = run.wait_for(Duration::from_mins(1), "ctr run");
    let deleted = started.elapsed();
    let mut err = String::new();
    let _ = run.0.stderr.take().unwrap().read_to_string(&mut err);
    assert!(status.success(), "ctr run: {status}\n{err}");
    node.assert_network_clean(ID);
    assert!(node.ctrd.ids("tasks").is_empty(), "leftover task");
    assert!(node.ctrd.ids("containers").is_empty(), "leftover container");

    // No netns left: no process in the pod's, and no bind mount pinning it.
    assert!(
        pids_with_ns("net", &pod_netns_id).is_empty(),
        "processes still in the pod netns"
    );
    let ns_inode = pod_netns_id.to_string_lossy().into_owned();
    for mountinfo in [
        "/proc/self/mountinfo".to_owned(),
        format!("/proc/{}/mountinfo", node.ctrd.pid()),
    ] {
        let m = std::fs::read_to_string(&mountinfo).unwrap();
        assert!(
            !m.lines().any(|l| l.contains(&ns_inode)),
            "{ns_inode} still mounted in {mountinfo}"
        );
    }

    eprintln!(
        "containerd up in {containerd_up:?}; ctr run --cni to container ready in {running:?}; \
         SIGTERM to ctr run's exit (task delete, CNI DEL, container delete) in {deleted:?}"
    );
}

/// The conflist exactly as the chart installs it, through the libcni that containerd
/// 1.6 and 1.7 (still common node runtimes) embed: a container runs to completion with its
/// address, and is deleted with nothing left.
#[test]
fn shipped_conflist_works_with_containerd() {
    let node = Node::start("ctrv", None);
    let id = "vpce-shipped";
    let out = node
        .ctrd
        .ctr(Duration::from_mins(2))
        .args(["run", "--cni", "--rm", "--rootfs"])
        .arg(&node.rootfs)
        .args([id, "/bin/sh", "-c", "ip -4 -o addr show dev eth0"])
        .output()
        .expect("spawn ctr run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Whatever happened, a failed ADD must have been rolled back by libcni's DEL. (ctr 1.6
    // itself leaves the never-started task behind then; containerd's guard removes it.)
    node.assert_network_clean(id);
    assert!(
        out.status.success(),
        "ctr run --cni with the shipped conflist (cniVersion {}) failed: {}\n\
         containerd 1.6 and 1.7 embed libcni 1.1, which parses results up to cniVersion \
         1.0.0 only (1.1.0 needs libcni 1.2, i.e. containerd 2.0)",
        node.conflist["cniVersion"],
        stderr.lines().last().unwrap_or_default()
    );
    assert!(stdout.contains(&format!("inet {POD_IP}/32")), "{stdout}");
}
