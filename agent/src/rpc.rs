//! The plugin's API: a thin gRPC adapter over the state owners — [`Ipam`] for addresses,
//! the endpoint [`Registry`] for who the pods are, the dataplane owner for the kernel.
//!
//! Nothing is answered from a state that is not yet the node's: until the agent is ready
//! every call but STATUS waits briefly and then says UNAVAILABLE ("not ready"), so a DEL
//! in that window is recorded by the plugin and applied once the restored state is in
//! place, instead of being released from an empty store and forgotten.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::sync::mpsc;
use tonic::{Request, Response, Status, metadata::MetadataValue};
use tracing::{info, warn};
use vpc_ebpf_rpc::{
    REASON_KEY, reason,
    report::Chain,
    types::{HostPort, MacAddr},
    v1,
};

use crate::{
    clock::now_ms,
    dataplane::{
        DataplaneError,
        owner::{DataplaneHandle, EndpointDesc},
    },
    endpoints::{PodRef, Registry, Wiring},
    ipam::{
        AssignError, GrowthBlock, Ipam, Readiness,
        checkpoint::CheckpointError,
        pool::Blocked,
        store::{AttachmentKey, PodMeta},
    },
    k8s::{annotate::Annotation, pods::PodCache},
    metrics::{Metrics, ReasonLabels},
    restart,
};

/// How long an ADD waits for a refill in progress before answering "try again later";
/// well inside the plugin's 10 s deadline.
pub const REFILL_WAIT: Duration = Duration::from_secs(3);
/// How long a call waits for the agent to become ready before answering UNAVAILABLE.
pub const READY_WAIT: Duration = Duration::from_secs(2);

/// The state owners the adapter serves from.
#[derive(Clone, Debug)]
pub struct Services {
    pub ipam: Arc<Ipam>,
    pub endpoints: Arc<Registry>,
    /// Set once the dataplane is loaded (before the agent is ready); never in IPAM-only
    /// use (`VPC_EBPF_DATAPLANE=false`).
    pub dataplane: Arc<OnceLock<DataplaneHandle>>,
    pub metrics: Arc<Metrics>,
    /// Where the plugin records releases it could not deliver.
    pub pending_dir: PathBuf,
    /// The pods on this node as the API server has them (empty off Kubernetes).
    pub pods: PodCache,
    /// Pods to annotate with their address (`ANNOTATE_POD_IP`).
    pub annotate: Option<mpsc::Sender<Annotation>>,
    /// Set before the agent is ready when NetworkPolicy is enforced: a new pod's policy
    /// is programmed before its endpoint, so its first packet is judged.
    pub policy: Arc<OnceLock<Arc<crate::policy::engine::Engine>>>,
    /// Where new ENIs go (custom networking, subnet discovery), for introspection.
    pub placement: Arc<std::sync::Mutex<crate::ipam::placer::Shown>>,
}

pub struct Backend {
    pub services: Services,
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

fn with_reason(mut s: Status, why: &'static str) -> Status {
    s.metadata_mut()
        .insert(REASON_KEY, MetadataValue::from_static(why));
    s
}

fn checkpoint_status(e: &CheckpointError) -> Status {
    warn!(error = %Chain(e), "checkpoint failed");
    Status::internal(format!(
        "the agent could not save its checkpoint: {}",
        Chain(e)
    ))
}

fn registry_status(e: &crate::endpoints::RegistryError) -> Status {
    warn!(error = %Chain(e), "endpoint registry failed");
    Status::internal(format!(
        "the agent could not save its endpoint registry: {}",
        Chain(e)
    ))
}

fn mac(what: &str, v: &str) -> Result<MacAddr, Status> {
    v.parse()
        .map_err(|e| Status::invalid_argument(format!("{what}: {e}")))
}

impl Services {
    pub fn dataplane(&self) -> Option<&DataplaneHandle> {
        self.dataplane.get()
    }

    /// Waits a moment for readiness; UNAVAILABLE ("not ready") otherwise.
    async fn ready(&self) -> Result<(), Status> {
        self.ipam.wait_ready(READY_WAIT).await.map_err(|why| {
            with_reason(
                Status::unavailable(format!("the agent is not ready yet: {why}")),
                reason::NOT_READY,
            )
        })
    }

    /// Applies a release the plugin recorded for `key`, if any, before `key` is served:
    /// a retried ADD must not get an address a DEL it could not deliver meant to free.
    async fn settle_pending(&self, key: &AttachmentKey) -> Result<(), Status> {
        let Some((path, record)) = restart::take_pending(&self.pending_dir, key) else {
            return Ok(());
        };
        let now = now_ms();
        let released = self
            .ipam
            .update(|s| restart::apply_taken(s, &record, now))
            .await
            .map_err(|e| checkpoint_status(&e))?;
        if let Some((k, ip)) = released {
            self.unprogram(ip, &k).await;
        }
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(path = %path.display(), error = %e, "could not remove an applied pending release");
        }
        Ok(())
    }

    /// Takes a pod out of the registry and the dataplane; failures are logged, never fail
    /// a DEL.
    async fn unprogram(&self, ip: Ipv4Addr, key: &AttachmentKey) {
        if let Err(e) = self.endpoints.remove(ip, key) {
            warn!(%ip, error = %Chain(&e), "removing the pod from the endpoint registry failed");
        }
        if let Some(dp) = &self.dataplane()
            && let Err(e) = dp.remove(ip).await
        {
            warn!(%ip, error = %Chain(&e), "removing the pod from the dataplane failed");
        }
        if let Some(engine) = self.policy.get() {
            engine.endpoints_changed();
        }
    }

    fn exhausted(&self, e: &AssignError, block: Option<GrowthBlock>) -> Status {
        let why = match block {
            Some(GrowthBlock::Pool(Blocked::EniLimit)) => reason::ENI_LIMIT,
            Some(GrowthBlock::Pool(Blocked::MaxPods)) => reason::MAX_PODS,
            Some(GrowthBlock::SubnetExhausted) => reason::SUBNET_EXHAUSTED,
            Some(GrowthBlock::Placement) => reason::ENI_PLACEMENT,
            None => reason::POOL_REFILLING,
        };
        self.metrics
            .no_ip
            .get_or_create(&ReasonLabels { reason: why.into() })
            .inc();
        self.metrics.awscni.no_available_ip();
        with_reason(Status::resource_exhausted(e.to_string()), why)
    }

    async fn add(&self, req: v1::AddNetworkRequest) -> Result<v1::AddNetworkReply, Status> {
        let key = key(req.attachment)?;
        let ports = req
            .port_mappings
            .iter()
            .map(HostPort::from_wire)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let pod = req.pod.map_or_else(PodMeta::default, |p| PodMeta {
            namespace: p.namespace,
            name: p.name,
            uid: p.uid,
        });
        self.ready().await?;
        self.settle_pending(&key).await?;
        let deadline = tokio::time::Instant::now() + REFILL_WAIT;
        let a = match self.ipam.assign(&key, &pod, now_ms, deadline).await {
            Ok(a) => a,
            Err(e @ AssignError::Exhausted { block, .. }) => return Err(self.exhausted(&e, block)),
            Err(AssignError::NotReady(why)) => {
                return Err(with_reason(
                    Status::unavailable(format!("the agent is not ready yet: {why}")),
                    reason::NOT_READY,
                ));
            }
            Err(AssignError::Checkpoint(e)) => return Err(checkpoint_status(&e)),
            Err(e @ AssignError::Store(_)) => return Err(Status::internal(Chain(&e).to_string())),
        };
        if !a.existing {
            info!(ip = %a.ip, eni = %a.eni_id, pod = %format!("{}/{}", pod.namespace, pod.name), "assigned");
        }
        // What policy needs of the pod, from the watcher's cache: no API round trip.
        let info = self.pods.get(&pod.namespace, &pod.name).unwrap_or_default();
        self.endpoints.reserve(
            a.ip,
            key,
            PodRef {
                namespace: pod.namespace,
                name: pod.name,
                uid: pod.uid,
            },
            crate::ipam::EniRef {
                id: a.eni_id.clone(),
                device_index: a.device_index,
            },
            ports,
        );
        self.endpoints
            .set_pod_info_of(a.ip, &info.labels, &info.named_ports);
        Ok(v1::AddNetworkReply {
            ipv4: a.ip.to_string(),
            eni_id: a.eni_id,
            device_index: a.device_index,
            existing: a.existing,
        })
    }

    async fn endpoint_ready(
        &self,
        req: v1::EndpointReadyRequest,
    ) -> Result<v1::EndpointReadyReply, Status> {
        let key = key(req.attachment)?;
        let ip: Ipv4Addr = req.ipv4.parse().map_err(|_| {
            Status::invalid_argument(format!("ipv4 {:?} is not an address", req.ipv4))
        })?;
        let wiring = Wiring {
            host_ifname: req.host_ifname,
            host_ifindex: req.host_ifindex,
            host_mac: mac("host_mac", &req.host_mac)?,
            pod_mac: mac("pod_mac", &req.pod_mac)?,
        };
        self.ready().await?;
        let not_given = || {
            Status::failed_precondition(format!("the agent has not given {ip} to this attachment"))
        };
        let Some((held, eni)) = self.ipam.lookup(&key).await else {
            return Err(not_given());
        };
        if held != ip {
            return Err(not_given());
        }
        let Some(reserved) = self.endpoints.get(ip).filter(|e| e.key == key) else {
            // The agent restarted between the ADD and this report: what the ADD asked for
            // (hostPorts) is gone, so the runtime must ADD again.
            return Err(Status::failed_precondition(format!(
                "the agent restarted since {ip} was given; the runtime retries the ADD"
            )));
        };
        if let Some(engine) = self.policy.get() {
            engine
                .program_pod(ip, &reserved.pod.namespace, &reserved.pod.name)
                .await
                .map_err(|e| {
                    with_reason(
                        Status::unavailable(format!(
                            "the NetworkPolicy of {ip} could not be programmed: {}",
                            Chain(&e)
                        )),
                        reason::NOT_READY,
                    )
                })?;
        }
        if let Some(dp) = self.dataplane() {
            let desc = EndpointDesc {
                ip,
                host_ifindex: wiring.host_ifindex,
                host_mac: wiring.host_mac,
                pod_mac: wiring.pod_mac,
                eni,
                host_ports: reserved.host_ports.clone(),
                via_host_qdisc: Some(req.via_host_qdisc),
            };
            dp.upsert(desc).await.map_err(|e| match e {
                DataplaneError::InvalidSpec(_) => {
                    Status::invalid_argument(format!("{ip}: {}", Chain(&e)))
                }
                // Most often a brand-new ENI not yet up in the kernel: try again.
                e => with_reason(
                    Status::unavailable(format!(
                        "the dataplane could not take {ip} on {}: {}",
                        wiring.host_ifname,
                        Chain(&e)
                    )),
                    reason::POOL_REFILLING,
                ),
            })?;
        }
        let host_ifname = wiring.host_ifname.clone();
        let wired = self.endpoints.wire(ip, &key, wiring);
        if self.ipam.lookup(&key).await.map(|(i, _)| i) != Some(ip) {
            // Released by a DEL while the programs were being attached: undo.
            self.unprogram(ip, &key).await;
            return Err(not_given());
        }
        let wired = wired.map_err(|e| registry_status(&e))?;
        info!(%ip, veth = %host_ifname, "endpoint ready");
        if let Some(tx) = &self.annotate
            && !wired.pod.name.is_empty()
        {
            // Off the ADD's path: a full queue (the API server away) drops it.
            let _ = tx.try_send(Annotation {
                namespace: wired.pod.namespace.clone(),
                name: wired.pod.name.clone(),
                ip,
            });
        }
        Ok(v1::EndpointReadyReply {
            arp_answered: self.dataplane().is_some(),
        })
    }

    async fn del(&self, req: v1::DelNetworkRequest) -> Result<v1::DelNetworkReply, Status> {
        let key = key(req.attachment)?;
        self.ready().await?;
        self.settle_pending(&key).await?;
        let released = self
            .ipam
            .release(&key, now_ms())
            .await
            .map_err(|e| checkpoint_status(&e))?;
        if let Some(ip) = released {
            self.unprogram(ip, &key).await;
            info!(%ip, container = %key.container_id, "released into cooldown");
        }
        Ok(v1::DelNetworkReply {
            released_ipv4: released.map(|ip| ip.to_string()).unwrap_or_default(),
        })
    }

    async fn check(&self, req: v1::CheckNetworkRequest) -> Result<v1::CheckNetworkReply, Status> {
        let key = key(req.attachment)?;
        self.ready().await?;
        if self.ipam.lookup(&key).await.is_none() {
            self.take_over_recovered(&key, &req.ipv4, &req.host_ifname)
                .await?;
        }
        let ip = self.ipam.lookup(&key).await.map(|(ip, _)| ip);
        let ep = ip.and_then(|ip| self.endpoints.get(ip));
        let attached = match (self.dataplane(), ip) {
            (Some(dp), Some(ip)) => dp.attached(ip).await.unwrap_or(false),
            // No dataplane (IPAM-only): the plugin's report is all there is.
            (None, _) => ep.as_ref().is_some_and(|e| e.wiring.is_some()),
            (Some(_), None) => false,
        };
        Ok(v1::CheckNetworkReply {
            ipv4: ip.map(|ip| ip.to_string()).unwrap_or_default(),
            dataplane_attached: attached,
            host_ifname: ep
                .and_then(|e| e.wiring.map(|w| w.host_ifname))
                .unwrap_or_default(),
        })
    }

    /// A pod found only by its host route (its checkpoint entry lost) is held under a
    /// placeholder key; the runtime's CHECK names the pod's real attachment, its address
    /// and host veth: the hold becomes the attachment's.
    async fn take_over_recovered(
        &self,
        key: &AttachmentKey,
        ipv4: &str,
        host_ifname: &str,
    ) -> Result<(), Status> {
        let Ok(ip) = ipv4.parse::<Ipv4Addr>() else {
            return Ok(());
        };
        let placeholder = restart::recovered_key(host_ifname);
        let moved = self
            .ipam
            .update(|s| s.rekey(ip, &placeholder, key))
            .await
            .map_err(|e| checkpoint_status(&e))?;
        if moved {
            if let Some(mut e) = self.endpoints.get(ip).filter(|e| e.key == placeholder) {
                e.key = key.clone();
                if let Err(err) = self.endpoints.adopt(e) {
                    warn!(error = %Chain(&err), "saving the endpoint registry failed");
                }
            }
            info!(%ip, veth = host_ifname, container = %key.container_id, "a recovered pod's address is its attachment's again");
        }
        Ok(())
    }

    async fn status(&self) -> v1::StatusReply {
        let (free, ready) = (
            self.ipam
                .read(|s, _| {
                    let per = if s.mode == crate::ipam::pool::Mode::Prefix {
                        16
                    } else {
                        1
                    };
                    s.usage(now_ms())
                        .iter()
                        .map(|e| (e.units * per).saturating_sub(e.assigned + e.cooling))
                        .sum::<u32>()
                })
                .await,
            self.ipam.readiness(),
        );
        // STATUS says whether pods can be set up at all. A pool that is empty for the
        // moment is not that: it refills, and a runtime that took it for "not ready"
        // would mark a full node's network NotReady. The count is still reported.
        let (ready, detail) = match ready {
            Readiness::NotReady(why) => (false, format!("agent not ready: {why}")),
            Readiness::Ready if free == 0 => (
                true,
                "no free address at the moment; more are being requested".to_owned(),
            ),
            Readiness::Ready => (true, String::new()),
        };
        v1::StatusReply {
            ready,
            free_addresses: free,
            detail,
        }
    }

    async fn gc(&self, req: v1::GarbageCollectRequest) -> Result<v1::GarbageCollectReply, Status> {
        self.ready().await?;
        let keep: HashSet<AttachmentKey> = req
            .keep
            .into_iter()
            .map(|a| AttachmentKey {
                network: req.network.clone(),
                container_id: a.container_id,
                ifname: a.ifname,
            })
            .collect();
        let released = self
            .ipam
            .release_all_but(&req.network, &keep, now_ms())
            .await
            .map_err(|e| checkpoint_status(&e))?;
        for (k, ip) in &released {
            info!(%ip, container = %k.container_id, "released by CNI GC");
            self.unprogram(*ip, k).await;
        }
        Ok(v1::GarbageCollectReply {
            released_ipv4: released.iter().map(|(_, ip)| ip.to_string()).collect(),
            released: released
                .into_iter()
                .map(|(k, _)| v1::Attachment {
                    network: k.network,
                    container_id: k.container_id,
                    ifname: k.ifname,
                })
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl v1::cni_backend_server::CniBackend for Backend {
    async fn add_network(
        &self,
        req: Request<v1::AddNetworkRequest>,
    ) -> Result<Response<v1::AddNetworkReply>, Status> {
        let s = &self.services;
        s.metrics.add_requests.inc();
        s.metrics.awscni.add_request();
        let started = std::time::Instant::now();
        let r = s.add(req.into_inner()).await;
        s.metrics
            .add_latency
            .observe(started.elapsed().as_secs_f64());
        r.map(Response::new)
    }

    async fn endpoint_ready(
        &self,
        req: Request<v1::EndpointReadyRequest>,
    ) -> Result<Response<v1::EndpointReadyReply>, Status> {
        self.services
            .endpoint_ready(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn del_network(
        &self,
        req: Request<v1::DelNetworkRequest>,
    ) -> Result<Response<v1::DelNetworkReply>, Status> {
        self.services.metrics.del_requests.inc();
        // The reason aws-node's plugin gives for every DEL.
        self.services.metrics.awscni.del_request("PodDeleted");
        self.services.del(req.into_inner()).await.map(Response::new)
    }

    async fn check_network(
        &self,
        req: Request<v1::CheckNetworkRequest>,
    ) -> Result<Response<v1::CheckNetworkReply>, Status> {
        self.services
            .check(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn status(
        &self,
        _req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        Ok(Response::new(self.services.status().await))
    }

    async fn garbage_collect(
        &self,
        req: Request<v1::GarbageCollectRequest>,
    ) -> Result<Response<v1::GarbageCollectReply>, Status> {
        self.services.gc(req.into_inner()).await.map(Response::new)
    }
}
