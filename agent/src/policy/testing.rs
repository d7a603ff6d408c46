//! What the policy modules' tests build their worlds from.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::model::{PodView, Policy, TCP};

/// A pod labelled `app=<app>`, serving the named port `http` on TCP 8080.
pub fn pod(ns: &str, name: &str, ip: Ipv4Addr, app: &str) -> PodView {
    PodView {
        namespace: ns.into(),
        name: name.into(),
        ip: Some(ip),
        labels: BTreeMap::from([("app".into(), app.into())]).into(),
        named_ports: vec![("http".into(), TCP, 8080)].into(),
        host_network: false,
    }
}

/// The compiler's view of a policy given as API JSON.
pub fn policy(v: serde_json::Value) -> Policy {
    let np: NetworkPolicy = serde_json::from_value(v).expect("a valid policy");
    Policy::from_api(&np).0
}
