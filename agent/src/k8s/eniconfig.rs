//! Custom networking's inputs from Kubernetes: the Node's labels and annotations, and the
//! ENIConfig (`eniconfigs.crd.k8s.amazonaws.com/v1alpha1`, cluster-scoped) they name.
//! Read fresh for every new ENI (rare), so a changed label or ENIConfig takes effect on
//! the next ENI without a restart or a watch.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    core::GroupVersionKind,
};

use crate::ipam::placement::{EniConfigChoice, EniConfigSpec, eniconfig_name};

#[derive(Debug, thiserror::Error)]
pub enum EniConfigError {
    #[error("reading Node {node} from the API server")]
    Node {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "ENIConfig {name:?} (from {source_of_name}) does not exist; create it (kubectl get eniconfigs) or change the node's label or annotation that names it"
    )]
    Missing {
        name: String,
        source_of_name: String,
    },
    #[error("reading ENIConfig {name:?} from the API server")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the ENIConfig resource is not installed (no eniconfigs.crd.k8s.amazonaws.com); install the chart's CRD"
    )]
    NoCrd,
}

impl EniConfigError {
    /// A problem with the cluster's objects (a user must act), not with reaching them.
    pub fn is_configuration(&self) -> bool {
        matches!(self, Self::Missing { .. } | Self::NoCrd)
    }
}

/// Where the node's ENIConfig name comes from: `ENI_CONFIG_LABEL_DEF` and
/// `ENI_CONFIG_ANNOTATION_DEF`.
#[derive(Clone, Debug)]
pub struct Keys {
    pub label: String,
    pub annotation: String,
}

/// Reads ENIConfigs for one node.
#[derive(Clone)]
pub struct EniConfigs {
    client: Client,
    node: String,
    keys: Keys,
}

impl std::fmt::Debug for EniConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EniConfigs")
            .field("node", &self.node)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("crd.k8s.amazonaws.com", "v1alpha1", "ENIConfig"),
        "eniconfigs",
    )
}

/// The spec of an ENIConfig object, read leniently (extra fields are ignored).
pub fn spec_of(obj: &DynamicObject) -> EniConfigSpec {
    let spec = &obj.data["spec"];
    EniConfigSpec {
        subnet: spec["subnet"].as_str().unwrap_or_default().to_owned(),
        security_groups: spec["securityGroups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect(),
    }
}

impl EniConfigs {
    pub fn new(client: Client, node: String, keys: Keys) -> Self {
        Self { client, node, keys }
    }

    /// The node's ENIConfig, named as aws-node names it.
    pub async fn current(&self) -> Result<(EniConfigChoice, EniConfigSpec), EniConfigError> {
        let node = Api::<Node>::all(self.client.clone())
            .get(&self.node)
            .await
            .map_err(|source| EniConfigError::Node {
                node: self.node.clone(),
                source,
            })?;
        let labels: BTreeMap<String, String> = node.metadata.labels.unwrap_or_default();
        let annotations: BTreeMap<String, String> = node.metadata.annotations.unwrap_or_default();
        let choice = eniconfig_name(
            &labels,
            &annotations,
            &self.keys.label,
            &self.keys.annotation,
        );
        if choice.name.is_empty() {
            return Err(EniConfigError::Missing {
                name: choice.name,
                source_of_name: choice.source,
            });
        }
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &resource());
        let obj = match api.get_opt(&choice.name).await {
            Ok(Some(o)) => o,
            Ok(None) => {
                return Err(EniConfigError::Missing {
                    name: choice.name,
                    source_of_name: choice.source,
                });
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => return Err(EniConfigError::NoCrd),
            Err(source) => {
                return Err(EniConfigError::Read {
                    name: choice.name,
                    source,
                });
            }
        };
        Ok((choice, spec_of(&obj)))
    }
}
