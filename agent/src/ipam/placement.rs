//! Where a new ENI goes, with aws-node's rules. Pure: the caller reads the Node, the
//! ENIConfig and the zone's subnets; this decides.
//!
//! - Custom networking (`AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG`): the node's ENIConfig names
//!   the subnet and security groups (the primary ENI's when it gives none); the primary
//!   ENI holds no pod addresses. It takes precedence over subnet discovery.
//! - Subnet discovery (`ENABLE_SUBNET_DISCOVERY`, on by default): the subnets of the
//!   node's VPC and zone, most free addresses first, that carry `kubernetes.io/role/cni`
//!   with a value other than `0` (the node's own subnet also when untagged), and whose
//!   cluster tags, if any, name `CLUSTER_NAME`. ENIs in excluded subnets hold no pod
//!   addresses.
//! - Neither: the node's subnet.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

use crate::aws::ec2::SubnetInfo;

/// Subnet discovery's tag.
pub const TAG_CNI_ROLE: &str = "kubernetes.io/role/cni";
/// Cluster tags on a subnet: `cni.networking.k8s.aws/cluster/<name>`.
pub const TAG_CLUSTER_PREFIX: &str = "cni.networking.k8s.aws/cluster/";
/// The node label that names an ENIConfig before anything else (aws-node's
/// "source of truth").
pub const LABEL_EXTERNAL_ENICONFIG: &str = "vpc.amazonaws.com/externalEniConfig";
/// `ENI_CONFIG_LABEL_DEF` and `ENI_CONFIG_ANNOTATION_DEF` default to this.
pub const DEFAULT_ENICONFIG_KEY: &str = "k8s.amazonaws.com/eniConfig";
/// The ENIConfig used when the node names none.
pub const DEFAULT_ENICONFIG: &str = "default";

/// Which ENIConfig a node uses and what said so.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EniConfigChoice {
    pub name: String,
    /// `label vpc.amazonaws.com/externalEniConfig`, `annotation <key>`, `label <key>` or
    /// `default`.
    pub source: String,
}

/// aws-node's order: the external label, the annotation `annotation_key`, the label
/// `label_key`, else `default`. A key that is present wins even with an empty value, as
/// in aws-node (the empty name then fails to resolve, loudly).
pub fn eniconfig_name(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    label_key: &str,
    annotation_key: &str,
) -> EniConfigChoice {
    let hit = |source: String, v: &String| EniConfigChoice {
        name: v.clone(),
        source,
    };
    if let Some(v) = labels.get(LABEL_EXTERNAL_ENICONFIG) {
        return hit(format!("label {LABEL_EXTERNAL_ENICONFIG}"), v);
    }
    if let Some(v) = annotations.get(annotation_key) {
        return hit(format!("annotation {annotation_key}"), v);
    }
    if let Some(v) = labels.get(label_key) {
        return hit(format!("label {label_key}"), v);
    }
    EniConfigChoice {
        name: DEFAULT_ENICONFIG.into(),
        source: "default".into(),
    }
}

/// An ENIConfig's spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EniConfigSpec {
    pub subnet: String,
    pub security_groups: Vec<String>,
}

/// Where to create an ENI: a subnet and the groups it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub subnet_id: String,
    pub subnet_cidr: Ipv4Net,
    pub security_groups: Vec<String>,
    /// For logs and introspection: `ENIConfig us-west-2a`, `subnet discovery`, ...
    pub why: String,
}

/// Why no ENI can be placed; said to pods, in logs and as an Event on the Node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error(
        "ENIConfig {name:?} (from {from}) {problem}; pods on this node get no new addresses until it is fixed"
    )]
    EniConfig {
        name: String,
        from: String,
        problem: String,
    },
    /// Custom networking's inputs from Kubernetes are wrong (no ENIConfig, no CRD).
    #[error("{0}; pods on this node get no new addresses until it is fixed")]
    Cluster(String),
    #[error(
        "no subnet may hold pod addresses: the node's subnet and every subnet of zone {zone} are untagged or tagged {TAG_CNI_ROLE}=0, or tagged for another cluster"
    )]
    NoSubnet { zone: String },
}

/// Checks an ENIConfig's subnet against the node, as EC2 would refuse it at attach time.
pub fn check_eniconfig(
    choice: &EniConfigChoice,
    spec: &EniConfigSpec,
    subnet: Option<&SubnetInfo>,
    node_vpc: &str,
    node_zone: &str,
    primary_groups: &[String],
) -> Result<Target, PlaceError> {
    let bad = |problem: String| PlaceError::EniConfig {
        name: choice.name.clone(),
        from: choice.source.clone(),
        problem,
    };
    if spec.subnet.is_empty() {
        return Err(bad("has no spec.subnet".into()));
    }
    let Some(s) = subnet else {
        return Err(bad(format!(
            "names subnet {}, which EC2 does not have",
            spec.subnet
        )));
    };
    if !node_vpc.is_empty() && s.vpc_id != node_vpc {
        return Err(bad(format!(
            "names subnet {} of {}, not of the node's VPC {node_vpc}",
            s.id, s.vpc_id
        )));
    }
    if s.availability_zone != node_zone {
        return Err(bad(format!(
            "names subnet {} in {}, but the node is in {node_zone} (an ENI must be in its instance's zone; give the node an ENIConfig of its zone)",
            s.id, s.availability_zone
        )));
    }
    let security_groups = if spec.security_groups.is_empty() {
        primary_groups.to_vec()
    } else {
        spec.security_groups.clone()
    };
    Ok(Target {
        subnet_id: s.id.clone(),
        subnet_cidr: s.cidr,
        security_groups,
        why: format!("ENIConfig {}", choice.name),
    })
}

/// Whether the cluster tags of a subnet let this cluster use it: none at all, or one
/// naming `cluster` (with no `CLUSTER_NAME`, any).
fn cluster_tags_allow(tags: &BTreeMap<String, String>, cluster: Option<&str>) -> bool {
    let Some(cluster) = cluster.filter(|c| !c.is_empty()) else {
        return true;
    };
    let mut named = tags
        .keys()
        .filter_map(|k| k.strip_prefix(TAG_CLUSTER_PREFIX))
        .peekable();
    named.peek().is_none() || named.any(|n| n == cluster)
}

/// Whether subnet discovery may put new ENIs in `s`.
pub fn usable_for_new_enis(s: &SubnetInfo, primary_subnet: &str, cluster: Option<&str>) -> bool {
    let role = s.tags.get(TAG_CNI_ROLE).map_or("", String::as_str);
    let tagged = match role {
        "0" => false,
        // Untagged: only the node's own subnet, as before subnet discovery existed.
        "" => s.id == primary_subnet,
        _ => true,
    };
    tagged && cluster_tags_allow(&s.tags, cluster)
}

/// Whether ENIs in `s` must hold no pod addresses: tagged `0`, or tagged for pods but for
/// another cluster.
pub fn excluded(s: &SubnetInfo, cluster: Option<&str>) -> bool {
    match s.tags.get(TAG_CNI_ROLE).map(String::as_str) {
        Some("0") => true,
        None | Some("") => false,
        Some(_) => !cluster_tags_allow(&s.tags, cluster),
    }
}

/// Subnet discovery's targets, in the order to try them: most free addresses first
/// (ties keep EC2's order).
pub fn discovery_targets(
    zone_subnets: &[SubnetInfo],
    primary_subnet: &str,
    cluster: Option<&str>,
    groups: &[String],
) -> Vec<Target> {
    let mut usable: Vec<&SubnetInfo> = zone_subnets
        .iter()
        .filter(|s| usable_for_new_enis(s, primary_subnet, cluster))
        .collect();
    usable.sort_by_key(|s| std::cmp::Reverse(s.available));
    usable
        .into_iter()
        .map(|s| Target {
            subnet_id: s.id.clone(),
            subnet_cidr: s.cidr,
            security_groups: groups.to_vec(),
            why: if s.id == primary_subnet {
                "subnet discovery (the node's subnet)".into()
            } else {
                format!("subnet discovery ({TAG_CNI_ROLE})")
            },
        })
        .collect()
}

/// EKS's max-pods formula (the AMI's max-pods calculator): every ENI's addresses but
/// their primaries (or as many /28 prefixes), plus 2 for host-network pods; with custom
/// networking the primary ENI holds none. The calculator also caps it (110, or 250 on
/// big instances); that is the kubelet's setting, not a limit of the network.
pub fn max_pods(max_enis: u32, slots_per_eni: u32, prefixes: bool, custom_networking: bool) -> u32 {
    let enis = max_enis.saturating_sub(u32::from(custom_networking));
    let per_eni = slots_per_eni.saturating_sub(1);
    let per_eni = if prefixes { per_eni * 16 } else { per_eni };
    enis.saturating_mul(per_eni).saturating_add(2)
}

#[cfg(test)]
mod tests;
