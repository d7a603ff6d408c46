//! The compiled rules of the node's pods, kept between changes: a change recompiles only
//! the local pods whose rules it can touch. A big cluster changes all the time (150k pods,
//! each start and stop a change); recompiling a node's hundred pods at every one would
//! cost far more than the one or two it touches.
//!
//! A local pod's rules are made of its own namespace's policies and the pods their peers
//! select: pods of the policy's namespace, of the namespaces a `namespaceSelector`
//! selects, and — for an egress rule with named ports and no pod selector — any pod. So a
//! change to a policy or pod in namespace N touches the local pods of N, those with a
//! namespace selector that selects N, and those with such an egress rule; a change to
//! namespaces' labels can touch any of them.
//!
//! Pure: [`Dirty`] is what changed, [`Deps`] what a compiled pod depends on.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use super::{
    compile::{PodRules, World},
    model::{Peer, PodView, PortSel, Selector},
};

/// What changed since the last compile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Everything (a relist, a namespace's labels): every local pod is recompiled.
    pub all: bool,
    /// Namespaces in which a pod or a policy changed.
    pub namespaces: BTreeSet<String>,
}

impl Dirty {
    pub fn namespace(&mut self, ns: &str) {
        if !self.all && !self.namespaces.contains(ns) {
            self.namespaces.insert(ns.to_owned());
        }
    }

    pub fn everything(&mut self) {
        self.all = true;
        self.namespaces.clear();
    }

    pub fn is_clean(&self) -> bool {
        !self.all && self.namespaces.is_empty()
    }
}

/// What a compiled local pod's rules depend on beyond its own namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deps {
    /// The namespace selectors of its policies' peers.
    pub namespaces: Vec<Selector>,
    /// An egress rule resolves named ports on pods anywhere.
    pub any_pod: bool,
}

impl Deps {
    pub fn of(world: &World, pod: &PodView) -> Self {
        let mut d = Self::default();
        for pol in world.selecting(pod) {
            let ingress = pol.ingress.iter().flatten().map(|r| (r, false));
            let egress = pol.egress.iter().flatten().map(|r| (r, true));
            for (rule, is_egress) in ingress.chain(egress) {
                let named = rule
                    .ports
                    .iter()
                    .any(|p| matches!(p.port, PortSel::Named(_)));
                if is_egress && named && rule.peers.is_empty() {
                    d.any_pod = true;
                }
                for peer in &rule.peers {
                    match peer {
                        Peer::Pods {
                            namespaces: Some(sel),
                            ..
                        } => {
                            if !d.namespaces.contains(sel) {
                                d.namespaces.push(sel.clone());
                            }
                        }
                        Peer::Block { .. } if is_egress && named => d.any_pod = true,
                        Peer::Pods { .. } | Peer::Block { .. } | Peer::Ipv6Block => {}
                    }
                }
            }
        }
        d
    }

    /// Whether a change in `ns` can touch a pod of `own` namespace with these deps.
    fn touched(&self, world: &World, own: &str, ns: &str) -> bool {
        own == ns
            || self.any_pod
            || self
                .namespaces
                .iter()
                .any(|sel| sel.matches(world.namespace_labels(ns)))
    }
}

#[derive(Clone, Debug)]
struct Entry {
    namespace: String,
    name: String,
    rules: PodRules,
    deps: Deps,
}

/// The compiled rules of the node's pods, by address.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pods: HashMap<Ipv4Addr, Entry>,
}

/// How much of a [`Compiled::update`] was recompiled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recompiled {
    pub pods: usize,
    pub kept: usize,
}

impl Compiled {
    /// Brings the rules of `local` (address, namespace, name; pods the world knows) up to
    /// date after `dirty`, and forgets pods no longer local. `compile` is called for each
    /// pod to recompile.
    pub fn update<'a>(
        &mut self,
        world: &World,
        dirty: &Dirty,
        local: impl Iterator<Item = (Ipv4Addr, &'a PodView)>,
        mut compile: impl FnMut(&PodView) -> PodRules,
    ) -> Recompiled {
        let mut seen = BTreeSet::new();
        let mut n = Recompiled::default();
        for (ip, pod) in local {
            seen.insert(ip);
            let fresh = self.pods.get(&ip).is_some_and(|e| {
                e.namespace == pod.namespace
                    && e.name == pod.name
                    && !dirty.all
                    && !dirty
                        .namespaces
                        .iter()
                        .any(|ns| e.deps.touched(world, &e.namespace, ns))
            });
            if fresh {
                n.kept += 1;
                continue;
            }
            n.pods += 1;
            self.pods.insert(
                ip,
                Entry {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    rules: compile(pod),
                    deps: Deps::of(world, pod),
                },
            );
        }
        self.pods.retain(|ip, _| seen.contains(ip));
        n
    }

    pub fn rules(&self, ip: Ipv4Addr) -> Option<&PodRules> {
        self.pods.get(&ip).map(|e| &e.rules)
    }
}

#[cfg(test)]
mod tests;
