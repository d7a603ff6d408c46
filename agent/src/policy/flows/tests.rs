//! Flow records from events: names, the connection's direction, which policies judged.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::policy::testing::{pod, policy};

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 11);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// x/a (app=web) and y/b (app=db). In y: `deny-all` isolates every pod for ingress,
/// `web-to-db` admits x's pods on the named port `http`. In x: `egress-db` lets a reach
/// b on TCP 8080.
fn world() -> World {
    let mut w = World::default();
    w.set_namespace("x".into(), BTreeMap::from([("ns".into(), "x".into())]));
    w.set_namespace("y".into(), BTreeMap::from([("ns".into(), "y".into())]));
    w.upsert_pod(pod("x", "a", A, "web"));
    w.upsert_pod(pod("y", "b", B, "db"));
    w.upsert_policy(policy(json!({
        "metadata": {"namespace": "y", "name": "deny-all"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
    })));
    w.upsert_policy(policy(json!({
        "metadata": {"namespace": "y", "name": "web-to-db"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}],
                              "ports": [{"port": "http"}]}]}
    })));
    w.upsert_policy(policy(json!({
        "metadata": {"namespace": "x", "name": "egress-db"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
                 "egress": [{"ports": [{"port": 8080}]}]}
    })));
    w
}

fn event(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, what: u8, why: u16, local: u8) -> PolicyEvent {
    PolicyEvent {
        ts_ns: 0,
        src: u32::from(src).to_be(),
        dst: u32::from(dst).to_be(),
        sport: 40000,
        dport,
        proto: TCP,
        verdict: what,
        ends: local,
        reply: 0,
        reason: why,
        portless: 0,
        pad: [0; 5],
    }
}

const BOTH: u8 = ends::SRC_LOCAL | ends::DST_LOCAL;

#[test]
fn an_allowed_connection_names_the_policies_that_admit_it_on_each_isolated_end() {
    let (w, mut d) = (world(), Describer::default());
    let r = d.describe(&w, &event(A, B, 8080, verdict::ALLOW, 0, BOTH), 0);
    assert_eq!(r.verdict, "allow");
    assert_eq!(
        (r.src.namespace.as_deref(), r.src.pod.as_deref()),
        (Some("x"), Some("a"))
    );
    assert_eq!(
        (r.dst.namespace.as_deref(), r.dst.pod.as_deref()),
        (Some("y"), Some("b"))
    );
    assert_eq!(
        r.judged,
        vec![
            Judged {
                direction: "egress".into(),
                policies: vec!["x/egress-db".into()]
            },
            // deny-all isolates b but admits nothing: only web-to-db admitted this.
            Judged {
                direction: "ingress".into(),
                policies: vec!["y/web-to-db".into()]
            },
        ]
    );
    // Only the ends that are this node's pods were judged here.
    let r = d.describe(
        &w,
        &event(A, B, 8080, verdict::ALLOW, 0, ends::DST_LOCAL),
        0,
    );
    assert_eq!(
        r.judged,
        vec![Judged {
            direction: "ingress".into(),
            policies: vec!["y/web-to-db".into()]
        }]
    );
}

#[test]
fn a_denial_names_every_policy_isolating_the_judged_pod() {
    let (w, mut d) = (world(), Describer::default());
    let r = d.describe(
        &w,
        &event(A, B, 9090, verdict::DENY, reason::DROP_POLICY_EGRESS, BOTH),
        0,
    );
    assert_eq!(
        r.judged,
        vec![Judged {
            direction: "egress".into(),
            policies: vec!["x/egress-db".into()]
        }]
    );
    let r = d.describe(
        &w,
        &event(
            OUTSIDE,
            B,
            8080,
            verdict::DENY,
            reason::DROP_POLICY_INGRESS,
            ends::DST_LOCAL,
        ),
        0,
    );
    assert_eq!(r.src.pod, None, "an address that is no pod's");
    assert_eq!(
        r.judged,
        vec![Judged {
            direction: "ingress".into(),
            policies: vec!["y/deny-all".into(), "y/web-to-db".into()]
        }]
    );
    assert!(r.line().contains("DENY"), "{}", r.line());
    assert!(r.line().contains("y/b 10.0.2.11:8080"), "{}", r.line());
}

#[test]
fn a_reply_packet_is_described_as_its_connection() {
    let (w, mut d) = (world(), Describer::default());
    // b's reply to a, revoked because a's egress no longer admits a → b.
    let mut ev = event(
        B,
        A,
        40000,
        verdict::REVOKE,
        reason::DROP_POLICY_EGRESS,
        BOTH,
    );
    ev.sport = 8080;
    ev.reply = 1;
    let r = d.describe(&w, &ev, 0);
    assert_eq!(r.src.pod.as_deref(), Some("a"));
    assert_eq!((r.dst.pod.as_deref(), r.dst.port), (Some("b"), Some(8080)));
    assert_eq!(r.judged[0].direction, "egress");
    assert_eq!(r.verdict, "revoke");
}

#[test]
fn attribution_follows_a_changed_world() {
    let (w, mut d) = (world(), Describer::default());
    let r = d.describe(
        &w,
        &event(A, B, 8080, verdict::ALLOW, 0, ends::DST_LOCAL),
        0,
    );
    assert_eq!(r.judged[0].policies, vec!["y/web-to-db".to_owned()]);
    let mut w = w;
    w.remove_policy("y", "deny-all");
    w.remove_policy("y", "web-to-db");
    d.set_generation(1);
    let r = d.describe(
        &w,
        &event(A, B, 8080, verdict::ALLOW, 0, ends::DST_LOCAL),
        0,
    );
    assert_eq!(
        r.judged,
        Vec::<Judged>::new(),
        "no policy isolates b any more"
    );
}

#[test]
fn filters_match_either_end() {
    let (w, mut d) = (world(), Describer::default());
    let r = d.describe(
        &w,
        &event(A, B, 9090, verdict::DENY, reason::DROP_POLICY_INGRESS, BOTH),
        0,
    );
    let filter = |q: &[(&str, &str)]| Filter::from_pairs(q.iter().copied()).unwrap();
    assert!(filter(&[]).matches(&r));
    assert!(filter(&[("namespace", "y")]).matches(&r));
    assert!(filter(&[("namespace", "x"), ("pod", "a")]).matches(&r));
    assert!(
        !filter(&[("namespace", "x"), ("pod", "b")]).matches(&r),
        "b is in y"
    );
    assert!(filter(&[("verdict", "deny")]).matches(&r));
    assert!(!filter(&[("verdict", "allow")]).matches(&r));
    assert!(!filter(&[("namespace", "z")]).matches(&r));
    let e = Filter::from_pairs([("verdict", "dropped")].into_iter()).unwrap_err();
    assert!(e.contains("allow, deny or revoke"), "{e}");
}

#[test]
fn times_are_rfc3339() {
    assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
    // 2026-11-30T20:28:26.042Z
    assert_eq!(
        rfc3339_millis(1_796_070_506_042),
        "2026-11-30T20:28:26.042Z"
    );
    assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
    assert_eq!(
        rfc3339_millis(4_107_542_399_999),
        "2100-02-28T23:59:59.999Z"
    );
}

#[test]
fn the_lookup_takes_the_longest_prefix() {
    let set: crate::policy::compile::RuleSet = BTreeMap::from([
        (
            "10.0.0.0/16".parse().unwrap(),
            vec![vpc_ebpf_common::policy::PortRange {
                proto: TCP,
                pad: 0,
                first: 80,
                last: 81,
            }],
        ),
        ("10.0.2.0/24".parse().unwrap(), vec![]),
    ]);
    assert!(set_admits(&set, Ipv4Addr::new(10, 0, 1, 1), TCP, Some(80)));
    assert!(!set_admits(&set, Ipv4Addr::new(10, 0, 1, 1), TCP, Some(82)));
    assert!(
        !set_admits(&set, Ipv4Addr::new(10, 0, 2, 1), TCP, Some(80)),
        "an except"
    );
    assert!(!set_admits(&set, OUTSIDE, TCP, Some(80)));
}
