//! `ANNOTATE_POD_IP`: as aws-node does, each pod gets its address in the
//! `vpc.amazonaws.com/pod-ips` annotation right after its ADD, so controllers can read it
//! before the kubelet reports the pod's status. Done off the ADD's path, retried while the
//! API server is away.

use std::{net::Ipv4Addr, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};
use vpc_ebpf_rpc::report::Chain;

use super::Kube;

pub const POD_IPS_ANNOTATION: &str = "vpc.amazonaws.com/pod-ips";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotation {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
}

/// How long a pod's annotation is retried before it is given up.
const PATIENCE: Duration = Duration::from_mins(2);

/// Annotates the pods that arrive on `rx` until `stop`.
pub async fn run(kube: Kube, mut rx: mpsc::Receiver<Annotation>, mut stop: watch::Receiver<bool>) {
    loop {
        let a = tokio::select! {
            _ = stop.changed() => return,
            a = rx.recv() => match a { Some(a) => a, None => return },
        };
        let api: Api<Pod> = Api::namespaced(kube.client.clone(), &a.namespace);
        let patch = serde_json::json!({
            "metadata": {"annotations": {POD_IPS_ANNOTATION: a.ip.to_string()}}
        });
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut wait = Duration::from_millis(200);
        loop {
            match api
                .patch(&a.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    debug!(pod = %format!("{}/{}", a.namespace, a.name), ip = %a.ip, "annotated");
                    break;
                }
                // The pod is gone already: nothing to annotate.
                Err(kube::Error::Api(e)) if e.code == 404 => break,
                Err(e) if tokio::time::Instant::now() + wait < deadline => {
                    debug!(error = %Chain(&e), retry_in = ?wait, "annotating a pod failed");
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    warn!(pod = %format!("{}/{}", a.namespace, a.name), error = %Chain(&e), "gave up annotating a pod with its IP");
                    break;
                }
            }
        }
    }
}
