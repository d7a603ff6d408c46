//! The I/O around [`placement`](super::placement): reads the node's ENIConfig from
//! Kubernetes and the zone's subnets from EC2, and says where the next ENI goes and
//! which attached ENIs may hold pod addresses.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ipnet::Ipv4Net;
use tracing::{debug, warn};
use vpc_ebpf_rpc::report::Chain;

use super::placement::{self, EniConfigChoice, PlaceError, Target};
use crate::{
    aws::ec2::{Ec2, Ec2Error, ErrorKind, SubnetInfo},
    k8s::eniconfig::{EniConfigError, EniConfigs},
    node::Node,
};

/// How new ENIs are placed.
#[derive(Clone, Debug)]
pub enum Mode {
    /// The node's subnet (subnet discovery off).
    NodeSubnet,
    /// Subnet discovery (`ENABLE_SUBNET_DISCOVERY`).
    Discovery,
    /// Custom networking: the node's ENIConfig. `None` when the agent is not on
    /// Kubernetes, so no ENIConfig can be read (every placement then fails, loudly).
    Custom(Option<EniConfigs>),
}

#[derive(Debug, thiserror::Error)]
pub enum PlacerError {
    /// The cluster's or EC2's configuration: a user must act; growth waits.
    #[error(transparent)]
    Config(#[from] PlaceError),
    #[error("custom networking: {0}")]
    Kube(#[source] EniConfigError),
    #[error(transparent)]
    Ec2(#[from] Ec2Error),
}

/// One attached ENI as the placer judges it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judged {
    /// Its subnet, when not the node's.
    pub subnet_cidr: Option<Ipv4Net>,
    pub excluded: bool,
}

/// What introspection shows of the placement.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Shown {
    pub mode: &'static str,
    pub eniconfig: Option<EniConfigChoice>,
    pub eniconfig_subnet: Option<String>,
    pub eniconfig_security_groups: Option<Vec<String>>,
    pub last_targets: Vec<String>,
    pub problem: Option<String>,
}

pub struct Placer {
    ec2: Ec2,
    node: Node,
    mode: Mode,
    cluster: Option<String>,
    /// Subnets seen, by id: for ENIs' gateways and exclusion.
    subnets: HashMap<String, SubnetInfo>,
    shown: Shown,
    /// Where `shown` is published for introspection.
    published: Option<Arc<Mutex<Shown>>>,
}

impl Placer {
    pub fn new(ec2: Ec2, node: Node, mode: Mode, cluster: Option<String>) -> Self {
        let shown = Shown {
            mode: match mode {
                Mode::NodeSubnet => "node-subnet",
                Mode::Discovery => "subnet-discovery",
                Mode::Custom(_) => "custom-networking",
            },
            ..Shown::default()
        };
        Self {
            ec2,
            node,
            mode,
            cluster,
            subnets: HashMap::new(),
            shown,
            published: None,
        }
    }

    /// Publishes what is shown of the placement to `to` (introspection reads it).
    #[must_use]
    pub fn showing(mut self, to: Arc<Mutex<Shown>>) -> Self {
        self.published = Some(to);
        self.publish();
        self
    }

    fn publish(&self) {
        if let Some(p) = &self.published
            && let Ok(mut g) = p.lock()
        {
            *g = self.shown.clone();
        }
    }

    pub fn discovers(&self) -> bool {
        matches!(self.mode, Mode::Discovery)
    }

    pub fn custom_networking(&self) -> bool {
        matches!(self.mode, Mode::Custom(_))
    }

    fn node_target(&self, why: &str) -> Target {
        Target {
            subnet_id: self.node.subnet_id.clone(),
            subnet_cidr: self.node.subnet_cidr,
            security_groups: self.node.security_groups.clone(),
            why: why.into(),
        }
    }

    /// Where the next ENI goes: subnets to try, in order.
    pub async fn targets(&mut self) -> Result<Vec<Target>, PlacerError> {
        let r = self.targets_inner().await;
        match &r {
            Ok(t) => {
                self.shown.last_targets = t
                    .iter()
                    .map(|t| format!("{} ({}, {})", t.subnet_id, t.subnet_cidr, t.why))
                    .collect();
                self.shown.problem = None;
            }
            Err(e) => self.shown.problem = Some(Chain(e).to_string()),
        }
        self.publish();
        r
    }

    async fn targets_inner(&mut self) -> Result<Vec<Target>, PlacerError> {
        match self.mode.clone() {
            Mode::NodeSubnet => Ok(vec![self.node_target("the node's subnet")]),
            Mode::Custom(None) => Err(PlaceError::EniConfig {
                name: placement::DEFAULT_ENICONFIG.into(),
                from: "custom networking".into(),
                problem: "cannot be read: the agent is not on Kubernetes".into(),
            }
            .into()),
            Mode::Custom(Some(reader)) => {
                let (choice, spec) = reader.current().await.map_err(|e| {
                    if e.is_configuration() {
                        PlacerError::Config(PlaceError::Cluster(format!(
                            "custom networking: {}",
                            Chain(&e)
                        )))
                    } else {
                        PlacerError::Kube(e)
                    }
                })?;
                self.shown.eniconfig = Some(choice.clone());
                self.shown.eniconfig_subnet = Some(spec.subnet.clone());
                self.shown.eniconfig_security_groups = Some(spec.security_groups.clone());
                let subnet = if spec.subnet.is_empty() {
                    None
                } else {
                    self.subnet(&spec.subnet).await?
                };
                self.vpc_id().await?;
                Ok(vec![placement::check_eniconfig(
                    &choice,
                    &spec,
                    subnet.as_ref(),
                    &self.node.vpc_id,
                    &self.node.availability_zone,
                    &self.node.security_groups,
                )?])
            }
            Mode::Discovery => {
                let zone = match self.vpc_id().await {
                    Ok(vpc) => {
                        self.ec2
                            .subnets_in(&vpc, &self.node.availability_zone)
                            .await
                    }
                    Err(e) => Err(e),
                };
                let zone = match zone {
                    Ok(z) => z,
                    Err(e) => {
                        // As aws-node: without DescribeSubnets (a missing permission,
                        // throttling) the node's own subnet still serves, unless it is
                        // known to be excluded.
                        let excluded = self
                            .subnets
                            .get(&self.node.subnet_id)
                            .is_some_and(|s| placement::excluded(s, self.cluster.as_deref()));
                        warn!(error = %Chain(&e), excluded, "subnet discovery could not read the zone's subnets; using the node's subnet");
                        if excluded {
                            return Err(e.into());
                        }
                        return Ok(vec![
                            self.node_target("the node's subnet (discovery failed)"),
                        ]);
                    }
                };
                for s in &zone {
                    self.subnets.insert(s.id.clone(), s.clone());
                }
                let t = placement::discovery_targets(
                    &zone,
                    &self.node.subnet_id,
                    self.cluster.as_deref(),
                    &self.node.security_groups,
                );
                if t.is_empty() {
                    return Err(PlaceError::NoSubnet {
                        zone: self.node.availability_zone.clone(),
                    }
                    .into());
                }
                Ok(t)
            }
        }
    }

    async fn vpc_id(&mut self) -> Result<String, Ec2Error> {
        if self.node.vpc_id.is_empty()
            && let Some(s) = self.subnet(&self.node.subnet_id.clone()).await?
        {
            self.node.vpc_id = s.vpc_id;
        }
        Ok(self.node.vpc_id.clone())
    }

    /// A subnet by id, from the cache or EC2; `None` if EC2 does not have it.
    async fn subnet(&mut self, id: &str) -> Result<Option<SubnetInfo>, Ec2Error> {
        if let Some(s) = self.subnets.get(id) {
            return Ok(Some(s.clone()));
        }
        match self.ec2.subnets_by_id(&[id.to_owned()]).await {
            Ok(v) => {
                for s in &v {
                    self.subnets.insert(s.id.clone(), s.clone());
                }
                Ok(v.into_iter().find(|s| s.id == id))
            }
            Err(e)
                if e.kind() == ErrorKind::NotFound || e.code().starts_with("InvalidSubnetID") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Judges attached ENIs `(device index, subnet id)`. With `fresh`, subnets are read
    /// again (their tags may have changed). `None`: the ENI's subnet is unknown now (EC2
    /// did not answer), so what was recorded stands.
    pub async fn judge(&mut self, enis: &[(u32, String)], fresh: bool) -> Vec<Option<Judged>> {
        let discovery = matches!(self.mode, Mode::Discovery);
        let mut ids: Vec<String> = enis
            .iter()
            .map(|(_, s)| s.clone())
            .filter(|s| {
                (discovery || *s != self.node.subnet_id) && (fresh || !self.subnets.contains_key(s))
            })
            .collect();
        ids.sort();
        ids.dedup();
        if !ids.is_empty() {
            match self.ec2.subnets_by_id(&ids).await {
                Ok(v) => {
                    for s in v {
                        self.subnets.insert(s.id.clone(), s);
                    }
                }
                Err(e) => {
                    warn!(error = %Chain(&e), "could not read the ENIs' subnets; judging them by what was known");
                }
            }
        }
        enis.iter()
            .map(|(dev, sid)| {
                let info = self.subnets.get(sid);
                let needed = discovery || *sid != self.node.subnet_id;
                if needed && info.is_none() && !(self.custom_networking() && *dev == 0) {
                    // Unknown now (EC2 did not answer): what the store has stands.
                    return None;
                }
                let subnet_cidr = if *sid == self.node.subnet_id {
                    None
                } else {
                    info.map(|s| s.cidr)
                };
                let excluded = if self.custom_networking() {
                    *dev == 0
                } else {
                    discovery
                        && info.is_some_and(|s| placement::excluded(s, self.cluster.as_deref()))
                };
                debug!(device_index = dev, subnet = %sid, ?subnet_cidr, excluded, "ENI judged");
                Some(Judged {
                    subnet_cidr,
                    excluded,
                })
            })
            .collect()
    }
}
