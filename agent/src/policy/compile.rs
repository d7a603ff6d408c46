//! The policy compiler: policies, pods and namespaces in, each local pod's rules out, as
//! the programs look them up (an LPM trie of peer prefixes to port ranges per direction).
//! Pure: table-tested here, applied to the maps by [`super::apply`].

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use vpc_ebpf_common::policy::{PORT_RANGES_MAX, PortRange};

use super::model::{Peer, PodView, Policy, PortRule, PortSel, Rule, Selector};

/// Peer prefix → the port ranges peers under it may use, flattened so that the longest
/// matching prefix alone holds the answer. An empty list admits nothing.
pub type RuleSet = BTreeMap<Ipv4Net, Vec<PortRange>>;

/// What one pod's policies compile to. `None`: not isolated in that direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRules {
    pub ingress: Option<RuleSet>,
    pub egress: Option<RuleSet>,
    /// The policies that select the pod, as `namespace/name`.
    pub policies: Vec<String>,
}

/// Something the compiler had to cut, to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncated {
    pub prefix: Ipv4Net,
    pub ranges: usize,
}

/// The cluster as policy sees it.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub policies: Vec<Policy>,
    pub pods: Vec<PodView>,
    /// Namespace name → labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

const ANY: PortRange = PortRange {
    proto: 0,
    pad: 0,
    first: 0,
    last: 0,
};

const EVERYWHERE: Ipv4Net = match Ipv4Net::new(std::net::Ipv4Addr::UNSPECIFIED, 0) {
    Ok(n) => n,
    Err(_) => unreachable!(),
};

/// A rule's admission before flattening: `net` minus its `except`s may use `ranges`.
#[derive(Debug)]
struct Grant {
    net: Ipv4Net,
    except: Vec<Ipv4Net>,
    ranges: Vec<PortRange>,
}

impl World {
    /// The rules of `pod` (a pod of this node): the union of the rules of every policy in
    /// its namespace that selects it, per direction.
    pub fn compile(&self, pod: &PodView) -> (PodRules, Vec<Truncated>) {
        let mut out = PodRules::default();
        let mut ingress: Option<Vec<Grant>> = None;
        let mut egress: Option<Vec<Grant>> = None;
        for pol in self
            .policies
            .iter()
            .filter(|p| p.namespace == pod.namespace && p.selector.matches(&pod.labels))
        {
            out.policies.push(format!("{}/{}", pol.namespace, pol.name));
            if let Some(rules) = &pol.ingress {
                let grants = ingress.get_or_insert_with(Vec::new);
                for r in rules {
                    self.ingress_grants(pol, r, pod, grants);
                }
            }
            if let Some(rules) = &pol.egress {
                let grants = egress.get_or_insert_with(Vec::new);
                for r in rules {
                    self.egress_grants(pol, r, grants);
                }
            }
        }
        let mut cut = Vec::new();
        out.ingress = ingress.map(|g| flatten(&g, &mut cut));
        out.egress = egress.map(|g| flatten(&g, &mut cut));
        (out, cut)
    }

    /// Ingress: the destination is `pod` itself, so named ports resolve on it once.
    fn ingress_grants(&self, pol: &Policy, r: &Rule, pod: &PodView, out: &mut Vec<Grant>) {
        let ranges = resolve(&r.ports, Some(pod), true);
        if ranges.is_empty() {
            return;
        }
        for (net, except) in self.peer_nets(pol, r) {
            out.push(Grant {
                net,
                except,
                ranges: ranges.clone(),
            });
        }
    }

    /// Egress: named ports resolve on each destination pod, so they become one grant per
    /// pod; numbered ports hold for the whole peer.
    fn egress_grants(&self, pol: &Policy, r: &Rule, out: &mut Vec<Grant>) {
        let numbered = resolve(&r.ports, None, false);
        let named = r.ports.iter().any(|p| matches!(p.port, PortSel::Named(_)));
        if !numbered.is_empty() {
            for (net, except) in self.peer_nets(pol, r) {
                out.push(Grant {
                    net,
                    except,
                    ranges: numbered.clone(),
                });
            }
        }
        if !named {
            return;
        }
        for pod in self.pods.iter().filter(|p| routable(p)) {
            let Some(ip) = pod.ip else { continue };
            let admitted = if r.peers.is_empty() {
                true
            } else {
                r.peers.iter().any(|peer| match peer {
                    Peer::Pods { namespaces, pods } => {
                        self.selects(pol, namespaces.as_ref(), pods.as_ref(), pod)
                    }
                    Peer::Block { cidr, except } => {
                        cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
                    }
                })
            };
            if !admitted {
                continue;
            }
            let ranges: Vec<_> = r
                .ports
                .iter()
                .filter(|p| matches!(p.port, PortSel::Named(_)))
                .filter_map(|p| named_range(p, pod))
                .collect();
            if !ranges.is_empty() {
                out.push(Grant {
                    net: host(ip),
                    except: Vec::new(),
                    ranges,
                });
            }
        }
    }

    /// The peers of a rule as prefixes (minus exceptions): every address when the rule
    /// names none, each selected pod's address, each ipBlock.
    fn peer_nets(&self, pol: &Policy, r: &Rule) -> Vec<(Ipv4Net, Vec<Ipv4Net>)> {
        if r.peers.is_empty() {
            return vec![(EVERYWHERE, Vec::new())];
        }
        let mut nets = Vec::new();
        for peer in &r.peers {
            match peer {
                Peer::Block { cidr, except } => nets.push((*cidr, except.clone())),
                Peer::Pods { namespaces, pods } => nets.extend(
                    self.pods
                        .iter()
                        .filter(|p| routable(p))
                        .filter(|p| self.selects(pol, namespaces.as_ref(), pods.as_ref(), p))
                        .filter_map(|p| p.ip.map(|ip| (host(ip), Vec::new()))),
                ),
            }
        }
        nets
    }

    fn selects(
        &self,
        pol: &Policy,
        namespaces: Option<&Selector>,
        pods: Option<&Selector>,
        pod: &PodView,
    ) -> bool {
        let ns_ok = match namespaces {
            None => pod.namespace == pol.namespace,
            Some(sel) => sel.matches(
                self.namespaces
                    .get(&pod.namespace)
                    .unwrap_or(&BTreeMap::new()),
            ),
        };
        ns_ok && pods.is_none_or(|sel| sel.matches(&pod.labels))
    }
}

/// Pods a policy peer can be: with an address of their own (a hostNetwork pod has its
/// node's, which policy does not select by labels).
fn routable(p: &PodView) -> bool {
    !p.host_network && p.ip.is_some()
}

fn host(ip: std::net::Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(ip, 32).expect("32 is a valid IPv4 prefix length")
}

/// The ranges of `ports` (every port when empty); named ports resolve on `dest` when
/// `with_named`, and are left out otherwise.
fn resolve(ports: &[PortRule], dest: Option<&PodView>, with_named: bool) -> Vec<PortRange> {
    if ports.is_empty() {
        return vec![ANY];
    }
    ports
        .iter()
        .filter_map(|p| match &p.port {
            PortSel::All => Some(range(p.proto, 0, u16::MAX)),
            PortSel::Range(a, b) => Some(range(p.proto, *a, *b)),
            PortSel::Named(_) if with_named => dest.and_then(|d| named_range(p, d)),
            PortSel::Named(_) => None,
        })
        .collect()
}

fn named_range(p: &PortRule, dest: &PodView) -> Option<PortRange> {
    let PortSel::Named(name) = &p.port else {
        return None;
    };
    dest.named_port(name, p.proto)
        .map(|port| range(p.proto, port, port))
}

const fn range(proto: u8, first: u16, last: u16) -> PortRange {
    PortRange {
        proto,
        pad: 0,
        first,
        last,
    }
}

/// Flattens grants for longest-prefix lookup: every prefix a grant or an exception names
/// gets the union of the grants that cover it and do not except it. An address's longest
/// matching prefix is then covered by exactly the grants that admit the address (a grant's
/// prefix or exception containing the address contains its longest match, and the
/// reverse), so one lookup answers.
fn flatten(grants: &[Grant], cut: &mut Vec<Truncated>) -> RuleSet {
    let prefixes: BTreeSet<Ipv4Net> = grants
        .iter()
        .flat_map(|g| {
            std::iter::once(g.net).chain(g.except.iter().copied().filter(|e| g.net.contains(e)))
        })
        .collect();
    prefixes
        .into_iter()
        .map(|q| {
            let ranges: Vec<PortRange> = grants
                .iter()
                .filter(|g| g.net.contains(&q) && !g.except.iter().any(|e| e.contains(&q)))
                .flat_map(|g| g.ranges.iter().copied())
                .collect();
            let mut ranges = normalize(ranges);
            if ranges.len() > PORT_RANGES_MAX {
                // Failing closed: fewer ports admitted than asked, reported.
                cut.push(Truncated {
                    prefix: q,
                    ranges: ranges.len(),
                });
                ranges.truncate(PORT_RANGES_MAX);
            }
            (q, ranges)
        })
        .collect()
}

/// Sorted, overlapping and adjacent ranges of a protocol merged; a whole-protocol wildcard
/// absorbs everything.
fn normalize(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    if ranges.iter().any(|r| r.proto == 0) {
        return vec![ANY];
    }
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if let Some(last) = out.last_mut()
            && last.proto == r.proto
            && u32::from(r.first) <= u32::from(last.last) + 1
        {
            last.last = last.last.max(r.last);
            continue;
        }
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests;
