//! A thin client over aws-sdk-ec2 with only the calls IPAM needs, typed results, and
//! every error classified so callers know whether to retry, pause or give up.
//!
//! The SDK's own retries are off: the reconciler owns backoff (with jitter) so that it
//! can keep serving from what it has, count every attempt and report throttling.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use aws_sdk_ec2::{
    Client,
    config::{
        BehaviorVersion, Region, http::HttpResponse, retry::RetryConfig, timeout::TimeoutConfig,
    },
    error::{ProvideErrorMetadata, SdkError},
    primitives::{DateTime, DateTimeFormat},
    types::{
        AttachmentStatus, Filter, NetworkInterface, NetworkInterfaceAttachmentChanges,
        ResourceType, Tag, TagSpecification,
    },
};

use ipnet::Ipv4Net;

use crate::metrics::Metrics;

/// Tag keys shared with Amazon VPC CNI, so ENIs left by either are recognised by both.
pub const TAG_INSTANCE_ID: &str = "node.k8s.amazonaws.com/instance_id";
pub const TAG_CREATED_AT: &str = "node.k8s.amazonaws.com/createdAt";
pub const TAG_CLUSTER_NAME: &str = "cluster.k8s.amazonaws.com/name";
/// Our own marker: only ENIs carrying it are deleted by leaked-ENI cleanup.
pub const TAG_MANAGED_BY: &str = "vpc-ebpf.io/managed-by";

/// How a failed call should be treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// RequestLimitExceeded and friends: back off and retry.
    Throttled,
    /// 5xx, timeouts, connection failures: back off and retry.
    Transient,
    /// InsufficientFreeAddressesInSubnet: retrying soon will not help.
    SubnetFull,
    /// An instance limit (ENIs, addresses per ENI) was hit.
    Limit,
    /// The resource does not exist (any more).
    NotFound,
    /// Anything else: a request EC2 refuses (permissions, bad parameters).
    Refused,
}

#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    #[error("EC2 {op}: {code}: {message}")]
    Api {
        op: &'static str,
        code: String,
        message: String,
        kind: ErrorKind,
        /// The HTTP status EC2 answered with; 0 when there was no answer.
        status: u16,
    },
    #[error("EC2 {op}: the response lacks {what}")]
    Malformed { op: &'static str, what: String },
}

impl Ec2Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Api { kind, .. } => *kind,
            Self::Malformed { .. } => ErrorKind::Transient,
        }
    }

    pub fn code(&self) -> &str {
        match self {
            Self::Api { code, .. } => code,
            Self::Malformed { .. } => "MalformedResponse",
        }
    }

    pub fn retryable(&self) -> bool {
        matches!(self.kind(), ErrorKind::Throttled | ErrorKind::Transient)
    }
}

/// Classifies an AWS error code (and HTTP status when there is one).
pub fn classify(code: &str, http_status: Option<u16>) -> ErrorKind {
    match code {
        "RequestLimitExceeded"
        | "Throttling"
        | "ThrottlingException"
        | "TooManyRequests"
        | "RequestThrottled"
        | "SlowDown" => ErrorKind::Throttled,
        "InsufficientFreeAddressesInSubnet" => ErrorKind::SubnetFull,
        "AttachmentLimitExceeded" | "PrivateIpAddressLimitExceeded" => ErrorKind::Limit,
        c if c.starts_with("InvalidNetworkInterfaceID")
            || c.starts_with("InvalidAttachmentID")
            || c == "InvalidNetworkInterface.NotFound" =>
        {
            ErrorKind::NotFound
        }
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            ErrorKind::Transient
        }
        _ if http_status.is_some_and(|s| s >= 500) => ErrorKind::Transient,
        _ => ErrorKind::Refused,
    }
}

fn api_error<E>(op: &'static str, e: &SdkError<E, HttpResponse>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            let code = err.code().unwrap_or("Unknown").to_owned();
            let status = se.raw().status().as_u16();
            Ec2Error::Api {
                op,
                kind: classify(&code, Some(status)),
                message: err.message().unwrap_or_default().to_owned(),
                code,
                status,
            }
        }
        SdkError::TimeoutError(_) => Ec2Error::Api {
            op,
            code: "Timeout".into(),
            message: "no answer in time".into(),
            kind: ErrorKind::Transient,
            status: 0,
        },
        other => Ec2Error::Api {
            op,
            code: "Transport".into(),
            message: format!("{}", aws_sdk_ec2::error::DisplayErrorContext(other)),
            kind: ErrorKind::Transient,
            status: 0,
        },
    }
}

/// An attachment of an ENI to an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniAttachment {
    pub id: String,
    pub instance_id: String,
    pub device_index: u32,
    pub status: String,
}

/// One ENI as EC2 describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniInfo {
    pub id: String,
    pub mac: String,
    pub subnet_id: String,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    /// Base addresses of delegated /28 prefixes.
    pub prefixes: Vec<Ipv4Addr>,
    pub attachment: Option<EniAttachment>,
    pub tags: BTreeMap<String, String>,
    pub security_groups: Vec<String>,
    /// `available`, `in-use`, ...
    pub status: String,
    /// EC2's `InterfaceType`: `interface` for ordinary ENIs; `trunk`, `efa`, ... for ENIs
    /// other software owns.
    pub interface_type: String,
}

fn parse_eni(ni: &NetworkInterface) -> Result<EniInfo, Ec2Error> {
    const OP: &str = "DescribeNetworkInterfaces";
    let missing = |what: &str| Ec2Error::Malformed {
        op: OP,
        what: what.to_owned(),
    };
    let id = ni
        .network_interface_id()
        .ok_or_else(|| missing("an ENI id"))?;
    let mut primary = None;
    let mut secondary_ips = Vec::new();
    for a in ni.private_ip_addresses() {
        let Some(ip) = a.private_ip_address().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if a.primary() == Some(true) {
            primary = Some(ip);
        } else {
            secondary_ips.push(ip);
        }
    }
    let primary_ip = primary
        .or_else(|| ni.private_ip_address().and_then(|s| s.parse().ok()))
        .ok_or_else(|| missing(&format!("the primary address of {id}")))?;
    let prefixes = ni
        .ipv4_prefixes()
        .iter()
        .filter_map(|p| p.ipv4_prefix()?.split('/').next()?.parse().ok())
        .collect();
    let attachment = ni.attachment().and_then(|a| {
        Some(EniAttachment {
            id: a.attachment_id()?.to_owned(),
            instance_id: a.instance_id().unwrap_or_default().to_owned(),
            device_index: u32::try_from(a.device_index()?).ok()?,
            status: a
                .status()
                .map(AttachmentStatus::as_str)
                .unwrap_or_default()
                .to_owned(),
        })
    });
    Ok(EniInfo {
        id: id.to_owned(),
        mac: ni.mac_address().unwrap_or_default().to_ascii_lowercase(),
        subnet_id: ni.subnet_id().unwrap_or_default().to_owned(),
        primary_ip,
        secondary_ips,
        prefixes,
        attachment,
        tags: tag_map(ni.tag_set()),
        security_groups: ni
            .groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_owned))
            .collect(),
        status: ni
            .status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        interface_type: ni
            .interface_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
    })
}

/// What a new ENI should look like.
#[derive(Clone, Debug, Default)]
pub struct NewEni {
    pub subnet_id: String,
    pub security_groups: Vec<String>,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub secondary_ips: u32,
    pub prefixes: u32,
}

/// One subnet as EC2 describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetInfo {
    pub id: String,
    pub cidr: Ipv4Net,
    pub availability_zone: String,
    pub vpc_id: String,
    /// EC2's `AvailableIpAddressCount`.
    pub available: u32,
    pub tags: BTreeMap<String, String>,
}

/// EC2's tag list as a map (a tag without a key is dropped).
fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                t.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

fn parse_subnet(s: &aws_sdk_ec2::types::Subnet) -> Option<SubnetInfo> {
    Some(SubnetInfo {
        id: s.subnet_id()?.to_owned(),
        cidr: s.cidr_block()?.parse().ok()?,
        availability_zone: s.availability_zone().unwrap_or_default().to_owned(),
        vpc_id: s.vpc_id().unwrap_or_default().to_owned(),
        available: s
            .available_ip_address_count()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        tags: tag_map(s.tags()),
    })
}

/// The instance type's network limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeLimits {
    pub max_enis: u32,
    pub ipv4_per_eni: u32,
}

#[derive(Clone)]
pub struct Ec2 {
    client: Client,
    metrics: Arc<Metrics>,
}

/// Formats a time as EC2 tags carry it (RFC 3339, UTC).
pub fn format_time(t: std::time::SystemTime) -> String {
    DateTime::from(t)
        .fmt(DateTimeFormat::DateTime)
        .unwrap_or_default()
}

pub fn parse_time(s: &str) -> Option<std::time::SystemTime> {
    DateTime::from_str(s, DateTimeFormat::DateTime)
        .ok()?
        .try_into()
        .ok()
}

impl Ec2 {
    /// A client for `region`, with credentials from the standard chain (environment, web
    /// identity for IRSA, EKS Pod Identity, the instance profile through IMDS), talking to
    /// `endpoint` when given.
    pub async fn new(region: &str, endpoint: Option<&str>, metrics: Arc<Metrics>) -> Self {
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .load()
            .await;
        let mut conf = aws_sdk_ec2::config::Builder::from(&shared)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .connect_timeout(Duration::from_secs(3))
                    .build(),
            );
        if let Some(ep) = endpoint {
            conf = conf.endpoint_url(ep);
        }
        Self {
            client: Client::from_conf(conf.build()),
            metrics,
        }
    }

    /// Records one call's outcome and latency.
    fn observe<T>(
        &self,
        op: &'static str,
        started: Instant,
        r: Result<T, Ec2Error>,
    ) -> Result<T, Ec2Error> {
        let (code, status) = match &r {
            Ok(_) => ("", 200),
            Err(e @ Ec2Error::Api { status, .. }) => (e.code(), *status),
            Err(e) => (e.code(), 200),
        };
        self.metrics.ec2_call(op, code, status, started.elapsed());
        r
    }

    pub async fn instance_type_limits(&self, instance_type: &str) -> Result<TypeLimits, Ec2Error> {
        const OP: &str = "DescribeInstanceTypes";
        let t0 = Instant::now();
        let r = async {
            let out = self
                .client
                .describe_instance_types()
                .instance_types(instance_type.into())
                .send()
                .await
                .map_err(|e| api_error(OP, &e))?;
            let net = out
                .instance_types()
                .first()
                .and_then(|t| t.network_info())
                .ok_or_else(|| Ec2Error::Malformed {
                    op: OP,
                    what: format!("network info for {instance_type}"),
                })?;
            let n = |v: Option<i32>, what: &str| {
                v.and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| Ec2Error::Malformed {
                        op: OP,
                        what: what.to_owned(),
                    })
            };
            Ok(TypeLimits {
                max_enis: n(net.maximum_network_interfaces(), "MaximumNetworkInterfaces")?,
                ipv4_per_eni: n(
                    net.ipv4_addresses_per_interface(),
                    "Ipv4AddressesPerInterface",
                )?,
            })
        }
        .await;
        self.observe(OP, t0, r)
    }

    async fn describe(&self, filters: Vec<Filter>) -> Result<Vec<EniInfo>, Ec2Error> {
        const OP: &str = "DescribeNetworkInterfaces";
        let t0 = Instant::now();
        let r = async {
            let mut out = Vec::new();
            let mut token = None;
            loop {
                let page = self
                    .client
                    .describe_network_interfaces()
                    .set_filters(Some(filters.clone()))
                    .set_next_token(token.take())
                    .send()
                    .await
                    .map_err(|e| api_error(OP, &e))?;
                for ni in page.network_interfaces() {
                    out.push(parse_eni(ni)?);
                }
                match page.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                    _ => return Ok(out),
                }
            }
        }
        .await;
        self.observe(OP, t0, r)
    }

    /// Every ENI attached to the instance, by device index.
    pub async fn attached_enis(&self, instance_id: &str) -> Result<Vec<EniInfo>, Ec2Error> {
        let mut v = self
            .describe(vec![filter("attachment.instance-id", instance_id)])
            .await?;
        v.sort_by_key(|e| e.attachment.as_ref().map_or(u32::MAX, |a| a.device_index));
        Ok(v)
    }

    pub async fn eni(&self, eni_id: &str) -> Result<Option<EniInfo>, Ec2Error> {
        Ok(self
            .describe(vec![filter("network-interface-id", eni_id)])
            .await?
            .into_iter()
            .next())
    }

    /// Unattached ENIs this agent created for the instance (leaked-cleanup candidates).
    pub async fn detached_enis_of(&self, instance_id: &str) -> Result<Vec<EniInfo>, Ec2Error> {
        self.detached_ours(TAG_INSTANCE_ID, instance_id).await
    }

    /// Unattached ENIs vpc-ebpf created for any node of the cluster: those of terminated
    /// nodes among them.
    pub async fn detached_enis_of_cluster(&self, cluster: &str) -> Result<Vec<EniInfo>, Ec2Error> {
        self.detached_ours(TAG_CLUSTER_NAME, cluster).await
    }

    /// Unattached ENIs tagged `tag=value` that vpc-ebpf created (only those are ever
    /// deleted).
    async fn detached_ours(&self, tag: &str, value: &str) -> Result<Vec<EniInfo>, Ec2Error> {
        Ok(self
            .describe(vec![
                filter(&format!("tag:{tag}"), value),
                filter("status", "available"),
            ])
            .await?
            .into_iter()
            .filter(|e| e.tags.contains_key(TAG_MANAGED_BY))
            .collect())
    }

    pub async fn create_eni(&self, spec: &NewEni) -> Result<EniInfo, Ec2Error> {
        const OP: &str = "CreateNetworkInterface";
        let t0 = Instant::now();
        let r = async {
            let tags = TagSpecification::builder()
                .resource_type(ResourceType::NetworkInterface)
                .set_tags(Some(
                    spec.tags
                        .iter()
                        .map(|(k, v)| Tag::builder().key(k).value(v).build())
                        .collect(),
                ))
                .build();
            let mut req = self
                .client
                .create_network_interface()
                .subnet_id(&spec.subnet_id)
                .description(&spec.description)
                .set_groups(Some(spec.security_groups.clone()))
                .tag_specifications(tags);
            if spec.prefixes > 0 {
                req = req.ipv4_prefix_count(i32::try_from(spec.prefixes).unwrap_or(i32::MAX));
            }
            if spec.secondary_ips > 0 {
                req = req.secondary_private_ip_address_count(
                    i32::try_from(spec.secondary_ips).unwrap_or(i32::MAX),
                );
            }
            let out = req.send().await.map_err(|e| api_error(OP, &e))?;
            let ni = out.network_interface().ok_or_else(|| Ec2Error::Malformed {
                op: OP,
                what: "the new ENI".into(),
            })?;
            parse_eni(ni)
        }
        .await;
        self.observe(OP, t0, r)
    }

    /// Attaches and marks the attachment delete-on-termination, so an instance that
    /// dies takes its ENIs with it.
    pub async fn attach_eni(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> Result<String, Ec2Error> {
        const OP: &str = "AttachNetworkInterface";
        let t0 = Instant::now();
        let r = async {
            let out = self
                .client
                .attach_network_interface()
                .network_interface_id(eni_id)
                .instance_id(instance_id)
                .device_index(i32::try_from(device_index).unwrap_or(i32::MAX))
                .send()
                .await
                .map_err(|e| api_error(OP, &e))?;
            out.attachment_id()
                .map(str::to_owned)
                .ok_or_else(|| Ec2Error::Malformed {
                    op: OP,
                    what: "an attachment id".into(),
                })
        }
        .await;
        self.observe(OP, t0, r)
    }

    /// Makes EC2 delete the ENI with the instance. Separate from [`Self::attach_eni`]:
    /// when this fails the ENI is attached all the same, and the caller must keep it.
    pub async fn set_delete_on_termination(
        &self,
        eni_id: &str,
        attachment_id: &str,
    ) -> Result<(), Ec2Error> {
        const OP: &str = "ModifyNetworkInterfaceAttribute";
        let t0 = Instant::now();
        let r = self
            .client
            .modify_network_interface_attribute()
            .network_interface_id(eni_id)
            .attachment(
                NetworkInterfaceAttachmentChanges::builder()
                    .attachment_id(attachment_id)
                    .delete_on_termination(true)
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|e| api_error(OP, &e));
        self.observe(OP, t0, r)
    }

    pub async fn detach_eni(&self, attachment_id: &str) -> Result<(), Ec2Error> {
        const OP: &str = "DetachNetworkInterface";
        let t0 = Instant::now();
        let r = self
            .client
            .detach_network_interface()
            .attachment_id(attachment_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| api_error(OP, &e));
        self.observe(OP, t0, r)
    }

    pub async fn delete_eni(&self, eni_id: &str) -> Result<(), Ec2Error> {
        const OP: &str = "DeleteNetworkInterface";
        let t0 = Instant::now();
        let r = self
            .client
            .delete_network_interface()
            .network_interface_id(eni_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| api_error(OP, &e));
        self.observe(OP, t0, r)
    }

    /// Adds `count` secondary addresses, or /28 prefixes when `prefixes`; returns what EC2
    /// gave (prefixes as base addresses).
    pub async fn assign(
        &self,
        eni_id: &str,
        count: u32,
        prefixes: bool,
    ) -> Result<Vec<Ipv4Addr>, Ec2Error> {
        const OP: &str = "AssignPrivateIpAddresses";
        let t0 = Instant::now();
        let n = i32::try_from(count).unwrap_or(i32::MAX);
        let r = async {
            let req = self
                .client
                .assign_private_ip_addresses()
                .network_interface_id(eni_id);
            let req = if prefixes {
                req.ipv4_prefix_count(n)
            } else {
                req.secondary_private_ip_address_count(n)
            };
            let out = req.send().await.map_err(|e| api_error(OP, &e))?;
            Ok(if prefixes {
                out.assigned_ipv4_prefixes()
                    .iter()
                    .filter_map(|p| p.ipv4_prefix()?.split('/').next()?.parse().ok())
                    .collect()
            } else {
                out.assigned_private_ip_addresses()
                    .iter()
                    .filter_map(|a| a.private_ip_address()?.parse().ok())
                    .collect()
            })
        }
        .await;
        self.observe(OP, t0, r)
    }

    pub async fn unassign(
        &self,
        eni_id: &str,
        addrs: &[Ipv4Addr],
        prefixes: bool,
    ) -> Result<(), Ec2Error> {
        const OP: &str = "UnassignPrivateIpAddresses";
        let t0 = Instant::now();
        let req = self
            .client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id);
        let req = if prefixes {
            req.set_ipv4_prefixes(Some(addrs.iter().map(|a| format!("{a}/28")).collect()))
        } else {
            req.set_private_ip_addresses(Some(addrs.iter().map(ToString::to_string).collect()))
        };
        let r = req.send().await.map(|_| ()).map_err(|e| api_error(OP, &e));
        self.observe(OP, t0, r)
    }

    /// Subnets by id, or with EC2 filters; one page of up to 1000 is plenty for one VPC
    /// zone.
    async fn subnets(
        &self,
        ids: &[String],
        filters: Vec<Filter>,
    ) -> Result<Vec<SubnetInfo>, Ec2Error> {
        const OP: &str = "DescribeSubnets";
        let t0 = Instant::now();
        let r = async {
            let out = self
                .client
                .describe_subnets()
                .set_subnet_ids((!ids.is_empty()).then(|| ids.to_vec()))
                .set_filters((!filters.is_empty()).then_some(filters))
                .send()
                .await
                .map_err(|e| api_error(OP, &e))?;
            Ok(out.subnets().iter().filter_map(parse_subnet).collect())
        }
        .await;
        self.observe(OP, t0, r)
    }

    /// The subnets of a VPC in one zone: subnet discovery's candidates.
    pub async fn subnets_in(&self, vpc_id: &str, zone: &str) -> Result<Vec<SubnetInfo>, Ec2Error> {
        self.subnets(
            &[],
            vec![filter("vpc-id", vpc_id), filter("availability-zone", zone)],
        )
        .await
    }

    pub async fn subnets_by_id(&self, ids: &[String]) -> Result<Vec<SubnetInfo>, Ec2Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.subnets(ids, Vec::new()).await
    }

    /// Subnet CIDR and the VPC's CIDR blocks.
    pub async fn subnet_and_vpc_cidrs(
        &self,
        subnet_id: &str,
    ) -> Result<(String, Vec<String>), Ec2Error> {
        const OP: &str = "DescribeSubnets";
        const OP2: &str = "DescribeVpcs";
        let t0 = Instant::now();
        let r = async {
            let out = self
                .client
                .describe_subnets()
                .subnet_ids(subnet_id)
                .send()
                .await
                .map_err(|e| api_error(OP, &e))?;
            let s = out.subnets().first().ok_or_else(|| Ec2Error::Malformed {
                op: OP,
                what: format!("subnet {subnet_id}"),
            })?;
            Ok((
                s.cidr_block().unwrap_or_default().to_owned(),
                s.vpc_id().unwrap_or_default().to_owned(),
            ))
        }
        .await;
        let (cidr, vpc) = self.observe(OP, t0, r)?;
        let t0 = Instant::now();
        let r = async {
            let out = self
                .client
                .describe_vpcs()
                .vpc_ids(&vpc)
                .send()
                .await
                .map_err(|e| api_error(OP2, &e))?;
            Ok(out
                .vpcs()
                .iter()
                .flat_map(aws_sdk_ec2::types::Vpc::cidr_block_association_set)
                .filter(|a| {
                    a.cidr_block_state()
                        .and_then(|s| s.state())
                        .is_none_or(|s| s.as_str() == "associated")
                })
                .filter_map(|a| a.cidr_block().map(str::to_owned))
                .collect())
        }
        .await;
        Ok((cidr, self.observe(OP2, t0, r)?))
    }
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let cases = [
            ("RequestLimitExceeded", None, ErrorKind::Throttled),
            (
                "InsufficientFreeAddressesInSubnet",
                Some(400),
                ErrorKind::SubnetFull,
            ),
            ("AttachmentLimitExceeded", Some(400), ErrorKind::Limit),
            ("PrivateIpAddressLimitExceeded", Some(400), ErrorKind::Limit),
            (
                "InvalidNetworkInterfaceID.NotFound",
                Some(400),
                ErrorKind::NotFound,
            ),
            (
                "InvalidAttachmentID.NotFound",
                Some(400),
                ErrorKind::NotFound,
            ),
            ("InternalError", Some(500), ErrorKind::Transient),
            ("Whatever", Some(503), ErrorKind::Transient),
            ("UnauthorizedOperation", Some(403), ErrorKind::Refused),
        ];
        for (code, status, want) in cases {
            assert_eq!(classify(code, status), want, "{code}");
        }
    }

    #[test]
    fn tag_times_round_trip() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        let s = format_time(t);
        assert!(s.ends_with('Z'), "{s}");
        assert_eq!(parse_time(&s), Some(t));
        assert_eq!(parse_time("yesterday"), None);
    }
}
