//! Every branch of the pod and ENI programs over hand-built frames (BPF_PROG_TEST_RUN):
//! verdicts, rewritten bytes and checksums, the one counter each packet adds, and the
//! conntrack entries translated flows leave behind.
//!
//! BPF_PROG_TEST_RUN presents frames as received on the namespace's loopback (ifindex 1),
//! so pod A's host veth is `lo` here; pod B and the ENIs are veths.

#![expect(
    clippy::many_single_char_names,
    reason = "(v, out, r) = verdict, frame, reason: read once, compared at once"
)]

use std::net::Ipv4Addr;

use vpc_ebpf_agent::dataplane::{Dataplane, EndpointSpec, EniSpec, NodeSpec, monotonic_now_ns};
use vpc_ebpf_common::{
    counters::{direction, reason},
    nat::{NatKey, nat_kind, nat_origin},
    programs::{FROM_ENI, FROM_POD, TO_ENI, TO_POD},
};
use vpc_ebpf_rpc::types::MacAddr;
use vpc_ebpf_tests::dataplane::{
    PinRoot, counted, counter_dir, ifindex, ip, net, tcp_port, udp_port,
};
use vpc_ebpf_tests::{
    netns::NetNs,
    packets::{self, Ipv4},
};

const REDIRECT: i32 = 7;
const PASS: i32 = 0;
const DROP: i32 = 2;

const NODE_IP: Ipv4Addr = ip(10, 0, 0, 10);
const GW: Ipv4Addr = ip(10, 0, 0, 1);
const POD_A: Ipv4Addr = ip(10, 0, 1, 5);
const POD_B: Ipv4Addr = ip(10, 0, 1, 6);
const A_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0xa1];
const A_HOST_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 0xa2];
const B_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0xb1];
const B_HOST_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 0xb2];
const ENI_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xe0];
const SNAT_PORTS: (u16, u16) = (61000, 62999);
const INTERNET: [u8; 4] = [8, 8, 8, 8];

struct Node {
    dp: Dataplane,
    eni0: u32,
    eni1: u32,
    b_host: u32,
}

fn node_spec(eni0: u32) -> NodeSpec {
    NodeSpec {
        node_ip: NODE_IP,
        primary_eni_ifindex: eni0,
        vpc_cidrs: vec![net("10.0.0.0/16")],
        snat_exclusions: vec![net("100.64.0.0/10")],
        passthrough_cidrs: vec![net("172.20.0.0/16")],
        external_snat: false,
        network_policy: false,
        snat_ports: SNAT_PORTS,
        snat_skip: None,
    }
}

/// Loads the dataplane in `ns` and describes a node: pod A (on `lo`, owned by the
/// secondary ENI), pod B (on dummy `hvb`, owned by the primary ENI).
fn node(ns: &NetNs, pins: &PinRoot) -> Node {
    // No dummy driver on every kernel: veth pairs whose far ends stay unused.
    for name in ["eni0", "eni1", "hvb"] {
        let peer = format!("{name}p");
        ns.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        ns.ip(&["link", "set", name, "up"]);
        ns.ip(&["link", "set", &peer, "up"]);
    }
    ns.run(|| {
        let (eni0, eni1, b_host) = (ifindex("eni0"), ifindex("eni1"), ifindex("hvb"));
        let mut dp = Dataplane::load(&pins.config(None)).expect("load");
        dp.set_node(&node_spec(eni0)).expect("set_node");
        for (i, (ifx, primary)) in [(eni0, true), (eni1, false)].into_iter().enumerate() {
            dp.upsert_eni(&EniSpec {
                ifindex: ifx,
                mac: MacAddr(ENI_MAC),
                primary_ip: ip(10, 0, 0, 10 + u8::try_from(i).unwrap()),
                gateway: GW,
                is_primary: primary,
            })
            .expect("upsert_eni");
        }
        dp.upsert_endpoint(&EndpointSpec {
            ipv4: POD_A,
            host_ifindex: 1,
            host_mac: MacAddr(A_HOST_MAC),
            pod_mac: MacAddr(A_MAC),
            eni_ifindex: eni1,
        })
        .expect("endpoint A");
        dp.upsert_endpoint(&EndpointSpec {
            ipv4: POD_B,
            host_ifindex: b_host,
            host_mac: MacAddr(B_HOST_MAC),
            pod_mac: MacAddr(B_MAC),
            eni_ifindex: eni0,
        })
        .expect("endpoint B");
        Node {
            dp,
            eni0,
            eni1,
            b_host,
        }
    })
}

/// Runs `program` on `frame`: the verdict, the frame as left, and the one reason whose
/// counter (on ifindex 1, or for all interfaces for a forwarding verdict) went up
/// (asserting it was exactly one packet).
fn run(dp: &mut Dataplane, program: &'static str, frame: &[u8]) -> (i32, Vec<u8>, u16) {
    let before = dp.counters().unwrap();
    let (verdict, out) = dp.test_run_frame(program, frame).expect("test run");
    let after = dp.counters().unwrap();
    let grew: Vec<u16> = reason::ALL
        .iter()
        .copied()
        .filter(|r| counted(&after, 1, *r).packets != counted(&before, 1, *r).packets)
        .collect();
    assert_eq!(grew.len(), 1, "exactly one reason counted, got {grew:?}");
    let r = grew[0];
    assert_eq!(
        counted(&after, 1, r).packets,
        counted(&before, 1, r).packets + 1
    );
    (verdict, out, r)
}

fn v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    packets::ipv4_between(src, dst, proto, l4)
}

/// A frame from pod A to its gateway.
fn from_a(p: &[u8]) -> Vec<u8> {
    packets::eth_with(A_HOST_MAC, A_MAC, packets::ETH_P_IP, p)
}

/// A frame from the VPC router to an ENI.
fn from_vpc(p: &[u8]) -> Vec<u8> {
    packets::eth_with(ENI_MAC, [0x02, 0, 0, 0, 0, 0x01], packets::ETH_P_IP, p)
}

fn src_of(f: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(f[26], f[27], f[28], f[29])
}
fn dst_of(f: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(f[30], f[31], f[32], f[33])
}
fn sport_of(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[34], f[35]])
}
fn dport_of(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[36], f[37]])
}
fn ttl_of(f: &[u8]) -> u8 {
    f[22]
}

#[test]
fn arp_for_the_gateway_is_answered_with_the_host_veth_mac() {
    let pins = PinRoot::new("arp");
    let ns = NetNs::new("arp");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let req = packets::eth_with(
            [0xff; 6],
            A_MAC,
            packets::ETH_P_ARP,
            &packets::arp_request_from(A_MAC, POD_A.octets(), [169, 254, 1, 1]),
        );
        let (v, out, r) = run(&mut n.dp, FROM_POD, &req);
        assert_eq!((v, r), (REDIRECT, reason::FWD_ARP_REPLY));
        assert_eq!(&out[0..6], &A_MAC, "reply goes to the asking pod");
        assert_eq!(&out[6..12], &A_HOST_MAC);
        assert_eq!(&out[12..14], &[0x08, 0x06]);
        assert_eq!(&out[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&out[22..28], &A_HOST_MAC, "sender hw: host veth");
        assert_eq!(&out[28..32], &[169, 254, 1, 1], "sender ip: gateway");
        assert_eq!(&out[32..38], &A_MAC);
        assert_eq!(&out[38..42], &POD_A.octets());
        assert_eq!(out.len(), req.len());

        // Not for the gateway: the kernel's business.
        let other = packets::eth_with(
            [0xff; 6],
            A_MAC,
            packets::ETH_P_ARP,
            &packets::arp_request_from(A_MAC, POD_A.octets(), [10, 0, 0, 1]),
        );
        let (v, out, r) = run(&mut n.dp, FROM_POD, &other);
        assert_eq!((v, r), (PASS, reason::PASS_ARP));
        assert_eq!(out, other);

        // Asking on behalf of another pod, or with another MAC: spoofing.
        let spoof_ip = packets::eth_with(
            [0xff; 6],
            A_MAC,
            packets::ETH_P_ARP,
            &packets::arp_request_from(A_MAC, POD_B.octets(), [169, 254, 1, 1]),
        );
        assert_eq!(
            run(&mut n.dp, FROM_POD, &spoof_ip).2,
            reason::DROP_SPOOFED_IP
        );
        let spoof_mac = packets::eth_with(
            [0xff; 6],
            A_MAC,
            packets::ETH_P_ARP,
            &packets::arp_request_from(B_MAC, POD_A.octets(), [169, 254, 1, 1]),
        );
        let (v, _, r) = run(&mut n.dp, FROM_POD, &spoof_mac);
        assert_eq!((v, r), (DROP, reason::DROP_SPOOFED_MAC));

        // Truncated ARP: passed on untouched.
        let short = packets::eth_with(
            [0xff; 6],
            A_MAC,
            packets::ETH_P_ARP,
            &[0, 1, 8, 0, 6, 4, 0, 1],
        );
        let (v, out, r) = run(&mut n.dp, FROM_POD, &short);
        assert_eq!((v, r), (PASS, reason::PASS_ARP));
        assert_eq!(out, short);
    });
}

#[test]
fn pod_to_local_pod_is_redirected_to_the_peer_with_macs_and_ttl_rewritten() {
    let pins = PinRoot::new("p2p");
    let ns = NetNs::new("p2p");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        for (proto, l4) in [
            (17, packets::udp(40000, 53, b"hello")),
            (6, packets::tcp(40000, 80, 0x02)),
            (1, packets::icmp_echo(7, 1)),
        ] {
            let f = from_a(&v4(POD_A, POD_B, proto, &l4));
            let (v, out, r) = run(&mut n.dp, FROM_POD, &f);
            assert_eq!((v, r), (REDIRECT, reason::FWD_LOCAL_POD), "proto {proto}");
            assert_eq!(&out[0..6], &B_MAC);
            assert_eq!(&out[6..12], &B_HOST_MAC);
            assert_eq!(ttl_of(&out), 63);
            assert_eq!((src_of(&out), dst_of(&out)), (POD_A, POD_B));
            assert_eq!(&out[34..], &f[34..], "L4 untouched");
            packets::assert_checksums(&out);
        }
        // A later fragment needs no L4 header to be routed.
        let mut frag = packets::ipv4(
            &Ipv4 {
                frag: 0x0010,
                src: POD_A.octets(),
                dst: POD_B.octets(),
                ..Ipv4::default()
            },
            &[0u8; 24],
        );
        frag[8] = 64;
        let (v, out, r) = run(&mut n.dp, FROM_POD, &from_a(&frag));
        assert_eq!((v, r), (REDIRECT, reason::FWD_LOCAL_POD));
        assert_eq!(packets::checksum(&out[14..34]), 0, "IPv4 header checksum");
        assert_eq!(ttl_of(&out), 63);
        // TTL 1: the kernel must send time-exceeded; nothing changed.
        let mut p = v4(POD_A, POD_B, 17, &packets::udp(1, 2, b""));
        p[8] = 1;
        p[10..12].copy_from_slice(&[0, 0]);
        let c = packets::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let f = from_a(&p);
        let (v, out, r) = run(&mut n.dp, FROM_POD, &f);
        assert_eq!((v, r, out), (PASS, reason::PASS_TTL_EXPIRED, f));
        let _ = n.b_host;
    });
}

#[test]
fn spoofed_sources_are_dropped_and_counted() {
    let pins = PinRoot::new("spoof");
    let ns = NetNs::new("spoof");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let udp = packets::udp(1, 2, b"x");
        // An address nobody has, and pod B's address (whose veth is not this one).
        for src in [ip(10, 0, 1, 99), POD_B, ip(0, 0, 0, 0)] {
            let (v, _, r) = run(&mut n.dp, FROM_POD, &from_a(&v4(src, POD_B, 17, &udp)));
            assert_eq!((v, r), (DROP, reason::DROP_SPOOFED_IP), "src {src}");
        }
        let f = packets::eth_with(
            A_HOST_MAC,
            B_MAC,
            packets::ETH_P_IP,
            &v4(POD_A, POD_B, 17, &udp),
        );
        let (v, _, r) = run(&mut n.dp, FROM_POD, &f);
        assert_eq!((v, r), (DROP, reason::DROP_SPOOFED_MAC));
    });
}

#[test]
fn vpc_and_excluded_destinations_leave_unchanged_through_the_owning_eni() {
    let pins = PinRoot::new("vpc");
    let ns = NetNs::new("vpc");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        for dst in [ip(10, 0, 2, 7), ip(100, 64, 3, 3)] {
            let f = from_a(&v4(POD_A, dst, 6, &packets::tcp(40000, 443, 0x02)));
            let (v, out, r) = run(&mut n.dp, FROM_POD, &f);
            assert_eq!((v, r), (REDIRECT, reason::FWD_ENI), "dst {dst}");
            assert_eq!((src_of(&out), dst_of(&out)), (POD_A, dst), "no SNAT");
            assert_eq!(ttl_of(&out), 63);
            packets::assert_checksums(&out);
        }
        // Without its ENI in the map the packet has no correct way out: dropped.
        n.dp.remove_eni(n.eni1).unwrap();
        let f = from_a(&v4(POD_A, ip(10, 0, 2, 7), 17, &packets::udp(1, 2, b"")));
        let (v, _, r) = run(&mut n.dp, FROM_POD, &f);
        assert_eq!((v, r), (DROP, reason::DROP_NO_ENI));
        assert!(n.dp.nat_entries().unwrap().is_empty());
    });
}

#[test]
fn kernel_destinations_pass_unchanged() {
    let pins = PinRoot::new("kern");
    let ns = NetNs::new("kern");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let udp = packets::udp(5353, 53, b"q");
        for (dst, want) in [
            (ip(172, 20, 0, 10), reason::PASS_PASSTHROUGH_CIDR),
            (NODE_IP, reason::PASS_TO_HOST),
        ] {
            let f = from_a(&v4(POD_A, dst, 17, &udp));
            let (v, out, r) = run(&mut n.dp, FROM_POD, &f);
            assert_eq!((v, r), (PASS, want), "dst {dst}");
            assert_eq!(out, f);
        }
        // Outside the VPC but nothing to translate.
        let gre = from_a(&v4(POD_A, Ipv4Addr::from(INTERNET), 47, &[0u8; 8]));
        let (v, out, r) = run(&mut n.dp, FROM_POD, &gre);
        assert_eq!((v, r, out), (PASS, reason::PASS_NOT_TRANSLATABLE, gre));
        let mut unreach = vec![3, 1, 0, 0, 0, 0, 0, 0];
        unreach.extend_from_slice(&[0u8; 28]);
        let f = from_a(&v4(POD_A, Ipv4Addr::from(INTERNET), 1, &unreach));
        let (v, out, r) = run(&mut n.dp, FROM_POD, &f);
        assert_eq!((v, r, out), (PASS, reason::PASS_NOT_TRANSLATABLE, f));
    });
}

#[test]
fn malformed_and_foreign_frames_pass_unchanged() {
    let pins = PinRoot::new("malformed");
    let ns = NetNs::new("malformed");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let tcp = v4(
            POD_A,
            Ipv4Addr::from(INTERNET),
            6,
            &packets::tcp(40000, 80, 0x02),
        );
        let bad_ihl = {
            let mut p = tcp.clone();
            p[0] = 0x43;
            p
        };
        let v6_in_v4 = {
            let mut p = tcp.clone();
            p[0] = 0x65;
            p
        };
        let long_ihl = {
            // IHL 15 (60 bytes) in a 40-byte packet.
            let mut p = tcp.clone();
            p[0] = 0x4f;
            p
        };
        // A later fragment whose first fragment was never translated here: nothing to
        // translate it with.
        let orphan_fragment = packets::ipv4(
            &Ipv4 {
                frag: 0x0004,
                proto: 17,
                src: POD_A.octets(),
                dst: INTERNET,
                ..Ipv4::default()
            },
            &[0; 16],
        );
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            (
                "truncated tcp",
                from_a(&tcp[..30]),
                reason::PASS_TRUNCATED_IPV4,
            ),
            ("ihl 3", from_a(&bad_ihl), reason::PASS_MALFORMED_IPV4),
            ("version 6", from_a(&v6_in_v4), reason::PASS_MALFORMED_IPV4),
            (
                "ihl past the end",
                from_a(&long_ihl),
                reason::PASS_TRUNCATED_IPV4,
            ),
            (
                "orphan fragment to snat",
                from_a(&orphan_fragment),
                reason::PASS_IPV4_FRAGMENT,
            ),
            (
                "vlan",
                packets::eth_with(
                    A_HOST_MAC,
                    A_MAC,
                    packets::ETH_P_8021Q,
                    &[0, 5, 8, 0, 0x45, 0, 0, 20],
                ),
                reason::PASS_VLAN,
            ),
            (
                "ipv6",
                packets::eth_with(A_HOST_MAC, A_MAC, packets::ETH_P_IPV6, &[0x60; 40]),
                reason::PASS_IPV6,
            ),
            (
                "lldp",
                packets::eth_with(A_HOST_MAC, A_MAC, packets::ETH_P_LLDP, &[0; 20]),
                reason::PASS_OTHER_ETHERTYPE,
            ),
        ];
        for program in [FROM_POD, FROM_ENI] {
            for (name, f, want) in &cases {
                // On an ENI a fragment to elsewhere is simply not for a pod.
                let want = if program == FROM_ENI && *name == "orphan fragment to snat" {
                    &reason::PASS_NOT_FOR_POD
                } else {
                    want
                };
                let (v, out, r) = run(&mut n.dp, program, f);
                assert_eq!((v, r), (PASS, *want), "{program}: {name}");
                assert_eq!(&out, f, "{program}: {name} must not be changed");
            }
        }
        assert!(n.dp.nat_entries().unwrap().is_empty(), "nothing translated");
    });
}

#[test]
fn nothing_is_steered_before_the_node_is_configured() {
    let pins = PinRoot::new("unconf");
    let ns = NetNs::new("unconf");
    ns.run(|| {
        let mut dp = Dataplane::load(&pins.config(None)).unwrap();
        let f = from_a(&v4(POD_A, POD_B, 17, &packets::udp(1, 2, b"")));
        for program in [FROM_POD, FROM_ENI] {
            let (v, out, r) = run(&mut dp, program, &f);
            assert_eq!((v, r), (PASS, reason::PASS_NOT_CONFIGURED));
            assert_eq!(out, f);
        }
    });
}

/// Sends `l4` from pod A to the internet, checks the SNAT, then sends `reply_l4` back
/// to the allocated port through the ENI program and checks the reverse translation.
fn snat_round_trip(n: &mut Node, proto: u8, l4: &[u8], reply: impl Fn(u16) -> Vec<u8>) -> u16 {
    let f = from_a(&v4(POD_A, Ipv4Addr::from(INTERNET), proto, l4));
    let (v, out, r) = run(&mut n.dp, FROM_POD, &f);
    assert_eq!((v, r), (REDIRECT, reason::FWD_SNAT), "proto {proto}");
    assert_eq!(src_of(&out), NODE_IP);
    assert_eq!(dst_of(&out), Ipv4Addr::from(INTERNET));
    assert_eq!(ttl_of(&out), 63);
    packets::assert_checksums(&out);
    let port = if proto == 1 {
        u16::from_be_bytes([out[38], out[39]])
    } else {
        assert_eq!(dport_of(&out), dport_of(&f));
        sport_of(&out)
    };
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port),
        "port {port} outside the range"
    );
    // Same flow again: same translation, no new entries.
    let entries = n.dp.nat_entries().unwrap().len();
    let (_, again, _) = run(&mut n.dp, FROM_POD, &f);
    assert_eq!(again, out);
    assert_eq!(n.dp.nat_entries().unwrap().len(), entries);

    let back = from_vpc(&v4(Ipv4Addr::from(INTERNET), NODE_IP, proto, &reply(port)));
    let (v, out, r) = run(&mut n.dp, FROM_ENI, &back);
    assert_eq!((v, r), (REDIRECT, reason::FWD_REVERSE_NAT));
    assert_eq!(
        (src_of(&out), dst_of(&out)),
        (Ipv4Addr::from(INTERNET), POD_A)
    );
    assert_eq!(&out[0..6], &A_MAC);
    assert_eq!(&out[6..12], &A_HOST_MAC);
    packets::assert_checksums(&out);
    if proto == 1 {
        assert_eq!(&out[38..40], &f[38..40], "echo id restored");
    } else {
        assert_eq!(dport_of(&out), sport_of(&f), "pod port restored");
    }
    port
}

#[test]
fn snat_translates_tcp_udp_and_icmp_echo_and_their_replies() {
    let pins = PinRoot::new("snat");
    let ns = NetNs::new("snat");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        // The pod's own port is in range: kept.
        let p = snat_round_trip(&mut n, 17, &packets::udp(61500, 53, b"query"), |port| {
            packets::udp(53, port, b"answer")
        });
        assert_eq!(p, 61500, "a free in-range port is kept");
        let p2 = snat_round_trip(&mut n, 6, &packets::tcp(40000, 443, 0x02), |port| {
            packets::tcp(443, port, 0x12)
        });
        assert_ne!(p2, 40000);
        snat_round_trip(&mut n, 1, &packets::icmp_echo(0x1234, 1), |port| {
            let mut r = packets::icmp_echo(port, 1);
            r[0] = 0;
            r
        });
        // A UDP datagram without a checksum keeps having none.
        let mut nocsum = v4(
            POD_A,
            Ipv4Addr::from(INTERNET),
            17,
            &packets::udp(40001, 123, b"t"),
        );
        nocsum[26..28].copy_from_slice(&[0, 0]);
        let (v, out, _) = run(&mut n.dp, FROM_POD, &from_a(&nocsum));
        assert_eq!(v, REDIRECT);
        assert_eq!(&out[40..42], &[0, 0]);

        let entries = n.dp.nat_entries().unwrap();
        assert_eq!(entries.len(), 8, "two per flow: {entries:?}");
        let fwd = entries
            .iter()
            .find(|(k, _)| {
                *k == NatKey::new(be(POD_A), u32::from_ne_bytes(INTERNET), 40000, 443, 6)
            })
            .expect("forward TCP entry");
        assert_eq!(fwd.1.kind, nat_kind::REWRITE_SRC);
        assert_eq!(fwd.1.origin, nat_origin::SNAT);
        assert_eq!(fwd.1.addr, be(NODE_IP));
        assert!(
            entries.contains(&(
                fwd.1.peer_key(&fwd.0),
                entries
                    .iter()
                    .find(|(k, _)| *k == fwd.1.peer_key(&fwd.0))
                    .unwrap()
                    .1
            ))
        );

        // A reply to a port nobody uses goes to the kernel untouched.
        let stray = from_vpc(&v4(
            Ipv4Addr::from(INTERNET),
            NODE_IP,
            17,
            &packets::udp(53, 61999, b""),
        ));
        let (v, out, r) = run(&mut n.dp, FROM_ENI, &stray);
        assert_eq!((v, r, out), (PASS, reason::PASS_NOT_FOR_POD, stray));
    });
}

#[test]
fn fragmented_datagrams_are_translated_whole_both_ways() {
    let pins = PinRoot::new("frag");
    let ns = NetNs::new("frag");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let internet = Ipv4Addr::from(INTERNET);
        let payload: Vec<u8> = (0..=255u8).cycle().take(120).collect();
        let whole = v4(POD_A, internet, 17, &packets::udp(40002, 5000, &payload));
        // The later fragment first: nothing is known of its datagram yet.
        let (first, later) = packets::fragments(&whole, 0x4242, 48);
        let (v, out, r) = run(&mut n.dp, FROM_POD, &from_a(&later));
        assert_eq!((v, r), (PASS, reason::PASS_IPV4_FRAGMENT), "orphan");
        assert_eq!(out, from_a(&later));

        let (v, out1, r) = run(&mut n.dp, FROM_POD, &from_a(&first));
        assert_eq!((v, r), (REDIRECT, reason::FWD_SNAT), "first fragment");
        assert_eq!(src_of(&out1), NODE_IP);
        let port = sport_of(&out1);
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port), "{port}");
        let (v, out2, r) = run(&mut n.dp, FROM_POD, &from_a(&later));
        assert_eq!((v, r), (REDIRECT, reason::FWD_SNAT), "later fragment");
        assert_eq!(src_of(&out2), NODE_IP);
        assert_eq!(&out2[34..], &later[20..], "payload untouched");
        assert_eq!(
            packets::checksum(&out2[14..34]),
            0,
            "header checksum of the later fragment"
        );
        // What the server reassembles: its UDP checksum holds for the new source.
        let datagram = packets::reassembled(&out1, &out2);
        packets::assert_checksums(&datagram);
        assert_eq!(sport_of(&datagram), port);

        // The answer, fragmented too, comes back whole to the pod.
        let answer = v4(internet, NODE_IP, 17, &packets::udp(5000, port, &payload));
        let (first, later) = packets::fragments(&answer, 0x1717, 64);
        let (v, in1, r) = run(&mut n.dp, FROM_ENI, &from_vpc(&first));
        assert_eq!((v, r), (REDIRECT, reason::FWD_REVERSE_NAT), "first answer");
        assert_eq!((dst_of(&in1), dport_of(&in1)), (POD_A, 40002));
        let (v, in2, r) = run(&mut n.dp, FROM_ENI, &from_vpc(&later));
        assert_eq!((v, r), (REDIRECT, reason::FWD_REVERSE_NAT), "later answer");
        assert_eq!(dst_of(&in2), POD_A);
        assert_eq!(&in2[0..6], &A_MAC);
        let datagram = packets::reassembled(&in1, &in2);
        packets::assert_checksums(&datagram);

        // Another datagram of the host's own (same addresses, another id) is not touched.
        let (_, stray) = packets::fragments(&answer, 0x1718, 64);
        let (v, _, r) = run(&mut n.dp, FROM_ENI, &from_vpc(&stray));
        assert_eq!((v, r), (PASS, reason::PASS_NOT_FOR_POD));
    });
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

#[test]
fn snat_gives_up_with_a_counted_drop_when_the_range_is_exhausted() {
    let pins = PinRoot::new("exhaust");
    let ns = NetNs::new("exhaust");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let mut spec = node_spec(n.eni0);
        spec.snat_ports = (62000, 62000);
        n.dp.set_node(&spec).unwrap();
        let dst = Ipv4Addr::from(INTERNET);
        let first = from_a(&v4(POD_A, dst, 17, &packets::udp(1000, 53, b"")));
        let (v, out, r) = run(&mut n.dp, FROM_POD, &first);
        assert_eq!((v, r, sport_of(&out)), (REDIRECT, reason::FWD_SNAT, 62000));
        let second = from_a(&v4(POD_A, dst, 17, &packets::udp(1001, 53, b"")));
        let (v, out, r) = run(&mut n.dp, FROM_POD, &second);
        assert_eq!((v, r), (DROP, reason::DROP_NO_SNAT_PORT));
        assert_eq!(out, second);
        // Another destination port is another tuple: the same source port is free for it.
        let third = from_a(&v4(POD_A, dst, 17, &packets::udp(1001, 54, b"")));
        assert_eq!(run(&mut n.dp, FROM_POD, &third).2, reason::FWD_SNAT);
    });
}

#[test]
fn snat_never_allocates_in_the_hosts_ephemeral_band() {
    let pins = PinRoot::new("snatskip");
    let ns = NetNs::new("snatskip");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let mut spec = node_spec(n.eni0);
        // Only 62999 is outside the band.
        spec.snat_skip = Some((60000, 62998));
        n.dp.set_node(&spec).unwrap();
        let dst = Ipv4Addr::from(INTERNET);
        // The pod's own port is in the range but in the band: not kept.
        let first = from_a(&v4(POD_A, dst, 17, &packets::udp(61500, 53, b"")));
        let (v, out, r) = run(&mut n.dp, FROM_POD, &first);
        assert_eq!((v, r, sport_of(&out)), (REDIRECT, reason::FWD_SNAT, 62999));
        let second = from_a(&v4(POD_A, dst, 17, &packets::udp(61501, 53, b"")));
        assert_eq!(
            run(&mut n.dp, FROM_POD, &second).2,
            reason::DROP_NO_SNAT_PORT
        );
        // A band covering the whole range is refused before any packet sees it.
        spec.snat_skip = Some((61000, 62999));
        assert!(n.dp.set_node(&spec).is_err());
    });
}

/// One TCP segment from pod A's `sport` to the internet's port 443.
fn pod_tcp(sport: u16, flags: u8) -> Vec<u8> {
    from_a(&v4(
        POD_A,
        Ipv4Addr::from(INTERNET),
        6,
        &packets::tcp(sport, 443, flags),
    ))
}

/// One TCP segment from the internet's port 443 to the node's `port`.
fn internet_tcp(port: u16, flags: u8) -> Vec<u8> {
    from_vpc(&v4(
        Ipv4Addr::from(INTERNET),
        NODE_IP,
        6,
        &packets::tcp(443, port, flags),
    ))
}

/// How long a closed SNAT flow keeps its port (the programs' REUSE_AFTER_NS), plus margin.
const REUSE_AFTER: std::time::Duration = std::time::Duration::from_millis(2100);
const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

#[test]
fn a_syn_takes_over_the_port_of_a_closed_flow_and_never_of_an_open_one() {
    let pins = PinRoot::new("takeover");
    let ns = NetNs::new("takeover");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let mut spec = node_spec(n.eni0);
        spec.snat_ports = (62000, 62000);
        n.dp.set_node(&spec).unwrap();
        // Flow A holds the only port.
        let (_, out, r) = run(&mut n.dp, FROM_POD, &pod_tcp(1000, SYN));
        assert_eq!((r, sport_of(&out)), (reason::FWD_SNAT, 62000));
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &internet_tcp(62000, SYN_ACK)).2,
            reason::FWD_REVERSE_NAT
        );
        // Open: a new connection cannot have it, nor can a non-SYN first packet.
        assert_eq!(
            run(&mut n.dp, FROM_POD, &pod_tcp(1001, SYN)).2,
            reason::DROP_NO_SNAT_PORT
        );
        // Half closed (FIN from the pod only): still A's.
        run(&mut n.dp, FROM_POD, &pod_tcp(1000, FIN_ACK));
        assert_eq!(
            run(&mut n.dp, FROM_POD, &pod_tcp(1001, SYN)).2,
            reason::DROP_NO_SNAT_PORT
        );
        // FIN both ways: closed, but the last ACK may still be on its way, so the port
        // is left alone for a while; after that only a SYN may take it.
        run(&mut n.dp, FROM_ENI, &internet_tcp(62000, FIN_ACK));
        assert_eq!(
            run(&mut n.dp, FROM_POD, &pod_tcp(1001, SYN)).2,
            reason::DROP_NO_SNAT_PORT
        );
        std::thread::sleep(REUSE_AFTER);
        assert_eq!(
            run(&mut n.dp, FROM_POD, &pod_tcp(1001, ACK)).2,
            reason::DROP_NO_SNAT_PORT
        );
        let (v, out, r) = run(&mut n.dp, FROM_POD, &pod_tcp(1001, SYN));
        assert_eq!((v, r, sport_of(&out)), (REDIRECT, reason::FWD_SNAT, 62000));
        // Replies now reach B's port, and A's forward entry is gone with its port.
        let (_, back, r) = run(&mut n.dp, FROM_ENI, &internet_tcp(62000, SYN_ACK));
        assert_eq!((r, dport_of(&back)), (reason::FWD_REVERSE_NAT, 1001));
        let dst = u32::from_ne_bytes(INTERNET);
        let keys: Vec<NatKey> =
            n.dp.nat_entries()
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect();
        assert!(
            !keys.contains(&NatKey::new(be(POD_A), dst, 1000, 443, 6)),
            "{keys:?}"
        );
        assert_eq!(keys.len(), 2, "{keys:?}");
        // A reset closes too.
        run(&mut n.dp, FROM_ENI, &internet_tcp(62000, RST));
        std::thread::sleep(REUSE_AFTER);
        let (_, out, r) = run(&mut n.dp, FROM_POD, &pod_tcp(1002, SYN));
        assert_eq!((r, sport_of(&out)), (reason::FWD_SNAT, 62000));
    });
}

#[test]
fn a_syn_on_a_reused_tuple_starts_the_flow_afresh() {
    let pins = PinRoot::new("reuse");
    let ns = NetNs::new("reuse");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let (_, out, _) = run(&mut n.dp, FROM_POD, &pod_tcp(1000, SYN));
        let port = sport_of(&out);
        run(&mut n.dp, FROM_POD, &pod_tcp(1000, FIN_ACK));
        run(&mut n.dp, FROM_ENI, &internet_tcp(port, FIN_ACK));
        let closing = n.dp.nat_entries().unwrap();
        assert!(closing.iter().all(|(_, e)| e.state != 0), "{closing:?}");
        // The pod reuses its port for a new connection: same translation, and neither
        // half is left marked closing (which would expire the new flow early).
        let (_, again, r) = run(&mut n.dp, FROM_POD, &pod_tcp(1000, SYN));
        assert_eq!((r, sport_of(&again)), (reason::FWD_SNAT, port));
        run(&mut n.dp, FROM_ENI, &internet_tcp(port, SYN_ACK));
        let fresh = n.dp.nat_entries().unwrap();
        assert_eq!(fresh.len(), 2);
        assert!(fresh.iter().all(|(_, e)| e.state == 0), "{fresh:?}");
    });
}

#[test]
fn external_snat_sends_outside_traffic_untranslated_through_the_owning_eni() {
    let pins = PinRoot::new("extsnat");
    let ns = NetNs::new("extsnat");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let mut spec = node_spec(n.eni0);
        spec.external_snat = true;
        n.dp.set_node(&spec).unwrap();
        let f = from_a(&v4(
            POD_A,
            Ipv4Addr::from(INTERNET),
            17,
            &packets::udp(1000, 53, b""),
        ));
        let (v, out, r) = run(&mut n.dp, FROM_POD, &f);
        assert_eq!((v, r), (REDIRECT, reason::FWD_ENI));
        assert_eq!(src_of(&out), POD_A);
        assert!(n.dp.nat_entries().unwrap().is_empty());
    });
}

#[test]
fn eni_traffic_to_local_pods_is_delivered_and_the_rest_passes() {
    let pins = PinRoot::new("eni");
    let ns = NetNs::new("eni");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let f = from_vpc(&v4(
            ip(10, 0, 3, 3),
            POD_B,
            6,
            &packets::tcp(5000, 80, 0x02),
        ));
        let (v, out, r) = run(&mut n.dp, FROM_ENI, &f);
        assert_eq!((v, r), (REDIRECT, reason::FWD_LOCAL_POD));
        assert_eq!(&out[0..12], &[B_MAC, B_HOST_MAC].concat()[..]);
        assert_eq!(ttl_of(&out), 63);
        packets::assert_checksums(&out);
        for dst in [NODE_IP, ip(10, 0, 1, 200)] {
            let f = from_vpc(&v4(ip(10, 0, 3, 3), dst, 6, &packets::tcp(5000, 80, 0x02)));
            let (v, out, r) = run(&mut n.dp, FROM_ENI, &f);
            assert_eq!(
                (v, r, out),
                (PASS, reason::PASS_NOT_FOR_POD, f),
                "dst {dst}"
            );
        }
        let arp = packets::eth(
            packets::ETH_P_ARP,
            &packets::arp_request([10, 0, 0, 1], NODE_IP.octets()),
        );
        let (v, out, r) = run(&mut n.dp, FROM_ENI, &arp);
        assert_eq!((v, r, out), (PASS, reason::PASS_ARP, arp));
    });
}

#[test]
fn hostport_is_dnated_to_the_pod_and_its_replies_translated_back() {
    let pins = PinRoot::new("hostport");
    let ns = NetNs::new("hostport");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        n.dp.set_hostports(POD_A, &[tcp_port(8080, 80), udp_port(5353, 53)])
            .unwrap();
        let client = ip(10, 0, 9, 9);
        let syn = from_vpc(&v4(client, NODE_IP, 6, &packets::tcp(40000, 8080, 0x02)));
        let (v, out, r) = run(&mut n.dp, FROM_ENI, &syn);
        assert_eq!((v, r), (REDIRECT, reason::FWD_HOSTPORT_DNAT));
        assert_eq!((src_of(&out), dst_of(&out)), (client, POD_A));
        assert_eq!((sport_of(&out), dport_of(&out)), (40000, 80));
        assert_eq!(&out[0..6], &A_MAC);
        packets::assert_checksums(&out);

        let synack = from_a(&v4(POD_A, client, 6, &packets::tcp(80, 40000, 0x12)));
        let (v, out, r) = run(&mut n.dp, FROM_POD, &synack);
        assert_eq!((v, r), (REDIRECT, reason::FWD_HOSTPORT_REPLY));
        assert_eq!((src_of(&out), sport_of(&out)), (NODE_IP, 8080));
        assert_eq!((dst_of(&out), dport_of(&out)), (client, 40000));
        packets::assert_checksums(&out);

        // The second packet of the flow is translated from the conntrack entry.
        let ack = from_vpc(&v4(client, NODE_IP, 6, &packets::tcp(40000, 8080, 0x10)));
        assert_eq!(run(&mut n.dp, FROM_ENI, &ack).2, reason::FWD_HOSTPORT_DNAT);

        // Unpublished port and other protocol: the kernel's.
        let other = from_vpc(&v4(client, NODE_IP, 6, &packets::tcp(40000, 8081, 0x02)));
        assert_eq!(run(&mut n.dp, FROM_ENI, &other).2, reason::PASS_NOT_FOR_POD);
        n.dp.set_hostports(POD_A, &[udp_port(5353, 53)]).unwrap();
        let syn2 = from_vpc(&v4(client, NODE_IP, 6, &packets::tcp(40001, 8080, 0x02)));
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &syn2).2,
            reason::PASS_NOT_FOR_POD,
            "withdrawn hostPort"
        );
        let dns = from_vpc(&v4(client, NODE_IP, 17, &packets::udp(999, 5353, b"q")));
        let (_, out, r) = run(&mut n.dp, FROM_ENI, &dns);
        assert_eq!((r, dport_of(&out)), (reason::FWD_HOSTPORT_DNAT, 53));

        // A pod on the node reaching the hostPort through the node address.
        let from_b = packets::eth_with(
            B_HOST_MAC,
            B_MAC,
            packets::ETH_P_IP,
            &v4(POD_B, NODE_IP, 17, &packets::udp(777, 5353, b"q")),
        );
        let _ = from_b; // B's veth is not lo, so its own path is covered by the traffic test.

        assert!(
            n.dp.set_hostports(POD_A, &[tcp_port(0, 80)]).is_err(),
            "port 0 cannot be a hostPort"
        );
        n.dp.remove_endpoint(POD_A).unwrap();
        let dns = from_vpc(&v4(client, NODE_IP, 17, &packets::udp(998, 5353, b"q")));
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &dns).2,
            reason::PASS_NOT_FOR_POD,
            "gone with its pod"
        );
    });
}

#[test]
fn conntrack_gc_expires_idle_flows_in_pairs() {
    let pins = PinRoot::new("gc");
    let ns = NetNs::new("gc");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let dst = Ipv4Addr::from(INTERNET);
        run(
            &mut n.dp,
            FROM_POD,
            &from_a(&v4(POD_A, dst, 17, &packets::udp(1000, 53, b""))),
        );
        run(
            &mut n.dp,
            FROM_POD,
            &from_a(&v4(POD_A, dst, 6, &packets::tcp(1000, 443, 0x02))),
        );
        assert_eq!(n.dp.nat_entries().unwrap().len(), 4);
        let now = monotonic_now_ns();
        assert_eq!(n.dp.gc_conntrack(now).unwrap(), 0, "nothing idle yet");
        // Two minutes on: the UDP flow (60 s) is gone, the TCP one (6 h) stays.
        assert_eq!(n.dp.gc_conntrack(now + 120_000_000_000).unwrap(), 2);
        let left = n.dp.nat_entries().unwrap();
        assert!(left.iter().all(|(k, _)| k.proto == 6), "{left:?}");
        // A RST makes the TCP flow a closing one (10 s).
        run(
            &mut n.dp,
            FROM_POD,
            &from_a(&v4(POD_A, dst, 6, &packets::tcp(1000, 443, 0x04))),
        );
        assert_eq!(
            n.dp.gc_conntrack(monotonic_now_ns() + 20_000_000_000)
                .unwrap(),
            2
        );
        assert!(n.dp.nat_entries().unwrap().is_empty());
    });
}

/// The IPv4 packet quoted by the ICMP error inside Ethernet frame `f`.
fn quoted(f: &[u8]) -> &[u8] {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    &f[14 + ihl + 8..]
}

/// Asserts the checksums of an ICMP error frame: outer IPv4, ICMP over the whole
/// message, the quoted IPv4 header, and the quoted L4 checksum when the quote is whole.
fn assert_error_checksums(f: &[u8]) {
    packets::assert_checksums(f);
    let q = quoted(f);
    let ihl = usize::from(q[0] & 0x0f) * 4;
    assert_eq!(
        packets::checksum(&q[..ihl]),
        0,
        "quoted IPv4 header checksum"
    );
    let whole = usize::from(u16::from_be_bytes([q[2], q[3]])) == q.len();
    if whole && !(q[9] == 17 && q[ihl + 6..ihl + 8] == [0, 0]) {
        assert_eq!(packets::l4_checksum(q), 0, "quoted L4 checksum of {q:02x?}");
    }
}

/// (protocol, L4 of the flow as the pod sends it, how many bytes of the translated packet
/// the error quotes (all: `None`), ICMP type, code)
type ErrorCase = (u8, Vec<u8>, Option<usize>, u8, u8);

#[test]
fn icmp_errors_about_snated_flows_are_translated_back_to_the_pod() {
    let pins = PinRoot::new("icmperr");
    let ns = NetNs::new("icmperr");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let ext = Ipv4Addr::from(INTERNET);
        let router = ip(198, 51, 100, 1);
        let cases: [ErrorCase; 5] = [
            // UDP, quoted whole: the quoted UDP checksum must follow.
            (17, packets::udp(40000, 53, b"query"), None, 3, 3),
            // UDP quoted with the RFC 792 minimum: IPv4 header and 8 bytes.
            (17, packets::udp(40001, 53, b"query"), Some(28), 11, 0),
            // TCP quoted whole (its checksum is updated) and cut at 8 bytes (it is not
            // there to update).
            (6, packets::tcp(40002, 443, 0x02), None, 3, 4),
            (6, packets::tcp(40003, 443, 0x02), Some(28), 11, 0),
            // Our own echo request: the identifier is translated back.
            (1, packets::icmp_echo(0x4242, 9), None, 3, 1),
        ];
        for (proto, l4, cut, ty, code) in cases {
            let f = from_a(&v4(POD_A, ext, proto, &l4));
            let (v, sent, r) = run(&mut n.dp, FROM_POD, &f);
            assert_eq!((v, r), (REDIRECT, reason::FWD_SNAT));
            let sent_ip = &sent[14..];
            let q = &sent_ip[..cut.unwrap_or(sent_ip.len())];
            let err = from_vpc(&v4(router, NODE_IP, 1, &packets::icmp_error(ty, code, q)));
            let (v, out, r) = run(&mut n.dp, FROM_ENI, &err);
            let what = format!("proto {proto} type {ty} quoting {} bytes", q.len());
            assert_eq!((v, r), (REDIRECT, reason::FWD_ICMP_ERROR_NAT), "{what}");
            assert_eq!((src_of(&out), dst_of(&out)), (router, POD_A), "{what}");
            assert_eq!(&out[0..6], &A_MAC);
            assert_eq!(ttl_of(&out), 63);
            assert_eq!(out.len(), err.len());
            let back = quoted(&out);
            assert_eq!(&back[12..16], &POD_A.octets(), "quoted source: {what}");
            assert_eq!(&back[16..20], &INTERNET, "quoted destination kept: {what}");
            // The quote now reads as the packet the pod sent (TTL aside: it was
            // decremented on the way out).
            let orig = &f[14..];
            let port = if proto == 1 { 24..26 } else { 20..22 };
            assert_eq!(&back[port.clone()], &orig[port], "pod's port: {what}");
            if cut.is_none() {
                assert_eq!(&back[20..], &orig[20..], "whole quoted L4 as sent: {what}");
            }
            assert_error_checksums(&out);
            // The translation touched nothing but the outer destination, TTL, MACs and the
            // quote.
            assert_eq!(&out[12..22], &err[12..22]);
            assert_eq!(&out[26..30], &err[26..30]);
            assert_eq!(&out[34..36], &err[34..36], "ICMP type and code");
        }
    });
}

#[test]
fn icmp_errors_a_pod_sends_about_translated_flows_leave_translated() {
    let pins = PinRoot::new("podicmp");
    let ns = NetNs::new("podicmp");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        n.dp.set_hostports(POD_A, &[udp_port(5353, 53), tcp_port(8080, 80)])
            .unwrap();
        let client = ip(10, 0, 9, 9);
        let ext = Ipv4Addr::from(INTERNET);
        // Reply of an SNATed flow: the pod's UDP socket is gone when the answer comes.
        let query = from_a(&v4(POD_A, ext, 17, &packets::udp(40000, 53, b"query")));
        let (_, sent, _) = run(&mut n.dp, FROM_POD, &query);
        let snat_port = sport_of(&sent);
        let answer = from_vpc(&v4(
            ext,
            NODE_IP,
            17,
            &packets::udp(53, snat_port, b"answer"),
        ));
        // (what arrives at the ENI, the node port the far end knows, who sent it)
        let flows = [
            (
                from_vpc(&v4(client, NODE_IP, 17, &packets::udp(999, 5353, b"q"))),
                5353,
                client,
            ),
            (
                from_vpc(&v4(client, NODE_IP, 6, &packets::tcp(40000, 8080, 0x02))),
                8080,
                client,
            ),
            (answer, snat_port, ext),
        ];
        for (arrived, node_port, peer) in flows {
            let (v, delivered, _) = run(&mut n.dp, FROM_ENI, &arrived);
            assert_eq!(v, REDIRECT);
            assert_eq!(dst_of(&delivered), POD_A);
            // Port unreachable, quoting the packet as the pod received it.
            let err = from_a(&v4(
                POD_A,
                peer,
                1,
                &packets::icmp_error(3, 3, &delivered[14..]),
            ));
            let (v, out, r) = run(&mut n.dp, FROM_POD, &err);
            let what = format!("error about {node_port} from {peer}");
            assert_eq!((v, r), (REDIRECT, reason::FWD_ICMP_ERROR_NAT), "{what}");
            assert_eq!((src_of(&out), dst_of(&out)), (NODE_IP, peer), "{what}");
            assert_eq!(ttl_of(&out), 63);
            let back = quoted(&out);
            assert_eq!(&back[12..16], &peer.octets(), "quoted source kept: {what}");
            assert_eq!(
                &back[16..20],
                &NODE_IP.octets(),
                "quoted destination: {what}"
            );
            assert_eq!(
                u16::from_be_bytes([back[22], back[23]]),
                node_port,
                "{what}"
            );
            // The quote reads as the packet the peer sent (TTL aside).
            assert_eq!(&back[20..], &arrived[34..], "quoted L4 as sent: {what}");
            assert_error_checksums(&out);
        }
        // About a flow nothing translated: routed like any packet, unchanged.
        let direct = v4(POD_B, POD_A, 17, &packets::udp(7, 9, b"x"));
        let err = from_a(&v4(POD_A, POD_B, 1, &packets::icmp_error(3, 3, &direct)));
        let (v, out, r) = run(&mut n.dp, FROM_POD, &err);
        assert_eq!((v, r), (REDIRECT, reason::FWD_LOCAL_POD));
        assert_eq!(&out[14 + 28..], &err[14 + 28..], "quote untouched");
    });
}

#[test]
fn icmp_errors_about_unknown_flows_or_cut_short_pass_unchanged() {
    let pins = PinRoot::new("icmpunk");
    let ns = NetNs::new("icmpunk");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let ext = Ipv4Addr::from(INTERNET);
        let router = ip(198, 51, 100, 1);
        let f = from_a(&v4(POD_A, ext, 17, &packets::udp(40000, 53, b"query")));
        let (_, sent, _) = run(&mut n.dp, FROM_POD, &f);
        let sent = sent[14..].to_vec();
        let unknown = v4(NODE_IP, ext, 17, &packets::udp(61234, 53, b"query"));
        let not_from_node = v4(ip(10, 0, 0, 99), ext, 17, &packets::udp(61000, 53, b"q"));
        let later_fragment = {
            let mut p = sent.clone();
            p[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
            p
        };
        let bad_ihl = {
            let mut p = sent.clone();
            p[0] = 0x43;
            p
        };
        let long_ihl = {
            let mut p = sent.clone();
            p[0] = 0x4f;
            p
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no such flow", unknown),
            ("quote not from the node", not_from_node),
            ("quoted later fragment", later_fragment),
            ("quoted IHL 3", bad_ihl[..28].to_vec()),
            ("quoted IHL past the end", long_ihl[..28].to_vec()),
            ("quoted L4 cut at 4 bytes", sent[..24].to_vec()),
            ("quoted IPv4 cut at 12 bytes", sent[..12].to_vec()),
            ("nothing quoted", vec![]),
        ];
        for (what, q) in &cases {
            let err = from_vpc(&v4(router, NODE_IP, 1, &packets::icmp_error(3, 3, q)));
            let (v, out, r) = run(&mut n.dp, FROM_ENI, &err);
            assert_eq!((v, r), (PASS, reason::PASS_ICMP_ERROR_UNKNOWN), "{what}");
            assert_eq!(&out, &err, "{what}: unchanged");
        }
        // Not an error: the kernel's, as before.
        let mut ts = vec![13, 0, 0, 0, 0, 1, 0, 1];
        ts.extend_from_slice(&[0; 12]);
        let f = from_vpc(&v4(router, NODE_IP, 1, &ts));
        let (v, out, r) = run(&mut n.dp, FROM_ENI, &f);
        assert_eq!((v, r, out), (PASS, reason::PASS_NOT_FOR_POD, f));
        // An error about a flow whose pod is gone: the kernel's.
        let err = from_vpc(&v4(router, NODE_IP, 1, &packets::icmp_error(3, 3, &sent)));
        n.dp.remove_endpoint(POD_A).unwrap();
        let (v, out, r) = run(&mut n.dp, FROM_ENI, &err);
        assert_eq!((v, r, out), (PASS, reason::PASS_NAT_STALE, err));
    });
}

/// [`run`] for the egress program: the one reason counted is an egress one.
fn run_egress(dp: &mut Dataplane, frame: &[u8]) -> (i32, Vec<u8>, u16) {
    run_egress_of(dp, TO_POD, frame)
}

/// Runs the egress program `program` on `frame`: the verdict, the frame as left, and the
/// one reason counted (egress, on ifindex 1).
fn run_egress_of(dp: &mut Dataplane, program: &'static str, frame: &[u8]) -> (i32, Vec<u8>, u16) {
    let before = dp.counters().unwrap();
    let (verdict, out) = dp.test_run_frame(program, frame).expect("test run");
    let after = dp.counters().unwrap();
    let c = |rows: &[_], r| counter_dir(rows, 1, r, direction::EGRESS).packets;
    let grew: Vec<u16> = reason::ALL
        .iter()
        .copied()
        .filter(|r| c(&after, *r) != c(&before, *r))
        .collect();
    assert_eq!(grew.len(), 1, "exactly one reason counted, got {grew:?}");
    (verdict, out, grew[0])
}

/// A frame the host stack sends to pod A through its veth.
fn to_a(p: &[u8]) -> Vec<u8> {
    packets::eth_with(A_MAC, A_HOST_MAC, packets::ETH_P_IP, p)
}

#[test]
fn host_stack_flows_are_recorded_on_egress_and_handed_back_to_the_kernel() {
    let pins = PinRoot::new("kflow");
    let ns = NetNs::new("kflow");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        let ext = Ipv4Addr::from(INTERNET);
        let vpc_client = ip(10, 0, 9, 9);
        // The host stack delivers to pod A: a NodePort client from the VPC, one from the
        // internet (kube-proxy DNAT, no SNAT), a probe from the node.
        for (src, sport) in [(vpc_client, 5000), (ext, 5001), (NODE_IP, 5002)] {
            let f = to_a(&v4(src, POD_A, 6, &packets::tcp(sport, 8080, 0x02)));
            let (v, out, r) = run_egress(&mut n.dp, &f);
            assert_eq!((v, r), (PASS, reason::PASS_KERNEL_TO_POD), "from {src}");
            assert_eq!(out, f, "unchanged");
            assert!(
                n.dp.kernel_flows()
                    .unwrap()
                    .iter()
                    .any(|(k, _)| *k == NatKey::new(be(POD_A), be(src), 8080, sport, 6)),
                "recorded from the pod's side"
            );
            // The pod's reply goes back to the kernel: not out of its ENI (VPC client),
            // not SNATed (internet), not a hostPort match.
            let reply = from_a(&v4(POD_A, src, 6, &packets::tcp(8080, sport, 0x12)));
            let (v, out, r) = run(&mut n.dp, FROM_POD, &reply);
            assert_eq!(
                (v, r, out),
                (PASS, reason::PASS_KERNEL_FLOW, reply),
                "to {src}"
            );
        }
        assert!(n.dp.nat_entries().unwrap().is_empty(), "nothing SNATed");
        // Another port of the same peer is not that flow.
        let other = from_a(&v4(POD_A, ext, 6, &packets::tcp(8081, 5001, 0x12)));
        assert_eq!(run(&mut n.dp, FROM_POD, &other).2, reason::FWD_SNAT);

        // Not this veth's pod, not IPv4, no ports: passed, nothing recorded.
        let flows = n.dp.kernel_flows().unwrap().len();
        let to_b = to_a(&v4(NODE_IP, POD_B, 6, &packets::tcp(1, 2, 0x02)));
        assert_eq!(
            run_egress(&mut n.dp, &to_b),
            (PASS, to_b, reason::PASS_IPV4_TCP)
        );
        let gre = to_a(&v4(NODE_IP, POD_A, 47, &[0u8; 8]));
        assert_eq!(
            run_egress(&mut n.dp, &gre),
            (PASS, gre, reason::PASS_IPV4_OTHER)
        );
        let arp = packets::eth(
            packets::ETH_P_ARP,
            &packets::arp_request([169, 254, 1, 1], POD_A.octets()),
        );
        assert_eq!(run_egress(&mut n.dp, &arp), (PASS, arp, reason::PASS_ARP));
        let short = to_a(&v4(NODE_IP, POD_A, 6, &packets::tcp(1, 2, 0x02))[..30]);
        assert_eq!(
            run_egress(&mut n.dp, &short),
            (PASS, short, reason::PASS_TRUNCATED_IPV4)
        );
        assert_eq!(n.dp.kernel_flows().unwrap().len(), flows);

        // Pod A to a Service: its port is marked for any peer, so the reply from the
        // backend kube-proxy chose (on another node) goes to the kernel to be un-DNATed.
        let svc = from_a(&v4(
            POD_A,
            ip(172, 20, 0, 10),
            6,
            &packets::tcp(40000, 80, 0x02),
        ));
        assert_eq!(
            run(&mut n.dp, FROM_POD, &svc).2,
            reason::PASS_PASSTHROUGH_CIDR
        );
        let backend = ip(10, 0, 3, 3);
        let back = from_vpc(&v4(backend, POD_A, 6, &packets::tcp(8080, 40000, 0x12)));
        let (v, out, r) = run(&mut n.dp, FROM_ENI, &back);
        assert_eq!((v, r, out), (PASS, reason::PASS_KERNEL_FLOW, back));
        let unrelated = from_vpc(&v4(backend, POD_A, 6, &packets::tcp(8080, 40001, 0x12)));
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &unrelated).2,
            reason::FWD_LOCAL_POD
        );
        // Same through the node address (a NodePort on this node, a host daemon).
        let node = from_a(&v4(POD_A, NODE_IP, 17, &packets::udp(40002, 30053, b"q")));
        assert_eq!(run(&mut n.dp, FROM_POD, &node).2, reason::PASS_TO_HOST);
        let back = from_vpc(&v4(backend, POD_A, 17, &packets::udp(53, 40002, b"a")));
        assert_eq!(run(&mut n.dp, FROM_ENI, &back).2, reason::PASS_KERNEL_FLOW);
        // An ICMP error about such a flow quotes the backend, not the address the pod
        // knows: the kernel's conntrack translates it, so it goes to the kernel too; one
        // about a flow of the pod's own goes straight to the pod.
        let quoted_flow = v4(POD_A, backend, 6, &packets::tcp(40000, 8080, 0x02));
        let err = from_vpc(&v4(
            backend,
            POD_A,
            1,
            &packets::icmp_error(3, 3, &quoted_flow),
        ));
        let (v, out, r) = run(&mut n.dp, FROM_ENI, &err);
        assert_eq!((v, r, out), (PASS, reason::PASS_KERNEL_FLOW, err));
        let quoted_own = v4(POD_A, backend, 6, &packets::tcp(40001, 8080, 0x02));
        let err = from_vpc(&v4(
            backend,
            POD_A,
            1,
            &packets::icmp_error(3, 3, &quoted_own),
        ));
        assert_eq!(run(&mut n.dp, FROM_ENI, &err).2, reason::FWD_LOCAL_POD);

        // Idle ones are collected.
        let far = monotonic_now_ns() + 7 * 3_600_000_000_000;
        assert!(n.dp.gc_conntrack(far).unwrap() >= 5);
        assert!(n.dp.kernel_flows().unwrap().is_empty());
    });
}

#[path = "dataplane_paths/policy.rs"]
mod policy;
