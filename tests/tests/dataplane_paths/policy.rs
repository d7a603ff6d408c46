//! NetworkPolicy in the programs, over hand-built frames: policies go through the agent's
//! compiler and set planner into the maps, as the agent writes them, and every branch of
//! the policy point is checked by its verdict and counted reason.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use vpc_ebpf_agent::policy::{
    compile::World,
    model::{PodView, Policy, TCP},
    sets::Applied,
};

use super::*;

const REMOTE: Ipv4Addr = ip(10, 0, 3, 3);
const OTHER: Ipv4Addr = ip(10, 0, 4, 4);

/// Pods of the test: A and B on this node (labelled `pod=a`/`pod=b`, namespace `x`, B
/// serving the named port `http` on 8080), and a remote pod `pod=r` at [`REMOTE`].
fn world(policies: &[serde_json::Value]) -> World {
    let pod = |name: &str, ip| PodView {
        namespace: "x".into(),
        name: name.into(),
        ip: Some(ip),
        labels: BTreeMap::from([("pod".to_owned(), name.to_owned())]).into(),
        named_ports: if name == "b" {
            vec![("http".into(), TCP, 8080)].into()
        } else {
            std::sync::Arc::default()
        },
        host_network: false,
    };
    let mut w = World::default();
    for p in [pod("a", POD_A), pod("b", POD_B), pod("r", REMOTE)] {
        w.upsert_pod(p);
    }
    w.set_namespace("x".into(), BTreeMap::new());
    for (i, spec) in policies.iter().enumerate() {
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("p{i}"), "namespace": "x"},
            "spec": spec,
        }))
        .expect("a valid policy");
        let (p, err) = Policy::from_api(&np);
        assert_eq!(err, None);
        w.upsert_policy(p);
    }
    w
}

/// Compiles `policies` for the node's pods and writes them as the agent does.
fn enforce(n: &mut Node, policies: &[serde_json::Value]) {
    let w = world(policies);
    let desired = ["a", "b"]
        .iter()
        .map(|name| {
            let p = w.pod("x", name).unwrap();
            (p.ip.unwrap(), w.compile(p).0)
        })
        .collect();
    let applied = n.dp.policy_applied().expect("read the policy maps");
    let (plan, next) = applied.plan(&desired);
    n.dp.apply_policy(&plan).expect("apply");
    assert_eq!(
        n.dp.policy_applied().expect("read back"),
        next,
        "the maps hold what was planned"
    );
}

fn policy_node(ns: &NetNs, pins: &PinRoot) -> Node {
    let mut n = node(ns, pins);
    ns.run(|| {
        n.dp.set_node(&NodeSpec {
            network_policy: true,
            ..node_spec(n.eni0)
        })
        .expect("set_node");
    });
    n
}

/// Runs `f` on a node with NetworkPolicy on, in a namespace and pin root of its own.
fn on_policy_node(tag: &str, f: impl FnOnce(&mut Node) + Send) {
    let pins = PinRoot::new(tag);
    let ns = NetNs::new(tag);
    let mut n = policy_node(&ns, &pins);
    ns.run(|| f(&mut n));
}

fn tcp_from_vpc(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    from_vpc(&v4(src, dst, 6, &packets::tcp(sport, dport, flags)))
}

fn tcp_from_a(dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    from_a(&v4(POD_A, dst, 6, &packets::tcp(sport, dport, flags)))
}

#[test]
fn without_the_flag_policies_are_not_judged() {
    let pins = PinRoot::new("pol-off");
    let ns = NetNs::new("pol-off");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        enforce(
            &mut n,
            &[serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})],
        );
        let (v, _, r) = run(&mut n.dp, FROM_POD, &tcp_from_a(POD_B, 4000, 80, SYN));
        assert_eq!((v, r), (REDIRECT, reason::FWD_LOCAL_POD));
    });
}

#[test]
fn the_eni_egress_program_runs_only_with_policy_on() {
    let pins = PinRoot::new("pol-eni");
    let ns = NetNs::new("pol-eni");
    let mut n = node(&ns, &pins);
    ns.run(|| {
        assert!(
            !n.dp.eni_egress_attached(n.eni0),
            "policy off: not attached"
        );
        let on = NodeSpec {
            network_policy: true,
            ..node_spec(n.eni0)
        };
        n.dp.set_node(&on).expect("set_node");
        assert!(n.dp.eni_egress_attached(n.eni0), "switched on: attached");
        n.dp.set_node(&node_spec(n.eni0)).expect("set_node");
        assert!(!n.dp.eni_egress_attached(n.eni0), "switched off: detached");
    });
}

#[test]
fn ingress_admits_by_peer_and_port_and_drops_the_rest() {
    on_policy_node("pol-in", |n| {
        // B admits the remote pod on its named port and 10.0.3.0/24 but .3 on 9000-9100.
        enforce(
            n,
            &[serde_json::json!({
                "podSelector": {"matchLabels": {"pod": "b"}},
                "ingress": [
                    {"from": [{"podSelector": {"matchLabels": {"pod": "r"}}}], "ports": [{"port": "http"}]},
                    {"from": [{"ipBlock": {"cidr": "10.0.3.0/24", "except": ["10.0.3.3/32"]}}],
                     "ports": [{"port": 9000, "endPort": 9100}]},
                ],
            })],
        );
        for (src, dport, want) in [
            (REMOTE, 8080, reason::FWD_LOCAL_POD),
            (REMOTE, 80, reason::DROP_POLICY_INGRESS),
            (REMOTE, 9000, reason::DROP_POLICY_INGRESS),
            (ip(10, 0, 3, 4), 9050, reason::FWD_LOCAL_POD),
            (ip(10, 0, 3, 4), 9101, reason::DROP_POLICY_INGRESS),
            (ip(10, 0, 3, 4), 8080, reason::DROP_POLICY_INGRESS),
            (OTHER, 8080, reason::DROP_POLICY_INGRESS),
        ] {
            let (v, _, r) = run(
                &mut n.dp,
                FROM_ENI,
                &tcp_from_vpc(src, POD_B, 5000, dport, SYN),
            );
            assert_eq!(r, want, "{src} -> B:{dport}");
            assert_eq!(
                v,
                if want == reason::FWD_LOCAL_POD {
                    REDIRECT
                } else {
                    DROP
                }
            );
        }
        // A (same node) is no admitted peer of B; A itself is not isolated.
        let (v, _, r) = run(&mut n.dp, FROM_POD, &tcp_from_a(POD_B, 4000, 8080, SYN));
        assert_eq!((v, r), (DROP, reason::DROP_POLICY_INGRESS));
        let (v, _, r) = run(
            &mut n.dp,
            FROM_ENI,
            &tcp_from_vpc(OTHER, POD_A, 5000, 22, SYN),
        );
        assert_eq!((v, r), (REDIRECT, reason::FWD_LOCAL_POD));
        // UDP to the named TCP port is not admitted.
        let u = from_vpc(&v4(REMOTE, POD_B, 17, &packets::udp(5000, 8080, b"x")));
        assert_eq!(run(&mut n.dp, FROM_ENI, &u).2, reason::DROP_POLICY_INGRESS);
    });
}

#[test]
fn replies_of_admitted_connections_pass_both_ways() {
    on_policy_node("pol-reply", |n| {
        // A: nothing in; out only to the remote pod on 80.
        enforce(
            n,
            &[serde_json::json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "policyTypes": ["Ingress", "Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.0.3.3/32"}}], "ports": [{"port": 80}]}],
            })],
        );
        let (v, _, r) = run(&mut n.dp, FROM_POD, &tcp_from_a(REMOTE, 4000, 80, SYN));
        assert_eq!((v, r), (REDIRECT, reason::FWD_ENI));
        // Its reply comes in through the ENI: admitted although A admits nothing in.
        let reply = tcp_from_vpc(REMOTE, POD_A, 80, 4000, SYN_ACK);
        assert_eq!(run(&mut n.dp, FROM_ENI, &reply).2, reason::FWD_LOCAL_POD);
        assert_eq!(
            run(&mut n.dp, FROM_POD, &tcp_from_a(REMOTE, 4000, 80, ACK)).2,
            reason::FWD_ENI
        );
        // The remote pod opening its own connection to A is denied, as is A reaching
        // another port or peer.
        let syn = tcp_from_vpc(REMOTE, POD_A, 80, 4001, SYN);
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &syn).2,
            reason::DROP_POLICY_INGRESS
        );
        for (dst, port) in [(REMOTE, 81), (OTHER, 80)] {
            assert_eq!(
                run(&mut n.dp, FROM_POD, &tcp_from_a(dst, 4002, port, SYN)).2,
                reason::DROP_POLICY_EGRESS,
                "{dst}:{port}"
            );
        }
        // ICMP echo: a rule with ports does not admit it; its errors always pass.
        let echo = from_a(&v4(POD_A, REMOTE, 1, &packets::icmp_echo(9, 1)));
        assert_eq!(
            run(&mut n.dp, FROM_POD, &echo).2,
            reason::DROP_POLICY_EGRESS
        );
        let quoted = v4(POD_A, REMOTE, 17, &packets::udp(4000, 53, b""));
        let err = from_vpc(&v4(REMOTE, POD_A, 1, &packets::icmp_error(3, 3, &quoted)));
        assert_eq!(run(&mut n.dp, FROM_ENI, &err).2, reason::FWD_LOCAL_POD);
    });
}

#[test]
fn a_policy_change_cuts_the_flows_it_now_denies_and_keeps_the_others() {
    on_policy_node("pol-change", |n| {
        // Two flows into B, opened with no policy at all.
        for sport in [5000, 5001] {
            let src = if sport == 5000 { REMOTE } else { OTHER };
            let syn = tcp_from_vpc(src, POD_B, sport, 8080, SYN);
            assert_eq!(run(&mut n.dp, FROM_ENI, &syn).2, reason::FWD_LOCAL_POD);
        }
        // Now B admits the remote pod only.
        enforce(
            n,
            &[serde_json::json!({
                "podSelector": {"matchLabels": {"pod": "b"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "r"}}}]}],
            })],
        );
        let kept = tcp_from_vpc(REMOTE, POD_B, 5000, 8080, ACK);
        assert_eq!(run(&mut n.dp, FROM_ENI, &kept).2, reason::FWD_LOCAL_POD);
        let cut = tcp_from_vpc(OTHER, POD_B, 5001, 8080, ACK);
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &cut).2,
            reason::DROP_POLICY_REVOKED
        );
        // Cut for good: its later segments are not taken for replies of a connection
        // B opened (B may send anywhere).
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &cut).2,
            reason::DROP_POLICY_REVOKED
        );
        // Back to no policy: the flow is admitted again.
        enforce(n, &[]);
        assert_eq!(run(&mut n.dp, FROM_ENI, &cut).2, reason::FWD_LOCAL_POD);
        assert_eq!(
            n.dp.policy_applied().unwrap(),
            Applied::default(),
            "no sets or pods left in the maps"
        );
    });
}

#[test]
fn mid_stream_segments_are_admitted_only_as_replies_of_admitted_openings() {
    on_policy_node("pol-mid", |n| {
        // A admits nothing in and may send to the remote pod (its egress not isolated
        // but for nothing else: a flow opened before tracking comes back mid-stream).
        enforce(
            n,
            &[serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}}})],
        );
        let ack = tcp_from_vpc(REMOTE, POD_A, 80, 4100, ACK);
        assert_eq!(run(&mut n.dp, FROM_ENI, &ack).2, reason::FWD_LOCAL_POD);
        let syn = tcp_from_vpc(REMOTE, POD_A, 80, 4101, SYN);
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &syn).2,
            reason::DROP_POLICY_INGRESS
        );
        // UDP has no such thing.
        let u = from_vpc(&v4(REMOTE, POD_A, 17, &packets::udp(53, 4102, b"x")));
        assert_eq!(run(&mut n.dp, FROM_ENI, &u).2, reason::DROP_POLICY_INGRESS);
        // Once the window after policy was switched on has passed, an untracked segment
        // is judged in its own direction: A admits nothing in, whatever it may send.
        n.dp.set_mid_stream_until(0).expect("close the window");
        let ack = tcp_from_vpc(REMOTE, POD_A, 80, 4103, ACK);
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &ack).2,
            reason::DROP_POLICY_INGRESS
        );
    });
}

#[test]
fn the_node_always_reaches_its_pods_and_services_are_judged_after_translation() {
    on_policy_node("pol-node", |n| {
        // A admits nothing in; B may send nowhere.
        enforce(
            n,
            &[
                serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
                serde_json::json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"]}),
            ],
        );
        // A kubelet probe from the node address, through the host stack.
        let probe = to_a(&v4(NODE_IP, POD_A, 6, &packets::tcp(6000, 8080, SYN)));
        assert_eq!(run_egress(&mut n.dp, &probe).2, reason::PASS_KERNEL_TO_POD);
        // A NodePort client from the internet after kube-proxy's DNAT: A's ingress.
        let ext = to_a(&v4(
            Ipv4Addr::from(INTERNET),
            POD_A,
            6,
            &packets::tcp(6001, 8080, SYN),
        ));
        assert_eq!(run_egress(&mut n.dp, &ext).2, reason::DROP_POLICY_INGRESS);
        // B reaching a Service whose backend is A: after DNAT, B's egress and A's
        // ingress are both judged against A.
        let via_service = to_a(&v4(POD_B, POD_A, 6, &packets::tcp(6002, 8080, SYN)));
        assert_eq!(
            run_egress(&mut n.dp, &via_service).2,
            reason::DROP_POLICY_EGRESS
        );
        // A itself reaching a ClusterIP is left to the host stack, judged after it.
        let to_service = tcp_from_a(ip(172, 20, 0, 10), 4200, 80, SYN);
        assert_eq!(
            run(&mut n.dp, FROM_POD, &to_service).2,
            reason::PASS_PASSTHROUGH_CIDR
        );
        // The Service's answer reaches A after un-DNAT (from the ClusterIP): a reply.
        let answer = to_a(&v4(
            ip(172, 20, 0, 10),
            POD_A,
            6,
            &packets::tcp(80, 4200, SYN_ACK),
        ));
        assert_eq!(run_egress(&mut n.dp, &answer).2, reason::PASS_KERNEL_TO_POD);
    });
}

#[test]
fn later_fragments_and_portless_protocols_are_judged_by_protocol() {
    on_policy_node("pol-frag", |n| {
        // B admits UDP (every port) and TCP 80 from anyone.
        enforce(
            n,
            &[serde_json::json!({
                "podSelector": {"matchLabels": {"pod": "b"}},
                "ingress": [{"ports": [{"protocol": "UDP"}, {"port": 80}]}],
            })],
        );
        let frag = |proto| {
            let mut p = packets::ipv4(
                &Ipv4 {
                    frag: 0x0010,
                    proto,
                    src: REMOTE.octets(),
                    dst: POD_B.octets(),
                    ..Ipv4::default()
                },
                &[0u8; 24],
            );
            p[8] = 64;
            from_vpc(&p)
        };
        assert_eq!(run(&mut n.dp, FROM_ENI, &frag(17)).2, reason::FWD_LOCAL_POD);
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &frag(6)).2,
            reason::DROP_POLICY_INGRESS
        );
        let gre = from_vpc(&v4(REMOTE, POD_B, 47, &[0u8; 8]));
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &gre).2,
            reason::DROP_POLICY_INGRESS
        );
    });
}

#[test]
fn later_fragments_follow_the_verdict_of_their_first_fragment() {
    on_policy_node("pol-frag2", |n| {
        // B admits UDP 53 alone.
        enforce(
            n,
            &[serde_json::json!({
                "podSelector": {"matchLabels": {"pod": "b"}},
                "ingress": [{"ports": [{"protocol": "UDP", "port": 53}]}],
            })],
        );
        let piece = |src: Ipv4Addr, id, frag, l4: &[u8]| {
            from_vpc(&packets::ipv4(
                &Ipv4 {
                    frag,
                    id,
                    proto: 17,
                    src: src.octets(),
                    dst: POD_B.octets(),
                    ..Ipv4::default()
                },
                l4,
            ))
        };
        // More fragments, offset 0: the first; offset 3 (24 bytes): a later one.
        let (first, later) = (0x2000, 0x0003);
        let to = |port| packets::udp(5000, port, &[0u8; 16]);
        let mut verdict = |p: Vec<u8>| run(&mut n.dp, FROM_ENI, &p).2;
        assert_eq!(
            verdict(piece(REMOTE, 7, first, &to(53))),
            reason::FWD_LOCAL_POD
        );
        assert_eq!(
            verdict(piece(REMOTE, 7, later, &[0u8; 24])),
            reason::FWD_LOCAL_POD,
            "the rest of an admitted datagram passes"
        );
        assert_eq!(
            verdict(piece(REMOTE, 8, first, &to(54))),
            reason::DROP_POLICY_INGRESS
        );
        assert_eq!(
            verdict(piece(REMOTE, 8, later, &[0u8; 24])),
            reason::DROP_POLICY_INGRESS,
            "the rest of a denied datagram is denied"
        );
        assert_eq!(
            verdict(piece(OTHER, 7, later, &[0u8; 24])),
            reason::DROP_POLICY_INGRESS,
            "the same identification from another source is another datagram"
        );
        assert_eq!(
            verdict(piece(REMOTE, 9, later, &[0u8; 24])),
            reason::DROP_POLICY_INGRESS,
            "a fragment whose first was never seen is judged on its own"
        );
    });
}

#[test]
fn sctp_is_judged_by_its_ports_and_its_replies_pass() {
    on_policy_node("pol-sctp", |n| {
        // A is isolated both ways and admits SCTP 9000 in, nothing out.
        enforce(
            n,
            &[serde_json::json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"ports": [{"protocol": "SCTP", "port": 9000}]}],
            })],
        );
        // The SCTP common header: ports, verification tag, checksum.
        let sctp = |sport: u16, dport: u16| {
            let mut h = Vec::from(sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&[0u8; 8]);
            h
        };
        let to_a = |dport| from_vpc(&v4(REMOTE, POD_A, 132, &sctp(5000, dport)));
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &to_a(9000)).2,
            reason::FWD_LOCAL_POD
        );
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &to_a(9001)).2,
            reason::DROP_POLICY_INGRESS
        );
        assert_eq!(
            run(
                &mut n.dp,
                FROM_ENI,
                &tcp_from_vpc(REMOTE, POD_A, 5000, 9000, SYN)
            )
            .2,
            reason::DROP_POLICY_INGRESS,
            "TCP to the SCTP port"
        );
        // A's answers on the admitted association pass; A opening one of its own does not.
        let from_a_to = |sport, dport| from_a(&v4(POD_A, REMOTE, 132, &sctp(sport, dport)));
        assert_ne!(
            run(&mut n.dp, FROM_POD, &from_a_to(9000, 5000)).2,
            reason::DROP_POLICY_EGRESS
        );
        assert_eq!(
            run(&mut n.dp, FROM_POD, &from_a_to(9000, 5001)).2,
            reason::DROP_POLICY_EGRESS
        );
    });
}

/// Runs the ENI egress program: the verdict and the one reason counted.
fn run_to_eni(dp: &mut Dataplane, frame: &[u8]) -> (i32, u16) {
    let (verdict, _, r) = run_egress_of(dp, TO_ENI, frame);
    (verdict, r)
}

#[test]
fn a_service_backend_on_another_node_is_judged_as_the_senders_egress_on_the_way_out() {
    on_policy_node("pol-svc", |n| {
        // A may send to the remote pod only.
        enforce(
            n,
            &[serde_json::json!({
                "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "r"}}}]}],
            })],
        );
        // A asks two ClusterIPs; the host stack takes both flows.
        for sport in [4300, 4301] {
            let to_service = tcp_from_a(ip(172, 20, 0, 10), sport, 80, SYN);
            assert_eq!(
                run(&mut n.dp, FROM_POD, &to_service).2,
                reason::PASS_PASSTHROUGH_CIDR
            );
        }
        // kube-proxy picked backends on other nodes: the remote pod is admitted, another
        // address is not.
        let to_remote = from_a(&v4(POD_A, REMOTE, 6, &packets::tcp(4300, 8080, SYN)));
        assert_eq!(
            run_to_eni(&mut n.dp, &to_remote),
            (PASS, reason::PASS_TO_VPC)
        );
        let to_other = from_a(&v4(POD_A, OTHER, 6, &packets::tcp(4301, 8080, SYN)));
        assert_eq!(
            run_to_eni(&mut n.dp, &to_other),
            (DROP, reason::DROP_POLICY_EGRESS)
        );
        // What the programs sent on themselves (no kernel flow) is not judged again, and
        // neither is the node's own traffic.
        let direct = from_a(&v4(POD_A, OTHER, 6, &packets::tcp(4302, 8080, SYN)));
        assert_eq!(run_to_eni(&mut n.dp, &direct), (PASS, reason::PASS_TO_VPC));
        let node = from_a(&v4(NODE_IP, OTHER, 6, &packets::tcp(4300, 8080, SYN)));
        assert_eq!(run_to_eni(&mut n.dp, &node), (PASS, reason::PASS_TO_VPC));
    });
}

#[test]
fn a_pod_cannot_plant_a_connection_for_another_pod() {
    on_policy_node("pol-spoof", |n| {
        // B admits nothing in; the window for untracked replies has passed.
        enforce(
            n,
            &[serde_json::json!({"podSelector": {"matchLabels": {"pod": "b"}}})],
        );
        n.dp.set_mid_stream_until(0).expect("close the window");
        // A, claiming to be B, opens a connection to the remote pod...
        let spoofed = from_a(&v4(POD_B, REMOTE, 6, &packets::tcp(80, 5000, SYN)));
        assert_eq!(
            run(&mut n.dp, FROM_POD, &spoofed).2,
            reason::DROP_SPOOFED_IP
        );
        // ...so that the remote pod's "replies" would reach B: they do not.
        for flags in [SYN_ACK, ACK] {
            let f = tcp_from_vpc(REMOTE, POD_B, 5000, 80, flags);
            assert_eq!(
                run(&mut n.dp, FROM_ENI, &f).2,
                reason::DROP_POLICY_INGRESS,
                "flags {flags:#x}"
            );
        }
    });
}

#[test]
fn verdicts_reach_user_space_as_events_named_by_pod_and_policy() {
    use vpc_ebpf_agent::policy::flows::Describer;
    use vpc_ebpf_common::policy::{PolicyEvent, ends, verdict};

    on_policy_node("pol-events", |n| {
        let mut events = n.dp.take_policy_events().expect("the events ring buffer");
        let admit_r = serde_json::json!({
            "podSelector": {"matchLabels": {"pod": "b"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "r"}}}], "ports": [{"port": "http"}]}],
        });
        enforce(n, std::slice::from_ref(&admit_r));
        let syn = tcp_from_vpc(REMOTE, POD_B, 5000, 8080, SYN);
        assert_eq!(run(&mut n.dp, FROM_ENI, &syn).2, reason::FWD_LOCAL_POD);
        let denied = tcp_from_vpc(REMOTE, POD_B, 5001, 80, SYN);
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &denied).2,
            reason::DROP_POLICY_INGRESS
        );
        // Traffic no rule judges (A is not isolated, the remote pod is not ours) costs no
        // event.
        let free = tcp_from_a(REMOTE, 6000, 80, SYN);
        assert_eq!(run(&mut n.dp, FROM_POD, &free).2, reason::FWD_ENI);
        // The admitted flow, revoked: one event, not one per packet.
        let isolate_b =
            serde_json::json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": []});
        enforce(n, std::slice::from_ref(&isolate_b));
        let ack = tcp_from_vpc(REMOTE, POD_B, 5000, 8080, ACK);
        for _ in 0..3 {
            assert_eq!(
                run(&mut n.dp, FROM_ENI, &ack).2,
                reason::DROP_POLICY_REVOKED
            );
        }

        let mut got: Vec<PolicyEvent> = Vec::new();
        events.drain(&mut got);
        assert_eq!(events.lost().unwrap(), 0);
        let seen: Vec<(u8, u16, u16, u8)> = got
            .iter()
            .map(|e| (e.verdict, e.sport, e.dport, e.ends))
            .collect();
        assert_eq!(
            seen,
            vec![
                (verdict::ALLOW, 5000, 8080, ends::DST_LOCAL),
                (verdict::DENY, 5001, 80, ends::DST_LOCAL),
                (verdict::REVOKE, 5000, 8080, ends::DST_LOCAL),
            ]
        );
        assert!(
            got.iter()
                .all(|e| e.src == u32::from(REMOTE).to_be() && e.proto == 6)
        );
        assert_eq!(got[1].reason, reason::DROP_POLICY_INGRESS);
        assert!(got[0].ts_ns > 0 && got[0].ts_ns <= got[2].ts_ns);

        // As the agent describes them: by pod and by policy.
        let (w, mut d) = (world(&[admit_r]), Describer::default());
        let allow = d.describe(&w, &got[0], 0);
        assert_eq!(
            (
                allow.src.pod.as_deref(),
                allow.dst.pod.as_deref(),
                allow.dst.port
            ),
            (Some("r"), Some("b"), Some(8080))
        );
        assert_eq!(allow.judged[0].direction, "ingress");
        assert_eq!(allow.judged[0].policies, vec!["x/p0".to_owned()]);
        let deny = d.describe(&w, &got[1], 0);
        assert_eq!(
            (deny.verdict.as_str(), deny.judged[0].policies.clone()),
            ("deny", vec!["x/p0".to_owned()])
        );
    });
}

/// B admits 600 single addresses of 10.9.0.0/16 (`extra` of them more): a set as big as
/// a team's monitoring pods.
fn many_peers(extra: usize) -> serde_json::Value {
    let from: Vec<serde_json::Value> = (0..600 + extra)
        .map(|i| {
            let a = ip(
                10,
                9,
                u8::try_from(i / 250).unwrap(),
                u8::try_from(i % 250).unwrap(),
            );
            serde_json::json!({"ipBlock": {"cidr": format!("{a}/32")}})
        })
        .collect();
    serde_json::json!({
        "podSelector": {"matchLabels": {"pod": "b"}},
        "ingress": [{"from": from, "ports": [{"port": 8080}]}],
    })
}

#[test]
fn big_rule_sets_are_written_amended_and_removed_whole() {
    on_policy_node("pol-batch", |n| {
        let syn = |src| tcp_from_vpc(src, POD_B, 5000, 8080, SYN);
        let newcomer = ip(10, 9, 2, 100);
        // Written in one go (`enforce` reads every entry back).
        enforce(n, &[many_peers(0)]);
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &syn(ip(10, 9, 1, 7))).2,
            reason::FWD_LOCAL_POD
        );
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &syn(newcomer)).2,
            reason::DROP_POLICY_INGRESS
        );
        // One peer more: the set is amended in place.
        let before = n.dp.policy_applied().unwrap();
        enforce(n, &[many_peers(1)]);
        let after = n.dp.policy_applied().unwrap();
        assert_eq!(
            before.sets.keys().collect::<Vec<_>>(),
            after.sets.keys().collect::<Vec<_>>(),
            "the same set, amended"
        );
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &syn(newcomer)).2,
            reason::FWD_LOCAL_POD
        );
        // Removal goes on past entries that are not there: a plan made from a stale view
        // (peers in the middle of the set that were never written) still removes the rest.
        let mut plan = vpc_ebpf_agent::policy::sets::Plan {
            pods_removed: after.pods.keys().copied().collect(),
            ..Default::default()
        };
        for (id, (dir, set)) in &after.sets {
            let mut stale = (**set).clone();
            for absent in [
                "10.8.0.0/24",
                "10.9.1.251/32",
                "10.9.1.252/32",
                "10.9.9.9/32",
            ] {
                stale.insert(absent.parse().unwrap(), Vec::new());
            }
            plan.dead_sets.push((*id, *dir, std::sync::Arc::new(stale)));
        }
        n.dp.apply_policy(&plan)
            .expect("removal with absent entries");
        assert_eq!(n.dp.policy_applied().unwrap(), Applied::default());
        assert_eq!(
            run(&mut n.dp, FROM_ENI, &syn(ip(10, 9, 1, 7))).2,
            reason::FWD_LOCAL_POD
        );
    });
}
