//! The policy engine: what the watchers know of the cluster (pods everywhere, namespaces,
//! policies), compiled for this node's pods and applied to the maps whenever something
//! changes, and for a new pod before its first packet.
//!
//! Until all three watches have listed once, the engine does not know the cluster's
//! policies: it leaves the (pinned) maps as an earlier run left them, and a new pod gets
//! what `NETWORK_POLICY_ENFORCING_MODE` says: `standard` admits its traffic until its
//! policies are known, `strict` denies all of it.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};
use vpc_ebpf_rpc::report::Chain;

use vpc_ebpf_common::policy::PolicyEvent;

use super::{
    cache::{Compiled, Dirty},
    compile::{PodRules, World},
    flow_log::Hub,
    flows::{Describer, FlowRecord},
    model::{PodView, Policy},
};
use crate::{
    dataplane::{
        DataplaneError,
        owner::{DataplaneHandle, PolicyApplied},
    },
    endpoints::Registry,
};

/// `NETWORK_POLICY_ENFORCING_MODE`, aws-node's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EnforcingMode {
    /// A pod whose policies are not known yet is not isolated.
    #[default]
    Standard,
    /// A pod whose policies are not known yet admits nothing, in either direction.
    Strict,
}

impl EnforcingMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "standard" => Some(Self::Standard),
            "strict" => Some(Self::Strict),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Strict => "strict",
        }
    }
}

/// Which watches have listed once.
pub mod source {
    pub const PODS: u8 = 1;
    pub const NAMESPACES: u8 = 2;
    pub const POLICIES: u8 = 4;
    pub const ALL: u8 = PODS | NAMESPACES | POLICIES;
}

#[derive(Debug, Default)]
struct Cluster {
    world: World,
    synced: u8,
    /// Bumped at every change the world takes (the flow log's attribution cache).
    generation: u64,
    /// What changed since the node's pods were last compiled, and what they compiled to.
    dirty: Dirty,
    compiled: Compiled,
}

impl Cluster {
    /// Records a change in `ns` (`None`: one that can touch anything).
    fn changed(&mut self, changed: bool, ns: Option<&str>) -> bool {
        if changed {
            self.generation += 1;
            match ns {
                Some(ns) => self.dirty.namespace(ns),
                None => self.dirty.everything(),
            }
        }
        changed
    }
}

pub struct Engine {
    cluster: Mutex<Cluster>,
    registry: Arc<Registry>,
    dp: DataplaneHandle,
    mode: EnforcingMode,
    changed: Notify,
    /// One apply at a time: each computes from the latest state.
    applying: tokio::sync::Mutex<()>,
    flows: Arc<Hub>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Changes are applied this long after the first of a burst (a Deployment's pods, a
/// namespace's policies arrive together).
const SETTLE: Duration = Duration::from_millis(20);

impl Engine {
    pub fn new(registry: Arc<Registry>, dp: DataplaneHandle, mode: EnforcingMode) -> Arc<Self> {
        Arc::new(Self {
            cluster: Mutex::new(Cluster::default()),
            registry,
            dp,
            mode,
            changed: Notify::new(),
            applying: tokio::sync::Mutex::new(()),
            flows: Arc::default(),
        })
    }

    /// Describes a batch of the programs' verdicts against the cluster as it is now.
    pub fn describe(
        &self,
        describer: &mut Describer,
        events: impl Iterator<Item = (PolicyEvent, u64)>,
    ) -> Vec<FlowRecord> {
        self.with(|c| {
            describer.set_generation(c.generation);
            events
                .map(|(ev, wall_ms)| describer.describe(&c.world, &ev, wall_ms))
                .collect()
        })
    }

    /// The flow log's records.
    pub fn flows(&self) -> Arc<Hub> {
        self.flows.clone()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Cluster) -> T) -> T {
        f(&mut self.cluster.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn synced(&self) -> bool {
        self.with(|c| c.synced == source::ALL)
    }

    // -- what the watchers report ------------------------------------------------------

    pub fn pod_applied(&self, p: PodView) {
        if self.with(|c| {
            let ns = p.namespace.clone();
            let ch = c.world.upsert_pod(p);
            c.changed(ch, Some(&ns))
        }) {
            self.changed.notify_one();
        }
    }

    pub fn pod_deleted(&self, namespace: &str, name: &str) {
        if self.with(|c| {
            let ch = c.world.remove_pod(namespace, name);
            c.changed(ch, Some(namespace))
        }) {
            self.changed.notify_one();
        }
    }

    pub fn pods_listed(&self, pods: Vec<PodView>) {
        self.with(|c| {
            c.world.replace_pods(pods);
            c.synced |= source::PODS;
            c.changed(true, None);
        });
        self.changed.notify_one();
    }

    pub fn namespace_applied(&self, name: String, labels: BTreeMap<String, String>) {
        if self.with(|c| {
            let ch = c.world.set_namespace(name, labels);
            c.changed(ch, None)
        }) {
            self.changed.notify_one();
        }
    }

    pub fn namespace_deleted(&self, name: &str) {
        if self.with(|c| {
            let ch = c.world.remove_namespace(name);
            c.changed(ch, None)
        }) {
            self.changed.notify_one();
        }
    }

    pub fn namespaces_listed(&self, namespaces: BTreeMap<String, BTreeMap<String, String>>) {
        self.with(|c| {
            c.world.replace_namespaces(namespaces);
            c.synced |= source::NAMESPACES;
            c.changed(true, None);
        });
        self.changed.notify_one();
    }

    pub fn policy_applied(&self, p: Policy) {
        if self.with(|c| {
            let ns = p.namespace.clone();
            let ch = c.world.upsert_policy(p);
            c.changed(ch, Some(&ns))
        }) {
            self.changed.notify_one();
        }
    }

    pub fn policy_deleted(&self, namespace: &str, name: &str) {
        if self.with(|c| {
            let ch = c.world.remove_policy(namespace, name);
            c.changed(ch, Some(namespace))
        }) {
            self.changed.notify_one();
        }
    }

    pub fn policies_listed(&self, policies: Vec<Policy>) {
        self.with(|c| {
            c.world.replace_policies(policies);
            c.synced |= source::POLICIES;
            c.changed(true, None);
        });
        self.changed.notify_one();
    }

    /// The node's pods changed (one went): applied with the next change.
    pub fn endpoints_changed(&self) {
        self.changed.notify_one();
    }

    // -- compiling and applying ---------------------------------------------------------

    /// Every local pod's rules, or `None` before all watches have listed. Only the local
    /// pods a change can touch are compiled again ([`Compiled`]), under the lock, from
    /// the world as it is.
    fn desired(&self) -> Option<BTreeMap<Ipv4Addr, PodRules>> {
        let endpoints = self.registry.pods();
        let (out, unknown) = self.with(|c| {
            if c.synced != source::ALL {
                return None;
            }
            // A local pod's address is known here before the API server has it.
            for (ip, pod) in &endpoints {
                let ns = &pod.namespace;
                let set = c.world.set_pod_ip(ns, &pod.name, *ip);
                c.changed(set, Some(ns));
            }
            let Cluster {
                world,
                dirty,
                compiled,
                ..
            } = c;
            let mut unknown = Vec::new();
            let local = endpoints.iter().filter_map(|e @ (ip, pod)| {
                let view = world.pod(&pod.namespace, &pod.name);
                if view.is_none() {
                    unknown.push(e);
                }
                Some((*ip, view?))
            });
            let n = compiled.update(world, dirty, local, |pod| {
                let (rules, cut) = world.compile(pod);
                for t in cut {
                    warn!(pod = %format!("{}/{}", pod.namespace, pod.name), prefix = %t.prefix, ranges = t.ranges,
                          "the pod's policies admit more port ranges for one peer than the dataplane holds; the rest are not admitted");
                }
                rules
            });
            *dirty = Dirty::default();
            debug!(recompiled = n.pods, kept = n.kept, "local pods' rules");
            let out: BTreeMap<Ipv4Addr, PodRules> = endpoints
                .iter()
                .filter_map(|(ip, _)| Some((*ip, compiled.rules(*ip)?.clone())))
                .collect();
            Some((out, unknown))
        })?;
        let mut out = out;
        for (ip, pod) in unknown {
            if let Some(r) = self.unknown_pod(*ip, &pod.namespace, &pod.name) {
                out.insert(*ip, r);
            }
        }
        Some(out)
    }

    /// The rules of a pod whose policies cannot be known: by the enforcing mode.
    fn unknown_pod(&self, ip: Ipv4Addr, namespace: &str, name: &str) -> Option<PodRules> {
        match self.mode {
            EnforcingMode::Standard => {
                info!(%ip, pod = %format!("{namespace}/{name}"), "the pod's policies are not known yet; NETWORK_POLICY_ENFORCING_MODE=standard admits its traffic until they are");
                None
            }
            EnforcingMode::Strict => {
                info!(%ip, pod = %format!("{namespace}/{name}"), "the pod's policies are not known yet; NETWORK_POLICY_ENFORCING_MODE=strict denies its traffic until they are");
                Some(PodRules {
                    ingress: Some(Arc::default()),
                    egress: Some(Arc::default()),
                    policies: Vec::new(),
                })
            }
        }
    }

    /// Applies what the cluster says now. Before the watches have listed, nothing changes.
    pub async fn sync(&self) -> Result<Option<PolicyApplied>, DataplaneError> {
        let _one = self.applying.lock().await;
        let Some(desired) = self.desired() else {
            return Ok(None);
        };
        self.dp.apply_policy(desired).await.map(Some)
    }

    /// Makes sure the policy of the pod at `ip` (already in the registry) is in the maps:
    /// called before the pod's first packet can flow. Before the watches have listed,
    /// only this pod changes, by the enforcing mode.
    pub async fn program_pod(
        &self,
        ip: Ipv4Addr,
        namespace: &str,
        name: &str,
    ) -> Result<(), DataplaneError> {
        let _one = self.applying.lock().await;
        if let Some(desired) = self.desired() {
            if !desired.contains_key(&ip) {
                debug!(%ip, "no policy selects the new pod");
            }
            self.dp.apply_policy(desired).await?;
        } else {
            let rules = self.unknown_pod(ip, namespace, name).unwrap_or_default();
            self.dp.amend_policy(BTreeMap::from([(ip, rules)])).await?;
        }
        Ok(())
    }

    /// Applies every change, a moment after it comes, until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = self.changed.notified() => {}
            }
            tokio::time::sleep(SETTLE).await;
            let t0 = std::time::Instant::now();
            match self.sync().await {
                Ok(None) => {}
                Ok(Some(a)) => {
                    failing = false;
                    if a.sets_written + a.pods_changed + a.sets_removed > 0 {
                        info!(took = ?t0.elapsed(), pods_isolated = a.pods, rule_sets = a.sets,
                              sets_written = a.sets_written, pods_changed = a.pods_changed,
                              sets_removed = a.sets_removed, "NetworkPolicy applied");
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %Chain(&e), "applying NetworkPolicy failed; retrying");
                    }
                    failing = true;
                    // Retried by itself, not only on the next change.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    self.changed.notify_one();
                }
            }
        }
    }
}
