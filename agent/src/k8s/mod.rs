//! The agent on Kubernetes (kube-rs): its own Node, the pods on that node (so an ADD
//! knows the pod's labels and named ports without a round trip), Events for what users
//! must see, and aws-node's pod IP annotation.
//!
//! Kubernetes is never on the path of a pod's address or packets: when the API server is
//! slow or down, IPAM and the dataplane keep working from what the agent holds, the
//! watchers retry with backoff, and nothing here can stop the agent.

pub mod annotate;
pub mod eniconfig;
pub mod events;
pub mod follow;
pub mod lease;
pub mod pods;
pub mod policy_watch;

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, Config};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};
use vpc_ebpf_rpc::report::Chain;

use crate::{endpoints::Registry, notice::Notices};

/// The node's name in the cluster: aws-node's variable, set from `spec.nodeName` by the
/// DaemonSet.
pub const NODE_NAME_VAR: &str = "MY_NODE_NAME";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no Kubernetes client configuration (neither in-cluster nor KUBECONFIG)")]
    NoConfig(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("{NODE_NAME_VAR} is not set: the DaemonSet sets it from spec.nodeName")]
    NoNodeName,
}

/// Clients and who we are in the cluster.
#[derive(Clone)]
pub struct Kube {
    /// For requests: reads time out.
    pub client: Client,
    /// For watches: no read timeout, since a watch of a quiet node sends nothing for
    /// minutes; kube's watcher has its own idle timeout (the server-side watch timeout
    /// plus a margin) that catches a dead connection.
    pub watch_client: Client,
    pub node_name: String,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

/// Requests to the API server give up after this long: a slow API server must not hold
/// the agent's tasks.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

impl Kube {
    /// In-cluster configuration (the DaemonSet's service account), or `KUBECONFIG` for
    /// development. `Ok(None)`: not on Kubernetes at all (the lab's plugin-direct nodes).
    pub async fn connect(node_name: Option<String>) -> Result<Option<Self>, KubeError> {
        let on_kubernetes = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            || std::env::var_os("KUBECONFIG").is_some();
        if !on_kubernetes {
            return Ok(None);
        }
        let config = Config::infer().await.map_err(KubeError::NoConfig)?;
        let watch_client = Client::try_from(config.clone()).map_err(KubeError::Client)?;
        let mut config = config;
        config.read_timeout = Some(READ_TIMEOUT);
        // The timeout counts from the request, not from when a pooled connection
        // went idle.
        config.reset_reader_on_write = true;
        let client = Client::try_from(config).map_err(KubeError::Client)?;
        let node_name = node_name.ok_or(KubeError::NoNodeName)?;
        Ok(Some(Self {
            client,
            watch_client,
            node_name,
        }))
    }

    /// The agent's Node, retried until the API server answers; `None` if it does not
    /// within `patience` (the caller goes on without it).
    pub async fn own_node(&self, patience: Duration) -> Option<Node> {
        let api: Api<Node> = Api::all(self.client.clone());
        let deadline = tokio::time::Instant::now() + patience;
        let mut wait = Duration::from_millis(200);
        loop {
            match api.get(&self.node_name).await {
                Ok(n) => {
                    info!(node = %self.node_name, "found this node in the cluster");
                    return Some(n);
                }
                Err(e) if tokio::time::Instant::now() + wait < deadline => {
                    warn!(node = %self.node_name, error = %Chain(&e), retry_in = ?wait, "reading this node from the API server failed");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    warn!(node = %self.node_name, error = %Chain(&e), "going on without the Node object; it is read again later");
                    return None;
                }
            }
        }
    }
}

/// The pods a Node may run (`status.allocatable.pods`), when it says so as a plain count.
pub fn allocatable_pods(node: &Node) -> Option<u32> {
    node.status
        .as_ref()?
        .allocatable
        .as_ref()?
        .get("pods")
        .and_then(|q| q.0.trim().parse().ok())
}

/// What the Kubernetes side gives the rest of the agent.
pub struct Started {
    /// The pods on this node (stays empty off Kubernetes).
    pub pods: pods::PodCache,
    /// Where notices go: Events on the Node, or only the log off Kubernetes.
    pub notices: Notices,
    /// Pods to annotate with their address, when `ANNOTATE_POD_IP` is on.
    pub annotate: Option<mpsc::Sender<annotate::Annotation>>,
    pub tasks: Vec<JoinHandle<()>>,
    /// The clients, on Kubernetes.
    pub kube: Option<Kube>,
}

/// Connects (when on Kubernetes) and starts the pod watcher, the Event publisher and the
/// annotator, all until `stop`.
pub async fn start(
    config: &crate::config::Config,
    registry: Arc<Registry>,
    stop: &watch::Receiver<bool>,
) -> Result<Started, KubeError> {
    let Some(kube) = Kube::connect(config.node_name.clone()).await? else {
        return Ok(Started {
            pods: pods::PodCache::default(),
            notices: Notices::log_only(),
            annotate: None,
            tasks: Vec::new(),
            kube: None,
        });
    };
    info!(node = %kube.node_name, "on Kubernetes");
    let cache = pods::PodCache::default();
    let (notices, notice_rx) = Notices::channel();
    let mut tasks = vec![
        tokio::spawn(pods::watch_pods(
            kube.watch_client.clone(),
            kube.node_name.clone(),
            cache.clone(),
            registry,
            stop.clone(),
        )),
        tokio::spawn(events::publish(
            kube.clone(),
            events::node_reference(&kube.node_name, None),
            notice_rx,
            stop.clone(),
        )),
    ];
    let annotate = config.annotate_pod_ip.then(|| {
        let (tx, rx) = mpsc::channel(1024);
        tasks.push(tokio::spawn(annotate::run(kube.clone(), rx, stop.clone())));
        tx
    });
    Ok(Started {
        pods: cache,
        notices,
        annotate,
        tasks,
        kube: Some(kube),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::NodeStatus, apimachinery::pkg::api::resource::Quantity};

    use super::*;

    #[test]
    fn allocatable_pods_is_read_as_a_plain_count() {
        let node = |q: Option<&str>| Node {
            status: Some(NodeStatus {
                allocatable: q.map(|q| [("pods".to_owned(), Quantity(q.to_owned()))].into()),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        assert_eq!(allocatable_pods(&node(Some("29"))), Some(29));
        assert_eq!(allocatable_pods(&node(Some("1k"))), None);
        assert_eq!(allocatable_pods(&node(None)), None);
        assert_eq!(allocatable_pods(&Node::default()), None);
    }
}
