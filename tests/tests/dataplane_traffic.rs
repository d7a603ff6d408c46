//! Real packets through the attached programs: two pod namespaces and a node namespace
//! joined by veths, plus a "VPC" namespace behind two ENIs that, like the VPC, drops a
//! source address arriving on an ENI that does not own it (strict rp_filter) and also
//! holds an "internet" address reachable only through SNAT.
//!
//! The pods have no static neighbour entry: their gateway's ARP is answered by the
//! program.

use std::{net::UdpSocket, time::Duration};

use vpc_ebpf_agent::dataplane::{AttachMode, Dataplane, EndpointSpec, EniSpec, NodeSpec};
use vpc_ebpf_common::{
    counters::{direction, reason},
    nat::NatKey,
};
use vpc_ebpf_rpc::types::HostPort;
use vpc_ebpf_tests::dataplane::{
    Exchange, PinRoot, counter, counter_dir, forwarded, ifindex, ip, mac_of, net, tcp_exchange,
    tcp_port, tcp_server, udp_port,
};
use vpc_ebpf_tests::netns::NetNs;

const POD_A: &str = "10.0.1.5";
const POD_B: &str = "10.0.1.6";
const VPC_HOST: &str = "10.0.2.7";
const INTERNET: &str = "203.0.113.9";

struct Lab {
    node: NetNs,
    pa: NetNs,
    pb: NetNs,
    vpc: NetNs,
}

/// Builds the namespaces; nothing is attached yet.
fn lab(tag: &str) -> Lab {
    let node = NetNs::new(&format!("{tag}-node"));
    let pa = NetNs::new(&format!("{tag}-pa"));
    let pb = NetNs::new(&format!("{tag}-pb"));
    let vpc = NetNs::new(&format!("{tag}-vpc"));
    for (pod, host, addr) in [(&pa, "hva", POD_A), (&pb, "hvb", POD_B)] {
        pod.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            host,
            "netns",
            node.name(),
        ]);
        pod.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
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
        node.ip(&["link", "set", host, "up"]);
    }
    // eni0 (primary, node IP 10.0.0.10) and eni1 (secondary, owns pod A).
    for (eni, peer, addr, gw) in [
        ("eni0", "v0", "10.0.0.10/24", "10.0.0.1/24"),
        ("eni1", "v1", "10.0.16.11/20", "10.0.16.1/20"),
    ] {
        node.ip(&[
            "link",
            "add",
            eni,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            vpc.name(),
        ]);
        node.ip(&["addr", "add", addr, "dev", eni]);
        node.ip(&["link", "set", eni, "up"]);
        vpc.ip(&["addr", "add", gw, "dev", peer]);
        vpc.ip(&["link", "set", peer, "up"]);
    }
    vpc.ip(&["addr", "add", &format!("{VPC_HOST}/32"), "dev", "lo"]);
    vpc.ip(&["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"]);
    // The VPC routes each pod address to the ENI that owns it ...
    vpc.ip(&["route", "add", POD_A, "via", "10.0.16.11", "dev", "v1"]);
    vpc.ip(&["route", "add", POD_B, "via", "10.0.0.10", "dev", "v0"]);
    // ... and drops what arrives on the wrong one.
    for conf in ["all", "v0", "v1"] {
        vpc.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{conf}.rp_filter=1"),
        ]);
    }
    Lab { node, pa, pb, vpc }
}

/// Loads the dataplane and describes the lab to it (in the node namespace).
fn describe(lab: &Lab, pins: &PinRoot, mode: AttachMode) -> Dataplane {
    let mac_a = lab.pa.run(|| mac_of("eth0"));
    let mac_b = lab.pb.run(|| mac_of("eth0"));
    lab.node.run(|| {
        let mut dp = Dataplane::load(&pins.config(Some(mode))).expect("load");
        let (eni0, eni1) = (ifindex("eni0"), ifindex("eni1"));
        dp.set_node(&NodeSpec {
            node_ip: ip(10, 0, 0, 10),
            primary_eni_ifindex: eni0,
            vpc_cidrs: vec![net("10.0.0.0/16")],
            snat_exclusions: vec![],
            // The Service CIDR: kube-proxy's, in the host stack.
            passthrough_cidrs: vec![net("10.100.0.0/16")],
            external_snat: false,
            network_policy: false,
            snat_ports: (61000, 62999),
            snat_skip: None,
        })
        .unwrap();
        for (ifx, mac, primary_ip, gateway, is_primary) in [
            (
                eni0,
                mac_of("eni0"),
                ip(10, 0, 0, 10),
                ip(10, 0, 0, 1),
                true,
            ),
            (
                eni1,
                mac_of("eni1"),
                ip(10, 0, 16, 11),
                ip(10, 0, 16, 1),
                false,
            ),
        ] {
            dp.upsert_eni(&EniSpec {
                ifindex: ifx,
                mac,
                primary_ip,
                gateway,
                is_primary,
            })
            .unwrap();
        }
        for (addr, host, pod_mac, eni) in [
            (ip(10, 0, 1, 5), "hva", mac_a, eni1),
            (ip(10, 0, 1, 6), "hvb", mac_b, eni0),
        ] {
            let spec = EndpointSpec {
                ipv4: addr,
                host_ifindex: ifindex(host),
                host_mac: mac_of(host),
                pod_mac,
                eni_ifindex: eni,
            };
            dp.upsert_endpoint(&spec).unwrap();
            dp.upsert_endpoint(&spec).unwrap(); // idempotent
            assert!(dp.endpoint_attached(addr));
        }
        dp
    })
}

fn ping(from: &NetNs, to: &str) -> bool {
    ping_size(from, to, 56)
}

/// Datagrams larger than the MTU leave in fragments, each translated, and the server's
/// fragmented answer reaches the pod whole.
fn fragments_through_snat(lab: &Lab) {
    let big: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let (seen, answer) = lab.vpc.run(|| {
        let server = UdpSocket::bind(format!("{INTERNET}:5001")).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        lab.pa.run(|| {
            let s = UdpSocket::bind(format!("{POD_A}:0")).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.send_to(&big, format!("{INTERNET}:5001")).unwrap();
            let mut buf = vec![0u8; 8192];
            let (n, from) = lab.vpc.run(|| {
                let (n, from) = server.recv_from(&mut buf).expect("fragmented datagram");
                assert_eq!(&buf[..n], &big[..], "the datagram arrived whole");
                server.send_to(&buf[..n], from).unwrap();
                (n, from)
            });
            assert_eq!(n, big.len());
            let mut back = vec![0u8; 8192];
            let (m, _) = s.recv_from(&mut back).expect("fragmented answer");
            (from, back[..m].to_vec())
        })
    });
    assert_eq!(
        seen.ip().to_string(),
        "10.0.0.10",
        "every fragment translated"
    );
    assert_eq!(answer, big, "the answer arrived whole");
    assert!(
        ping_size(&lab.pa, INTERNET, 3000),
        "large echo through SNAT"
    );
}

/// Two echo requests of `size` bytes of payload (fragmented past the MTU).
fn ping_size(from: &NetNs, to: &str, size: u16) -> bool {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            from.name(),
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
        ])
        .args(["-s", &size.to_string(), to])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn rx_packets(ns: &NetNs, iface: &str) -> u64 {
    ns.exec(&[
        "cat",
        &format!("/sys/class/net/{iface}/statistics/rx_packets"),
    ])
    .trim()
    .parse()
    .unwrap()
}

fn pod_paths(mode: AttachMode) {
    let tag = format!("tr{}", if mode == AttachMode::Tcx { "x" } else { "c" });
    let pins = PinRoot::new(&tag);
    let lab = lab(&tag);
    let dp = describe(&lab, &pins, mode);

    // Same node, both ways: ARP answered by the program, then redirect_peer.
    assert!(ping(&lab.pa, POD_B), "pod A → pod B");
    assert!(ping(&lab.pb, POD_A), "pod B → pod A");
    let neigh = lab.pa.exec(&["ip", "neigh", "show", "169.254.1.1"]);
    let hva_mac = lab.node.run(|| mac_of("hva")).to_string();
    assert!(
        neigh.contains(&hva_mac),
        "gateway resolved to the host veth: {neigh}"
    );
    assert!(!neigh.contains("PERMANENT"), "no static entry: {neigh}");

    // UDP from A to B.
    let got = lab.pb.run(|| {
        let sink = UdpSocket::bind(format!("{POD_B}:9000")).unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        lab.pa.run(|| {
            let s = UdpSocket::bind(format!("{POD_A}:0")).unwrap();
            s.send_to(b"through redirect_peer", format!("{POD_B}:9000"))
                .unwrap();
        });
        let mut buf = [0u8; 64];
        let (n, from) = sink.recv_from(&mut buf).expect("datagram from pod A");
        (buf[..n].to_vec(), from.ip().to_string())
    });
    assert_eq!(got, (b"through redirect_peer".to_vec(), POD_A.to_owned()));

    // To the VPC: pod A's address is owned by eni1; the VPC namespace would drop it from
    // eni0, so the reply proves the way out. B is owned by eni0.
    let v1_before = rx_packets(&lab.vpc, "v1");
    assert!(ping(&lab.pa, VPC_HOST), "pod A → VPC host through eni1");
    assert!(rx_packets(&lab.vpc, "v1") >= v1_before + 2);
    assert!(ping(&lab.pb, VPC_HOST), "pod B → VPC host through eni0");

    // To the internet: SNATed to the node address (the VPC namespace has no route back
    // to pod addresses through eni0 for that), reply reverse-NATed.
    assert!(ping(&lab.pa, INTERNET), "pod A → internet through SNAT");
    let seen_from = lab.vpc.run(|| {
        let sink = UdpSocket::bind(format!("{INTERNET}:53")).unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        lab.pa.run(|| {
            let s = UdpSocket::bind(format!("{POD_A}:0")).unwrap();
            s.send_to(b"q", format!("{INTERNET}:53")).unwrap();
        });
        let mut buf = [0u8; 8];
        let (_, from) = sink.recv_from(&mut buf).expect("datagram from pod A");
        from
    });
    assert_eq!(seen_from.ip().to_string(), "10.0.0.10", "source translated");
    assert!((61000..=62999).contains(&seen_from.port()));

    fragments_through_snat(&lab);

    let rows = dp.counters().unwrap();
    let hva = lab.node.run(|| ifindex("hva"));
    // Forwarding verdicts are counted for all interfaces together.
    assert!(forwarded(&rows, reason::FWD_ARP_REPLY).packets >= 1);
    // A → B (3) and B → A (2) on the host veths, the VPC's replies to A on eni1 (2).
    assert!(forwarded(&rows, reason::FWD_LOCAL_POD).packets >= 7);
    assert!(forwarded(&rows, reason::FWD_ENI).packets >= 2);
    assert!(forwarded(&rows, reason::FWD_SNAT).packets >= 3);
    assert!(forwarded(&rows, reason::FWD_REVERSE_NAT).packets >= 2);
    assert_eq!(counter(&rows, hva, reason::DROP_SPOOFED_IP).packets, 0);

    // The agent goes away: traffic keeps flowing through the pinned attachments.
    drop(dp);
    assert!(ping(&lab.pa, POD_B), "after the agent stopped");
    assert!(ping(&lab.pa, INTERNET), "SNAT after the agent stopped");

    // A new agent takes everything over without detaching, and can remove a pod.
    lab.node.run(|| {
        let mut dp = Dataplane::load(&pins.config(Some(mode))).expect("reload");
        if mode == AttachMode::Tcx {
            // tcx links are re-opened from their pins.
            assert!(dp.endpoint_attached(ip(10, 0, 1, 5)));
        }
        dp.upsert_endpoint(&EndpointSpec {
            ipv4: ip(10, 0, 1, 5),
            host_ifindex: ifindex("hva"),
            host_mac: mac_of("hva"),
            pod_mac: lab.pa.run(|| mac_of("eth0")),
            eni_ifindex: ifindex("eni1"),
        })
        .unwrap();
        assert!(dp.endpoint_attached(ip(10, 0, 1, 5)));
        assert!(ping(&lab.pa, POD_B), "after the restart");
        dp.remove_endpoint(ip(10, 0, 1, 5)).unwrap();
        dp.remove_endpoint(ip(10, 0, 1, 5)).unwrap(); // not found: fine
        assert!(!dp.endpoint_attached(ip(10, 0, 1, 5)));
        assert!(
            !ping(&lab.pa, POD_B),
            "removed: nothing answers ARP or forwards"
        );
    });
}

vpc_ebpf_tests::attach_modes!(pods_talk_through_the_programs, pod_paths);

const POD_C: &str = "10.0.33.7";
const NODE2_IP: &str = "10.0.32.20";
const CLUSTER_IP_REMOTE: &str = "10.100.0.10";
const CLUSTER_IP_LOCAL: &str = "10.100.0.11";

/// A second node (its own dataplane, primary ENI only) with pod C, behind the same VPC
/// router: the place a ClusterIP's remote backend lives.
struct Node2 {
    node: NetNs,
    pc: NetNs,
}

fn second_node(lab: &Lab, tag: &str) -> Node2 {
    let node = NetNs::new(&format!("{tag}-node2"));
    let pc = NetNs::new(&format!("{tag}-pc"));
    pc.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "hvc",
        "netns",
        node.name(),
    ]);
    pc.ip(&["addr", "add", &format!("{POD_C}/32"), "dev", "eth0"]);
    pc.ip(&["link", "set", "eth0", "up"]);
    pc.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    pc.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    node.ip(&["link", "set", "hvc", "up"]);
    node.ip(&[
        "link",
        "add",
        "eni0",
        "type",
        "veth",
        "peer",
        "name",
        "w0",
        "netns",
        lab.vpc.name(),
    ]);
    node.ip(&["addr", "add", &format!("{NODE2_IP}/20"), "dev", "eni0"]);
    node.ip(&["link", "set", "eni0", "up"]);
    lab.vpc.ip(&["addr", "add", "10.0.32.1/20", "dev", "w0"]);
    lab.vpc.ip(&["link", "set", "w0", "up"]);
    lab.vpc
        .ip(&["route", "add", POD_C, "via", NODE2_IP, "dev", "w0"]);
    lab.vpc
        .exec(&["sysctl", "-qw", "net.ipv4.conf.w0.rp_filter=1"]);
    // The router now routes between nodes, not only answers for its own addresses.
    lab.vpc.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    Node2 { node, pc }
}

fn describe_node2(n2: &Node2, pins: &PinRoot, mode: AttachMode) -> Dataplane {
    let mac_c = n2.pc.run(|| mac_of("eth0"));
    n2.node.run(|| {
        let mut dp = Dataplane::load(&pins.config(Some(mode))).expect("load node 2");
        let eni0 = ifindex("eni0");
        dp.set_node(&NodeSpec {
            node_ip: ip(10, 0, 32, 20),
            primary_eni_ifindex: eni0,
            vpc_cidrs: vec![net("10.0.0.0/16")],
            snat_exclusions: vec![],
            passthrough_cidrs: vec![net("10.100.0.0/16")],
            external_snat: false,
            network_policy: false,
            snat_ports: (61000, 62999),
            snat_skip: None,
        })
        .unwrap();
        dp.upsert_eni(&EniSpec {
            ifindex: eni0,
            mac: mac_of("eni0"),
            primary_ip: ip(10, 0, 32, 20),
            gateway: ip(10, 0, 32, 1),
            is_primary: true,
        })
        .unwrap();
        dp.upsert_endpoint(&EndpointSpec {
            ipv4: ip(10, 0, 33, 7),
            host_ifindex: ifindex("hvc"),
            host_mac: mac_of("hvc"),
            pod_mac: mac_c,
            eni_ifindex: eni0,
        })
        .unwrap();
        dp
    })
}

/// What a node running kube-proxy has and the dataplane does not provide: the plugin's
/// `/32` routes to the pod veths, a default route, forwarding, and kube-proxy's DNAT
/// rules (iptables, nft backend) for a ClusterIP with a backend on node 2, one with a
/// backend on this node, and a NodePort. All inside the test's node namespace.
fn kube_proxy(lab: &Lab) {
    lab.node
        .ip(&["route", "add", POD_A, "dev", "hva", "scope", "link"]);
    lab.node
        .ip(&["route", "add", POD_B, "dev", "hvb", "scope", "link"]);
    lab.node
        .ip(&["route", "add", "default", "via", "10.0.0.1", "dev", "eni0"]);
    lab.node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    for (dst, dport, to) in [
        (CLUSTER_IP_REMOTE, "80", format!("{POD_C}:8080")),
        (CLUSTER_IP_LOCAL, "80", format!("{POD_A}:8081")),
        ("10.0.0.10", "30080", format!("{POD_A}:8081")),
    ] {
        lab.node.exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            dst,
            "-p",
            "tcp",
            "--dport",
            dport,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ]);
    }
}

fn sock(addr: &str, port: u16) -> std::net::SocketAddrV4 {
    std::net::SocketAddrV4::new(addr.parse().unwrap(), port)
}

fn kube_proxy_paths(mode: AttachMode) {
    let tag = format!("kp{}", if mode == AttachMode::Tcx { "x" } else { "c" });
    let pins = PinRoot::new(&tag);
    let pins2 = PinRoot::new(&format!("{tag}2"));
    let lab = lab(&tag);
    let n2 = second_node(&lab, &tag);
    let dp = describe(&lab, &pins, mode);
    let _dp2 = describe_node2(&n2, &pins2, mode);
    kube_proxy(&lab);
    let (hva, hvb, eni0) = lab
        .node
        .run(|| (ifindex("hva"), ifindex("hvb"), ifindex("eni0")));

    let server_c = tcp_server(n2.pc.name(), &format!("{POD_C}:8080"), 1);
    let server_a = tcp_server(lab.pa.name(), &format!("{POD_A}:8081"), 4);

    // (a) Pod B → ClusterIP whose backend is pod C on node 2. The reply comes in through
    // eni0 addressed to pod B; only the host's conntrack can turn its source back into
    // the ClusterIP. Had it been redirected into pod B, its kernel would have answered
    // the SYN-ACK from 10.0.33.7 with a RST and the connect would fail.
    let x: Exchange = lab
        .pb
        .run(|| tcp_exchange(None, sock(CLUSTER_IP_REMOTE, 80)))
        .expect("pod B → ClusterIP → pod C on node 2");
    assert_eq!(x.peer.to_string(), format!("{CLUSTER_IP_REMOTE}:80"));
    assert_eq!(
        x.reply,
        x.local.to_string(),
        "pod C saw pod B, not a NAT address"
    );
    assert_eq!(server_c.join().unwrap().len(), 1);
    let rows = dp.counters().unwrap();
    assert!(
        counter(&rows, eni0, reason::PASS_KERNEL_FLOW).packets >= 2,
        "replies from pod C went through the host stack"
    );
    let port_b = x.local.port();
    assert!(
        dp.kernel_flows()
            .unwrap()
            .iter()
            .any(|(k, _)| *k == NatKey::pod_port(be(POD_B), port_b, 6)),
        "pod B's port is marked as a host-stack flow"
    );

    // (b) Pod B → ClusterIP whose backend is pod A on this node: the kernel delivers to
    // A through its veth (recorded on egress) and A's reply goes back through the kernel,
    // not straight into pod B.
    let fwd_local_before = forwarded(&lab_rows(&dp), reason::FWD_LOCAL_POD).packets;
    let x = lab
        .pb
        .run(|| tcp_exchange(None, sock(CLUSTER_IP_LOCAL, 80)))
        .expect("pod B → ClusterIP → pod A");
    assert_eq!(x.peer.to_string(), format!("{CLUSTER_IP_LOCAL}:80"));
    assert_eq!(x.reply, x.local.to_string());
    let rows = dp.counters().unwrap();
    assert_eq!(
        forwarded(&rows, reason::FWD_LOCAL_POD).packets,
        fwd_local_before,
        "no reply of pod A was redirected into pod B"
    );

    // (c) NodePort from a VPC host: the kernel DNATs node:30080 to pod A, whose replies
    // (to a VPC address, which the program would otherwise send out of eni1 untranslated)
    // must go back through the kernel to leave as node:30080.
    let x = lab
        .vpc
        .run(|| tcp_exchange(Some(VPC_HOST.parse().unwrap()), sock("10.0.0.10", 30080)))
        .expect("VPC host → NodePort → pod A");
    assert_eq!(x.peer.to_string(), "10.0.0.10:30080");
    assert_eq!(x.reply, x.local.to_string(), "pod A saw the client address");

    // (d) Kubelet-style probes from the host, from the node address and from the
    // secondary ENI's address (a VPC address: without the record the reply would be
    // sent out of eni1 to the VPC).
    let fwd_eni_before = forwarded(&lab_rows(&dp), reason::FWD_ENI).packets;
    for src in ["10.0.0.10", "10.0.16.11"] {
        let x = lab
            .node
            .run(|| tcp_exchange(Some(src.parse().unwrap()), sock(POD_A, 8081)))
            .unwrap_or_else(|e| panic!("probe from {src}: {e}"));
        assert_eq!(x.peer.to_string(), format!("{POD_A}:8081"), "not SNATed");
        assert_eq!(x.reply, x.local.to_string());
    }
    let rows = dp.counters().unwrap();
    assert_eq!(
        forwarded(&rows, reason::FWD_ENI).packets,
        fwd_eni_before,
        "no probe reply left through an ENI"
    );
    assert!(counter(&rows, hva, reason::PASS_KERNEL_FLOW).packets >= 6);
    assert!(
        counter_dir(&rows, hva, reason::PASS_KERNEL_TO_POD, direction::EGRESS).packets >= 6,
        "the host stack's deliveries to pod A were seen on egress"
    );
    assert!(counter_dir(&rows, hvb, reason::PASS_KERNEL_TO_POD, direction::EGRESS).packets >= 2);
    let seen_by_a = server_a.join().unwrap();
    assert_eq!(seen_by_a.len(), 4, "{seen_by_a:?}");

    // The fast paths are untouched: pod to pod still goes straight through.
    assert!(ping(&lab.pa, POD_B));
    assert!(forwarded(&dp.counters().unwrap(), reason::FWD_LOCAL_POD).packets > fwd_local_before);

    // Flows carry on through the pinned programs while no agent runs.
    drop(dp);
    let server_a = tcp_server(lab.pa.name(), &format!("{POD_A}:8081"), 1);
    let x = lab
        .pb
        .run(|| tcp_exchange(None, sock(CLUSTER_IP_LOCAL, 80)))
        .expect("ClusterIP with the agent stopped");
    assert_eq!(x.peer.to_string(), format!("{CLUSTER_IP_LOCAL}:80"));
    assert_eq!(server_a.join().unwrap().len(), 1);

    // Idle host-stack flows are collected with the conntrack.
    lab.node.run(|| {
        let mut dp = Dataplane::load(&pins.config(Some(mode))).expect("reload");
        assert!(!dp.kernel_flows().unwrap().is_empty());
        let far = vpc_ebpf_agent::dataplane::monotonic_now_ns() + 7 * 3600 * 1_000_000_000;
        assert!(dp.gc_conntrack(far).unwrap() > 0);
        assert!(dp.kernel_flows().unwrap().is_empty());
    });
}

fn lab_rows(dp: &Dataplane) -> Vec<vpc_ebpf_agent::dataplane::CounterRow> {
    dp.counters().unwrap()
}

fn be(a: &str) -> u32 {
    u32::from_ne_bytes(a.parse::<std::net::Ipv4Addr>().unwrap().octets())
}

vpc_ebpf_tests::attach_modes!(
    kube_proxy_flows_go_back_through_the_host_stack,
    kube_proxy_paths
);

/// A UDP server in `ns` answering each of `n` datagrams with the address it came from.
fn udp_server(ns: &NetNs, addr: &str, n: usize) -> std::thread::JoinHandle<Vec<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ns, addr) = (ns.name().to_owned(), addr.to_owned());
    let h = std::thread::spawn(move || {
        vpc_ebpf_tests::netns::run_in(&ns, || {
            let s = UdpSocket::bind(&addr).expect("bind the UDP server");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            tx.send(()).unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 64];
            while seen.len() < n {
                let Ok((_, from)) = s.recv_from(&mut buf) else {
                    break;
                };
                s.send_to(from.to_string().as_bytes(), from).unwrap();
                seen.push(from.to_string());
            }
            seen
        })
    });
    rx.recv().expect("UDP server bound");
    h
}

/// Sends one datagram from `bind` to `to` and returns (answer, who answered, our address).
fn udp_exchange(bind: &str, to: &str) -> (String, String, String) {
    let s = UdpSocket::bind(format!("{bind}:0")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.send_to(b"hello", to).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = s
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no answer from {to}: {e}"));
    (
        String::from_utf8_lossy(&buf[..n]).into_owned(),
        from.to_string(),
        s.local_addr().unwrap().to_string(),
    )
}

fn hostport_paths(mode: AttachMode) {
    let tag = format!("hp{}", if mode == AttachMode::Tcx { "x" } else { "c" });
    let pins = PinRoot::new(&tag);
    let lab = lab(&tag);
    let mut dp = describe(&lab, &pins, mode);
    // Pod A (owned by the secondary ENI) publishes TCP 8080 → 8081 and UDP 5353 → 5300.
    dp.set_hostports(
        ip(10, 0, 1, 5),
        &[tcp_port(8080, 8081), udp_port(5353, 5300)],
    )
    .unwrap();
    let hva = lab.node.run(|| ifindex("hva"));

    let tcp = tcp_server(lab.pa.name(), &format!("{POD_A}:8081"), 5);
    let udp = udp_server(&lab.pa, &format!("{POD_A}:5300"), 2);
    // From a VPC host and from the internet, to the node address: the pod sees the real
    // client, the client sees the node address and the hostPort answer.
    for client in [VPC_HOST, INTERNET] {
        let x = lab
            .vpc
            .run(|| tcp_exchange(Some(client.parse().unwrap()), sock("10.0.0.10", 8080)))
            .unwrap_or_else(|e| panic!("TCP hostPort from {client}: {e}"));
        assert_eq!(x.peer.to_string(), "10.0.0.10:8080");
        assert_eq!(x.reply, x.local.to_string(), "pod A saw {client} itself");
        let (answer, from, me) = lab.vpc.run(|| udp_exchange(client, "10.0.0.10:5353"));
        assert_eq!(from, "10.0.0.10:5353", "UDP answer from the hostPort");
        assert_eq!(answer, me, "pod A saw {client} itself");
    }
    // From pod B on the same node, through the node address.
    let x = lab
        .pb
        .run(|| tcp_exchange(None, sock("10.0.0.10", 8080)))
        .expect("TCP hostPort from pod B");
    assert_eq!(x.peer.to_string(), "10.0.0.10:8080");
    assert_eq!(x.reply, x.local.to_string());
    // The secondary ENI's address publishes it too (portmap publishes on every local
    // address), and the answer leaves by that ENI: the VPC namespace drops a source that
    // arrives on another one.
    let x = lab
        .vpc
        .run(|| tcp_exchange(Some(VPC_HOST.parse().unwrap()), sock("10.0.16.11", 8080)))
        .expect("TCP hostPort on the secondary ENI's address");
    assert_eq!(x.peer.to_string(), "10.0.16.11:8080");
    assert_eq!(x.reply, x.local.to_string());
    // A pod reaches it there too: through the VPC, which hands the address back to its
    // ENI (portmap DNATs a pod's connection to any local address). The VPC routes.
    lab.vpc.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let x = lab
        .pb
        .run(|| tcp_exchange(None, sock("10.0.16.11", 8080)))
        .expect("TCP hostPort on the secondary ENI's address from pod B");
    assert_eq!(x.peer.to_string(), "10.0.16.11:8080");
    assert_eq!(x.reply, x.local.to_string());
    assert_eq!(tcp.join().unwrap().len(), 5);
    assert_eq!(udp.join().unwrap().len(), 2);

    // A hostIP publishes on that address only: pod B's 9090 on the secondary ENI's.
    dp.set_hostports(
        ip(10, 0, 1, 6),
        &[HostPort {
            host_ip: Some(ip(10, 0, 16, 11)),
            ..tcp_port(9090, 8082)
        }],
    )
    .unwrap();
    let b = tcp_server(lab.pb.name(), &format!("{POD_B}:8082"), 1);
    let x = lab
        .vpc
        .run(|| tcp_exchange(Some(VPC_HOST.parse().unwrap()), sock("10.0.16.11", 9090)))
        .expect("TCP hostPort on its hostIP");
    assert_eq!(x.peer.to_string(), "10.0.16.11:9090");
    assert_eq!(x.reply, x.local.to_string(), "pod B saw the client itself");
    assert_eq!(b.join().unwrap().len(), 1);
    let elsewhere = lab
        .vpc
        .run(|| tcp_exchange(Some(VPC_HOST.parse().unwrap()), sock("10.0.0.10", 9090)));
    assert!(
        elsewhere.is_err(),
        "published beyond its hostIP: {elsewhere:?}"
    );
    assert_eq!(
        dp.hostports().unwrap()[&ip(10, 0, 1, 6)][0].host_ip,
        Some(ip(10, 0, 16, 11)),
        "the hostIP reads back from the pinned map (a restarted agent keeps it)"
    );

    let rows = dp.counters().unwrap();
    // Two TCP handshakes + data + two datagrams from outside, at least.
    assert!(forwarded(&rows, reason::FWD_HOSTPORT_DNAT).packets >= 6);
    assert!(forwarded(&rows, reason::FWD_HOSTPORT_REPLY).packets >= 6);
    assert_eq!(counter(&rows, hva, reason::DROP_NO_ENI).packets, 0);

    // Withdrawn: nothing listens on the node's own 8080, so the connection is refused.
    dp.set_hostports(ip(10, 0, 1, 5), &[]).unwrap();
    let refused = lab
        .vpc
        .run(|| tcp_exchange(Some(VPC_HOST.parse().unwrap()), sock("10.0.0.10", 8080)));
    assert!(refused.is_err(), "{refused:?}");
}

vpc_ebpf_tests::attach_modes!(
    hostports_reach_the_pod_and_answer_from_the_node_address,
    hostport_paths
);
