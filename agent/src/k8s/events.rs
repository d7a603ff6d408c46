//! Publishes the agent's notices ([`crate::notice`]) as Kubernetes Events on its Node, so
//! `kubectl describe node` shows why pods on it wait. Repeats of a notice become a series
//! of one Event (kube's recorder), not a new object each time.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::{mpsc, watch};
use tracing::debug;
use vpc_ebpf_rpc::report::Chain;

use super::Kube;
use crate::notice::{Notice, Severity};

/// The Node as Events refer to it.
pub fn node_reference(node_name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node_name.to_owned()),
        uid,
        // Events about cluster-scoped objects live in `default`, where kubectl looks.
        namespace: Some("default".into()),
        ..Default::default()
    }
}

/// Publishes `notices` until `stop`. A notice the API server does not take (it is down)
/// is dropped after the log line [`crate::notice`] already wrote.
pub async fn publish(
    kube: Kube,
    reference: ObjectReference,
    mut notices: mpsc::Receiver<Notice>,
    mut stop: watch::Receiver<bool>,
) {
    let reporter = Reporter {
        controller: "vpc-ebpf-agent".into(),
        instance: Some(kube.node_name.clone()),
    };
    let recorder = Recorder::new(kube.client.clone(), reporter);
    loop {
        let n = tokio::select! {
            _ = stop.changed() => return,
            n = notices.recv() => match n { Some(n) => n, None => return },
        };
        let ev = Event {
            type_: match n.severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: n.reason.into(),
            note: Some(n.message.clone()),
            action: "IPAM".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &reference).await {
            debug!(reason = n.reason, error = %Chain(&e), "the Event could not be published");
        }
    }
}
