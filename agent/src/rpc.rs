//! The plugin's API: the CNI backend service over the datastore. Every change is
//! checkpointed before it is answered, so an agent killed right after replying has the
//! assignment on disk.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::{Mutex, Notify};
use tonic::{Request, Response, Status, metadata::MetadataValue};
use tracing::{info, warn};
use vpc_ebpf_rpc::{REASON_KEY, reason, v1};

use crate::{
    datapath::Datapath,
    ipam::{
        checkpoint,
        pool::Blocked,
        store::{AttachmentKey, PodMeta, Store, StoreError},
    },
    metrics::{Metrics, ReasonLabels},
};

/// Why the pool cannot grow, as the reconciler last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrowthBlock {
    Pool(Blocked),
    SubnetExhausted,
}

/// What the plugin reported about a pod's interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ipv4: Ipv4Addr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: String,
    pub pod_mac: String,
}

pub struct State {
    pub store: Store,
    pub checkpoint: PathBuf,
    /// False until discovery and checkpoint restore are done.
    pub ready: bool,
    pub not_ready_reason: String,
    pub blocked: Option<GrowthBlock>,
    pub endpoints: HashMap<AttachmentKey, Endpoint>,
    /// hostPorts from the ADD's portMappings, programmed when the endpoint is ready:
    /// (IP protocol, host port, container port).
    pub port_mappings: HashMap<AttachmentKey, Vec<(u8, u16, u16)>>,
}

impl State {
    /// A ready state over `store`, checkpointed to `checkpoint`.
    pub fn new(store: Store, checkpoint: PathBuf) -> Self {
        Self {
            store,
            checkpoint,
            ready: true,
            not_ready_reason: String::new(),
            blocked: None,
            endpoints: HashMap::new(),
            port_mappings: HashMap::new(),
        }
    }
}

/// Shared between the RPC service, the reconciler and introspection.
#[derive(Clone)]
pub struct Shared {
    pub state: Arc<Mutex<State>>,
    /// Poked whenever the pool changed, so the reconciler looks again at once.
    pub pool_changed: Arc<Notify>,
    /// Poked by the reconciler when addresses were added, for ADDs waiting on a refill.
    pub pool_grown: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Set once the dataplane is loaded and the node known; absent in IPAM-only use.
    pub datapath: Arc<OnceLock<Arc<Datapath>>>,
}

impl Shared {
    pub fn new(state: State, metrics: Arc<Metrics>) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
            pool_changed: Arc::new(Notify::new()),
            pool_grown: Arc::new(Notify::new()),
            metrics,
            datapath: Arc::new(OnceLock::new()),
        }
    }

    pub fn datapath(&self) -> Option<&Arc<Datapath>> {
        self.datapath.get()
    }

    /// Takes a pod out of the dataplane; failures are logged, never fail a DEL.
    async fn unprogram(&self, ip: Ipv4Addr) {
        if let Some(dp) = self.datapath()
            && let Err(e) = dp.remove_endpoint(ip).await
        {
            warn!(%ip, error = %e, "removing the pod from the dataplane failed");
        }
    }
}

/// How long an ADD waits for a refill in progress before answering "try again later";
/// well inside the plugin's 10 s deadline.
pub const REFILL_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn key(a: Option<v1::Attachment>) -> Result<AttachmentKey, Status> {
    let a = a.ok_or_else(|| Status::invalid_argument("attachment is required"))?;
    if a.container_id.is_empty() || a.ifname.is_empty() || a.network.is_empty() {
        return Err(Status::invalid_argument(
            "attachment needs network, container_id and ifname",
        ));
    }
    Ok(AttachmentKey {
        network: a.network,
        container_id: a.container_id,
        ifname: a.ifname,
    })
}

fn exhausted(msg: String, why: &'static str) -> Status {
    let mut s = Status::resource_exhausted(msg);
    s.metadata_mut()
        .insert(REASON_KEY, MetadataValue::from_static(why));
    s
}

pub fn persist(state: &State) -> Result<(), Status> {
    checkpoint::save(&state.checkpoint, &state.store).map_err(|e| {
        warn!(error = %e, "checkpoint failed");
        Status::internal(format!("the agent could not save its checkpoint: {e}"))
    })
}

fn port_mappings(p: &[v1::PortMapping]) -> Result<Vec<(u8, u16, u16)>, Status> {
    p.iter()
        .map(|m| {
            let proto = match v1::Protocol::try_from(m.protocol) {
                Ok(v1::Protocol::Tcp) => 6,
                Ok(v1::Protocol::Udp) => 17,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "portMapping {}: protocol must be tcp or udp",
                        m.host_port
                    )));
                }
            };
            let port = |v: u32, what: &str| {
                u16::try_from(v)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| Status::invalid_argument(format!("{what} {v} is not a port")))
            };
            Ok((
                proto,
                port(m.host_port, "hostPort")?,
                port(m.container_port, "containerPort")?,
            ))
        })
        .collect()
}

pub struct Backend {
    pub shared: Shared,
}

#[tonic::async_trait]
impl v1::cni_backend_server::CniBackend for Backend {
    async fn add_network(
        &self,
        req: Request<v1::AddNetworkRequest>,
    ) -> Result<Response<v1::AddNetworkReply>, Status> {
        let req = req.into_inner();
        let key = key(req.attachment)?;
        let ports = port_mappings(&req.port_mappings)?;
        let pod = req.pod.map_or_else(PodMeta::default, |p| PodMeta {
            namespace: p.namespace,
            name: p.name,
            uid: p.uid,
        });
        self.shared.metrics.add_requests.inc();
        let started = std::time::Instant::now();
        let r = self.add_network_inner(key, pod, ports).await;
        self.shared
            .metrics
            .add_latency
            .observe(started.elapsed().as_secs_f64());
        r
    }
    async fn endpoint_ready(
        &self,
        req: Request<v1::EndpointReadyRequest>,
    ) -> Result<Response<v1::EndpointReadyReply>, Status> {
        let req = req.into_inner();
        let key = key(req.attachment)?;
        let ipv4: Ipv4Addr = req.ipv4.parse().map_err(|_| {
            Status::invalid_argument(format!("ipv4 {:?} is not an address", req.ipv4))
        })?;
        let not_given = || {
            Status::failed_precondition(format!(
                "the agent has not given {ipv4} to this attachment"
            ))
        };
        // What the dataplane needs, read under the lock; the attach itself (milliseconds
        // of netlink and bpf syscalls) runs without it so other pods' ADDs are not held up.
        let (eni, ports, enis) = {
            let st = self.shared.state.lock().await;
            if st.store.lookup(&key) != Some(ipv4) {
                return Err(not_given());
            }
            let eni = st
                .store
                .assignments()
                .find(|(k, ..)| **k == key)
                .map(|(.., e)| e.id.clone())
                .unwrap_or_default();
            // Only for an ENI attached moments ago, which the dataplane does not know yet.
            let enis: Vec<_> = if self
                .shared
                .datapath()
                .is_some_and(|dp| dp.eni_ifindex(&eni).is_none())
            {
                st.store
                    .enis()
                    .map(|e| (e.id.clone(), e.device_index, e.mac.clone(), e.primary_ip))
                    .collect()
            } else {
                Vec::new()
            };
            let ports = st.port_mappings.get(&key).cloned().unwrap_or_default();
            (eni, ports, enis)
        };
        let mut arp_answered = false;
        if let Some(dp) = self.shared.datapath() {
            if !enis.is_empty() {
                // The ENI was attached moments ago: program it now rather than fail.
                if let Err(e) = dp.sync_enis(&enis).await {
                    warn!(error = %e, "ENI sync for a new pod failed");
                }
            }
            dp.upsert_endpoint(ipv4, &eni, req.host_ifindex, &req.host_mac, &req.pod_mac)
                .await
                .map_err(|e| {
                    // Most often a brand-new ENI not yet up in the kernel: try again.
                    let mut s = Status::unavailable(format!(
                        "the dataplane could not take {ipv4} on {}: {e}",
                        req.host_ifname
                    ));
                    s.metadata_mut().insert(
                        REASON_KEY,
                        MetadataValue::from_static(reason::POOL_REFILLING),
                    );
                    s
                })?;
            dp.set_hostports(ipv4, &ports)
                .map_err(|e| Status::invalid_argument(format!("hostPorts of {ipv4}: {e}")))?;
            arp_answered = true;
        }
        let mut st = self.shared.state.lock().await;
        if st.store.lookup(&key) != Some(ipv4) {
            // Released by a DEL while the programs were being attached: undo.
            drop(st);
            self.shared.unprogram(ipv4).await;
            return Err(not_given());
        }
        st.endpoints.insert(
            key,
            Endpoint {
                ipv4,
                host_ifname: req.host_ifname,
                host_ifindex: req.host_ifindex,
                host_mac: req.host_mac,
                pod_mac: req.pod_mac,
            },
        );
        Ok(Response::new(v1::EndpointReadyReply { arp_answered }))
    }

    async fn del_network(
        &self,
        req: Request<v1::DelNetworkRequest>,
    ) -> Result<Response<v1::DelNetworkReply>, Status> {
        let key = key(req.into_inner().attachment)?;
        self.shared.metrics.del_requests.inc();
        let mut st = self.shared.state.lock().await;
        st.endpoints.remove(&key);
        st.port_mappings.remove(&key);
        let released = st.store.release(&key, now_ms());
        if let Some(ip) = released {
            self.shared.unprogram(ip).await;
            persist(&st)?;
            info!(%ip, container = %key.container_id, "released into cooldown");
            self.shared.pool_changed.notify_one();
        }
        Ok(Response::new(v1::DelNetworkReply {
            released_ipv4: released.map(|ip| ip.to_string()).unwrap_or_default(),
        }))
    }

    async fn check_network(
        &self,
        req: Request<v1::CheckNetworkRequest>,
    ) -> Result<Response<v1::CheckNetworkReply>, Status> {
        let key = key(req.into_inner().attachment)?;
        let st = self.shared.state.lock().await;
        let ep = st.endpoints.get(&key);
        Ok(Response::new(v1::CheckNetworkReply {
            ipv4: st
                .store
                .lookup(&key)
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            dataplane_attached: match (self.shared.datapath(), st.store.lookup(&key)) {
                (Some(dp), Some(ip)) => dp.endpoint_attached(ip),
                // No dataplane (IPAM-only): the endpoint report is all there is.
                (None, _) => ep.is_some(),
                (Some(_), None) => false,
            },
            host_ifname: ep.map(|e| e.host_ifname.clone()).unwrap_or_default(),
        }))
    }

    async fn status(
        &self,
        _req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        let st = self.shared.state.lock().await;
        let usage = st.store.usage(now_ms());
        let free: u32 = usage
            .iter()
            .map(|e| {
                let per = if st.store.mode == crate::ipam::pool::Mode::Prefix {
                    16
                } else {
                    1
                };
                (e.units * per).saturating_sub(e.assigned + e.cooling)
            })
            .sum();
        let (ready, detail) = if !st.ready {
            (false, format!("agent not ready: {}", st.not_ready_reason))
        } else if free == 0 {
            (false, "no free address on this node yet".to_owned())
        } else {
            (true, String::new())
        };
        Ok(Response::new(v1::StatusReply {
            ready,
            free_addresses: free,
            detail,
        }))
    }

    async fn garbage_collect(
        &self,
        req: Request<v1::GarbageCollectRequest>,
    ) -> Result<Response<v1::GarbageCollectReply>, Status> {
        let req = req.into_inner();
        let keep: std::collections::HashSet<AttachmentKey> = req
            .keep
            .into_iter()
            .map(|a| AttachmentKey {
                network: req.network.clone(),
                container_id: a.container_id,
                ifname: a.ifname,
            })
            .collect();
        let mut st = self.shared.state.lock().await;
        let stale: Vec<AttachmentKey> = st
            .store
            .assignments()
            .map(|(k, ..)| k.clone())
            .filter(|k| k.network == req.network && !keep.contains(k))
            .collect();
        let now = now_ms();
        let mut released_ipv4 = Vec::new();
        for k in &stale {
            if let Some(ip) = st.store.release(k, now) {
                self.shared.unprogram(ip).await;
                released_ipv4.push(ip.to_string());
            }
            st.endpoints.remove(k);
            st.port_mappings.remove(k);
        }
        if !stale.is_empty() {
            persist(&st)?;
            self.shared.pool_changed.notify_one();
        }
        Ok(Response::new(v1::GarbageCollectReply {
            released: stale
                .into_iter()
                .map(|k| v1::Attachment {
                    network: k.network,
                    container_id: k.container_id,
                    ifname: k.ifname,
                })
                .collect(),
            released_ipv4,
        }))
    }
}

impl Backend {
    async fn add_network_inner(
        &self,
        key: AttachmentKey,
        pod: PodMeta,
        ports: Vec<(u8, u16, u16)>,
    ) -> Result<Response<v1::AddNetworkReply>, Status> {
        let deadline = tokio::time::Instant::now() + REFILL_WAIT;
        let mut st = self.shared.state.lock().await;
        let result = loop {
            if !st.ready {
                let mut s = Status::unavailable(format!(
                    "the agent is not ready yet: {}",
                    st.not_ready_reason
                ));
                s.metadata_mut()
                    .insert(REASON_KEY, MetadataValue::from_static(reason::NOT_READY));
                return Err(s);
            }
            let result = st.store.assign(&key, &pod, now_ms());
            self.shared.pool_changed.notify_one();
            // The pool is being refilled right now: a short wait here beats failing the
            // pod into kubelet's much longer retry backoff.
            let refilling = st.blocked.is_none()
                && matches!(result, Err(StoreError::NoFreeAddress { .. }))
                && tokio::time::Instant::now() < deadline;
            if !refilling {
                break result;
            }
            let grown = self.shared.pool_grown.notified();
            tokio::pin!(grown);
            grown.as_mut().enable();
            drop(st);
            let _ = tokio::time::timeout_at(deadline, grown).await;
            st = self.shared.state.lock().await;
        };
        match result {
            Ok(a) => {
                if ports.is_empty() {
                    st.port_mappings.remove(&key);
                } else {
                    st.port_mappings.insert(key.clone(), ports);
                }
                if !a.existing {
                    if let Err(e) = persist(&st) {
                        // Not on disk, so not given: undo rather than risk a double handout.
                        st.store.release(&key, 0);
                        return Err(e);
                    }
                    info!(ip = %a.ip, eni = %a.eni_id, pod = %format!("{}/{}", pod.namespace, pod.name), "assigned");
                }
                Ok(Response::new(v1::AddNetworkReply {
                    ipv4: a.ip.to_string(),
                    eni_id: a.eni_id,
                    device_index: a.device_index,
                    existing: a.existing,
                }))
            }
            Err(StoreError::NoFreeAddress { cooling, total }) => {
                let base =
                    format!("no free address on this node ({total} held, {cooling} cooling down)");
                let why = match st.blocked {
                    Some(GrowthBlock::Pool(Blocked::EniLimit)) => reason::ENI_LIMIT,
                    Some(GrowthBlock::Pool(Blocked::MaxPods)) => reason::MAX_PODS,
                    Some(GrowthBlock::SubnetExhausted) => reason::SUBNET_EXHAUSTED,
                    None => reason::POOL_REFILLING,
                };
                self.shared
                    .metrics
                    .no_ip
                    .get_or_create(&ReasonLabels { reason: why.into() })
                    .inc();
                Err(match st.blocked {
                    Some(GrowthBlock::Pool(Blocked::EniLimit)) => exhausted(
                        format!("{base}; every ENI this instance type allows is attached and full"),
                        reason::ENI_LIMIT,
                    ),
                    Some(GrowthBlock::Pool(Blocked::MaxPods)) => exhausted(
                        format!("{base}; the node holds as many addresses as max pods"),
                        reason::MAX_PODS,
                    ),
                    Some(GrowthBlock::SubnetExhausted) => exhausted(
                        format!(
                            "{base}; the subnet has no free addresses (InsufficientFreeAddressesInSubnet)"
                        ),
                        reason::SUBNET_EXHAUSTED,
                    ),
                    None => exhausted(
                        format!("{base}; more are being requested from EC2"),
                        reason::POOL_REFILLING,
                    ),
                })
            }
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}
