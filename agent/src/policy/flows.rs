//! Flow logs: the programs' policy verdicts ([`PolicyEvent`]) described for people — the
//! pods at both ends, the direction that was judged and the policies that judged it — and
//! filtered for the live view. Pure: the cluster as the engine knows it ([`World`]) and
//! an event in, a [`FlowRecord`] out.
//!
//! Kubernetes policies only admit; a denial is the absence of an admitting rule. A denied
//! flow therefore names every policy that isolates the judged pod in that direction (any
//! of them admitting it would have let it through), and an admitted one names the
//! policies whose rules admit it.

use std::{collections::HashMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};
use vpc_ebpf_common::{
    counters::reason,
    policy::{PolicyEvent, ends, verdict},
};

use super::{
    compile::{PodRules, World, set_admits},
    model::{SCTP, TCP, UDP},
};

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Set when the address is a pod's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let (Some(ns), Some(pod)) = (&self.namespace, &self.pod) {
            write!(f, "{ns}/{pod} ")?;
        }
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.ip),
            None => write!(f, "{}", self.ip),
        }
    }
}

/// What one direction's rules said: `ingress` judges the destination pod, `egress` the
/// source pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Judged {
    pub direction: String,
    /// `namespace/name` of each policy that admitted the flow (allow) or isolates the pod
    /// without admitting it (deny, revoke).
    pub policies: Vec<String>,
}

/// A policy verdict on a connection, described. `src` opened the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// `allow` (a new connection), `deny` (a packet), `revoke` (a connection a policy
    /// change now denies).
    pub verdict: String,
    pub protocol: String,
    pub src: End,
    pub dst: End,
    pub judged: Vec<Judged>,
    /// The packet was a segment of a connection opened before policy tracked it, admitted
    /// as its reply.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mid_stream: bool,
}

impl FlowRecord {
    /// One line for a terminal.
    pub fn line(&self) -> String {
        let judged: Vec<String> = self
            .judged
            .iter()
            .map(|j| {
                if j.policies.is_empty() {
                    j.direction.clone()
                } else {
                    format!("{} by {}", j.direction, j.policies.join(","))
                }
            })
            .collect();
        format!(
            "{} {:<6} {} {} -> {}  {}{}",
            self.time,
            self.verdict.to_uppercase(),
            self.protocol,
            self.src,
            self.dst,
            judged.join("; "),
            if self.mid_stream { " (mid-stream)" } else { "" }
        )
    }
}

pub fn protocol_name(proto: u8) -> String {
    match proto {
        TCP => "TCP".into(),
        UDP => "UDP".into(),
        SCTP => "SCTP".into(),
        1 => "ICMP".into(),
        n => format!("proto-{n}"),
    }
}

pub const fn verdict_name(v: u8) -> &'static str {
    match v {
        verdict::ALLOW => "allow",
        verdict::DENY => "deny",
        verdict::REVOKE => "revoke",
        _ => "unknown",
    }
}

/// Describes events, remembering what it compiled for attribution until the world
/// changes.
#[derive(Debug, Default)]
pub struct Describer {
    generation: u64,
    /// (pod address, policy namespace/name) → that policy's rules for the pod.
    one_policy: HashMap<(Ipv4Addr, String), PodRules>,
}

const INGRESS: &str = "ingress";
const EGRESS: &str = "egress";

impl Describer {
    /// The world's change count: what was compiled for another one is forgotten.
    pub fn set_generation(&mut self, generation: u64) {
        if generation != self.generation {
            self.generation = generation;
            self.one_policy.clear();
        }
    }

    /// `wall_ms`: the event's time as Unix milliseconds.
    pub fn describe(&mut self, world: &World, ev: &PolicyEvent, wall_ms: u64) -> FlowRecord {
        let packet_src = Ipv4Addr::from(u32::from_be(ev.src));
        let packet_dst = Ipv4Addr::from(u32::from_be(ev.dst));
        let (src, dst, sport, dport, src_local, dst_local) = if ev.reply == 0 {
            (
                packet_src,
                packet_dst,
                ev.sport,
                ev.dport,
                ev.ends & ends::SRC_LOCAL != 0,
                ev.ends & ends::DST_LOCAL != 0,
            )
        } else {
            (
                packet_dst,
                packet_src,
                ev.dport,
                ev.sport,
                ev.ends & ends::DST_LOCAL != 0,
                ev.ends & ends::SRC_LOCAL != 0,
            )
        };
        let port = |p: u16| (ev.portless == 0 && (ev.proto == TCP || ev.proto == UDP)).then_some(p);
        let judged = if ev.verdict == verdict::ALLOW {
            let mut j = Vec::new();
            if src_local
                && let Some(a) = self.admitting(world, src, dst, EGRESS, ev.proto, port(dport))
            {
                j.push(a);
            }
            if dst_local
                && let Some(a) = self.admitting(world, dst, src, INGRESS, ev.proto, port(dport))
            {
                j.push(a);
            }
            j
        } else {
            let (direction, pod) = if ev.reason == reason::DROP_POLICY_EGRESS {
                (EGRESS, src)
            } else {
                (INGRESS, dst)
            };
            vec![Judged {
                direction: direction.to_owned(),
                policies: isolating(world, pod, direction),
            }]
        };
        FlowRecord {
            time: rfc3339_millis(wall_ms),
            verdict: verdict_name(ev.verdict).to_owned(),
            protocol: protocol_name(ev.proto),
            src: end(world, src, port(sport)),
            dst: end(world, dst, port(dport)),
            judged,
            mid_stream: ev.verdict == verdict::ALLOW && ev.reply != 0,
        }
    }

    /// The policies whose rules admit `peer` to or from the pod at `ip`; `None` when the
    /// pod is not isolated in `direction` (its rules were not consulted).
    fn admitting(
        &mut self,
        world: &World,
        ip: Ipv4Addr,
        peer: Ipv4Addr,
        direction: &'static str,
        proto: u8,
        port: Option<u16>,
    ) -> Option<Judged> {
        let isolating = isolating(world, ip, direction);
        if isolating.is_empty() {
            return None;
        }
        let pod = world.pod_by_ip(ip)?;
        let policies = isolating
            .into_iter()
            .filter(|name| {
                let rules = self
                    .one_policy
                    .entry((ip, name.clone()))
                    .or_insert_with(|| {
                        let (ns, n) = name.split_once('/').unwrap_or(("", name));
                        world.compile_one(pod, ns, n)
                    });
                let set = if direction == INGRESS {
                    &rules.ingress
                } else {
                    &rules.egress
                };
                set.as_ref()
                    .is_some_and(|s| set_admits(s, peer, proto, port))
            })
            .collect();
        Some(Judged {
            direction: direction.to_owned(),
            policies,
        })
    }
}

fn end(world: &World, ip: Ipv4Addr, port: Option<u16>) -> End {
    let pod = world.pod_by_ip(ip);
    End {
        ip,
        port,
        namespace: pod.map(|p| p.namespace.clone()),
        pod: pod.map(|p| p.name.clone()),
    }
}

/// The policies isolating the pod at `ip` in `direction`.
fn isolating(world: &World, ip: Ipv4Addr, direction: &str) -> Vec<String> {
    let Some(pod) = world.pod_by_ip(ip) else {
        return Vec::new();
    };
    world
        .selecting(pod)
        .filter(|p| {
            if direction == INGRESS {
                p.ingress.is_some()
            } else {
                p.egress.is_some()
            }
        })
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}

/// What the live view shows: every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Either end is a pod in this namespace.
    pub namespace: Option<String>,
    /// Either end is a pod of this name (in `namespace`, when given).
    pub pod: Option<String>,
    pub verdict: Option<String>,
}

impl Filter {
    /// From a query string: `namespace=`, `pod=`, `verdict=` (`allow`, `deny`, `revoke`);
    /// other keys are the caller's.
    pub fn from_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut f = Self::default();
        for (k, v) in pairs {
            match k {
                "namespace" => f.namespace = Some(v.to_owned()),
                "pod" => f.pod = Some(v.to_owned()),
                "verdict" => {
                    if !matches!(v, "allow" | "deny" | "revoke") {
                        return Err(format!("verdict={v:?}: expected allow, deny or revoke"));
                    }
                    f.verdict = Some(v.to_owned());
                }
                _ => {}
            }
        }
        Ok(f)
    }

    pub fn matches(&self, r: &FlowRecord) -> bool {
        let end_ok = |e: &End| {
            self.namespace
                .as_ref()
                .is_none_or(|ns| e.namespace.as_ref() == Some(ns))
                && self.pod.as_ref().is_none_or(|p| e.pod.as_ref() == Some(p))
        };
        self.verdict.as_ref().is_none_or(|v| *v == r.verdict) && (end_ok(&r.src) || end_ok(&r.dst))
    }
}

/// `unix_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_millis(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (counting in 400-year
/// eras of 146,097 days, with years starting in March so the leap day comes last).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests;
