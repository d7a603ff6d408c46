//! The watches NetworkPolicy needs, cluster-wide: pods (their labels, addresses and
//! named ports, on every node, since peers are anywhere), namespaces (their labels) and
//! NetworkPolicies, each feeding the [`Engine`]. Like the pod watch of this node, they
//! retry with backoff forever and never stop the agent.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{Api, runtime::watcher};
use tokio::sync::watch;
use tracing::warn;

use super::{
    follow::{Names, Sink, follow},
    pods::PodInfo,
};
use crate::policy::{
    engine::Engine,
    model::{PodView, Policy, proto_number},
};

/// A pod as policy sees it (what the node's pod cache keeps, plus its address). Pods that
/// have finished (Succeeded, Failed) hold no address any more: the address may already be
/// another pod's.
pub fn pod_view(p: &Pod) -> PodView {
    let info = PodInfo::from_pod(p);
    let status = p.status.as_ref();
    let finished = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
    PodView::new(
        p.metadata.namespace.clone().unwrap_or_default(),
        p.metadata.name.clone().unwrap_or_default(),
        status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            .filter(|_| !finished),
        info.labels,
        info.named_ports
            .into_iter()
            .filter_map(|n| Some((n.name, proto_number(&n.protocol)?, n.port)))
            .collect(),
        info.host_network,
    )
}

fn policy(np: &NetworkPolicy) -> Policy {
    let (p, err) = Policy::from_api(np);
    if let Some(e) = err {
        warn!(policy = %format!("{}/{}", p.namespace, p.name), error = %e,
              "the NetworkPolicy does not parse; the pods it selects admit nothing in the directions it names");
    }
    p
}

struct Pods(Arc<Engine>);
impl Sink<Pod> for Pods {
    type Kept = PodView;
    fn keep(&self, p: Pod) -> PodView {
        pod_view(&p)
    }
    fn listed(&mut self, all: Vec<PodView>) {
        self.0.pods_listed(all);
    }
    fn applied(&mut self, k: Pod) {
        self.0.pod_applied(pod_view(&k));
    }
    fn deleted(&mut self, k: &Pod) {
        let v = pod_view(k);
        self.0.pod_deleted(&v.namespace, &v.name);
    }
}

struct Namespaces(Arc<Engine>);
impl Sink<Namespace> for Namespaces {
    type Kept = Option<(String, BTreeMap<String, String>)>;
    fn keep(&self, n: Namespace) -> Self::Kept {
        Some((n.metadata.name?, n.metadata.labels.unwrap_or_default()))
    }
    fn listed(&mut self, all: Vec<Self::Kept>) {
        self.0
            .namespaces_listed(all.into_iter().flatten().collect::<BTreeMap<_, _>>());
    }
    fn applied(&mut self, n: Namespace) {
        if let Some(name) = n.metadata.name {
            self.0
                .namespace_applied(name, n.metadata.labels.unwrap_or_default());
        }
    }
    fn deleted(&mut self, n: &Namespace) {
        if let Some(name) = &n.metadata.name {
            self.0.namespace_deleted(name);
        }
    }
}

struct Policies(Arc<Engine>);
impl Sink<NetworkPolicy> for Policies {
    type Kept = Policy;
    fn keep(&self, k: NetworkPolicy) -> Policy {
        policy(&k)
    }
    fn listed(&mut self, all: Vec<Policy>) {
        self.0.policies_listed(all);
    }
    fn applied(&mut self, k: NetworkPolicy) {
        self.0.policy_applied(policy(&k));
    }
    fn deleted(&mut self, k: &NetworkPolicy) {
        let p = policy(k);
        self.0.policy_deleted(&p.namespace, &p.name);
    }
}

const POLICY_MEANWHILE: &str = "policy is enforced from what is known meanwhile";

/// Starts the three watches and the engine's apply loop, until `stop`.
pub fn start(
    client: &kube::Client,
    engine: &Arc<Engine>,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(follow(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            Names {
                what: "the cluster's pods",
                meanwhile: POLICY_MEANWHILE,
            },
            Pods(engine.clone()),
            stop.clone(),
        )),
        tokio::spawn(follow(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            Names {
                what: "namespaces",
                meanwhile: POLICY_MEANWHILE,
            },
            Namespaces(engine.clone()),
            stop.clone(),
        )),
        tokio::spawn(follow(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            Names {
                what: "NetworkPolicies",
                meanwhile: POLICY_MEANWHILE,
            },
            Policies(engine.clone()),
            stop.clone(),
        )),
        tokio::spawn(engine.clone().run(stop.clone())),
    ]
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodStatus;

    use super::*;
    use crate::{
        k8s::pods::sample_pod,
        policy::model::{TCP, UDP},
    };

    fn pod(phase: &str) -> Pod {
        Pod {
            status: Some(PodStatus {
                pod_ip: Some("10.0.1.5".into()),
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..sample_pod()
        }
    }

    #[test]
    fn a_pod_view_keeps_what_policy_needs() {
        let v = pod_view(&pod("Running"));
        assert_eq!((v.namespace.as_str(), v.name.as_str()), ("x", "web"));
        assert_eq!(v.ip, Some(std::net::Ipv4Addr::new(10, 0, 1, 5)));
        assert_eq!(v.labels["app"], "web");
        assert_eq!(
            v.named_ports,
            vec![
                ("serve-80-tcp".into(), TCP, 80),
                ("serve-81-udp".into(), UDP, 81)
            ]
            .into()
        );
        assert!(!v.host_network);
    }

    #[test]
    fn finished_pods_hold_no_address() {
        assert_eq!(pod_view(&pod("Succeeded")).ip, None);
        assert_eq!(pod_view(&pod("Failed")).ip, None);
    }
}
