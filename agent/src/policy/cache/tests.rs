//! Which local pods a change recompiles.

use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::policy::testing::{self, policy};

fn pod(ns: &str, name: &str, last: u8, app: &str) -> PodView {
    testing::pod(ns, name, Ipv4Addr::new(10, 0, 0, last), app)
}

/// Local: x/a (selected by a same-namespace policy), y/b (a policy whose peers are the
/// namespaces labelled team=red), z/c (egress on a named port to anywhere). Elsewhere:
/// pods in x, y, red namespace r and blue namespace q.
fn world() -> World {
    let mut w = World::default();
    for (ns, team) in [
        ("x", "blue"),
        ("y", "blue"),
        ("z", "blue"),
        ("r", "red"),
        ("q", "blue"),
    ] {
        w.set_namespace(ns.into(), BTreeMap::from([("team".into(), team.into())]));
    }
    for p in [
        pod("x", "a", 1, "api"),
        pod("y", "b", 2, "api"),
        pod("z", "c", 3, "api"),
        pod("x", "x2", 11, "web"),
        pod("y", "y2", 12, "web"),
        pod("r", "r2", 13, "web"),
        pod("q", "q2", 14, "web"),
    ] {
        w.upsert_pod(p);
    }
    w.upsert_policy(policy(
        json!({"metadata": {"namespace": "x", "name": "same-ns"},
        "spec": {"podSelector": {"matchLabels": {"app": "api"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}}),
    ));
    w.upsert_policy(policy(json!({"metadata": {"namespace": "y", "name": "red-teams"},
        "spec": {"podSelector": {},
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}]}})));
    w.upsert_policy(policy(
        json!({"metadata": {"namespace": "z", "name": "named-out"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                 "egress": [{"ports": [{"port": "http"}]}]}}),
    ));
    w
}

const LOCAL: [(&str, &str, u8); 3] = [("x", "a", 1), ("y", "b", 2), ("z", "c", 3)];

/// Updates `c` after `dirty`; the local pods recompiled.
fn recompiled(c: &mut Compiled, w: &World, dirty: &Dirty) -> Vec<String> {
    let mut done = Vec::new();
    let local = LOCAL
        .iter()
        .map(|(ns, name, last)| (Ipv4Addr::new(10, 0, 0, *last), w.pod(ns, name).unwrap()));
    c.update(w, dirty, local, |p| {
        done.push(format!("{}/{}", p.namespace, p.name));
        w.compile(p).0
    });
    done
}

fn dirty(namespaces: &[&str]) -> Dirty {
    let mut d = Dirty::default();
    for ns in namespaces {
        d.namespace(ns);
    }
    d
}

#[test]
fn a_change_recompiles_only_the_local_pods_it_can_touch() {
    let w = world();
    let mut c = Compiled::default();
    assert_eq!(
        recompiled(&mut c, &w, &Dirty::default()),
        ["x/a", "y/b", "z/c"],
        "first: all"
    );
    assert!(
        recompiled(&mut c, &w, &Dirty::default()).is_empty(),
        "nothing changed"
    );
    // A pod of x: x/a (same namespace), z/c (named egress ports resolve anywhere).
    assert_eq!(recompiled(&mut c, &w, &dirty(&["x"])), ["x/a", "z/c"]);
    // A pod of the red namespace: y/b selects it by namespace; z/c as before.
    assert_eq!(recompiled(&mut c, &w, &dirty(&["r"])), ["y/b", "z/c"]);
    // A pod of a blue namespace no one selects: z/c only.
    assert_eq!(recompiled(&mut c, &w, &dirty(&["q"])), ["z/c"]);
    let mut all = Dirty::default();
    all.everything();
    assert_eq!(recompiled(&mut c, &w, &all), ["x/a", "y/b", "z/c"]);
}

#[test]
fn kept_rules_are_the_rules_a_full_compile_gives() {
    let mut w = world();
    let mut c = Compiled::default();
    recompiled(&mut c, &w, &Dirty::default());
    // r2 leaves the red namespace's web pods; q gets a web pod more.
    w.remove_pod("r", "r2");
    w.upsert_pod(pod("q", "q3", 15, "web"));
    recompiled(&mut c, &w, &dirty(&["r", "q"]));
    for (ns, name, last) in LOCAL {
        let full = w.compile(w.pod(ns, name).unwrap()).0;
        assert_eq!(
            c.rules(Ipv4Addr::new(10, 0, 0, last)),
            Some(&full),
            "{ns}/{name}"
        );
    }
}

#[test]
fn pods_no_longer_local_are_forgotten() {
    let w = world();
    let mut c = Compiled::default();
    recompiled(&mut c, &w, &Dirty::default());
    c.update(&w, &Dirty::default(), std::iter::empty(), |p| {
        w.compile(p).0
    });
    assert!(c.rules(Ipv4Addr::new(10, 0, 0, 1)).is_none());
}
