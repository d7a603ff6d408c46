//! The three setups under test, each built from scratch in network namespaces of its own
//! (nothing in the machine's root namespace): (a) the floor, (b) Amazon VPC CNI's
//! dataplane as the benchmark rebuilds it, (c) vpc-ebpf's programs through the agent's
//! dataplane library.
//!
//! (b) and (c) share one layout: two pods on one node, the node's primary ENI a veth to
//! a VPC router namespace, and an internet host behind the router. Pod addresses and
//! names follow what the CNI plugins write (pod `/32` + `169.254.1.1` gateway, host veths
//! named `eni…`, `/32` host routes).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ipnet::Ipv4Net;
use vpc_ebpf_agent::dataplane::{
    AttachMode, CounterRow, Dataplane, DataplaneConfig, EndpointSpec, EniSpec, NodeSpec,
    monotonic_now_ns,
};
use vpc_ebpf_common::counters::ALL_INTERFACES;
use vpc_ebpf_rpc::types::MacAddr;
use vpc_ebpf_tests::netns::{NetNs, run_in};

pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 6);
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const SUBNET_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const VPC_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 16);
pub const INTERNET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const HOST_VETH_A: &str = "eni5f0d3a9c21e";
const HOST_VETH_B: &str = "eni8b7e41c6d0f";
/// The second node (policy bench only), in a subnet of its own: a pod on it is reached
/// through both nodes' ENIs and the VPC router.
pub const POD_C: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 7);
pub const NODE2_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 10);
const SUBNET2_GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const HOST_VETH_C: &str = "eni2c94d07be13";
/// The ENI is `eth0` of the node, as on EC2.
const ENI: &str = "eth0";
/// Route table of the primary ENI for pod egress to the VPC (VPC CNI numbers ENI tables
/// from 2 for device index 1; one is enough to put the lookup on the path).
const ENI_TABLE: &str = "2";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Floor,
    VpcCni,
    Ebpf,
}

impl Kind {
    pub const ALL: [Self; 3] = [Self::Floor, Self::VpcCni, Self::Ebpf];

    pub fn key(self) -> &'static str {
        match self {
            Self::Floor => "a",
            Self::VpcCni => "b",
            Self::Ebpf => "c",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Floor => "(a) veth floor",
            Self::VpcCni => "(b) VPC-CNI-style",
            Self::Ebpf => "(c) vpc-ebpf",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    SameNode,
    Internet,
    /// Pod to a pod of the second node (two-node setups only).
    CrossNode,
}

impl PathKind {
    pub const ALL: [Self; 2] = [Self::SameNode, Self::Internet];

    pub fn key(self) -> &'static str {
        match self {
            Self::SameNode => "same-node",
            Self::Internet => "pod-internet",
            Self::CrossNode => "cross-node",
        }
    }
}

/// Where a measurement's client and server run, and which source address the server
/// must see (the pod's, or the node's after SNAT).
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub client_ns: String,
    pub server_ns: String,
    pub server_ip: Ipv4Addr,
    pub expect_peer: Ipv4Addr,
}

/// The loaded programs, their private pin root and the conntrack collector an agent
/// would run.
struct EbpfState {
    dp: Arc<Mutex<Dataplane>>,
    stop_gc: Arc<AtomicBool>,
    gc: Option<std::thread::JoinHandle<()>>,
    pin_root: PathBuf,
    attach_mode: AttachMode,
}

impl Drop for EbpfState {
    fn drop(&mut self) {
        self.stop_gc.store(true, Ordering::Relaxed);
        if let Some(t) = self.gc.take() {
            let _ = t.join();
        }
        // Unpinning releases the links (and with them the programs) once the
        // namespaces, and so the interfaces, are gone too.
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

pub struct Setup {
    pub kind: Kind,
    same_node: Endpoints,
    internet: Endpoints,
    cross_node: Option<Endpoints>,
    node: Option<String>,
    node2: Option<String>,
    ebpf: Option<EbpfState>,
    ebpf2: Option<EbpfState>,
    // Declared last so that it is dropped last: programs are unpinned first, then every
    // interface goes with its namespace.
    namespaces: Vec<NetNs>,
}

impl Setup {
    pub fn endpoints(&self, path: PathKind) -> &Endpoints {
        match path {
            PathKind::SameNode => &self.same_node,
            PathKind::Internet => &self.internet,
            PathKind::CrossNode => self
                .cross_node
                .as_ref()
                .expect("cross-node traffic needs a two-node setup"),
        }
    }

    pub fn node_ns(&self) -> Option<&str> {
        self.node.as_deref()
    }

    pub fn node2_ns(&self) -> Option<&str> {
        self.node2.as_deref()
    }

    /// The dataplanes of the nodes (one per node), for (c).
    pub fn dataplanes(&self) -> Vec<Arc<Mutex<Dataplane>>> {
        [&self.ebpf, &self.ebpf2]
            .into_iter()
            .flatten()
            .map(|e| Arc::clone(&e.dp))
            .collect()
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.iter().map(NetNs::name)
    }

    pub fn attach_mode(&self) -> Option<AttachMode> {
        self.ebpf.as_ref().map(|e| e.attach_mode)
    }

    /// The programs' counters with interface names ("all" for the forwarding verdicts,
    /// which are not kept per interface), for (c).
    pub fn counters(&self) -> Option<Vec<(String, CounterRow)>> {
        let e = self.ebpf.as_ref()?;
        let node = self.node.as_deref()?;
        let rows = e.dp.lock().unwrap().counters().ok()?;
        let names = interface_names(node);
        Some(
            rows.into_iter()
                .map(|r| {
                    let name = if r.key.ifindex == ALL_INTERFACES {
                        "all".to_owned()
                    } else {
                        names
                            .iter()
                            .find(|(i, _)| *i == r.key.ifindex)
                            .map_or_else(|| format!("if{}", r.key.ifindex), |(_, n)| n.clone())
                    };
                    (name, r)
                })
                .collect(),
        )
    }

    /// Live NAT/conntrack entries of the programs (two per translated flow), for (c).
    pub fn nat_entries(&self) -> Option<usize> {
        let e = self.ebpf.as_ref()?;
        e.dp.lock().unwrap().nat_entries().ok().map(|v| v.len())
    }
}

fn ns_sysctl(ns: &NetNs, kv: &str) {
    ns.exec(&["sysctl", "-qw", kv]);
}

fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// (a): two namespaces, one veth pair, one subnet. Both paths use it: nothing can be
/// cheaper than this between two network stacks.
pub fn floor() -> Setup {
    let cli = NetNs::new("bdp-a-cli");
    let srv = NetNs::new("bdp-a-srv");
    veth(&cli, "eth0", &srv, "eth0");
    cli.ip(&["addr", "add", &format!("{POD_A}/24"), "dev", "eth0"]);
    srv.ip(&["addr", "add", &format!("{POD_B}/24"), "dev", "eth0"]);
    let ends = Endpoints {
        client_ns: cli.name().to_owned(),
        server_ns: srv.name().to_owned(),
        server_ip: POD_B,
        expect_peer: POD_A,
    };
    Setup {
        kind: Kind::Floor,
        same_node: ends.clone(),
        internet: ends,
        cross_node: None,
        node: None,
        node2: None,
        ebpf: None,
        ebpf2: None,
        namespaces: vec![cli, srv],
    }
}

/// What (b) and (c) share: pods, node, ENI, VPC router, internet host.
struct Layout {
    node: NetNs,
    pa: NetNs,
    pb: NetNs,
    router: NetNs,
    inet: NetNs,
    /// The second node and its pod, when asked for.
    node2: Option<(NetNs, NetNs)>,
}

/// One pod: its namespace, with its `/32`, the link-local gateway route and its host
/// veth in `node`, and the node's `/32` route to it.
fn pod_link(pod: &NetNs, node: &NetNs, host: &str, addr: Ipv4Addr) {
    veth(pod, "eth0", node, host);
    pod.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
    pod.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    // Both plugins keep this route: kubelet probes and kube-proxy DNAT use it.
    node.ip(&[
        "route",
        "add",
        &format!("{addr}/32"),
        "dev",
        host,
        "scope",
        "link",
    ]);
}

/// The second node on the router's `vpc1`, in its own subnet, with pod C.
fn add_node2(tag: &str, router: &NetNs) -> (NetNs, NetNs) {
    let node = NetNs::new(&format!("bdp-{tag}-node2"));
    let pc = NetNs::new(&format!("bdp-{tag}-pc"));
    pod_link(&pc, &node, HOST_VETH_C, POD_C);
    veth(&node, ENI, router, "vpc1");
    node.ip(&["addr", "add", &format!("{NODE2_IP}/24"), "dev", ENI]);
    node.ip(&["route", "add", "default", "via", &SUBNET2_GW.to_string()]);
    ns_sysctl(&node, "net.ipv4.ip_forward=1");
    router.ip(&["addr", "add", &format!("{SUBNET2_GW}/24"), "dev", "vpc1"]);
    router.ip(&[
        "route",
        "add",
        &POD_C.to_string(),
        "via",
        &NODE2_IP.to_string(),
        "dev",
        "vpc1",
    ]);
    ns_sysctl(router, "net.ipv4.conf.vpc1.rp_filter=1");
    (node, pc)
}

fn layout(tag: &str) -> Layout {
    let node = NetNs::new(&format!("bdp-{tag}-node"));
    let pa = NetNs::new(&format!("bdp-{tag}-pa"));
    let pb = NetNs::new(&format!("bdp-{tag}-pb"));
    let router = NetNs::new(&format!("bdp-{tag}-vpc"));
    let inet = NetNs::new(&format!("bdp-{tag}-inet"));
    for (pod, host, addr) in [(&pa, HOST_VETH_A, POD_A), (&pb, HOST_VETH_B, POD_B)] {
        pod_link(pod, &node, host, addr);
    }
    veth(&node, ENI, &router, "vpc0");
    node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", ENI]);
    node.ip(&["route", "add", "default", "via", &SUBNET_GW.to_string()]);
    ns_sysctl(&node, "net.ipv4.ip_forward=1");
    router.ip(&["addr", "add", &format!("{SUBNET_GW}/24"), "dev", "vpc0"]);
    // The VPC routes each secondary address to the ENI that owns it and, like its
    // source/destination check, drops what arrives from elsewhere.
    for pod in [POD_A, POD_B] {
        router.ip(&[
            "route",
            "add",
            &pod.to_string(),
            "via",
            &NODE_IP.to_string(),
            "dev",
            "vpc0",
        ]);
    }
    veth(&router, "igw0", &inet, "eth0");
    router.ip(&["addr", "add", "203.0.113.1/24", "dev", "igw0"]);
    inet.ip(&["addr", "add", &format!("{INTERNET}/24"), "dev", "eth0"]);
    inet.ip(&["route", "add", "default", "via", "203.0.113.1"]);
    ns_sysctl(&router, "net.ipv4.ip_forward=1");
    for conf in ["all", "vpc0", "igw0"] {
        ns_sysctl(&router, &format!("net.ipv4.conf.{conf}.rp_filter=1"));
    }
    Layout {
        node,
        pa,
        pb,
        router,
        inet,
        node2: None,
    }
}

fn finish(kind: Kind, l: Layout, ebpf: Option<EbpfState>, ebpf2: Option<EbpfState>) -> Setup {
    let ends = |server: &NetNs, server_ip, expect_peer| Endpoints {
        client_ns: l.pa.name().to_owned(),
        server_ns: server.name().to_owned(),
        server_ip,
        expect_peer,
    };
    let same_node = ends(&l.pb, POD_B, POD_A);
    let internet = ends(&l.inet, INTERNET, NODE_IP);
    let cross_node = l.node2.as_ref().map(|(_, pc)| ends(pc, POD_C, POD_A));
    let node = Some(l.node.name().to_owned());
    let node2 = l.node2.as_ref().map(|(n, _)| n.name().to_owned());
    let mut namespaces = vec![l.pa, l.pb, l.inet];
    if let Some((n, pc)) = l.node2 {
        namespaces.extend([pc, n]);
    }
    namespaces.extend([l.router, l.node]);
    Setup {
        kind,
        same_node,
        internet,
        cross_node,
        node,
        node2,
        ebpf,
        ebpf2,
        namespaces,
    }
}

/// (b): what Amazon VPC CNI programs on a node (plugin + ipamd), for pods on the primary
/// ENI with external SNAT off and NodePort support on (its defaults).
pub fn vpc_cni() -> Setup {
    vpc_cni_nodes(false)
}

/// (b), with a second node when `two_nodes`.
pub fn vpc_cni_nodes(two_nodes: bool) -> Setup {
    let mut l = layout("b");
    vpc_cni_node(
        &l.node,
        &[(&l.pa, HOST_VETH_A, POD_A), (&l.pb, HOST_VETH_B, POD_B)],
        SUBNET_GW,
        NODE_IP,
    );
    if two_nodes {
        let (node2, pc) = add_node2("b", &l.router);
        vpc_cni_node(&node2, &[(&pc, HOST_VETH_C, POD_C)], SUBNET2_GW, NODE2_IP);
        l.node2 = Some((node2, pc));
    }
    finish(Kind::VpcCni, l, None, None)
}

fn vpc_cni_node(node: &NetNs, pods: &[(&NetNs, &str, Ipv4Addr)], gw: Ipv4Addr, node_ip: Ipv4Addr) {
    for &(pod, host, addr) in pods {
        let mac = link_mac(node.name(), host).to_string();
        pod.ip(&[
            "neigh",
            "add",
            "169.254.1.1",
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        let a = addr.to_string();
        node.ip(&["rule", "add", "to", &a, "lookup", "main", "prio", "512"]);
        node.ip(&[
            "rule",
            "add",
            "from",
            &a,
            "to",
            &VPC_CIDR.to_string(),
            "lookup",
            ENI_TABLE,
            "prio",
            "1536",
        ]);
    }
    node.ip(&[
        "route",
        "add",
        &gw.to_string(),
        "dev",
        ENI,
        "scope",
        "link",
        "table",
        ENI_TABLE,
    ]);
    node.ip(&[
        "route",
        "add",
        "default",
        "via",
        &gw.to_string(),
        "dev",
        ENI,
        "table",
        ENI_TABLE,
    ]);
    node.ip(&[
        "rule",
        "add",
        "fwmark",
        "0x80/0x80",
        "lookup",
        "main",
        "prio",
        "1024",
    ]);
    ns_sysctl(node, &format!("net.ipv4.conf.{ENI}.rp_filter=2"));
    vpc_cni_iptables(node, node_ip);
}

/// VPC CNI's SNAT for destinations outside the VPC and its connmark rules for traffic
/// arriving on the primary ENI (NodePort support).
fn vpc_cni_iptables(node: &NetNs, node_ip: Ipv4Addr) {
    let vpc = VPC_CIDR.to_string();
    let node_ip = node_ip.to_string();
    let rules: [&[&str]; 6] = [
        &["-t", "nat", "-N", "AWS-SNAT-CHAIN-0"],
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "AWS SNAT CHAIN",
            "-j",
            "AWS-SNAT-CHAIN-0",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "AWS-SNAT-CHAIN-0",
            "-d",
            &vpc,
            "-m",
            "comment",
            "--comment",
            "AWS SNAT CHAIN EXCLUSION",
            "-j",
            "RETURN",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "AWS-SNAT-CHAIN-0",
            "!",
            "-o",
            "vlan+",
            "-m",
            "comment",
            "--comment",
            "AWS, SNAT",
            "-m",
            "addrtype",
            "!",
            "--dst-type",
            "LOCAL",
            "-j",
            "SNAT",
            "--to-source",
            &node_ip,
            "--random-fully",
        ],
        &[
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-i",
            ENI,
            "-m",
            "comment",
            "--comment",
            "AWS, primary ENI",
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "--limit-iface-in",
            "-j",
            "CONNMARK",
            "--set-xmark",
            "0x80/0x80",
        ],
        &[
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-i",
            "eni+",
            "-m",
            "comment",
            "--comment",
            "AWS, primary ENI",
            "-j",
            "CONNMARK",
            "--restore-mark",
            "--nfmask",
            "0x80",
            "--ctmask",
            "0x80",
        ],
    ];
    for r in rules {
        let mut argv = vec!["iptables", "-w"];
        argv.extend_from_slice(r);
        node.exec(&argv);
    }
}

/// (c): the same layout described to the agent's dataplane library, which attaches the
/// programs; no neighbour entry, rule or iptables rule is written.
pub fn ebpf(
    pin_root: PathBuf,
    mode: Option<AttachMode>,
    snat_ports: (u16, u16),
    object: Option<&[u8]>,
) -> Setup {
    ebpf_nodes(&EbpfOptions {
        tag: "c",
        pin_root,
        mode,
        snat_ports,
        object,
        network_policy: false,
        two_nodes: false,
    })
}

pub struct EbpfOptions<'a> {
    /// Names the setup's namespaces (`bdp-<tag>-…`).
    pub tag: &'static str,
    pub pin_root: PathBuf,
    pub mode: Option<AttachMode>,
    pub snat_ports: (u16, u16),
    pub object: Option<&'a [u8]>,
    /// `ENABLE_NETWORK_POLICY` on both nodes.
    pub network_policy: bool,
    pub two_nodes: bool,
}

/// (c) with the options of the policy bench: each node loads its own programs under its
/// own pin root, as two agents would.
pub fn ebpf_nodes(o: &EbpfOptions<'_>) -> Setup {
    let mut l = layout(o.tag);
    let node1 = NodeDesc {
        node: &l.node,
        node_ip: NODE_IP,
        gateway: SUBNET_GW,
        pods: vec![(&l.pa, HOST_VETH_A, POD_A), (&l.pb, HOST_VETH_B, POD_B)],
    };
    let first = load_node(&node1, o, o.pin_root.clone());
    let second = if o.two_nodes {
        let (node2, pc) = add_node2(o.tag, &l.router);
        let desc = NodeDesc {
            node: &node2,
            node_ip: NODE2_IP,
            gateway: SUBNET2_GW,
            pods: vec![(&pc, HOST_VETH_C, POD_C)],
        };
        let state = load_node(
            &desc,
            o,
            PathBuf::from(format!("{}-node2", o.pin_root.display())),
        );
        l.node2 = Some((node2, pc));
        Some(state)
    } else {
        None
    };
    finish(Kind::Ebpf, l, Some(first), second)
}

struct NodeDesc<'a> {
    node: &'a NetNs,
    node_ip: Ipv4Addr,
    gateway: Ipv4Addr,
    pods: Vec<(&'a NetNs, &'a str, Ipv4Addr)>,
}

fn load_node(n: &NodeDesc<'_>, o: &EbpfOptions<'_>, pin_root: PathBuf) -> EbpfState {
    let node = n.node.name().to_owned();
    let config = DataplaneConfig {
        pin_root: pin_root.clone(),
        attach_mode: o.mode,
        nat_max_entries: None,
    };
    let pods: Vec<(Ipv4Addr, u32, MacAddr, MacAddr)> = n
        .pods
        .iter()
        .map(|&(ns, host, addr)| {
            (
                addr,
                ifindex(&node, host),
                link_mac(&node, host),
                link_mac(ns.name(), "eth0"),
            )
        })
        .collect();
    let dp = run_in(&node, || {
        let mut dp = match o.object {
            Some(obj) => Dataplane::load_object(&config, obj),
            None => Dataplane::load(&config),
        }
        .expect("loading the eBPF object");
        let eni = ifindex(&node, ENI);
        // Read inside the node namespace, as the agent does at start.
        let snat_skip = Some(vpc_ebpf_agent::dataplane::settings::host_ephemeral_ports());
        dp.set_node(&NodeSpec {
            node_ip: n.node_ip,
            primary_eni_ifindex: eni,
            vpc_cidrs: vec![VPC_CIDR],
            snat_exclusions: vec![],
            passthrough_cidrs: vec![],
            external_snat: false,
            network_policy: o.network_policy,
            snat_ports: o.snat_ports,
            snat_skip,
        })
        .expect("set_node");
        dp.upsert_eni(&EniSpec {
            ifindex: eni,
            mac: link_mac(&node, ENI),
            primary_ip: n.node_ip,
            gateway: n.gateway,
            is_primary: true,
        })
        .expect("upsert_eni");
        for &(addr, host_ifindex, host_mac, pod_mac) in &pods {
            dp.upsert_endpoint(&EndpointSpec {
                ipv4: addr,
                host_ifindex,
                host_mac,
                pod_mac,
                eni_ifindex: eni,
            })
            .expect("upsert_endpoint");
        }
        dp
    });
    let attach_mode = dp.attach_mode();
    let dp = Arc::new(Mutex::new(dp));
    let stop_gc = Arc::new(AtomicBool::new(false));
    // The agent's periodic conntrack collection, with its default timeouts: without it
    // closed SNAT flows would hold their ports until LRU eviction. Once a second: entries
    // outlive their timeout by at most that, and the walk costs the measured machine
    // little.
    let gc = {
        let (dp, stop) = (Arc::clone(&dp), Arc::clone(&stop_gc));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                if let Err(e) = dp.lock().unwrap().gc_conntrack(monotonic_now_ns()) {
                    eprintln!("warning: conntrack gc: {e}");
                }
            }
        })
    };
    EbpfState {
        dp,
        stop_gc,
        gc: Some(gc),
        pin_root,
        attach_mode,
    }
}

fn ip_out(args: &[&str]) -> String {
    vpc_ebpf_tests::netns::run(Command::new("ip").args(args))
}

/// The MAC of `iface` in namespace `ns`, as `ip` prints it.
pub fn link_mac(ns: &str, iface: &str) -> MacAddr {
    let out = ip_out(&["-n", ns, "-o", "link", "show", "dev", iface]);
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no MAC for {iface} in {ns}: {out}"))
}

fn ifindex(ns: &str, iface: &str) -> u32 {
    let out = ip_out(&["-n", ns, "-o", "link", "show", "dev", iface]);
    out.split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex for {iface} in {ns}: {out}"))
}

fn interface_names(ns: &str) -> Vec<(u32, String)> {
    ip_out(&["-n", ns, "-o", "link", "show"])
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(':');
            let idx = parts.next()?.trim().parse().ok()?;
            let name = parts.next()?.trim().split('@').next()?.to_owned();
            Some((idx, name))
        })
        .collect()
}
