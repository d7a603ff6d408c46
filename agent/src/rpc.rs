//! The plugin's API: the CNI backend service over the datastore. Every change is
//! checkpointed before it is answered, so an agent killed right after replying has the
//! assignment on disk.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::{Mutex, Notify};
use tonic::{Request, Response, Status, metadata::MetadataValue};
use tracing::{info, warn};
use vpc_ebpf_rpc::{REASON_KEY, reason, v1};

use crate::{
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
}

impl Shared {
    pub fn new(state: State, metrics: Arc<Metrics>) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
            pool_changed: Arc::new(Notify::new()),
            pool_grown: Arc::new(Notify::new()),
            metrics,
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
        let pod = req.pod.map_or_else(PodMeta::default, |p| PodMeta {
            namespace: p.namespace,
            name: p.name,
            uid: p.uid,
        });
        self.shared.metrics.add_requests.inc();
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

    async fn endpoint_ready(
        &self,
        req: Request<v1::EndpointReadyRequest>,
    ) -> Result<Response<v1::EndpointReadyReply>, Status> {
        let req = req.into_inner();
        let key = key(req.attachment)?;
        let ipv4: Ipv4Addr = req.ipv4.parse().map_err(|_| {
            Status::invalid_argument(format!("ipv4 {:?} is not an address", req.ipv4))
        })?;
        let mut st = self.shared.state.lock().await;
        if st.store.lookup(&key) != Some(ipv4) {
            return Err(Status::failed_precondition(format!(
                "the agent has not given {ipv4} to this attachment"
            )));
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
        Ok(Response::new(v1::EndpointReadyReply {}))
    }

    async fn del_network(
        &self,
        req: Request<v1::DelNetworkRequest>,
    ) -> Result<Response<v1::DelNetworkReply>, Status> {
        let key = key(req.into_inner().attachment)?;
        self.shared.metrics.del_requests.inc();
        let mut st = self.shared.state.lock().await;
        st.endpoints.remove(&key);
        let released = st.store.release(&key, now_ms());
        if let Some(ip) = released {
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
            dataplane_attached: ep.is_some(),
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
                released_ipv4.push(ip.to_string());
            }
            st.endpoints.remove(k);
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
