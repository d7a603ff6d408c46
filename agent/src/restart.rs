//! Starting again without disturbing pods: after a stop, a crash or an upgrade the agent
//! rebuilds the node's state before it answers anyone, from what survives it.
//!
//! 1. [`restore_local`] — local files only, so it works while EC2 is unreachable: the
//!    IPAM checkpoint (an unreadable one moved aside), the node's identity cache, the
//!    endpoint registry, the releases the plugin recorded while the agent was down, and
//!    the addresses pods on this host still use that the checkpoint does not know.
//! 2. [`adopt_dataplane`] — every endpoint re-programmed from the registry (or, for one
//!    it lacks, from the pinned maps and the pod's host route), whatever the pins held: a
//!    map re-created empty (a layout change, a `PIN_VERSION` bump, lost pins) is refilled
//!    and lost links re-attached before traffic depends on them; entries of pods that are
//!    gone are removed; pin directories of other versions go once nothing uses them.
//! 3. [`sweep`] — periodically: recorded releases, holds for pods found only by their
//!    route whose route went, and addresses held for pods whose veth is gone (a stale
//!    checkpoint, an ADD whose plugin died before reporting back).
//!
//! The decisions are pure functions ([`claim_routed`], [`plan_adoption`],
//! [`stale_assignments`]) tested on their own; the rest is their I/O.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use tracing::{error, info, warn};
use vpc_ebpf_rpc::{report::Chain, types::PendingRelease};

use crate::{
    clock::now_ms,
    config::Config,
    dataplane::{
        Dataplane, DataplaneConfig, DataplaneError, EndpointSpec,
        owner::{self, DataplaneHandle, EndpointDesc, Programmed},
        settings::{self, NodeSettings},
    },
    endpoints::{self, Endpoint, PodRef, Registry, Wiring},
    host::{Host, Link, PodRoute},
    ipam::{
        EniDesc, EniRef, Ipam, checkpoint,
        store::{AttachmentKey, PodMeta, Store},
    },
    metrics::Metrics,
    node::{self, Node},
    persist,
};

/// The network name of attachments recovered from host routes: not one a runtime uses,
/// so only the recovery sweep, or the runtime's CHECK taking it over, ends them.
pub const RECOVERED_NETWORK: &str = "vpc-ebpf-recovered";

/// How long an address may be held with no route to a pod before it is released: the
/// plugin adds the route within its 10 s ADD deadline, so an older hold without one
/// belongs to a pod that is gone (its veth deleted without a DEL) or to a checkpoint older
/// than the node.
pub const STALE_GRACE_MS: u64 = 60_000;

pub fn recovered_key(ifname: &str) -> AttachmentKey {
    AttachmentKey {
        network: RECOVERED_NETWORK.into(),
        container_id: ifname.into(),
        ifname: "eth0".into(),
    }
}

/// The state read from local files at start.
#[derive(Debug)]
pub struct Local {
    pub store: Store,
    /// `None` on a node's first start (or a lost cache): discover before serving.
    pub node: Option<Node>,
    pub endpoints: Vec<Endpoint>,
    pub released_pending: usize,
    pub recovered: Vec<PodRoute>,
}

fn cooldown_ms(config: &Config) -> u64 {
    u64::try_from(config.ip_cooldown.as_millis()).unwrap_or(u64::MAX)
}

/// Moves an unreadable state file aside, never silently overwriting it.
fn aside(path: &Path, what: &str, e: &dyn std::error::Error) {
    match persist::move_aside(path, now_ms()) {
        Ok(to) => {
            error!(error = %Chain(e), moved_to = %to.display(), "{what} is unreadable; starting without it");
        }
        Err(m) => {
            error!(error = %Chain(e), move_error = %Chain(&m), "{what} is unreadable and could not be moved aside");
        }
    }
}

fn load_store(config: &Config) -> Store {
    let cooldown = cooldown_ms(config);
    match checkpoint::load(&config.checkpoint) {
        Ok(Some(mut s)) => {
            if s.mode != config.mode {
                warn!(from = ?s.mode, to = ?config.mode, "ENABLE_PREFIX_DELEGATION changed since the checkpoint; pods keep their addresses, new ones come from the new mode");
                s.mode = config.mode;
            }
            s.cooldown_ms = cooldown;
            s
        }
        Ok(None) => Store::new(config.mode, cooldown),
        Err(e) => {
            aside(&config.checkpoint, "the IPAM checkpoint", &e);
            Store::new(config.mode, cooldown)
        }
    }
}

/// Step 1: the node's state from local files (see the module documentation). Saves the
/// result before returning.
pub async fn restore_local(config: &Config, host: &Host) -> Local {
    let now = now_ms();
    let mut store = load_store(config);
    let node_path = node::cache_path(&config.checkpoint);
    let node = node::load_cached(&node_path).unwrap_or_else(|e| {
        aside(&node_path, "the node identity cache", &e);
        None
    });
    let reg_path = endpoints::registry_path(&config.checkpoint);
    let mut endpoints = endpoints::load(&reg_path).unwrap_or_else(|e| {
        aside(&reg_path, "the endpoint registry", &e);
        Vec::new()
    });
    let pending = apply_pending(&pending_dir(config), &mut store, now);
    let routes = host
        .pod_routes(&config.veth_prefix)
        .await
        .unwrap_or_else(|e| {
            warn!(error = %Chain(&e), "listing pod routes failed; nothing recovered from them");
            Vec::new()
        });
    let recovered = claim_routed(&mut store, &routes, &endpoints, now);
    // An endpoint whose address is another attachment's, or whose pod is gone, is stale.
    // One the store does not know at all (a lost checkpoint, EC2 not merged yet) stays
    // while its pod's route does: the sweep claims its address once the store has it.
    endpoints.retain(|e| match store.holder(e.ip) {
        Some((k, ..)) => *k == e.key,
        None => routes.iter().any(|r| r.ip == e.ip),
    });
    match checkpoint::save(&config.checkpoint, &store) {
        // Only now are the recorded releases safe to forget.
        Ok(()) => pending.remove(),
        Err(e) => error!(error = %Chain(&e), "could not save the restored checkpoint"),
    }
    info!(
        enis = store.enis().count(),
        assignments = store.assignments().count(),
        endpoints = endpoints.len(),
        node_known = node.is_some(),
        released_pending = pending.freed.len(),
        recovered = recovered.len(),
        "restored the node's state from local files"
    );
    Local {
        store,
        node,
        endpoints,
        released_pending: pending.freed.len(),
        recovered,
    }
}

/// Where the plugin records releases it could not hand over (next to the socket).
pub fn pending_dir(config: &Config) -> PathBuf {
    vpc_ebpf_rpc::types::pending_dir(&config.agent_socket)
}

/// What [`apply_pending`] did: the attachments it released and the records it consumed.
/// The records must be removed ([`Applied::remove`]) only after the store is saved, or a
/// crash in between would forget the release.
#[derive(Debug, Default)]
pub struct Applied {
    pub freed: Vec<(AttachmentKey, Ipv4Addr)>,
    pub records: Vec<PathBuf>,
}

impl Applied {
    pub fn remove(&self) {
        for path in &self.records {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(path = %path.display(), error = %e, "could not remove a pending release");
            }
        }
    }
}

fn apply_one(
    store: &mut Store,
    p: &PendingRelease,
    now_ms: u64,
) -> Option<(AttachmentKey, Ipv4Addr)> {
    let key = AttachmentKey {
        network: p.network.clone(),
        container_id: p.container_id.clone(),
        ifname: p.ifname.clone(),
    };
    // A record older than the attachment's current address raced with a restart: the
    // address is a newer pod's.
    let newer = p
        .recorded_ms
        .zip(store.assigned_since(&key))
        .is_some_and(|(recorded, since)| since > recorded);
    if newer {
        info!(container = %key.container_id, "ignoring a recorded release older than the attachment's current address");
        return None;
    }
    let ip = store.release(&key, now_ms)?;
    info!(%ip, container = %key.container_id, "released a DEL recorded while the agent was unreachable");
    Some((key, ip))
}

/// Releases every recorded attachment. Unreadable records are left in place and logged,
/// never guessed at.
pub fn apply_pending(dir: &Path, store: &mut Store, now_ms: u64) -> Applied {
    let (records, unreadable) = PendingRelease::read_dir(dir);
    for path in unreadable {
        warn!(path = %path.display(), "unreadable pending release left in place");
    }
    let mut out = Applied::default();
    for (path, p) in records {
        out.freed.extend(apply_one(store, &p, now_ms));
        out.records.push(path);
    }
    out
}

/// The recorded release for `key`, if the plugin left one: applied to the store by the
/// caller before `key` is served again, so a retried ADD never gets the address a DEL it
/// could not deliver was meant to free.
pub fn take_pending(dir: &Path, key: &AttachmentKey) -> Option<(PathBuf, PendingRelease)> {
    PendingRelease::read_one(dir, &key.network, &key.container_id, &key.ifname)
}

/// Applies one recorded release taken with [`take_pending`].
pub fn apply_taken(
    store: &mut Store,
    p: &PendingRelease,
    now_ms: u64,
) -> Option<(AttachmentKey, Ipv4Addr)> {
    apply_one(store, p, now_ms)
}

/// Every pod route to an address the store does not show as assigned is a pod we lost
/// track of (a checkpoint lost or older than the pod): hold its address so nobody else
/// gets it — under its attachment when the registry still knows the pod on that veth, so
/// the runtime's CHECK and DEL find it; else under a placeholder until the runtime's CHECK
/// names it. Returns the routes claimed.
pub fn claim_routed(
    store: &mut Store,
    routes: &[PodRoute],
    known: &[Endpoint],
    now_ms: u64,
) -> Vec<PodRoute> {
    let assigned: BTreeSet<Ipv4Addr> = store.assignments().map(|(_, _, ip, _)| ip).collect();
    let mut out = Vec::new();
    for r in routes.iter().filter(|r| !assigned.contains(&r.ip)) {
        // Only addresses the node holds; the store says which (after EC2 is merged).
        if store.eni_of(r.ip).is_none() {
            continue;
        }
        let wired = known.iter().find(|e| {
            e.ip == r.ip
                && e.wiring
                    .as_ref()
                    .is_some_and(|w| w.host_ifindex == r.ifindex)
                && store.lookup(&e.key).is_none()
        });
        let (key, pod) = wired.map_or_else(
            || (recovered_key(&r.ifname), PodMeta::default()),
            |e| {
                (
                    e.key.clone(),
                    PodMeta {
                        namespace: e.pod.namespace.clone(),
                        name: e.pod.name.clone(),
                        uid: e.pod.uid.clone(),
                    },
                )
            },
        );
        match store.claim(r.ip, &key, &pod, now_ms) {
            Ok(()) => {
                warn!(ip = %r.ip, veth = %r.ifname, "holding an address a pod on this host uses that the checkpoint did not know");
                out.push(r.clone());
            }
            Err(e) => {
                warn!(ip = %r.ip, veth = %r.ifname, error = %Chain(&e), "a pod route points at an address this node cannot hold");
            }
        }
    }
    out
}

/// Assignments to release because their pod is gone: holds for recovered pods whose
/// route went, and any other assignment older than [`STALE_GRACE_MS`] with no route to
/// its address at all.
pub fn stale_assignments(store: &Store, routes: &[PodRoute], now_ms: u64) -> Vec<AttachmentKey> {
    let has_route: BTreeSet<Ipv4Addr> = routes.iter().map(|r| r.ip).collect();
    let routed_via: BTreeSet<(&str, Ipv4Addr)> =
        routes.iter().map(|r| (r.ifname.as_str(), r.ip)).collect();
    store
        .assignments()
        .filter(|(k, _, ip, _)| {
            if k.network == RECOVERED_NETWORK {
                return !routed_via.contains(&(k.container_id.as_str(), *ip));
            }
            let old = store
                .assigned_since(k)
                .is_some_and(|since| now_ms.saturating_sub(since) > STALE_GRACE_MS);
            old && !has_route.contains(ip)
        })
        .map(|(k, ..)| k.clone())
        .collect()
}

/// What [`plan_adoption`] decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Endpoints to program (from the registry, or rebuilt from the pins), in address
    /// order: the registry becomes exactly these.
    pub endpoints: Vec<Endpoint>,
    /// Pinned entries of pods that are gone (no route to them through their veth).
    pub remove: Vec<Ipv4Addr>,
    /// Pods whose veth exists but that the store does not hold (a lost checkpoint, or EC2
    /// not merged yet): their entries stay as they are (registry and pins) until the sweep
    /// claims their addresses.
    pub kept_unknown: Vec<Endpoint>,
    /// Assignments whose pod's veth exists but whose MACs nobody knows any more (pins and
    /// registry both lost): the runtime's next ADD or CHECK of the pod repairs them.
    pub unknown: Vec<Ipv4Addr>,
}

/// The pods on the node after a restart: every assignment whose address has a host route
/// through the veth its endpoint names. The registry is trusted first; for an assignment
/// it lacks (an agent that predates it, a crash between programming and saving), the
/// pinned entry is adopted.
pub fn plan_adoption<S: std::hash::BuildHasher>(
    store: &Store,
    registry: &[Endpoint],
    pinned: &Programmed,
    routes: &[PodRoute],
    links: &HashMap<u32, Link, S>,
) -> Adoption {
    let alive =
        |ip: Ipv4Addr, ifindex: u32| routes.iter().any(|r| r.ip == ip && r.ifindex == ifindex);
    let pinned_by_ip: BTreeMap<Ipv4Addr, &EndpointSpec> =
        pinned.endpoints.iter().map(|e| (e.ipv4, e)).collect();
    let mut out = Adoption::default();
    for (key, pod, ip, eni) in store.assignments() {
        let eni_ref = eni.reference();
        let from_registry = registry.iter().find(|e| {
            e.ip == ip
                && e.key == *key
                && e.wiring.as_ref().is_some_and(|w| alive(ip, w.host_ifindex))
        });
        if let Some(e) = from_registry {
            out.endpoints.push(Endpoint {
                eni: eni_ref,
                ..e.clone()
            });
            continue;
        }
        if let Some(p) = pinned_by_ip.get(&ip).filter(|p| alive(ip, p.host_ifindex)) {
            let host_ifname = links
                .get(&p.host_ifindex)
                .map(|l| l.name.clone())
                .unwrap_or_default();
            out.endpoints.push(Endpoint {
                ip,
                key: key.clone(),
                pod: PodRef {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    uid: pod.uid.clone(),
                },
                eni: eni_ref,
                host_ports: pinned.host_ports.get(&ip).cloned().unwrap_or_default(),
                wiring: Some(Wiring {
                    host_ifname,
                    host_ifindex: p.host_ifindex,
                    host_mac: p.host_mac,
                    pod_mac: p.pod_mac,
                }),
                labels: BTreeMap::new(),
                named_ports: Vec::new(),
                policy_id: 0,
            });
            continue;
        }
        if routes.iter().any(|r| r.ip == ip) {
            out.unknown.push(ip);
        }
    }
    let assigned: BTreeSet<Ipv4Addr> = store.assignments().map(|(_, _, ip, _)| ip).collect();
    out.kept_unknown = registry
        .iter()
        .filter(|e| !assigned.contains(&e.ip))
        .filter(|e| {
            e.wiring
                .as_ref()
                .is_some_and(|w| alive(e.ip, w.host_ifindex))
        })
        .cloned()
        .collect();
    let kept: BTreeSet<Ipv4Addr> = out.endpoints.iter().map(|e| e.ip).collect();
    out.remove = pinned
        .endpoints
        .iter()
        .filter(|e| !kept.contains(&e.ipv4))
        // A pod the store does not know but whose veth still routes to it keeps its entry.
        .filter(|e| assigned.contains(&e.ipv4) || !alive(e.ipv4, e.host_ifindex))
        .map(|e| e.ipv4)
        .collect();
    out
}

/// What the dataplane needs to program `e`, with the ENI as the store has it.
pub fn endpoint_desc(e: &Endpoint, eni: &EniDesc) -> Option<EndpointDesc> {
    let w = e.wiring.as_ref()?;
    Some(EndpointDesc {
        ip: e.ip,
        host_ifindex: w.host_ifindex,
        host_mac: w.host_mac,
        pod_mac: w.pod_mac,
        eni: eni.clone(),
        host_ports: e.host_ports.clone(),
        via_host_qdisc: None,
    })
}

/// Loads (or re-opens) the dataplane and starts its owner, with the node's tables set and
/// the store's ENIs programmed.
pub async fn start_dataplane(
    config: &Config,
    node: &Node,
    ipam: &Ipam,
    metrics: Arc<Metrics>,
) -> Result<Started, StartError> {
    let settings: NodeSettings =
        settings::node_settings(config, node, settings::host_ephemeral_ports())
            .map_err(StartError::Snat)?;
    let dp_config = DataplaneConfig {
        pin_root: config.pin_root.clone(),
        attach_mode: None,
        nat_max_entries: config.nat_max_entries,
    };
    // Loading programs takes a few hundred milliseconds of syscalls: off the workers.
    let mut dp = tokio::task::spawn_blocking(move || Dataplane::load(&dp_config))
        .await
        .map_err(|_| StartError::Dataplane(Box::new(DataplaneError::Stopped)))?
        .map_err(|e| StartError::Dataplane(Box::new(e)))?;
    if !dp.replaced_maps().is_empty() {
        warn!(maps = ?dp.replaced_maps(), "pinned maps were re-created empty; re-programming every endpoint");
    }
    enable_ip_forward()?;
    let policy_events = dp
        .take_policy_events()
        .map_err(|e| StartError::Dataplane(Box::new(e)))?;
    let (handle, thread) = owner::spawn(dp, node.gateway(), metrics).map_err(StartError::Thread)?;
    handle
        .set_node(settings)
        .await
        .map_err(|e| StartError::Dataplane(Box::new(e)))?;
    let enis = ipam.enis().borrow().clone();
    let programmed = handle
        .set_enis(enis)
        .await
        .map_err(|e| StartError::Dataplane(Box::new(e)))?;
    info!(enis = programmed, "dataplane loaded");
    Ok(Started {
        handle,
        thread,
        policy_events,
    })
}

/// A loaded dataplane: its owner, the owner's thread, and the policy events' reader.
#[derive(Debug)]
pub struct Started {
    pub handle: DataplaneHandle,
    pub thread: std::thread::JoinHandle<()>,
    pub policy_events: crate::dataplane::events::PolicyEvents,
}

/// What the programs hand to the kernel (Service traffic kube-proxy DNATs to another
/// node, pod traffic to the node's other addresses) is forwarded by it.
fn enable_ip_forward() -> Result<(), StartError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    match std::fs::read_to_string(PATH) {
        Ok(v) if v.trim() == "1" => Ok(()),
        _ => {
            std::fs::write(PATH, "1").map_err(StartError::IpForward)?;
            info!("enabled net.ipv4.ip_forward");
            Ok(())
        }
    }
}

/// Failures of the start-up steps that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the SNAT port range")]
    Snat(#[source] settings::SnatRangeError),
    #[error(
        "loading the eBPF dataplane (check VPC_EBPF_PIN_ROOT, bpffs and the kernel's BPF support)"
    )]
    Dataplane(#[source] Box<DataplaneError>),
    #[error("starting the dataplane owner's thread")]
    Thread(#[source] std::io::Error),
    #[error(
        "enabling net.ipv4.ip_forward (the agent needs CAP_NET_ADMIN and a writable /proc/sys)"
    )]
    IpForward(#[source] std::io::Error),
    #[error("reading the node's interfaces and routes")]
    Host(#[source] crate::host::HostError),
}

/// What [`adopt_dataplane`] did.
#[derive(Debug, Default)]
pub struct Adopted {
    pub programmed: usize,
    pub removed: usize,
    pub failed: usize,
    pub unknown: usize,
    pub old_versions: Vec<PathBuf>,
}

/// Step 2: makes the dataplane hold exactly the pods on the node (see the module
/// documentation), then removes the pins of other versions.
pub async fn adopt_dataplane(
    dp: &DataplaneHandle,
    ipam: &Ipam,
    registry: &Registry,
    host: &Host,
) -> Result<Adopted, StartError> {
    let pinned = dp.programmed().await.unwrap_or_else(|e| {
        warn!(error = %Chain(&e), "reading the pinned endpoints failed; programming from the registry alone");
        Programmed::default()
    });
    let routes = host.host_routes().await.map_err(StartError::Host)?;
    let links: HashMap<u32, Link> = host
        .links()
        .await
        .map_err(StartError::Host)?
        .into_iter()
        .map(|l| (l.index, l))
        .collect();
    let (plan, enis) = ipam
        .read(|s, _| {
            let plan = plan_adoption(s, &registry.all(), &pinned, &routes, &links);
            let enis: HashMap<String, EniDesc> =
                s.enis().map(|e| (e.id.clone(), e.desc())).collect();
            (plan, enis)
        })
        .await;
    let mut out = Adopted {
        unknown: plan.unknown.len(),
        ..Adopted::default()
    };
    for e in &plan.endpoints {
        let Some(desc) = enis.get(&e.eni.id).and_then(|eni| endpoint_desc(e, eni)) else {
            continue;
        };
        match dp.upsert(desc).await {
            Ok(()) => out.programmed += 1,
            Err(err) => {
                out.failed += 1;
                warn!(ip = %e.ip, error = %Chain(&err), "could not re-program a pod");
            }
        }
    }
    for ip in &plan.remove {
        match dp.remove(*ip).await {
            Ok(()) => out.removed += 1,
            Err(e) => warn!(%ip, error = %Chain(&e), "could not remove a stale endpoint"),
        }
    }
    for ip in &plan.unknown {
        warn!(%ip, "a pod's veth exists but neither the registry nor the pins know its MACs; its next CHECK or ADD repairs it");
    }
    let keep: HashSet<Ipv4Addr> = plan
        .endpoints
        .iter()
        .chain(&plan.kept_unknown)
        .map(|e| e.ip)
        .collect();
    if !plan.kept_unknown.is_empty() {
        warn!(
            pods = plan.kept_unknown.len(),
            "pods on this node whose addresses the store does not hold yet keep their dataplane entries until their addresses are claimed"
        );
    }
    if let Err(e) = registry.retain(|e| keep.contains(&e.ip)) {
        warn!(error = %Chain(&e), "saving the endpoint registry failed");
    }
    for e in plan.endpoints {
        if let Err(err) = registry.adopt(e) {
            warn!(error = %Chain(&err), "saving the endpoint registry failed");
        }
    }
    let mut live: HashSet<Ipv4Addr> = ipam
        .read(|s, _| s.assignments().map(|(_, _, ip, _)| ip).collect())
        .await;
    live.extend(keep);
    match dp.sweep_rules(live).await {
        Ok(0) => {}
        Ok(n) => info!(
            rules = n,
            "removed ip rules of pods deleted while the agent was down"
        ),
        Err(e) => warn!(error = %Chain(&e), "sweeping pod ip rules failed"),
    }
    match dp.remove_other_versions().await {
        Ok(v) => out.old_versions = v,
        Err(e) => warn!(error = %Chain(&e), "could not remove pins of other versions"),
    }
    if !out.old_versions.is_empty() {
        info!(removed = ?out.old_versions, "removed the pins of other dataplane versions");
    }
    Ok(out)
}

/// What one [`sweep`] released.
#[derive(Debug, Default)]
pub struct Swept {
    pub pending: usize,
    pub stale: usize,
    pub claimed: usize,
}

/// Step 3, run periodically (and once right after the agent is ready): recorded
/// releases, holds whose pod is gone, routed addresses the store lost.
pub async fn sweep(
    ipam: &Ipam,
    registry: &Registry,
    dp: Option<&DataplaneHandle>,
    host: &Host,
    pending: &Path,
    veth_prefix: &str,
) -> Swept {
    let now = now_ms();
    let known = registry.all();
    let routes = match host.host_routes().await {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(error = %Chain(&e), "listing routes failed; only recorded releases are applied");
            None
        }
    };
    let result = ipam
        .update(|s| {
            let applied = apply_pending(pending, s, now);
            let mut released = applied.freed.clone();
            let mut claimed = 0;
            if let Some(routes) = &routes {
                for k in stale_assignments(s, routes, now) {
                    if let Some(ip) = s.release(&k, now) {
                        info!(%ip, container = %k.container_id, "released an address whose pod is gone (no route to it)");
                        released.push((k, ip));
                    }
                }
                let ours: Vec<PodRoute> = routes
                    .iter()
                    .filter(|r| r.ifname.starts_with(veth_prefix))
                    .cloned()
                    .collect();
                claimed = claim_routed(s, &ours, &known, now).len();
            }
            (applied, released, claimed)
        })
        .await;
    let (applied, released, claimed): (Applied, Vec<(AttachmentKey, Ipv4Addr)>, usize) =
        match result {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %Chain(&e), "checkpoint after the sweep failed; trying again later");
                return Swept::default();
            }
        };
    applied.remove();
    for (key, ip) in &released {
        if let Err(e) = registry.remove(*ip, key) {
            warn!(error = %Chain(&e), "saving the endpoint registry failed");
        }
        if let Some(dp) = dp
            && let Err(e) = dp.remove(*ip).await
        {
            warn!(%ip, error = %Chain(&e), "removing a released pod from the dataplane failed");
        }
    }
    if !released.is_empty() {
        ipam.pool_changed().notify_one();
    }
    Swept {
        pending: applied.freed.len(),
        stale: released.len() - applied.freed.len(),
        claimed,
    }
}

/// How often the sweep runs: recorded releases are applied within this.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs [`sweep`] at once and then every [`SWEEP_EVERY`] until `stop`.
pub async fn sweep_loop(
    services: crate::rpc::Services,
    host: Host,
    veth_prefix: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let s = sweep(
            &services.ipam,
            &services.endpoints,
            services.dataplane(),
            &host,
            &services.pending_dir,
            &veth_prefix,
        )
        .await;
        if s.pending + s.stale + s.claimed > 0 {
            info!(
                pending = s.pending,
                stale = s.stale,
                claimed = s.claimed,
                "recovery sweep"
            );
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}

/// Pod identity as the store keeps it, for the registry.
pub fn pod_ref(p: &PodMeta) -> PodRef {
    PodRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
    }
}

/// The ENI reference of a description.
pub fn eni_ref(e: &EniDesc) -> EniRef {
    EniRef {
        id: e.id.clone(),
        device_index: e.device_index,
    }
}

/// A fresh store for `config`'s mode (IPAM-only tests, first starts).
pub fn empty_store(config: &Config) -> Store {
    Store::new(config.mode, cooldown_ms(config))
}

#[cfg(test)]
mod tests {
    use vpc_ebpf_rpc::types::{HostPort, MacAddr};

    use super::*;
    use crate::ipam::pool::Mode;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn key(c: &str) -> AttachmentKey {
        AttachmentKey {
            network: "aws-cni".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn route(addr: &str, ifindex: u32, name: &str) -> PodRoute {
        PodRoute {
            ip: ip(addr),
            ifindex,
            ifname: name.into(),
        }
    }

    fn store() -> Store {
        let mut s = Store::new(Mode::SecondaryIp, 1_000);
        s.upsert_eni("eni-0", 0, MacAddr([2, 0, 0, 0, 0, 1]), ip("10.0.0.10"));
        s.add_ips(
            "eni-0",
            &[
                ip("10.0.0.20"),
                ip("10.0.0.21"),
                ip("10.0.0.22"),
                ip("10.0.0.23"),
            ],
        )
        .unwrap();
        s
    }

    fn wired(addr: &str, k: &str, ifindex: u32) -> Endpoint {
        Endpoint {
            ip: ip(addr),
            key: key(k),
            pod: PodRef::default(),
            eni: EniRef {
                id: "eni-0".into(),
                device_index: 0,
            },
            host_ports: vec![],
            wiring: Some(Wiring {
                host_ifname: format!("eni{ifindex}"),
                host_ifindex: ifindex,
                host_mac: MacAddr([2, 0, 0, 0, 1, 0]),
                pod_mac: MacAddr([2, 0, 0, 0, 2, 0]),
            }),
            labels: BTreeMap::new(),
            named_ports: vec![],
            policy_id: 0,
        }
    }

    #[test]
    fn routed_addresses_are_held_then_released_when_the_route_goes() {
        let mut s = store();
        let known = key("c1");
        s.claim(ip("10.0.0.20"), &known, &PodMeta::default(), 0)
            .unwrap();
        let routes = [
            route("10.0.0.20", 7, "eniaaa"),
            route("10.0.0.21", 8, "enibbb"),
            route("10.0.0.99", 9, "eniccc"),
            route("10.0.0.10", 10, "eniddd"),
        ];
        let rec = claim_routed(&mut s, &routes, &[], 0);
        assert_eq!(rec, vec![route("10.0.0.21", 8, "enibbb")]);
        assert_eq!(s.lookup(&recovered_key("enibbb")), Some(ip("10.0.0.21")));
        assert!(stale_assignments(&s, &routes, 10).is_empty());
        // The recovered pod's route went: its hold goes at once; the known pod keeps its
        // address through the grace period even without a route.
        let stale = stale_assignments(&s, &routes[2..], 10);
        assert_eq!(stale, vec![recovered_key("enibbb")]);
        assert_eq!(
            stale_assignments(&s, &[], STALE_GRACE_MS + 1),
            vec![known.clone(), recovered_key("enibbb")]
        );
    }

    #[test]
    fn a_routed_address_is_claimed_under_the_attachment_the_registry_knows() {
        let mut s = store();
        let e = wired("10.0.0.22", "c9", 9);
        let routes = [route("10.0.0.22", 9, "eni9"), route("10.0.0.23", 5, "eni5")];
        let claimed = claim_routed(&mut s, &routes, std::slice::from_ref(&e), 0);
        assert_eq!(claimed.len(), 2);
        assert_eq!(s.lookup(&key("c9")), Some(ip("10.0.0.22")));
        assert_eq!(s.lookup(&recovered_key("eni5")), Some(ip("10.0.0.23")));
    }

    #[test]
    fn a_stale_checkpoint_cannot_keep_a_deleted_pods_address() {
        let mut s = store();
        s.assign(&key("gone"), &PodMeta::default(), 1_000).unwrap();
        let live = s.assign(&key("live"), &PodMeta::default(), 1_000).unwrap();
        let routes = [route(&live.ip.to_string(), 5, "enilive")];
        assert!(stale_assignments(&s, &routes, 1_000 + STALE_GRACE_MS).is_empty());
        assert_eq!(
            stale_assignments(&s, &routes, 1_001 + STALE_GRACE_MS),
            vec![key("gone")]
        );
    }

    #[test]
    fn adoption_trusts_the_registry_then_the_pins_and_drops_the_rest() {
        let mut s = store();
        let a = s.assign(&key("a"), &PodMeta::default(), 0).unwrap().ip;
        let b = s.assign(&key("b"), &PodMeta::default(), 0).unwrap().ip;
        let c = s.assign(&key("c"), &PodMeta::default(), 0).unwrap().ip;
        let registry = vec![
            wired(&a.to_string(), "a", 11),
            // A registry entry of another attachment at b: not trusted for b.
            wired(&b.to_string(), "old-b", 12),
        ];
        let pinned = Programmed {
            endpoints: vec![
                EndpointSpec {
                    ipv4: b,
                    host_ifindex: 12,
                    host_mac: MacAddr([2, 0, 0, 0, 1, 12]),
                    pod_mac: MacAddr([2, 0, 0, 0, 2, 12]),
                    eni_ifindex: 2,
                },
                // A pod deleted while the agent was down.
                EndpointSpec {
                    ipv4: ip("10.0.0.99"),
                    host_ifindex: 40,
                    host_mac: MacAddr::default(),
                    pod_mac: MacAddr::default(),
                    eni_ifindex: 2,
                },
            ],
            host_ports: BTreeMap::from([(
                b,
                vec![HostPort {
                    protocol: vpc_ebpf_rpc::types::Protocol::Tcp,
                    host_port: 8080,
                    container_port: 80,
                    host_ip: None,
                }],
            )]),
        };
        let routes = [
            route(&a.to_string(), 11, "eni11"),
            route(&b.to_string(), 12, "eni12"),
            route(&c.to_string(), 13, "eni13"),
        ];
        let links: HashMap<u32, Link> = [(
            12,
            Link {
                index: 12,
                name: "eni12".into(),
                mac: None,
                mtu: 9001,
            },
        )]
        .into();
        let plan = plan_adoption(&s, &registry, &pinned, &routes, &links);
        assert_eq!(plan.endpoints.len(), 2);
        assert_eq!(plan.endpoints[0], registry[0]);
        let pb = &plan.endpoints[1];
        assert_eq!((pb.ip, &pb.key), (b, &key("b")));
        assert_eq!(pb.wiring.as_ref().unwrap().host_ifname, "eni12");
        assert_eq!(
            pb.host_ports.len(),
            1,
            "hostPorts adopted from the pinned map"
        );
        assert_eq!(plan.remove, vec![ip("10.0.0.99")]);
        assert_eq!(plan.unknown, vec![c]);
        assert!(plan.kept_unknown.is_empty());

        // The checkpoint lost: the store holds nothing yet. Pods whose veth still routes
        // to them keep their entries (registry and pins); only the gone one goes.
        let empty = Store::new(Mode::SecondaryIp, 1_000);
        let plan = plan_adoption(&empty, &registry[..1], &pinned, &routes, &links);
        assert!(plan.endpoints.is_empty());
        assert_eq!(plan.kept_unknown, registry[..1].to_vec());
        assert_eq!(
            plan.remove,
            vec![ip("10.0.0.99")],
            "b's pinned entry is kept"
        );
        // The same endpoint whose veth is gone is not programmed.
        let plan = plan_adoption(&s, &registry, &pinned, &routes[1..], &links);
        assert!(plan.endpoints.iter().all(|e| e.ip != a));
    }

    #[test]
    fn pending_releases_are_applied_once_and_never_to_a_newer_pod() {
        let dir = std::env::temp_dir().join(format!("vpc-ebpf-restart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = store();
        s.assign(&key("gone"), &PodMeta::default(), 0).unwrap();
        PendingRelease::new("aws-cni", "gone", "eth0", 5)
            .write(&dir)
            .unwrap();
        std::fs::write(dir.join("broken.json"), b"{").unwrap();
        let applied = apply_pending(&dir, &mut s, 10);
        assert_eq!(applied.freed.len(), 1);
        assert_eq!(s.lookup(&key("gone")), None);
        applied.remove();
        assert!(
            dir.join("broken.json").exists(),
            "unreadable records are kept"
        );
        assert!(apply_pending(&dir, &mut s, 20).freed.is_empty());
        // A record older than the key's current assignment is stale.
        s.assign(&key("gone"), &PodMeta::default(), 2_000).unwrap();
        PendingRelease::new("aws-cni", "gone", "eth0", 1_500)
            .write(&dir)
            .unwrap();
        let (_, rec) = take_pending(&dir, &key("gone")).unwrap();
        assert_eq!(apply_taken(&mut s, &rec, 2_100), None);
        assert!(s.lookup(&key("gone")).is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
