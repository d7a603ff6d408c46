//! The rule sets of the sweep, written twice from one description: as NetworkPolicies
//! for vpc-ebpf's compiler, and as the iptables + ipset rules an iptables-mode policy
//! engine (Calico's, kube-router's) renders for the same policies.
//!
//! With `n` rules, each measured pod is selected by `n` filler policies in the direction
//! it is judged (servers B and C for ingress, client A for egress), each admitting one
//! peer prefix no traffic comes from on one port of its own, then by the policy that
//! admits the measured traffic (A → servers, TCP 20000-29999, the ports the load
//! generator hands out). An iptables engine walks the fillers before it reaches the
//! admitting rule, as it would for policies it orders before it; vpc-ebpf's lookups do
//! not depend on order. With 0 rules no policy exists and no pod is isolated.

use std::{fmt::Write as _, net::Ipv4Addr};

use serde_json::{Value, json};

pub const NAMESPACE: &str = "bench";
/// The load generator's server ports (`load::fresh_port` counts up from 20000).
pub const PORTS: (u16, u16) = (20_000, 29_999);

/// The prefix and port of filler rule `i`: distinct /32s in 172.16.0.0/12 and ports
/// cycling 1000-60999, so no two fillers merge into one entry or one iptables rule.
pub fn filler(i: usize) -> (Ipv4Addr, u16) {
    let i32 = u32::try_from(i).expect("fewer than 2^32 rules");
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 1)) + i32);
    let port = 1000 + u16::try_from(i % 60_000).expect("below 60000");
    (addr, port)
}

fn filler_policy(i: usize, ingress: bool) -> Value {
    let (addr, port) = filler(i);
    let peer = json!([{"ipBlock": {"cidr": format!("{addr}/32")}}]);
    let ports = json!([{"protocol": "TCP", "port": port}]);
    if ingress {
        json!({
            "metadata": {"namespace": NAMESPACE, "name": format!("in-{i}")},
            "spec": {"podSelector": {"matchLabels": {"role": "server"}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": peer, "ports": ports}]}
        })
    } else {
        json!({
            "metadata": {"namespace": NAMESPACE, "name": format!("out-{i}")},
            "spec": {"podSelector": {"matchLabels": {"role": "client"}},
                     "policyTypes": ["Egress"],
                     "egress": [{"to": peer, "ports": ports}]}
        })
    }
}

/// The NetworkPolicies (API JSON) of a sweep point: `n` fillers per direction and, when
/// `n > 0`, the two that admit the measured traffic (named `zz-…` so they sort last).
pub fn policies(n: usize) -> Vec<Value> {
    if n == 0 {
        return Vec::new();
    }
    let ports = json!([{"protocol": "TCP", "port": PORTS.0, "endPort": PORTS.1}]);
    let mut out: Vec<Value> = (0..n)
        .flat_map(|i| [filler_policy(i, true), filler_policy(i, false)])
        .collect();
    out.push(json!({
        "metadata": {"namespace": NAMESPACE, "name": "zz-servers-admit-client"},
        "spec": {"podSelector": {"matchLabels": {"role": "server"}},
                 "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                              "ports": ports}]}
    }));
    out.push(json!({
        "metadata": {"namespace": NAMESPACE, "name": "zz-client-reaches-servers"},
        "spec": {"podSelector": {"matchLabels": {"role": "client"}},
                 "policyTypes": ["Egress"],
                 "egress": [{"to": [{"podSelector": {"matchLabels": {"role": "server"}}}],
                             "ports": ports}]}
    }));
    out
}

/// A node's pods for the iptables rendering: address, and whether it is the client.
pub struct LocalPod {
    pub ip: Ipv4Addr,
    pub client: bool,
}

/// What an iptables-mode engine writes on one node for the policies of [`policies`]:
/// `ipset restore` input (one `hash:net` set per peer, as kube-router makes them, and
/// the pod-selector sets) and `iptables-restore --noflush` input for the filter table.
///
/// Layout as those engines use it: established traffic accepted first in FORWARD, then
/// one chain per isolated local pod and direction that jumps to each selecting policy's
/// chain; a policy chain marks what it admits, and the pod chain returns on the mark
/// after each jump and drops at its end.
pub fn iptables(
    n: usize,
    local: &[LocalPod],
    servers: &[Ipv4Addr],
    clients: &[Ipv4Addr],
) -> (String, String) {
    let mut sets = String::new();
    let mut rules = String::from("*filter\n:BENCH-FW - [0:0]\n");
    if n == 0 {
        rules.push_str("-A FORWARD -j BENCH-FW\nCOMMIT\n");
        return (sets, rules);
    }
    let set = |sets: &mut String, name: &str, kind: &str, members: &[String]| {
        let _ = writeln!(
            sets,
            "create {name} {kind} family inet maxelem 65536 -exist"
        );
        for m in members {
            let _ = writeln!(sets, "add {name} {m} -exist");
        }
    };
    let list = |ips: &[Ipv4Addr]| ips.iter().map(ToString::to_string).collect::<Vec<_>>();
    set(&mut sets, "bench-servers", "hash:ip", &list(servers));
    set(&mut sets, "bench-clients", "hash:ip", &list(clients));
    let mut chains = String::new();
    let mut body = String::new();
    let _ = writeln!(
        body,
        "-A FORWARD -j BENCH-FW\n-A BENCH-FW -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    for i in 0..n {
        let (addr, port) = filler(i);
        let peer = format!("bench-peer-{i}");
        set(&mut sets, &peer, "hash:net", &[format!("{addr}/32")]);
        for (dir, match_dir) in [("in", "src"), ("out", "dst")] {
            let chain = format!("BENCH-NP-{dir}-{i}");
            let _ = writeln!(chains, ":{chain} - [0:0]");
            let _ = writeln!(
                body,
                "-A {chain} -p tcp -m set --match-set {peer} {match_dir} --dport {port} -j MARK --set-xmark 0x10000/0x10000"
            );
        }
    }
    let (lo, hi) = PORTS;
    for (dir, set_name, match_dir) in [
        ("in", "bench-clients", "src"),
        ("out", "bench-servers", "dst"),
    ] {
        let chain = format!("BENCH-NP-{dir}-admit");
        let _ = writeln!(chains, ":{chain} - [0:0]");
        let _ = writeln!(
            body,
            "-A {chain} -p tcp -m set --match-set {set_name} {match_dir} -m multiport --dports {lo}:{hi} -j MARK --set-xmark 0x10000/0x10000"
        );
    }
    for pod in local {
        let (dir, sel) = if pod.client {
            ("out", format!("-s {}/32", pod.ip))
        } else {
            ("in", format!("-d {}/32", pod.ip))
        };
        let chain = format!("BENCH-POD-{dir}-{}", pod.ip);
        let _ = writeln!(chains, ":{chain} - [0:0]");
        let _ = writeln!(body, "-A BENCH-FW {sel} -j {chain}");
        let _ = writeln!(body, "-A {chain} -j MARK --set-xmark 0x0/0x10000");
        let targets = (0..n)
            .map(|i| format!("BENCH-NP-{dir}-{i}"))
            .chain([format!("BENCH-NP-{dir}-admit")]);
        for t in targets {
            let _ = writeln!(body, "-A {chain} -j {t}");
            let _ = writeln!(body, "-A {chain} -m mark --mark 0x10000/0x10000 -j RETURN");
        }
        let _ = writeln!(body, "-A {chain} -j DROP");
    }
    rules.push_str(&chains);
    rules.push_str(&body);
    rules.push_str("COMMIT\n");
    (sets, rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fillers_are_distinct_and_admitting_policies_sort_last() {
        let p = policies(3);
        assert_eq!(p.len(), 3 * 2 + 2);
        let names: Vec<&str> = p
            .iter()
            .filter_map(|v| v["metadata"]["name"].as_str())
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(sorted.last(), Some(&"zz-servers-admit-client"));
        assert_ne!(filler(0), filler(1));
        assert!(policies(0).is_empty());
    }

    #[test]
    fn iptables_walks_every_filler_before_the_admitting_rule() {
        let local = [LocalPod {
            ip: Ipv4Addr::new(10, 0, 1, 6),
            client: false,
        }];
        let (sets, rules) = iptables(
            2,
            &local,
            &[Ipv4Addr::new(10, 0, 1, 6)],
            &[Ipv4Addr::new(10, 0, 1, 5)],
        );
        assert!(sets.contains("add bench-peer-1 172.16.0.2/32"));
        let chain: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A BENCH-POD-in-10.0.1.6 -j BENCH-NP"))
            .collect();
        assert_eq!(
            chain,
            [
                "-A BENCH-POD-in-10.0.1.6 -j BENCH-NP-in-0",
                "-A BENCH-POD-in-10.0.1.6 -j BENCH-NP-in-1",
                "-A BENCH-POD-in-10.0.1.6 -j BENCH-NP-in-admit"
            ]
        );
        assert!(rules.ends_with("-A BENCH-POD-in-10.0.1.6 -j DROP\nCOMMIT\n"));
    }
}
