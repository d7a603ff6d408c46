//! The policy compiler: policies, pods and namespaces in, each local pod's rules out, as
//! the programs look them up (an LPM trie of peer prefixes to port ranges per direction).
//! Pure: table-tested here, applied to the maps by [`super::apply`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use vpc_ebpf_common::policy::{PORT_RANGES_MAX, PortRange};

use super::{
    label_index::{LabelIndex, selector_keys},
    model::{Peer, PodView, Policy, PortRule, PortSel, Rule, Selector},
};

/// Peer prefix → the port ranges peers under it may use, flattened so that the longest
/// matching prefix alone holds the answer. An empty list admits nothing.
pub type RuleSet = BTreeMap<Ipv4Net, Vec<PortRange>>;

/// What one pod's policies compile to. `None`: not isolated in that direction. Sets are
/// shared: the engine keeps them, the planner compares and records them, and copying a
/// set of hundreds of peers at every change would cost more than computing it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRules {
    pub ingress: Option<Arc<RuleSet>>,
    pub egress: Option<Arc<RuleSet>>,
    /// The policies that select the pod, as `namespace/name`.
    pub policies: Vec<String>,
}

/// Something the compiler had to cut, to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncated {
    pub prefix: Ipv4Net,
    pub ranges: usize,
}

type Key = (String, String);

/// The cluster as policy sees it, indexed so that compiling a pod looks at its own
/// namespace's policies and at the pods its peers can select, not at the whole cluster
/// (a big cluster has 150k pods and 10k policies; a node compiles its ~100 pods at every
/// change).
#[derive(Clone, Debug, Default)]
pub struct World {
    /// Namespace → name → pod.
    pods: HashMap<String, BTreeMap<String, PodView>>,
    pod_count: usize,
    /// Address → the pod holding it (routable pods only).
    by_ip: HashMap<Ipv4Addr, Key>,
    /// The routable pods' addresses by namespace and label.
    labelled: LabelIndex,
    /// Namespace → name → policy (in name order, so `PodRules::policies` is too).
    policies: HashMap<String, BTreeMap<String, Policy>>,
    policy_count: usize,
    /// Namespace name → labels.
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// (label, value) → the namespaces carrying it: a `namespaceSelector` with labels
    /// looks at the namespaces that can match, not at thousands.
    ns_by_label: HashMap<(String, String), BTreeSet<String>>,
}

fn key_of(namespace: &str, name: &str) -> Key {
    (namespace.to_owned(), name.to_owned())
}

/// Inserts `v` under `ns`/`name` unless the same value is there; whether anything
/// changed, and whether it was new.
fn upsert<V: PartialEq>(
    m: &mut HashMap<String, BTreeMap<String, V>>,
    ns: &str,
    name: &str,
    v: V,
) -> (bool, bool) {
    let names = m.entry(ns.to_owned()).or_default();
    if names.get(name) == Some(&v) {
        return (false, false);
    }
    let new = names.insert(name.to_owned(), v).is_none();
    (true, new)
}

fn remove<V>(m: &mut HashMap<String, BTreeMap<String, V>>, ns: &str, name: &str) -> Option<V> {
    let names = m.get_mut(ns)?;
    let v = names.remove(name);
    if names.is_empty() {
        m.remove(ns);
    }
    v
}

impl World {
    // -- keeping it current ------------------------------------------------------------

    /// Adds or replaces a pod; whether anything changed.
    pub fn upsert_pod(&mut self, p: PodView) -> bool {
        if self.pod(&p.namespace, &p.name) == Some(&p) {
            return false;
        }
        self.unindex(&p.namespace, &p.name);
        let key = key_of(&p.namespace, &p.name);
        if routable(&p)
            && let Some(ip) = p.ip
        {
            self.by_ip.insert(ip, key.clone());
            self.labelled.add(&p.namespace, &p.labels, ip);
        }
        let (_, new) = upsert(&mut self.pods, &key.0, &key.1, p);
        self.pod_count += usize::from(new);
        true
    }

    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> bool {
        self.unindex(namespace, name);
        let gone = remove(&mut self.pods, namespace, name).is_some();
        self.pod_count -= usize::from(gone);
        gone
    }

    fn unindex(&mut self, namespace: &str, name: &str) {
        let Some((ip, labels)) = self
            .pod(namespace, name)
            .and_then(|p| Some((p.ip?, routable(p).then(|| p.labels.clone()))))
        else {
            return;
        };
        if let Some(labels) = labels {
            self.labelled.remove(namespace, &labels, ip);
        }
        if self
            .by_ip
            .get(&ip)
            .is_some_and(|(ns, n)| ns == namespace && n == name)
        {
            self.by_ip.remove(&ip);
        }
    }

    pub fn replace_pods(&mut self, pods: impl IntoIterator<Item = PodView>) {
        self.pods.clear();
        self.by_ip.clear();
        self.labelled.clear_pods();
        self.pod_count = 0;
        for p in pods {
            self.upsert_pod(p);
        }
    }

    /// Gives a pod the address this node assigned it, before the API server has it;
    /// whether that changed anything.
    pub fn set_pod_ip(&mut self, namespace: &str, name: &str, ip: Ipv4Addr) -> bool {
        if let Some(p) = self.pod(namespace, name)
            && p.ip != Some(ip)
        {
            let mut p = p.clone();
            p.ip = Some(ip);
            return self.upsert_pod(p);
        }
        false
    }

    pub fn upsert_policy(&mut self, p: Policy) -> bool {
        let (ns, name) = key_of(&p.namespace, &p.name);
        if self.policies.get(&ns).and_then(|m| m.get(&name)) == Some(&p) {
            return false;
        }
        // The new selectors' keys first, so that a key both name stays indexed.
        for k in selector_keys(&p) {
            self.labelled.want(k, routable_pods(&self.pods));
        }
        match self.policies.entry(ns).or_default().insert(name, p) {
            Some(old) => {
                for k in selector_keys(&old) {
                    self.labelled.unwant(k);
                }
            }
            None => self.policy_count += 1,
        }
        true
    }

    pub fn remove_policy(&mut self, namespace: &str, name: &str) -> bool {
        let Some(old) = remove(&mut self.policies, namespace, name) else {
            return false;
        };
        for k in selector_keys(&old) {
            self.labelled.unwant(k);
        }
        self.policy_count -= 1;
        true
    }

    pub fn replace_policies(&mut self, policies: impl IntoIterator<Item = Policy>) {
        let old = std::mem::take(&mut self.policies);
        self.policy_count = 0;
        for p in policies {
            self.upsert_policy(p);
        }
        for p in old.values().flat_map(BTreeMap::values) {
            for k in selector_keys(p) {
                self.labelled.unwant(k);
            }
        }
    }

    pub fn set_namespace(&mut self, name: String, labels: BTreeMap<String, String>) -> bool {
        if self.namespaces.get(&name) == Some(&labels) {
            return false;
        }
        self.remove_namespace(&name);
        for (k, v) in &labels {
            self.ns_by_label
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(name.clone());
        }
        self.namespaces.insert(name, labels);
        true
    }

    pub fn remove_namespace(&mut self, name: &str) -> bool {
        let Some(old) = self.namespaces.remove(name) else {
            return false;
        };
        for (k, v) in old {
            let key = (k, v);
            if let Some(names) = self.ns_by_label.get_mut(&key) {
                names.remove(name);
                if names.is_empty() {
                    self.ns_by_label.remove(&key);
                }
            }
        }
        true
    }

    pub fn replace_namespaces(&mut self, namespaces: BTreeMap<String, BTreeMap<String, String>>) {
        self.namespaces.clear();
        self.ns_by_label.clear();
        for (name, labels) in namespaces {
            self.set_namespace(name, labels);
        }
    }

    // -- reading it --------------------------------------------------------------------

    /// A namespace's labels (none when it is not known).
    pub fn namespace_labels(&self, namespace: &str) -> &BTreeMap<String, String> {
        self.namespaces.get(namespace).unwrap_or(&NO_LABELS)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodView> {
        self.pods.get(namespace)?.get(name)
    }

    /// The routable pod holding `ip`.
    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&PodView> {
        self.by_ip.get(&ip).and_then(|(ns, n)| self.pod(ns, n))
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodView> {
        self.pods.values().flat_map(BTreeMap::values)
    }

    pub const fn pod_count(&self) -> usize {
        self.pod_count
    }

    pub const fn policy_count(&self) -> usize {
        self.policy_count
    }

    fn pods_in(&self, namespace: &str) -> impl Iterator<Item = &PodView> {
        self.pods
            .get(namespace)
            .into_iter()
            .flat_map(BTreeMap::values)
    }

    /// The namespaces whose pods a pod peer of `pol` can select: the policy's own, or
    /// those `namespaces` selects.
    fn peer_namespaces<'a>(
        &'a self,
        pol: &'a Policy,
        namespaces: Option<&'a Selector>,
    ) -> Box<dyn Iterator<Item = &'a str> + 'a> {
        match namespaces {
            None => Box::new(std::iter::once(pol.namespace.as_str())),
            // With labels to match, only the namespaces that carry the rarest of them
            // can; a namespace not (yet) known has no labels, so only a selector without
            // labels can take it, and that one looks at every namespace with pods.
            Some(sel) => match sel
                .labels
                .iter()
                .map(|(k, v)| self.ns_by_label.get(&(k.clone(), v.clone())))
                .min_by_key(|names| names.map_or(0, BTreeSet::len))
            {
                Some(names) => Box::new(
                    names
                        .into_iter()
                        .flatten()
                        .filter(move |ns| sel.matches(self.namespace_labels(ns)))
                        .map(String::as_str),
                ),
                None => Box::new(
                    self.pods
                        .keys()
                        .filter(move |ns| sel.matches(self.namespace_labels(ns)))
                        .map(String::as_str),
                ),
            },
        }
    }

    /// The pods a pod peer of `pol` can select.
    fn peer_candidates<'a>(
        &'a self,
        pol: &'a Policy,
        namespaces: Option<&'a Selector>,
    ) -> impl Iterator<Item = &'a PodView> + 'a {
        self.peer_namespaces(pol, namespaces)
            .flat_map(|ns| self.pods_in(ns))
    }
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
        self.compile_by(pod, |_| true)
    }

    /// The rules one policy alone gives `pod` (so a flow log can say which policies
    /// admitted a connection).
    pub fn compile_one(&self, pod: &PodView, namespace: &str, name: &str) -> PodRules {
        self.compile_by(pod, |p| p.namespace == namespace && p.name == name)
            .0
    }

    /// The policies in `pod`'s namespace that select it, by name.
    pub fn selecting<'a>(&'a self, pod: &'a PodView) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies
            .get(&pod.namespace)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|p| p.selector.matches(&pod.labels))
    }

    fn compile_by(
        &self,
        pod: &PodView,
        include: impl Fn(&Policy) -> bool,
    ) -> (PodRules, Vec<Truncated>) {
        let mut out = PodRules::default();
        let mut ingress: Option<Vec<Grant>> = None;
        let mut egress: Option<Vec<Grant>> = None;
        for pol in self.selecting(pod).filter(|p| include(p)) {
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
        out.ingress = ingress.map(|g| Arc::new(flatten(&g, &mut cut)));
        out.egress = egress.map(|g| Arc::new(flatten(&g, &mut cut)));
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
        // Each destination pod once, however many peers name it.
        let mut seen = BTreeSet::new();
        let candidates: Box<dyn Iterator<Item = &PodView>> = if r.peers.is_empty() {
            Box::new(self.pods())
        } else {
            Box::new(
                r.peers
                    .iter()
                    .flat_map(|peer| -> Box<dyn Iterator<Item = &PodView>> {
                        match peer {
                            Peer::Pods { namespaces, pods } => {
                                Box::new(self.peer_candidates(pol, namespaces.as_ref()).filter(
                                    move |p| pods.as_ref().is_none_or(|sel| sel.matches(&p.labels)),
                                ))
                            }
                            Peer::Block { cidr, except } => Box::new(
                                self.by_ip
                                    .iter()
                                    .filter(move |(ip, _)| {
                                        cidr.contains(*ip)
                                            && !except.iter().any(|e| e.contains(*ip))
                                    })
                                    .filter_map(|(_, (ns, n))| self.pod(ns, n)),
                            ),
                            Peer::Ipv6Block => Box::new(std::iter::empty()),
                        }
                    }),
            )
        };
        for pod in candidates.filter(|p| routable(p)) {
            let Some(ip) = pod.ip else { continue };
            if !seen.insert(ip) {
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
                Peer::Ipv6Block => {}
                // Labels only (the usual selector): the index has the addresses.
                Peer::Pods {
                    namespaces,
                    pods: Some(sel),
                } if sel.exprs.is_empty() => {
                    for ns in self.peer_namespaces(pol, namespaces.as_ref()) {
                        match self.labelled.carrying(ns, &sel.labels) {
                            Some(ips) => nets.extend(ips.map(|ip| (host(ip), Vec::new()))),
                            None => nets.extend(
                                self.pods_in(ns)
                                    .filter(|p| routable(p) && sel.matches(&p.labels))
                                    .filter_map(|p| p.ip.map(|ip| (host(ip), Vec::new()))),
                            ),
                        }
                    }
                }
                Peer::Pods { namespaces, pods } => nets.extend(
                    self.peer_candidates(pol, namespaces.as_ref())
                        .filter(|p| routable(p))
                        .filter(|p| pods.as_ref().is_none_or(|sel| sel.matches(&p.labels)))
                        .filter_map(|p| p.ip.map(|ip| (host(ip), Vec::new()))),
                ),
            }
        }
        nets
    }
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// Whether `set` admits a connection with `peer` (`proto`, destination `port`): the
/// lookup the programs make, longest prefix first.
pub fn set_admits(set: &RuleSet, peer: std::net::Ipv4Addr, proto: u8, port: Option<u16>) -> bool {
    (0..=32u8)
        .rev()
        .find_map(|len| {
            let net = Ipv4Net::new(peer, len).ok()?.trunc();
            set.get(&net)
        })
        .is_some_and(|ranges| {
            let n = ranges.len().min(PORT_RANGES_MAX);
            let mut rules = vpc_ebpf_common::policy::PortRules {
                count: u32::try_from(n).unwrap_or(0),
                ..Default::default()
            };
            rules.ranges[..n].copy_from_slice(&ranges[..n]);
            rules.admits(proto, port)
        })
}

/// Every routable pod as the label index takes them.
fn routable_pods(
    pods: &HashMap<String, BTreeMap<String, PodView>>,
) -> impl Iterator<Item = (&str, &super::model::Labels, Ipv4Addr)> {
    pods.iter().flat_map(|(ns, names)| {
        names
            .values()
            .filter(|p| routable(p))
            .filter_map(move |p| Some((ns.as_str(), &p.labels, p.ip?)))
    })
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
    // The grants covering a prefix are those at one of its (at most 33) supernets: found
    // by lookup, not by testing every grant against every prefix (a peer selecting
    // hundreds of pods makes hundreds of /32 grants).
    let mut by_net: HashMap<Ipv4Net, Vec<&Grant>> = HashMap::new();
    for g in grants {
        by_net.entry(g.net).or_default().push(g);
    }
    // Only the lengths grants have (a handful: /32 pods, a few blocks).
    let lengths: BTreeSet<u8> = by_net.keys().map(Ipv4Net::prefix_len).collect();
    prefixes
        .into_iter()
        .map(|q| {
            let ranges: Vec<PortRange> = lengths
                .range(..=q.prefix_len())
                .filter_map(|&len| {
                    let net = Ipv4Net::new(q.network(), len).ok()?.trunc();
                    by_net.get(&net)
                })
                .flatten()
                .filter(|g| !g.except.iter().any(|e| e.contains(&q)))
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
