//! The pods scheduled on this node, as the API server has them: who they are, their
//! labels, their named container ports. A watcher keeps the cache; ADDs read it (no
//! round trip), and label changes are passed on to the endpoint registry.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, runtime::watcher};
use tokio::sync::watch;

use super::follow::{Names, Sink, follow};
use crate::endpoints::{NamedPort, Registry};

/// What the agent keeps of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub named_ports: Vec<NamedPort>,
    pub host_network: bool,
}

impl PodInfo {
    pub fn from_pod(p: &Pod) -> Self {
        let spec = p.spec.as_ref();
        let named_ports = spec
            .map(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .filter_map(|port| {
                        Some(NamedPort {
                            name: port.name.clone()?,
                            protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                            port: u16::try_from(port.container_port).ok()?,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            uid: p.metadata.uid.clone().unwrap_or_default(),
            labels: p.metadata.labels.clone().unwrap_or_default(),
            named_ports,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        }
    }
}

/// (namespace, name) → what the API server says of the pod.
#[derive(Clone, Debug, Default)]
pub struct PodCache {
    inner: Arc<RwLock<HashMap<(String, String), PodInfo>>>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

impl PodCache {
    pub fn get(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Whether the cache has been filled from a complete list at least once.
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn key(p: &Pod) -> Option<(String, String)> {
        Some((p.metadata.namespace.clone()?, p.metadata.name.clone()?))
    }

    fn apply(&self, p: &Pod, registry: &Registry) {
        let Some(key) = Self::key(p) else { return };
        let info = PodInfo::from_pod(p);
        let changed = {
            let mut map = self
                .inner
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.insert(key.clone(), info.clone()).as_ref() != Some(&info)
        };
        if changed {
            registry.set_pod_info(&key.0, &key.1, &info.labels, &info.named_ports);
        }
    }

    fn delete(&self, p: &Pod) {
        if let Some(key) = Self::key(p) {
            self.inner
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&key);
        }
    }

    fn replace(&self, pods: &[Pod], registry: &Registry) {
        let fresh: HashMap<(String, String), PodInfo> = pods
            .iter()
            .filter_map(|p| Some((Self::key(p)?, PodInfo::from_pod(p))))
            .collect();
        for ((ns, name), info) in &fresh {
            registry.set_pod_info(ns, name, &info.labels, &info.named_ports);
        }
        *self
            .inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        self.synced
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The node's pods into the cache and the registry.
struct NodePods {
    cache: PodCache,
    registry: Arc<Registry>,
}

impl Sink<Pod> for NodePods {
    type Kept = Pod;
    fn keep(&self, p: Pod) -> Pod {
        p
    }

    fn listed(&mut self, all: Vec<Pod>) {
        self.cache.replace(&all, &self.registry);
    }

    fn applied(&mut self, p: Pod) {
        self.cache.apply(&p, &self.registry);
    }

    fn deleted(&mut self, p: &Pod) {
        self.cache.delete(p);
    }
}

/// Watches the pods on `node_name` until `stop`, keeping `cache` and the registry's pod
/// information current. Errors (the API server down, a watch expired) are retried with
/// backoff, forever.
pub async fn watch_pods(
    client: kube::Client,
    node_name: String,
    cache: PodCache,
    registry: Arc<Registry>,
    stop: watch::Receiver<bool>,
) {
    follow(
        Api::all(client),
        watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
        Names {
            what: "this node's pods",
            meanwhile: "pods are served meanwhile",
        },
        NodePods { cache, registry },
        stop,
    )
    .await;
}

/// A pod with labels and named ports (TCP and UDP) and an unnamed one, for tests.
#[cfg(test)]
pub(crate) fn sample_pod() -> Pod {
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};
    Pod {
        metadata: kube::api::ObjectMeta {
            name: Some("web".into()),
            namespace: Some("x".into()),
            uid: Some("u1".into()),
            labels: Some(BTreeMap::from([("app".into(), "web".into())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "c".into(),
                ports: Some(vec![
                    ContainerPort {
                        name: Some("serve-80-tcp".into()),
                        container_port: 80,
                        ..Default::default()
                    },
                    ContainerPort {
                        name: Some("serve-81-udp".into()),
                        container_port: 81,
                        protocol: Some("UDP".into()),
                        ..Default::default()
                    },
                    ContainerPort {
                        container_port: 9000,
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_ports_and_labels_are_kept() {
        let info = PodInfo::from_pod(&sample_pod());
        assert_eq!(info.uid, "u1");
        assert_eq!(info.labels["app"], "web");
        assert_eq!(
            info.named_ports,
            vec![
                NamedPort {
                    name: "serve-80-tcp".into(),
                    protocol: "TCP".into(),
                    port: 80
                },
                NamedPort {
                    name: "serve-81-udp".into(),
                    protocol: "UDP".into(),
                    port: 81
                },
            ]
        );
        assert!(!info.host_network);
    }
}
