//! Compiler tests on Kubernetes' own e2e topology (namespaces x, y, z; pods a, b, c in
//! each; TCP and UDP servers on 80 and 81 with named ports), each checked as a
//! reachability truth table through the flattened rules, looked up as the kernel does
//! (longest prefix, then the ranges).

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use vpc_ebpf_common::policy::PortRules;

use super::*;
use crate::policy::model::{TCP, UDP};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn ip_of(ns: u8, pod: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1 + ns, 10 + pod)
}

fn world(policies: &[serde_json::Value]) -> World {
    let mut w = World::default();
    for (i, ns) in (0u8..).zip(NAMESPACES) {
        w.set_namespace(
            (*ns).to_owned(),
            BTreeMap::from([("ns".to_owned(), (*ns).to_owned())]),
        );
        for (j, pod) in (0u8..).zip(PODS) {
            w.upsert_pod(PodView {
                namespace: (*ns).to_owned(),
                name: (*pod).to_owned(),
                ip: Some(ip_of(i, j)),
                labels: BTreeMap::from([("pod".to_owned(), (*pod).to_owned())]).into(),
                named_ports: vec![
                    ("serve-80-tcp".into(), TCP, 80),
                    ("serve-80-udp".into(), UDP, 80),
                    ("serve-81-tcp".into(), TCP, 81),
                    ("serve-81-udp".into(), UDP, 81),
                ]
                .into(),
                host_network: false,
            });
        }
    }
    for p in policies {
        let np: NetworkPolicy = serde_json::from_value(p.clone()).expect("a valid policy");
        let (pol, err) = Policy::from_api(&np);
        assert_eq!(err, None);
        w.upsert_policy(pol);
    }
    w
}

/// Pod `i` of the topology (x/a, x/b, x/c, y/a, ...).
fn nth(w: &World, i: usize) -> &PodView {
    w.pod(NAMESPACES[i / 3], PODS[i % 3])
        .expect("a topology pod")
}

/// Changes pod `i` of the topology.
fn change(w: &mut World, i: usize, f: impl FnOnce(&mut PodView)) {
    let mut p = nth(w, i).clone();
    f(&mut p);
    w.upsert_pod(p);
}

/// The kernel's lookup: the longest prefix containing `peer`, then its ranges.
fn admits(set: &RuleSet, peer: Ipv4Addr, proto: u8, port: u16) -> bool {
    let Some((_, ranges)) = set
        .iter()
        .filter(|(net, _)| net.contains(&peer))
        .max_by_key(|(net, _)| net.prefix_len())
    else {
        return false;
    };
    let mut r = PortRules {
        count: u32::try_from(ranges.len()).expect("a short list"),
        ..Default::default()
    };
    r.ranges[..ranges.len()].copy_from_slice(ranges);
    r.admits(proto, Some(port))
}

/// Whether `from` may open a connection to `to` on (proto, port), under the rules both
/// compile to: the source's egress and the destination's ingress.
fn reach(w: &World, from: (usize, usize), to: (usize, usize), proto: u8, port: u16) -> bool {
    if from == to {
        // A pod reaching its own address never leaves its namespace (loopback), as the
        // upstream e2e allows.
        return true;
    }
    let pod = |(n, p): (usize, usize)| nth(w, n * 3 + p);
    let (src, dst) = (pod(from), pod(to));
    let (src_rules, _) = w.compile(src);
    let (dst_rules, _) = w.compile(dst);
    let ok_out = src_rules
        .egress
        .as_ref()
        .is_none_or(|s| admits(s, dst.ip.unwrap(), proto, port));
    let ok_in = dst_rules
        .ingress
        .as_ref()
        .is_none_or(|s| admits(s, src.ip.unwrap(), proto, port));
    ok_out && ok_in
}

/// The truth table over the 9 pods for (proto, port): a string of 81 '.'/'X'
/// (reachable/not), rows = sources x/a..z/c, columns = destinations.
fn table(w: &World, proto: u8, port: u16) -> Vec<String> {
    let all: Vec<(usize, usize)> = (0..3).flat_map(|n| (0..3).map(move |p| (n, p))).collect();
    all.iter()
        .map(|&from| {
            all.iter()
                .map(|&to| {
                    if reach(w, from, to, proto, port) {
                        '.'
                    } else {
                        'X'
                    }
                })
                .collect()
        })
        .collect()
}

/// Expected table where `ok(from, to)` says which pairs are reachable.
fn expect(ok: impl Fn((usize, usize), (usize, usize)) -> bool) -> Vec<String> {
    let ok = |from, to| from == to || ok(from, to);
    let all: Vec<(usize, usize)> = (0..3).flat_map(|n| (0..3).map(move |p| (n, p))).collect();
    all.iter()
        .map(|&from| {
            all.iter()
                .map(|&to| if ok(from, to) { '.' } else { 'X' })
                .collect()
        })
        .collect()
}

fn np(name: &str, ns: &str, spec: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

const X: usize = 0;
const Y: usize = 1;
const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

#[test]
fn no_policy_everything_reaches_everything() {
    let w = world(&[]);
    assert_eq!(table(&w, TCP, 80), expect(|_, _| true));
}

#[test]
fn deny_all_ingress_in_x() {
    let w = world(&[np("deny", "x", &serde_json::json!({"podSelector": {}}))]);
    // No ingress rules: x's pods isolated, admitting nothing.
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| to.0 != X || from == to)
    );
}

#[test]
fn allow_all_ingress_with_an_empty_rule() {
    let w = world(&[np(
        "allow",
        "x",
        &serde_json::json!({"podSelector": {}, "ingress": [{}]}),
    )]);
    assert_eq!(table(&w, TCP, 80), expect(|_, _| true));
}

#[test]
fn deny_all_egress_in_x() {
    let w = world(&[np(
        "deny",
        "x",
        &serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    )]);
    assert_eq!(table(&w, TCP, 80), expect(|from, _| from.0 != X));
}

#[test]
fn egress_rules_default_the_egress_type() {
    // No policyTypes, egress rules given: Ingress and Egress both isolate.
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )]);
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| {
            if from == (X, A) {
                to == (X, B)
            } else {
                to != (X, A)
            }
        })
    );
}

#[test]
fn ingress_from_pods_of_the_same_namespace() {
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )]);
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| to != (X, A) || from == (X, B))
    );
}

#[test]
fn ingress_from_namespaces_by_label() {
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    )]);
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| to != (X, A) || from.0 == Y)
    );
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_and() {
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                                  "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )]);
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| to != (X, A) || from == (Y, B))
    );
}

#[test]
fn namespace_and_pod_selector_in_two_peers_is_or() {
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                                                 {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    )]);
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| to != (X, A) || from.0 == Y || from == (X, B))
    );
}

#[test]
fn empty_namespace_selector_is_every_namespace() {
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"from": [{"namespaceSelector": {},
                                                  "podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
    )]);
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| to != (X, A) || from.1 == C)
    );
}

#[test]
fn match_expressions() {
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
                           "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}]}),
    )]);
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| !(to == (X, A) || to == (X, B)) || from.0 != X)
    );
}

#[test]
fn ports_numbered_and_named_per_protocol() {
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"ports": [{"port": 80}, {"protocol": "UDP", "port": "serve-81-udp"}]}]}),
    )]);
    let open = |from: (usize, usize), to| from == from && to != (X, A);
    assert_eq!(table(&w, TCP, 80), expect(|_, _| true));
    assert_eq!(table(&w, TCP, 81), expect(open));
    assert_eq!(table(&w, UDP, 80), expect(open));
    assert_eq!(table(&w, UDP, 81), expect(|_, _| true));
}

#[test]
fn named_egress_ports_resolve_on_each_destination() {
    let mut w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                           "egress": [{"ports": [{"port": "web"}]}]}),
    )]);
    // Only y/b serves "web", on 81.
    change(&mut w, Y * 3 + B, |p| {
        let mut ports = p.named_ports.to_vec();
        ports.push(("web".into(), TCP, 81));
        p.named_ports = ports.into();
    });
    assert_eq!(
        table(&w, TCP, 81),
        expect(|from, to| from != (X, A) || to == (Y, B))
    );
    assert_eq!(table(&w, TCP, 80), expect(|from, _| from != (X, A)));
}

#[test]
fn end_port_ranges() {
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "endPort": 90}]}]}),
    )]);
    assert_eq!(table(&w, TCP, 80), expect(|_, to| to.0 != X));
    assert_eq!(table(&w, TCP, 81), expect(|_, _| true));
}

#[test]
fn ip_block_with_except_also_matches_pods() {
    // 10.0.0.0/16 except y's /24: every pod but y's.
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}}]}]}),
    )]);
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| to != (X, A) || from.0 != Y)
    );
}

#[test]
fn an_ipv6_block_matches_no_pod_and_leaves_the_rest_of_the_policy_alone() {
    // Written for dual stack: x/a reaches 0.0.0.0/0 and ::/0; x/b reaches ::/0 alone.
    let w = world(&[
        np(
            "dual",
            "x",
            &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                               "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]}]}),
        ),
        np(
            "v6",
            "x",
            &serde_json::json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
                               "egress": [{"to": [{"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8::/64"]}}]}]}),
        ),
    ]);
    assert_eq!(table(&w, TCP, 80), expect(|from, _| from != (X, B)));
    let (pol, err) = Policy::from_api(
        &serde_json::from_value(np(
            "v6",
            "x",
            &serde_json::json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "::/0"}}]}]}),
        ))
        .unwrap(),
    );
    assert_eq!(err, None, "an IPv6 block is no error");
    assert_eq!(pol.egress.map(|r| r.len()), Some(1));
}

#[test]
fn an_except_hole_is_filled_by_another_rule_for_its_ports_only() {
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}}]},
                                       {"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                                  "podSelector": {"matchLabels": {"pod": "c"}}}],
                                        "ports": [{"port": 81}]}]}),
    )]);
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| to != (X, A) || from.0 != Y)
    );
    assert_eq!(
        table(&w, TCP, 81),
        expect(|from, to| to != (X, A) || from.0 != Y || from == (Y, C))
    );
}

#[test]
fn policies_add_up() {
    let w = world(&[
        np(
            "deny",
            "x",
            &serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
        np(
            "a-from-b",
            "x",
            &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        ),
        np(
            "b-to-a",
            "x",
            &serde_json::json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
                               "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        ),
    ]);
    // Everything into or out of x is denied but x/b → x/a.
    assert_eq!(
        table(&w, TCP, 80),
        expect(|from, to| (from.0 != X && to.0 != X) || (from == (X, B) && to == (X, A)))
    );
}

#[test]
fn policy_is_per_pod_labels_not_name_prefix() {
    let mut w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}}),
    )]);
    w.upsert_pod(PodView {
        namespace: "x".into(),
        name: "web-1".into(),
        ip: Some(Ipv4Addr::new(10, 0, 1, 50)),
        labels: BTreeMap::from([("app".into(), "web".into())]).into(),
        ..Default::default()
    });
    w.upsert_pod(PodView {
        namespace: "x".into(),
        name: "web-1-canary".into(),
        ip: Some(Ipv4Addr::new(10, 0, 1, 51)),
        labels: BTreeMap::from([("app".into(), "web-canary".into())]).into(),
        ..Default::default()
    });
    assert!(w.compile(w.pod("x", "web-1").unwrap()).0.ingress.is_some());
    assert!(
        w.compile(w.pod("x", "web-1-canary").unwrap())
            .0
            .ingress
            .is_none()
    );
}

#[test]
fn host_network_pods_and_pods_without_address_are_no_peers() {
    let mut w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"from": [{"podSelector": {}}]}]}),
    )]);
    change(&mut w, B, |p| p.host_network = true);
    change(&mut w, C, |p| p.ip = None);
    let (rules, _) = w.compile(nth(&w, A));
    let ingress = rules.ingress.expect("isolated");
    assert!(ingress.keys().all(|n| n.prefix_len() == 32));
    assert_eq!(ingress.len(), 1, "x/a itself only: {ingress:?}");
}

#[test]
fn other_namespaces_policies_do_not_select() {
    let w = world(&[np("deny", "y", &serde_json::json!({"podSelector": {}}))]);
    assert!(w.compile(nth(&w, 0)).0.ingress.is_none());
    assert_eq!(w.compile(nth(&w, 3)).0.policies, vec!["y/deny".to_owned()]);
}

#[test]
fn a_policy_that_does_not_parse_isolates_and_admits_nothing() {
    let bad: NetworkPolicy = serde_json::from_value(np(
        "bad",
        "x",
        &serde_json::json!({"podSelector": {},
                           "ingress": [{"from": [{"ipBlock": {"cidr": "not-a-cidr"}}]}]}),
    ))
    .unwrap();
    let (pol, err) = Policy::from_api(&bad);
    assert_eq!(
        err,
        Some(crate::policy::model::ModelError::Cidr("not-a-cidr".into()))
    );
    assert_eq!(pol.ingress, Some(Vec::new()));
}

#[test]
fn ranges_merge_and_a_wildcard_absorbs() {
    assert_eq!(
        normalize(vec![
            range(TCP, 90, 100),
            range(TCP, 80, 85),
            range(TCP, 86, 89),
            range(UDP, 53, 53),
        ]),
        vec![range(TCP, 80, 100), range(UDP, 53, 53)]
    );
    assert_eq!(normalize(vec![range(TCP, 1, 2), ANY]), vec![ANY]);
}

#[test]
fn too_many_ranges_are_cut_and_reported() {
    let ports: Vec<_> = (0..20)
        .map(|i| serde_json::json!({"port": 1000 + 2 * i}))
        .collect();
    let w = world(&[np(
        "p",
        "x",
        &serde_json::json!({"podSelector": {}, "ingress": [{"ports": ports}]}),
    )]);
    let (rules, cut) = w.compile(nth(&w, 0));
    assert_eq!(cut.len(), 1);
    assert_eq!(cut[0].ranges, 20);
    assert_eq!(rules.ingress.unwrap()[&EVERYWHERE].len(), PORT_RANGES_MAX);
}

#[test]
fn the_world_keeps_its_indexes_through_changes() {
    let mut w = world(&[]);
    let ip = ip_of(0, 0);
    assert_eq!(w.pod_by_ip(ip).map(|p| p.name.as_str()), Some("a"));
    // x/a's address goes to a new pod before x/a's deletion arrives.
    let mut next = nth(&w, 0).clone();
    next.name = "a2".into();
    assert!(w.upsert_pod(next.clone()));
    assert!(!w.upsert_pod(next), "the same pod again changes nothing");
    assert_eq!(w.pod_by_ip(ip).map(|p| p.name.as_str()), Some("a2"));
    assert!(w.remove_pod("x", "a"));
    assert_eq!(
        w.pod_by_ip(ip).map(|p| p.name.as_str()),
        Some("a2"),
        "the old pod's removal leaves the new holder"
    );
    assert!(!w.remove_pod("x", "a"));
    assert_eq!(w.pod_count(), 9);
    // A pod that loses its address is no one's peer by it any more.
    change(&mut w, 1, |p| p.ip = None);
    assert!(w.pod_by_ip(ip_of(0, 1)).is_none());
    // Policies by namespace, in name order.
    let w = world(&[
        np("z2", "x", &serde_json::json!({"podSelector": {}})),
        np("a1", "x", &serde_json::json!({"podSelector": {}})),
        np("m", "y", &serde_json::json!({"podSelector": {}})),
    ]);
    assert_eq!(w.policy_count(), 3);
    assert_eq!(
        w.compile(nth(&w, 0)).0.policies,
        vec!["x/a1".to_owned(), "x/z2".to_owned()]
    );
}

/// A change to a world, for tests that take several in turn.
type Step<'a> = Box<dyn Fn(&mut World) + 'a>;

/// Peers selected by labels come from the label index; after every kind of pod change
/// they are exactly those a scan of every pod finds.
#[test]
fn peers_selected_by_labels_follow_every_pod_change() {
    let mut w = world(&[serde_json::json!({
        "metadata": {"namespace": "x", "name": "p"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]},
                {"from": [{"podSelector": {"matchLabels": {"pod": "c", "tier": "fe"}}}]},
            ],
        },
    })]);
    // With `probe`, policy `q` admits x's pods labelled role=probe too.
    let scan = |w: &World, probe: bool| -> BTreeSet<Ipv4Addr> {
        w.pods()
            .filter(|p| !p.host_network)
            .filter(|p| {
                let has = |k: &str, v: &str| p.labels.get(k).map(String::as_str) == Some(v);
                has("pod", "b")
                    || (p.namespace == "x" && has("pod", "c") && has("tier", "fe"))
                    || (probe && p.namespace == "x" && has("role", "probe"))
            })
            .filter_map(|p| p.ip)
            .collect()
    };
    let compiled = |w: &World| -> BTreeSet<Ipv4Addr> {
        let rules = w.compile(nth(w, 0)).0;
        rules
            .ingress
            .expect("x/a is isolated")
            .keys()
            .map(ipnet::Ipv4Net::addr)
            .collect()
    };
    let relabel = |w: &mut World, i: usize, kv: &[(&str, &str)]| {
        change(w, i, |p| {
            p.labels = kv
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
                .into();
        });
    };
    let steps: Vec<Step> = vec![
        Box::new(|_| {}),
        // y/b becomes no peer; z/a becomes one.
        Box::new(|w| relabel(w, 4, &[("pod", "q")])),
        Box::new(|w| relabel(w, 6, &[("pod", "b")])),
        // Both labels needed: x/c gains the second.
        Box::new(|w| relabel(w, 2, &[("pod", "c"), ("tier", "fe")])),
        // A new address, none, then host networking.
        Box::new(|w| change(w, 7, |p| p.ip = Some(Ipv4Addr::new(10, 9, 9, 9)))),
        Box::new(|w| change(w, 1, |p| p.ip = None)),
        Box::new(|w| change(w, 1, |p| p.ip = Some(ip_of(0, 1)))),
        Box::new(|w| change(w, 7, |p| p.host_network = true)),
        // Two pods on one address (a pod going while its successor comes), then one.
        Box::new(|w| {
            change(w, 5, |p| {
                p.ip = Some(ip_of(2, 0));
                p.labels = BTreeMap::from([("pod".to_owned(), "b".to_owned())]).into();
            });
        }),
        Box::new(|w| {
            w.remove_pod("y", "c");
        }),
        Box::new(|w| {
            w.remove_pod("z", "a");
        }),
        // A label no selector names yet, then a policy that names it (the index takes
        // the pods there are), then the policy gone.
        Box::new(|w| relabel(w, 2, &[("pod", "c"), ("role", "probe")])),
        Box::new(|w| {
            w.upsert_policy(crate::policy::testing::policy(serde_json::json!({
                "metadata": {"namespace": "x", "name": "q"},
                "spec": {
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "probe"}}}]}],
                },
            })));
        }),
        Box::new(|w| relabel(w, 1, &[("pod", "b"), ("role", "probe")])),
        Box::new(|w| {
            w.remove_policy("x", "q");
        }),
    ];
    for (i, step) in steps.iter().enumerate() {
        step(&mut w);
        let probe = (12..14).contains(&i);
        assert_eq!(compiled(&w), scan(&w, probe), "after step {i}");
    }
    assert!(!compiled(&w).is_empty());
}
