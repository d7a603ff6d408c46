//! The watches NetworkPolicy needs, cluster-wide: pods (their labels, addresses and
//! named ports, on every node, since peers are anywhere), namespaces (their labels) and
//! NetworkPolicies, each feeding the [`Engine`]. Like the pod watch of this node, they
//! retry with backoff forever and never stop the agent.

use std::{collections::BTreeMap, fmt::Debug, sync::Arc};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Resource,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{info, warn};
use vpc_ebpf_rpc::report::Chain;

use crate::policy::{
    engine::Engine,
    model::{PodView, Policy, proto_number},
};

/// A pod as policy sees it. Pods that have finished (Succeeded, Failed) hold no address
/// any more: the address may already be another pod's.
pub fn pod_view(p: &Pod) -> PodView {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let finished = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
    PodView {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        name: p.metadata.name.clone().unwrap_or_default(),
        ip: status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            .filter(|_| !finished),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        named_ports: spec
            .map(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .filter_map(|port| {
                        Some((
                            port.name.clone()?,
                            proto_number(port.protocol.as_deref().unwrap_or("TCP"))?,
                            u16::try_from(port.container_port).ok()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    }
}

fn policy(np: &NetworkPolicy) -> Policy {
    let (p, err) = Policy::from_api(np);
    if let Some(e) = err {
        warn!(policy = %format!("{}/{}", p.namespace, p.name), error = %e,
              "the NetworkPolicy does not parse; the pods it selects admit nothing in the directions it names");
    }
    p
}

/// What a watch reports, in the engine's terms.
trait Sink<K>: Send + Sync + 'static {
    fn listed(&self, all: Vec<K>);
    fn applied(&self, k: K);
    fn deleted(&self, k: &K);
}

struct Pods(Arc<Engine>);
impl Sink<Pod> for Pods {
    fn listed(&self, all: Vec<Pod>) {
        self.0.pods_listed(all.iter().map(pod_view).collect());
    }
    fn applied(&self, k: Pod) {
        self.0.pod_applied(pod_view(&k));
    }
    fn deleted(&self, k: &Pod) {
        let v = pod_view(k);
        self.0.pod_deleted(&v.namespace, &v.name);
    }
}

struct Namespaces(Arc<Engine>);
impl Sink<Namespace> for Namespaces {
    fn listed(&self, all: Vec<Namespace>) {
        self.0.namespaces_listed(
            all.into_iter()
                .filter_map(|n| Some((n.metadata.name?, n.metadata.labels.unwrap_or_default())))
                .collect::<BTreeMap<_, _>>(),
        );
    }
    fn applied(&self, n: Namespace) {
        if let Some(name) = n.metadata.name {
            self.0
                .namespace_applied(name, n.metadata.labels.unwrap_or_default());
        }
    }
    fn deleted(&self, n: &Namespace) {
        if let Some(name) = &n.metadata.name {
            self.0.namespace_deleted(name);
        }
    }
}

struct Policies(Arc<Engine>);
impl Sink<NetworkPolicy> for Policies {
    fn listed(&self, all: Vec<NetworkPolicy>) {
        self.0.policies_listed(all.iter().map(policy).collect());
    }
    fn applied(&self, k: NetworkPolicy) {
        self.0.policy_applied(policy(&k));
    }
    fn deleted(&self, k: &NetworkPolicy) {
        let p = policy(k);
        self.0.policy_deleted(&p.namespace, &p.name);
    }
}

async fn follow<K, S>(api: Api<K>, what: &'static str, sink: S, mut stop: watch::Receiver<bool>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    S: Sink<K>,
{
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    tokio::pin!(stream);
    let mut buffer: Vec<K> = Vec::new();
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        let next = tokio::select! {
            _ = stop.changed() => return,
            n = stream.next() => n,
        };
        let Some(event) = next else {
            warn!(
                what,
                "the watch ended; policy is enforced from what is known"
            );
            let _ = stop.changed().await;
            return;
        };
        match event {
            Ok(ev) => {
                if let Some(since) = failing_since.take() {
                    info!(what, after = ?since.elapsed(), "the watch is back");
                }
                match ev {
                    watcher::Event::Init => buffer.clear(),
                    watcher::Event::InitApply(k) => buffer.push(k),
                    watcher::Event::InitDone => {
                        let n = buffer.len();
                        sink.listed(std::mem::take(&mut buffer));
                        info!(what, n, "listed");
                    }
                    watcher::Event::Apply(k) => sink.applied(k),
                    watcher::Event::Delete(k) => sink.deleted(&k),
                }
            }
            Err(e) => {
                if failing_since.is_none() {
                    warn!(what, error = %Chain(&e), "the watch failed; retrying with backoff, policy is enforced from what is known meanwhile");
                    failing_since = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}

/// Starts the three watches and the engine's apply loop, until `stop`.
pub fn start(
    client: &kube::Client,
    engine: &Arc<Engine>,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(follow(
            Api::<Pod>::all(client.clone()),
            "pods",
            Pods(engine.clone()),
            stop.clone(),
        )),
        tokio::spawn(follow(
            Api::<Namespace>::all(client.clone()),
            "namespaces",
            Namespaces(engine.clone()),
            stop.clone(),
        )),
        tokio::spawn(follow(
            Api::<NetworkPolicy>::all(client.clone()),
            "networkpolicies",
            Policies(engine.clone()),
            stop.clone(),
        )),
        tokio::spawn(engine.clone().run(stop.clone())),
    ]
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec, PodStatus};

    use super::*;
    use crate::policy::model::{TCP, UDP};

    fn pod(phase: &str) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("web".into()),
                namespace: Some("x".into()),
                labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![
                        ContainerPort {
                            name: Some("http".into()),
                            container_port: 8080,
                            ..Default::default()
                        },
                        ContainerPort {
                            name: Some("dns".into()),
                            container_port: 53,
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
            status: Some(PodStatus {
                pod_ip: Some("10.0.1.5".into()),
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_pod_view_keeps_what_policy_needs() {
        let v = pod_view(&pod("Running"));
        assert_eq!((v.namespace.as_str(), v.name.as_str()), ("x", "web"));
        assert_eq!(v.ip, Some("10.0.1.5".parse().unwrap()));
        assert_eq!(v.labels["app"], "web");
        assert_eq!(
            v.named_ports,
            vec![("http".into(), TCP, 8080), ("dns".into(), UDP, 53)]
        );
        assert!(!v.host_network);
    }

    #[test]
    fn finished_pods_hold_no_address() {
        assert_eq!(pod_view(&pod("Succeeded")).ip, None);
        assert_eq!(pod_view(&pod("Failed")).ip, None);
    }
}
