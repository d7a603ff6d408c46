//! Who this node is and how it is to be run: its identity from IMDS and EC2 (instance,
//! primary ENI, subnet, VPC CIDRs, the instance type's limits) and the settings the
//! configuration gives it. The identity is cached next to the checkpoint, so a restarted
//! agent serves pods from its restored state even while EC2 is unreachable.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use vpc_ebpf_rpc::{
    report::Chain,
    types::{MacAddr, MacParseError},
};

use crate::{
    aws::{
        ec2::{Ec2, Ec2Error, EniInfo},
        imds::{Imds, ImdsError, InstanceMetadata},
    },
    config::Config,
    ipam::pool::{InstanceLimits, Mode, Targets},
    metrics::Metrics,
    persist::{self, PersistError},
};

/// What the node is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub instance_id: String,
    pub instance_type: String,
    pub region: String,
    #[serde(default)]
    pub availability_zone: String,
    pub subnet_id: String,
    pub subnet_cidr: Ipv4Net,
    /// Empty in an identity cached by an older agent; discovery fills it in.
    #[serde(default)]
    pub vpc_id: String,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub security_groups: Vec<String>,
    pub primary_eni: String,
    pub primary_ip: Ipv4Addr,
    pub primary_mac: MacAddr,
    pub limits: InstanceLimits,
}

impl Node {
    /// The subnet's gateway: its first host address, as in every VPC subnet. Next hop of
    /// everything leaving by an ENI.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet_cidr.network()) + 1)
    }
}

/// How the configuration says the node's pool is to be run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mode: Mode,
    pub targets: Targets,
    pub cluster_name: Option<String>,
    pub additional_tags: BTreeMap<String, String>,
    pub leaked_eni_cleanup: bool,
    /// Detached ENIs of ours younger than this are left alone (they may be mid-attach).
    pub leaked_eni_age: Duration,
    /// How long growth pauses after InsufficientFreeAddressesInSubnet.
    pub subnet_full_pause: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: Mode::SecondaryIp,
            targets: Targets::default(),
            cluster_name: None,
            additional_tags: BTreeMap::new(),
            leaked_eni_cleanup: true,
            leaked_eni_age: Duration::from_mins(5),
            subnet_full_pause: Duration::from_mins(1),
        }
    }
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        Self {
            mode: c.mode,
            targets: c.targets.clone(),
            cluster_name: c.cluster_name.clone(),
            additional_tags: c.additional_eni_tags.clone(),
            leaked_eni_cleanup: !c.disable_leaked_eni_cleanup,
            leaked_eni_age: c.leaked_eni_age,
            subnet_full_pause: c.subnet_full_pause,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("reading the instance from IMDS")]
    Imds(#[from] ImdsError),
    #[error("reading the instance from EC2")]
    Ec2(#[from] Ec2Error),
    #[error(
        "EC2 shows no ENI at device index 0 for instance {0}; is the EC2 endpoint the right one?"
    )]
    NoPrimaryEni(String),
    #[error("IMDS does not show the primary ENI {0} (MAC {1})")]
    PrimaryNotInImds(String, String),
    #[error("IMDS gave {what} {value:?}, not an IPv4 CIDR")]
    Cidr { what: &'static str, value: String },
    #[error("EC2 gave the primary ENI's MAC")]
    Mac(#[source] MacParseError),
}

impl DiscoverError {
    /// Worth retrying: the service may come back (EC2 down at start, IMDS slow).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Imds(_) | Self::PrimaryNotInImds(..) => true,
            Self::Ec2(e) => e.retryable(),
            Self::NoPrimaryEni(_) | Self::Cidr { .. } | Self::Mac(_) => false,
        }
    }
}

fn cidr(what: &'static str, value: &str) -> Result<Ipv4Net, DiscoverError> {
    value
        .parse::<Ipv4Net>()
        .ok()
        .filter(|n| n.trunc() == *n)
        .ok_or_else(|| DiscoverError::Cidr {
            what,
            value: value.to_owned(),
        })
}

/// Reads the instance's limits and ENIs from EC2, given what IMDS said.
pub async fn discover(
    meta: &InstanceMetadata,
    ec2: &Ec2,
) -> Result<(Node, Vec<EniInfo>), DiscoverError> {
    let limits = ec2.instance_type_limits(&meta.instance_type).await?;
    let enis = ec2.attached_enis(&meta.instance_id).await?;
    let primary = enis
        .iter()
        .find(|e| e.attachment.as_ref().is_some_and(|a| a.device_index == 0))
        .ok_or_else(|| DiscoverError::NoPrimaryEni(meta.instance_id.clone()))?;
    let pmeta = meta
        .enis
        .iter()
        .find(|e| e.mac.eq_ignore_ascii_case(&primary.mac))
        .ok_or_else(|| DiscoverError::PrimaryNotInImds(primary.id.clone(), primary.mac.clone()))?;
    let node = Node {
        instance_id: meta.instance_id.clone(),
        instance_type: meta.instance_type.clone(),
        region: meta.region.clone(),
        availability_zone: meta.availability_zone.clone(),
        subnet_id: primary.subnet_id.clone(),
        subnet_cidr: cidr("the subnet CIDR", &pmeta.subnet_cidr)?,
        vpc_id: pmeta.vpc_id.clone(),
        vpc_cidrs: pmeta
            .vpc_cidrs
            .iter()
            .map(|c| cidr("a VPC CIDR", c))
            .collect::<Result<_, _>>()?,
        security_groups: primary.security_groups.clone(),
        primary_eni: primary.id.clone(),
        primary_ip: primary.primary_ip,
        primary_mac: primary.mac.parse().map_err(DiscoverError::Mac)?,
        limits: InstanceLimits {
            max_enis: limits.max_enis,
            slots_per_eni: limits.ipv4_per_eni,
        },
    };
    Ok((node, enis))
}

/// Waits between discovery attempts: quick at first, then every 10 s.
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(10))
}

/// The node, its ENIs as EC2 has them, and an EC2 client for its region.
pub struct Discovered {
    pub node: Node,
    pub enis: Vec<EniInfo>,
    pub ec2: Ec2,
}

/// Discovery, retried until it works: IMDS or EC2 being down is reported through
/// `report` (the agent's not-ready reason) and waited out, never a crash loop. Only an
/// answer that retrying cannot change is an error.
pub async fn discover_with_retry(
    config: &Config,
    metrics: &Arc<Metrics>,
    report: impl Fn(String),
) -> Result<Discovered, DiscoverError> {
    let mut imds = Imds::new(&config.imds_endpoint);
    let mut ec2: Option<Ec2> = None;
    let mut attempt = 0;
    loop {
        let r: Result<_, DiscoverError> = async {
            let meta = imds.discover_primary().await?;
            let client = if let Some(c) = &ec2 {
                c.clone()
            } else {
                let c = Ec2::new(
                    &meta.region,
                    config.ec2_endpoint.as_deref(),
                    metrics.clone(),
                )
                .await;
                ec2 = Some(c.clone());
                c
            };
            let (node, enis) = discover(&meta, &client).await?;
            Ok(Discovered {
                node,
                enis,
                ec2: client,
            })
        }
        .await;
        match r {
            Ok(d) => {
                info!(instance = %d.node.instance_id, instance_type = %d.node.instance_type, enis = d.enis.len(), "discovered the node");
                return Ok(d);
            }
            Err(e) if e.retryable() => {
                let wait = retry_delay(attempt);
                attempt += 1;
                warn!(error = %Chain(&e), retry_in = ?wait, "discovery failed; retrying");
                report(format!("discovering the node: {}", Chain(&e)));
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Where the node's identity is cached: next to the checkpoint.
pub fn cache_path(checkpoint: &Path) -> PathBuf {
    checkpoint.with_file_name("node.json")
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("node identity cache")]
    Io(#[from] PersistError),
    #[error("node identity cache {path} is unreadable")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub fn load_cached(path: &Path) -> Result<Option<Node>, CacheError> {
    let Some(data) = persist::read(path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&data)
        .map(Some)
        .map_err(|source| CacheError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

pub fn save_cached(path: &Path, node: &Node) -> Result<(), CacheError> {
    let data = serde_json::to_vec_pretty(node).map_err(|source| CacheError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(persist::write_atomic(path, &data)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Node {
        Node {
            instance_id: "i-1".into(),
            instance_type: "m5.large".into(),
            region: "us-west-2".into(),
            availability_zone: "us-west-2a".into(),
            subnet_id: "subnet-1".into(),
            subnet_cidr: "10.0.16.0/20".parse().unwrap(),
            vpc_id: "vpc-1".into(),
            vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            security_groups: vec!["sg-1".into()],
            primary_eni: "eni-0".into(),
            primary_ip: Ipv4Addr::new(10, 0, 16, 10),
            primary_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            limits: InstanceLimits {
                max_enis: 3,
                slots_per_eni: 10,
            },
        }
    }

    #[test]
    fn the_gateway_is_the_subnets_first_host() {
        assert_eq!(sample().gateway(), Ipv4Addr::new(10, 0, 16, 1));
    }

    #[test]
    fn the_identity_cache_round_trips() {
        let dir = std::env::temp_dir().join(format!("vpc-ebpf-node-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = cache_path(&dir.join("ipam.json"));
        assert_eq!(path, dir.join("node.json"));
        assert_eq!(load_cached(&path).unwrap(), None);
        save_cached(&path, &sample()).unwrap();
        assert_eq!(load_cached(&path).unwrap(), Some(sample()));
        std::fs::write(&path, b"{").unwrap();
        assert!(matches!(
            load_cached(&path),
            Err(CacheError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn cidrs_with_host_bits_are_refused() {
        assert!(cidr("x", "10.0.0.0/16").is_ok());
        assert!(cidr("x", "10.0.0.1/16").is_err());
        assert!(cidr("x", "nonsense").is_err());
    }

    #[test]
    fn retry_delays_are_bounded() {
        assert_eq!(retry_delay(0), Duration::from_millis(250));
        assert_eq!(retry_delay(2), Duration::from_secs(1));
        assert_eq!(retry_delay(30), Duration::from_secs(10));
    }
}
