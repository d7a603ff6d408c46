//! The agent's configuration from its environment, with Amazon VPC CNI's variable names
//! and defaults where they exist.
//!
//! VPC CNI's own variables are read as aws-node reads them, so a cluster's existing
//! settings keep working: a value aws-node would replace by its default (not a number,
//! negative, out of range) is replaced the same way and reported as a fallback naming the
//! variable, the value given and the value used. vpc-ebpf's own `VPC_EBPF_*` variables
//! are strict: every problem names the variable, what it got and what it accepts, all at
//! once, and the agent does not start.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::Ipv4Net;

use crate::ipam::{
    placement::DEFAULT_ENICONFIG_KEY,
    pool::{Mode, Targets},
};

#[derive(Clone, Debug, PartialEq)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "one field per variable, as the environment has them"
)]
pub struct Config {
    pub mode: Mode,
    pub targets: Targets,
    pub ip_cooldown: Duration,
    pub cluster_name: Option<String>,
    pub additional_eni_tags: BTreeMap<String, String>,
    pub disable_leaked_eni_cleanup: bool,
    /// AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG: new ENIs go where the node's ENIConfig says;
    /// the primary ENI holds no pod addresses.
    pub custom_network: bool,
    /// ENI_CONFIG_LABEL_DEF / ENI_CONFIG_ANNOTATION_DEF: the node label and annotation
    /// naming its ENIConfig.
    pub eniconfig_label: String,
    pub eniconfig_annotation: String,
    /// ENABLE_SUBNET_DISCOVERY: new ENIs go to the zone's subnets tagged
    /// `kubernetes.io/role/cni`, most free addresses first.
    pub subnet_discovery: bool,
    /// VPC_EBPF_LEAKED_ENI_AGE: how old a detached ENI of ours must be before cleanup
    /// deletes it (younger ones may be in the middle of our own attach).
    pub leaked_eni_age: Duration,
    /// VPC_EBPF_SUBNET_FULL_PAUSE: how long growth pauses after
    /// InsufficientFreeAddressesInSubnet before EC2 is asked again.
    pub subnet_full_pause: Duration,
    /// AWS_EC2_METADATA_SERVICE_ENDPOINT, as the AWS SDKs name it.
    pub imds_endpoint: String,
    pub external_snat: bool,
    /// ENABLE_NETWORK_POLICY: enforce Kubernetes NetworkPolicy (aws-vpc-cni's chart
    /// value `enableNetworkPolicy`).
    pub network_policy: bool,
    /// NETWORK_POLICY_ENFORCING_MODE: what a pod whose policies are not known yet gets.
    pub policy_mode: crate::policy::engine::EnforcingMode,
    /// ENABLE_POLICY_EVENT_LOGS: log policy verdicts (denials at info, admissions at
    /// debug), as aws-node's network policy agent's `enable-policy-event-logs`. The
    /// counters and `vpc-ebpf-agent flows` have them either way.
    pub policy_event_logs: bool,
    /// ENABLE_BANDWIDTH_PLUGIN: chain the `bandwidth` plugin after vpc-ebpf in the
    /// conflist (as aws-node does), so that pods' `kubernetes.io/ingress-bandwidth` and
    /// `egress-bandwidth` limits apply.
    pub bandwidth_plugin: bool,
    pub exclude_snat_cidrs: Vec<Ipv4Net>,
    /// VPC_EBPF_SNAT_PORT_RANGE: source ports SNAT may use on the node address; the
    /// node's own ephemeral range (`net.ipv4.ip_local_port_range`) is skipped inside it.
    pub snat_ports: (u16, u16),
    pub veth_prefix: String,
    pub mtu: u32,
    /// AWS_EC2_ENDPOINT: an EC2 endpoint other than the region's (VPC endpoints, the lab).
    pub ec2_endpoint: Option<String>,
    pub agent_socket: PathBuf,
    pub checkpoint: PathBuf,
    /// VPC_EBPF_DATAPLANE=false runs IPAM only (pods then get a static gateway ARP entry).
    pub dataplane: bool,
    /// VPC_EBPF_PIN_ROOT: bpffs directory of the pinned maps and links.
    pub pin_root: PathBuf,
    /// VPC_EBPF_SERVICE_CIDRS: ClusterIP ranges handed to the kernel (kube-proxy);
    /// default as EKS picks it from the VPC CIDR.
    pub service_cidrs: Option<Vec<Ipv4Net>>,
    /// VPC_EBPF_NAT_MAX_ENTRIES: size of the NAT table; default from memory.
    pub nat_max_entries: Option<u32>,
    pub metrics_addr: SocketAddr,
    pub introspection_addr: SocketAddr,
    /// DISABLE_METRICS / DISABLE_INTROSPECTION, as aws-node: the endpoint is not served.
    pub disable_metrics: bool,
    pub disable_introspection: bool,
    pub log_level: String,
    /// MY_NODE_NAME: the node's name in Kubernetes (from `spec.nodeName`).
    pub node_name: Option<String>,
    /// POD_NAMESPACE: the agent's own namespace (from `metadata.namespace`), where its
    /// Leases live. Default kube-system, aws-node's.
    pub namespace: String,
    /// ANNOTATE_POD_IP: write each pod's address to its `vpc.amazonaws.com/pod-ips`
    /// annotation, as aws-node does.
    pub annotate_pod_ip: bool,
    /// VPC_EBPF_CNI_CONF_DIR: where the agent writes the CNI network config once it is
    /// ready (the host's /etc/cni/net.d, as mounted in the agent's container), so the
    /// kubelet reports the node's network ready only when pods can be served. Unset: the
    /// agent writes none.
    pub cni_conf_dir: Option<PathBuf>,
    /// POD_MTU: the MTU of the pods' interfaces, as aws-node names it (default: the ENI
    /// MTU).
    pub pod_mtu: u32,
    /// Values of VPC CNI's variables that aws-node would not use as given either, and
    /// what is used instead: the variable, the value given, the value used. Logged as
    /// warnings and published as Events on the Node.
    pub fallbacks: Vec<String>,
}

/// VPC_EBPF_AGENT_SOCKET's default.
pub const DEFAULT_SOCKET: &str = "/run/vpc-ebpf/agent.sock";

/// VPC_EBPF_SNAT_PORT_RANGE's default: every unprivileged port, as iptables' SNAT
/// `--random-fully` in VPC CNI uses; the node's ephemeral range is skipped at run time.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1024, 65_535);
/// Fewest SNAT ports a node may be left with: fewer, and one busy pod runs out.
pub const MIN_SNAT_PORTS: u32 = 1024;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

struct Reader<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<String>,
    fallbacks: Vec<String>,
}

impl Reader<'_> {
    fn raw(&self, key: &str) -> Option<String> {
        (self.get)(key)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn count(&mut self, key: &str) -> Option<u32> {
        let v = self.raw(key)?;
        let parsed = v.parse::<u32>().ok();
        if parsed.is_none() {
            self.problems
                .push(format!("{key}={v:?}: expected a whole number >= 0"));
        }
        parsed
    }

    fn fallback(&mut self, key: &str, given: &str, why: &str, used: &str) {
        self.fallbacks.push(format!(
            "{key}={given:?} {why}; using {used}, as aws-node does"
        ));
    }

    /// A whole number of VPC CNI's. aws-node reads these with Go's `strconv.Atoi` and
    /// uses its default for anything else or anything negative; so does this, with the
    /// default `fallback` (`None`: as if unset).
    fn cni_count(&mut self, key: &str, fallback: Option<u32>) -> Option<u32> {
        let v = self.raw(key)?;
        match v.parse::<i64>() {
            Ok(n) if n >= 0 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
            parsed => {
                let why = if parsed.is_ok() {
                    "is negative"
                } else {
                    "is not a whole number"
                };
                let used = fallback.map_or_else(|| "none (unset)".to_owned(), |f| f.to_string());
                self.fallback(key, &v, why, &used);
                fallback
            }
        }
    }

    /// NETWORK_POLICY_ENFORCING_MODE: `standard` or `strict`, as aws-node.
    fn policy_mode(&mut self) -> crate::policy::engine::EnforcingMode {
        use crate::policy::engine::EnforcingMode;
        let key = "NETWORK_POLICY_ENFORCING_MODE";
        let Some(v) = self.raw(key) else {
            return EnforcingMode::default();
        };
        EnforcingMode::parse(&v).unwrap_or_else(|| {
            self.fallback(key, &v, "is not standard or strict", "standard");
            EnforcingMode::default()
        })
    }

    /// A boolean of VPC CNI's: Go's `strconv.ParseBool`, the default otherwise.
    fn cni_flag(&mut self, key: &str, default: bool) -> bool {
        let Some(v) = self.raw(key) else {
            return default;
        };
        parse_bool(&v).unwrap_or_else(|| {
            self.fallback(key, &v, "is not true or false", &default.to_string());
            default
        })
    }

    /// An MTU of VPC CNI's: 576 to 9001, as aws-node checks.
    fn cni_mtu(&mut self, key: &str, default: u32) -> u32 {
        let Some(v) = self.raw(key) else {
            return default;
        };
        match v.parse::<u32>() {
            Ok(m) if (576..=9001).contains(&m) => m,
            _ => {
                self.fallback(
                    key,
                    &v,
                    "is not an MTU from 576 to 9001",
                    &default.to_string(),
                );
                default
            }
        }
    }

    /// A listen address of VPC CNI's.
    fn cni_addr(&mut self, key: &str, default: SocketAddr) -> SocketAddr {
        let Some(v) = self.raw(key) else {
            return default;
        };
        v.parse().unwrap_or_else(|_| {
            self.fallback(key, &v, "is not an address:port", &default.to_string());
            default
        })
    }

    fn flag(&mut self, key: &str, default: bool) -> bool {
        let Some(v) = self.raw(key) else {
            return default;
        };
        parse_bool(&v).unwrap_or_else(|| {
            self.problems
                .push(format!("{key}={v:?}: expected true or false"));
            default
        })
    }

    /// aws-node ignores ADDITIONAL_ENI_TAGS when it is not a JSON object of strings, and
    /// drops tags under the prefixes it reserves.
    fn eni_tags(&mut self) -> BTreeMap<String, String> {
        let Some(v) = self.raw("ADDITIONAL_ENI_TAGS") else {
            return BTreeMap::new();
        };
        let mut tags = match serde_json::from_str::<BTreeMap<String, String>>(&v) {
            Ok(t) => t,
            Err(e) => {
                self.fallback(
                    "ADDITIONAL_ENI_TAGS",
                    &v,
                    &format!(
                        "is not a JSON object of string tags such as {{\"team\":\"net\"}} ({e})"
                    ),
                    "no additional tags",
                );
                return BTreeMap::new();
            }
        };
        let reserved: Vec<String> = tags
            .keys()
            .filter(|k| k.starts_with("k8s.amazonaws.com") || k.starts_with("aws:"))
            .cloned()
            .collect();
        if !reserved.is_empty() {
            for k in &reserved {
                tags.remove(k);
            }
            let used = serde_json::to_string(&tags).unwrap_or_default();
            self.fallback(
                "ADDITIONAL_ENI_TAGS",
                &v,
                &format!("uses reserved tag prefixes (k8s.amazonaws.com, aws:) in {reserved:?}"),
                &used,
            );
        }
        tags
    }

    fn cidrs(&mut self, key: &str) -> Option<Vec<Ipv4Net>> {
        let v = self.raw(key)?;
        let (out, bad) = split_cidrs(&v);
        for part in bad {
            self.problems.push(format!(
                "{key}: {part:?} is not an IPv4 CIDR such as 10.10.0.0/16"
            ));
        }
        Some(out)
    }

    fn port_range(&mut self, key: &str, default: (u16, u16)) -> (u16, u16) {
        let Some(v) = self.raw(key) else {
            return default;
        };
        let parsed = v
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| *a >= 1024 && a <= b && u32::from(b - a) + 1 >= MIN_SNAT_PORTS);
        parsed.unwrap_or_else(|| {
            self.problems.push(format!(
                "{key}={v:?}: MIN-MAX with 1024 <= MIN, MAX <= 65535 and at least 1024 ports, \
                 such as 1024-65535"
            ));
            default
        })
    }

    /// aws-node skips the entries of AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS it cannot parse.
    fn snat_exclusions(&mut self) -> Vec<Ipv4Net> {
        const KEY: &str = "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS";
        let Some(v) = self.raw(KEY) else {
            return Vec::new();
        };
        let (out, bad) = split_cidrs(&v);
        if !bad.is_empty() {
            let used = out
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            self.fallback(
                KEY,
                &v,
                &format!("has entries that are not IPv4 CIDRs such as 10.10.0.0/16: {bad:?}"),
                &format!("{used:?}"),
            );
        }
        out
    }
}

/// A comma-separated list of IPv4 CIDRs: the ones that parse (as network addresses), and
/// the entries that do not.
fn split_cidrs(v: &str) -> (Vec<Ipv4Net>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<Ipv4Net>() {
            Ok(c) if c.trunc() == c => out.push(c),
            _ => bad.push(part.to_owned()),
        }
    }
    (out, bad)
}

/// Go's `strconv.ParseBool`, which VPC CNI uses, so existing manifests keep working.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// VPC CNI features vpc-ebpf does not have: on, they are reported (the node still gets
/// pod networking from its own subnet), never silently ignored.
/// The `env:` of aws-node's stock manifest (aws-k8s-cni.yaml, also its chart's values):
/// a cluster moving from aws-node has these, and the agent takes every one as given.
pub const AWS_NODE_STOCK_ENV: &[(&str, &str)] = &[
    ("ADDITIONAL_ENI_TAGS", "{}"),
    ("AWS_VPC_CNI_NODE_PORT_SUPPORT", "true"),
    ("AWS_VPC_ENI_MTU", "9001"),
    ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "false"),
    ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "false"),
    (
        "AWS_VPC_K8S_CNI_LOG_FILE",
        "/host/var/log/aws-routed-eni/ipamd.log",
    ),
    ("AWS_VPC_K8S_CNI_LOGLEVEL", "DEBUG"),
    ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "prng"),
    ("AWS_VPC_K8S_CNI_VETHPREFIX", "eni"),
    (
        "AWS_VPC_K8S_PLUGIN_LOG_FILE",
        "/var/log/aws-routed-eni/plugin.log",
    ),
    ("AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "DEBUG"),
    ("DISABLE_INTROSPECTION", "false"),
    ("DISABLE_METRICS", "false"),
    ("ENABLE_POD_ENI", "false"),
    ("ENABLE_PREFIX_DELEGATION", "false"),
    ("WARM_ENI_TARGET", "1"),
    ("WARM_PREFIX_TARGET", "1"),
    ("DISABLE_NETWORK_RESOURCE_PROVISIONING", "false"),
    ("ENABLE_IPv4", "true"),
    ("ENABLE_IPv6", "false"),
];

const UNSUPPORTED_FEATURES: [(&str, &str); 1] = [(
    "ENABLE_POD_ENI",
    "security groups for pods (branch ENIs) are not supported: pods use the node's security groups",
)];

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    #[allow(clippy::too_many_lines)] // one flat list of variables reads best
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut r = Reader {
            get,
            problems: Vec::new(),
            fallbacks: Vec::new(),
        };
        if r.raw("ENABLE_IPv6").as_deref().and_then(parse_bool) == Some(true) {
            r.problems.push(
                "ENABLE_IPv6=true: vpc-ebpf serves IPv4 clusters only; set ENABLE_IPv6=false"
                    .into(),
            );
        }
        for (key, what) in UNSUPPORTED_FEATURES {
            if let Some(v) = r.raw(key)
                && parse_bool(&v) == Some(true)
            {
                r.fallbacks.push(format!("{key}={v:?}: {what}"));
            }
        }
        let prefix = r.cni_flag("ENABLE_PREFIX_DELEGATION", false);
        // aws-node: MAX_ENI below 1 or not a number means no limit.
        let max_eni = match r.raw("MAX_ENI") {
            None => None,
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n >= 1 => Some(u32::try_from(n).unwrap_or(u32::MAX)),
                Ok(-1) => None,
                _ => {
                    r.fallback("MAX_ENI", &v, "is not a number of ENIs >= 1", "no limit");
                    None
                }
            },
        };
        // In aws-node, 0 is how WARM_IP_TARGET and MINIMUM_IP_TARGET say "unset": the
        // pool then follows WARM_ENI_TARGET (or WARM_PREFIX_TARGET).
        let warm_ip = r.cni_count("WARM_IP_TARGET", None).filter(|&n| n > 0);
        let minimum_ip = r.cni_count("MINIMUM_IP_TARGET", None).filter(|&n| n > 0);
        // aws-node's stock manifest sets WARM_PREFIX_TARGET=1 with prefix delegation off;
        // it only matters in prefix mode.
        let warm_prefix = if prefix {
            r.cni_count("WARM_PREFIX_TARGET", Some(1))
        } else {
            None
        };
        let targets = Targets {
            warm_eni: r.cni_count("WARM_ENI_TARGET", Some(1)).unwrap_or(1),
            warm_ip,
            minimum_ip,
            warm_prefix,
            max_eni,
            max_pods: r.count("MAX_PODS"),
        };
        let ip_cooldown = Duration::from_secs(u64::from(
            r.cni_count("IP_COOLDOWN_PERIOD", Some(30)).unwrap_or(30),
        ));
        let additional_eni_tags = r.eni_tags();
        let exclude_snat_cidrs = r.snat_exclusions();
        let veth_prefix = r
            .raw("AWS_VPC_K8S_CNI_VETHPREFIX")
            .unwrap_or_else(|| "eni".into());
        if veth_prefix.len() > 4
            || !veth_prefix.chars().all(|c| c.is_ascii_alphanumeric())
            || ["eth", "lo", "vlan"].contains(&veth_prefix.as_str())
        {
            r.problems.push(format!(
                "AWS_VPC_K8S_CNI_VETHPREFIX={veth_prefix:?}: 1 to 4 letters or digits, not eth, \
                 lo or vlan"
            ));
        }
        let mtu = r.cni_mtu("AWS_VPC_ENI_MTU", 9001);
        let pod_mtu = r.cni_mtu("POD_MTU", mtu);
        let mut log_level = r
            .raw("AWS_VPC_K8S_CNI_LOGLEVEL")
            .unwrap_or_else(|| "INFO".into())
            .to_lowercase();
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            let given = std::mem::replace(&mut log_level, "info".into());
            r.fallback(
                "AWS_VPC_K8S_CNI_LOGLEVEL",
                &given,
                "is not one of ERROR, WARN, INFO, DEBUG, TRACE",
                "INFO",
            );
        }
        let config = Self {
            mode: if prefix {
                Mode::Prefix
            } else {
                Mode::SecondaryIp
            },
            targets,
            ip_cooldown,
            cluster_name: r.raw("CLUSTER_NAME"),
            additional_eni_tags,
            disable_leaked_eni_cleanup: r.cni_flag("DISABLE_LEAKED_ENI_CLEANUP", false),
            custom_network: r.cni_flag("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", false),
            eniconfig_label: r
                .raw("ENI_CONFIG_LABEL_DEF")
                .unwrap_or_else(|| DEFAULT_ENICONFIG_KEY.into()),
            eniconfig_annotation: r
                .raw("ENI_CONFIG_ANNOTATION_DEF")
                .unwrap_or_else(|| DEFAULT_ENICONFIG_KEY.into()),
            subnet_discovery: r.cni_flag("ENABLE_SUBNET_DISCOVERY", true),
            leaked_eni_age: Duration::from_secs(u64::from(
                r.count("VPC_EBPF_LEAKED_ENI_AGE").unwrap_or(300),
            )),
            subnet_full_pause: Duration::from_secs(u64::from(
                r.count("VPC_EBPF_SUBNET_FULL_PAUSE").unwrap_or(60),
            )),
            imds_endpoint: r
                .raw("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                .unwrap_or_else(|| crate::aws::imds::DEFAULT_ENDPOINT.into()),
            external_snat: r.cni_flag("AWS_VPC_K8S_CNI_EXTERNALSNAT", false),
            network_policy: r.cni_flag("ENABLE_NETWORK_POLICY", false),
            policy_mode: r.policy_mode(),
            policy_event_logs: r.cni_flag("ENABLE_POLICY_EVENT_LOGS", false),
            bandwidth_plugin: r.cni_flag("ENABLE_BANDWIDTH_PLUGIN", false),
            exclude_snat_cidrs,
            snat_ports: r.port_range("VPC_EBPF_SNAT_PORT_RANGE", DEFAULT_SNAT_PORTS),
            veth_prefix,
            mtu,
            ec2_endpoint: r.raw("AWS_EC2_ENDPOINT"),
            agent_socket: r
                .raw("VPC_EBPF_AGENT_SOCKET")
                .unwrap_or_else(|| DEFAULT_SOCKET.into())
                .into(),
            checkpoint: r
                .raw("VPC_EBPF_CHECKPOINT")
                .unwrap_or_else(|| crate::ipam::checkpoint::DEFAULT_PATH.into())
                .into(),
            dataplane: r.flag("VPC_EBPF_DATAPLANE", true),
            pin_root: r
                .raw("VPC_EBPF_PIN_ROOT")
                .unwrap_or_else(|| crate::dataplane::DEFAULT_PIN_ROOT.into())
                .into(),
            service_cidrs: r.cidrs("VPC_EBPF_SERVICE_CIDRS"),
            nat_max_entries: r.count("VPC_EBPF_NAT_MAX_ENTRIES"),
            metrics_addr: r.cni_addr(
                "METRICS_BIND_ADDRESS",
                SocketAddr::from(([127, 0, 0, 1], 61678)),
            ),
            introspection_addr: r.cni_addr(
                "INTROSPECTION_BIND_ADDRESS",
                SocketAddr::from(([127, 0, 0, 1], 61679)),
            ),
            disable_metrics: r.cni_flag("DISABLE_METRICS", false),
            disable_introspection: r.cni_flag("DISABLE_INTROSPECTION", false),
            log_level,
            node_name: r.raw(crate::k8s::NODE_NAME_VAR),
            namespace: r
                .raw("POD_NAMESPACE")
                .unwrap_or_else(|| "kube-system".to_owned()),
            annotate_pod_ip: r.cni_flag("ANNOTATE_POD_IP", false),
            cni_conf_dir: r.raw("VPC_EBPF_CNI_CONF_DIR").map(PathBuf::from),
            pod_mtu,
            // Last: every variable above has been read.
            fallbacks: std::mem::take(&mut r.fallbacks),
        };
        if r.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(r.problems))
        }
    }
}

impl Config {
    /// The effective configuration under the variable names that set it, for
    /// introspection and the start-up log.
    pub fn to_json(&self) -> serde_json::Value {
        let opt = |v: Option<u32>| v.map_or(serde_json::Value::Null, serde_json::Value::from);
        serde_json::json!({
            "ENABLE_PREFIX_DELEGATION": self.mode == Mode::Prefix,
            "WARM_ENI_TARGET": self.targets.warm_eni,
            "WARM_IP_TARGET": opt(self.targets.warm_ip),
            "MINIMUM_IP_TARGET": opt(self.targets.minimum_ip),
            "WARM_PREFIX_TARGET": opt(self.targets.warm_prefix),
            "MAX_ENI": opt(self.targets.max_eni),
            "MAX_PODS": opt(self.targets.max_pods),
            "IP_COOLDOWN_PERIOD": self.ip_cooldown.as_secs(),
            "CLUSTER_NAME": self.cluster_name,
            "ADDITIONAL_ENI_TAGS": self.additional_eni_tags,
            "DISABLE_LEAKED_ENI_CLEANUP": self.disable_leaked_eni_cleanup,
            "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": self.custom_network,
            "ENI_CONFIG_LABEL_DEF": self.eniconfig_label,
            "ENI_CONFIG_ANNOTATION_DEF": self.eniconfig_annotation,
            "ENABLE_SUBNET_DISCOVERY": self.subnet_discovery,
            "VPC_EBPF_LEAKED_ENI_AGE": self.leaked_eni_age.as_secs(),
            "VPC_EBPF_SUBNET_FULL_PAUSE": self.subnet_full_pause.as_secs(),
            "AWS_VPC_K8S_CNI_EXTERNALSNAT": self.external_snat,
            "ENABLE_NETWORK_POLICY": self.network_policy,
            "NETWORK_POLICY_ENFORCING_MODE": self.policy_mode.as_str(),
            "ENABLE_POLICY_EVENT_LOGS": self.policy_event_logs,
            "ENABLE_BANDWIDTH_PLUGIN": self.bandwidth_plugin,
            "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": self.exclude_snat_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "VPC_EBPF_SNAT_PORT_RANGE": format!("{}-{}", self.snat_ports.0, self.snat_ports.1),
            "AWS_VPC_K8S_CNI_VETHPREFIX": self.veth_prefix,
            "AWS_VPC_ENI_MTU": self.mtu,
            "AWS_EC2_ENDPOINT": self.ec2_endpoint,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds_endpoint,
            "VPC_EBPF_AGENT_SOCKET": self.agent_socket,
            "VPC_EBPF_CHECKPOINT": self.checkpoint,
            "VPC_EBPF_DATAPLANE": self.dataplane,
            "VPC_EBPF_PIN_ROOT": self.pin_root,
            "VPC_EBPF_SERVICE_CIDRS": self.service_cidrs.as_ref().map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>()),
            "VPC_EBPF_NAT_MAX_ENTRIES": self.nat_max_entries,
            "METRICS_BIND_ADDRESS": self.metrics_addr.to_string(),
            "INTROSPECTION_BIND_ADDRESS": self.introspection_addr.to_string(),
            "DISABLE_METRICS": self.disable_metrics,
            "DISABLE_INTROSPECTION": self.disable_introspection,
            "AWS_VPC_K8S_CNI_LOGLEVEL": self.log_level,
            "MY_NODE_NAME": self.node_name,
            "POD_NAMESPACE": self.namespace,
            "ANNOTATE_POD_IP": self.annotate_pod_ip,
            "VPC_EBPF_CNI_CONF_DIR": self.cni_conf_dir,
            "POD_MTU": self.pod_mtu,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(&|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_match_vpc_cni() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.mode, Mode::SecondaryIp);
        assert_eq!(c.targets, Targets::default());
        assert_eq!(c.ip_cooldown, Duration::from_secs(30));
        assert_eq!(c.veth_prefix, "eni");
        assert_eq!(c.mtu, 9001);
        assert_eq!(c.metrics_addr.port(), 61678);
        assert_eq!(c.introspection_addr.port(), 61679);
        assert!(!c.external_snat && !c.disable_leaked_eni_cleanup);
        assert_eq!(c.snat_ports, (1024, 65_535));
    }

    #[test]
    fn reads_every_variable() {
        let c = parse(&[
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("WARM_IP_TARGET", "3"),
            ("MINIMUM_IP_TARGET", "8"),
            ("WARM_PREFIX_TARGET", "2"),
            ("MAX_ENI", "2"),
            ("IP_COOLDOWN_PERIOD", "5"),
            ("CLUSTER_NAME", "prod"),
            ("ADDITIONAL_ENI_TAGS", r#"{"team":"net"}"#),
            ("DISABLE_LEAKED_ENI_CLEANUP", "1"),
            ("AWS_VPC_K8S_CNI_EXTERNALSNAT", "True"),
            (
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                "10.10.0.0/16, 192.168.0.0/24",
            ),
            ("AWS_EC2_ENDPOINT", "http://10.0.255.10"),
            ("VPC_EBPF_SNAT_PORT_RANGE", "20000-29999"),
        ])
        .unwrap();
        assert_eq!(c.snat_ports, (20_000, 29_999));
        assert_eq!(c.mode, Mode::Prefix);
        assert_eq!(
            (c.targets.warm_ip, c.targets.minimum_ip),
            (Some(3), Some(8))
        );
        assert_eq!(
            (c.targets.warm_prefix, c.targets.max_eni),
            (Some(2), Some(2))
        );
        assert_eq!(c.ip_cooldown, Duration::from_secs(5));
        assert_eq!(c.additional_eni_tags["team"], "net");
        assert_eq!(c.exclude_snat_cidrs.len(), 2);
        assert!(c.external_snat && c.disable_leaked_eni_cleanup);
        assert_eq!(parse(&[("MAX_ENI", "-1")]).unwrap().targets.max_eni, None);
    }

    #[test]
    fn problems_with_vpc_ebpf_variables_are_all_named_with_what_is_accepted() {
        let e = parse(&[
            ("VPC_EBPF_DATAPLANE", "yes"),
            ("VPC_EBPF_SERVICE_CIDRS", "10.0.0.1/8"),
            ("VPC_EBPF_SNAT_PORT_RANGE", "80-90"),
            ("VPC_EBPF_NAT_MAX_ENTRIES", "many"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "eth"),
            ("ENABLE_IPv6", "true"),
        ])
        .unwrap_err();
        let text = e.to_string();
        for var in [
            "VPC_EBPF_DATAPLANE",
            "VPC_EBPF_SERVICE_CIDRS",
            "VPC_EBPF_SNAT_PORT_RANGE",
            "VPC_EBPF_NAT_MAX_ENTRIES",
            "AWS_VPC_K8S_CNI_VETHPREFIX",
            "ENABLE_IPv6",
        ] {
            assert!(text.contains(var), "{var} not named in:\n{text}");
        }
        assert_eq!(e.0.len(), 6, "{text}");
    }

    /// VPC CNI's variables as aws-node reads them (ipamd's getters: `strconv.Atoi` and
    /// `strconv.ParseBool`, defaults on anything else, 0 as "unset" for the IP targets).
    /// Each row: the variables, what the agent uses, and whether a fallback is reported.
    #[test]
    #[allow(clippy::too_many_lines)] // one table
    fn vpc_cni_variables_are_read_as_aws_node_reads_them() {
        type Check = fn(&Config) -> bool;
        type Row = (&'static [(&'static str, &'static str)], Check, bool);
        let rows: &[Row] = &[
            // 0 means unset: the pool follows WARM_ENI_TARGET.
            (
                &[("WARM_IP_TARGET", "0")],
                |c| c.targets.warm_ip.is_none(),
                false,
            ),
            (
                &[("MINIMUM_IP_TARGET", "0")],
                |c| c.targets.minimum_ip.is_none(),
                false,
            ),
            (
                &[("WARM_IP_TARGET", "0"), ("MINIMUM_IP_TARGET", "10")],
                |c| c.targets.warm_ip.is_none() && c.targets.minimum_ip == Some(10),
                false,
            ),
            (
                &[("WARM_IP_TARGET", "-1")],
                |c| c.targets.warm_ip.is_none(),
                true,
            ),
            (
                &[("WARM_IP_TARGET", "two")],
                |c| c.targets.warm_ip.is_none(),
                true,
            ),
            (
                &[("MINIMUM_IP_TARGET", "1.5")],
                |c| c.targets.minimum_ip.is_none(),
                true,
            ),
            (
                &[("WARM_ENI_TARGET", "0")],
                |c| c.targets.warm_eni == 0,
                false,
            ),
            (
                &[("WARM_ENI_TARGET", "-3")],
                |c| c.targets.warm_eni == 1,
                true,
            ),
            (
                &[("WARM_ENI_TARGET", "one")],
                |c| c.targets.warm_eni == 1,
                true,
            ),
            // The stock aws-node manifest: WARM_PREFIX_TARGET=1 without prefix delegation.
            (
                &[
                    ("WARM_PREFIX_TARGET", "1"),
                    ("ENABLE_PREFIX_DELEGATION", "false"),
                ],
                |c| c.mode == Mode::SecondaryIp && c.targets.warm_prefix.is_none(),
                false,
            ),
            (
                &[
                    ("WARM_PREFIX_TARGET", "0"),
                    ("ENABLE_PREFIX_DELEGATION", "true"),
                ],
                |c| c.mode == Mode::Prefix && c.targets.warm_prefix == Some(0),
                false,
            ),
            (
                &[
                    ("WARM_PREFIX_TARGET", "-1"),
                    ("ENABLE_PREFIX_DELEGATION", "true"),
                ],
                |c| c.targets.warm_prefix == Some(1),
                true,
            ),
            (
                &[("ENABLE_PREFIX_DELEGATION", "yes")],
                |c| c.mode == Mode::SecondaryIp,
                true,
            ),
            (&[("MAX_ENI", "-1")], |c| c.targets.max_eni.is_none(), false),
            (&[("MAX_ENI", "0")], |c| c.targets.max_eni.is_none(), true),
            (&[("MAX_ENI", "x")], |c| c.targets.max_eni.is_none(), true),
            (&[("MAX_ENI", "2")], |c| c.targets.max_eni == Some(2), false),
            (
                &[("IP_COOLDOWN_PERIOD", "-5")],
                |c| c.ip_cooldown == Duration::from_secs(30),
                true,
            ),
            (&[("AWS_VPC_ENI_MTU", "100")], |c| c.mtu == 9001, true),
            (
                &[("AWS_VPC_ENI_MTU", "1500")],
                |c| c.mtu == 1500 && c.pod_mtu == 1500,
                false,
            ),
            (
                &[("AWS_VPC_ENI_MTU", "1500"), ("POD_MTU", "99999")],
                |c| c.pod_mtu == 1500,
                true,
            ),
            (
                &[("AWS_VPC_K8S_CNI_EXTERNALSNAT", "maybe")],
                |c| !c.external_snat,
                true,
            ),
            (
                &[("AWS_VPC_K8S_CNI_LOGLEVEL", "verbose")],
                |c| c.log_level == "info",
                true,
            ),
            (
                &[("AWS_VPC_K8S_CNI_LOGLEVEL", "DEBUG")],
                |c| c.log_level == "debug",
                false,
            ),
            (
                &[("ADDITIONAL_ENI_TAGS", "team=net")],
                |c| c.additional_eni_tags.is_empty(),
                true,
            ),
            (
                &[("ADDITIONAL_ENI_TAGS", r#"{"team":"net","aws:x":"y"}"#)],
                |c| c.additional_eni_tags.len() == 1 && c.additional_eni_tags["team"] == "net",
                true,
            ),
            (
                &[("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.9.0.0/16,nope")],
                |c| c.exclude_snat_cidrs.len() == 1,
                true,
            ),
            (
                &[("INTROSPECTION_BIND_ADDRESS", "localhost")],
                |c| c.introspection_addr.port() == 61679,
                true,
            ),
            (
                &[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true")],
                |c| c.custom_network && c.subnet_discovery,
                false,
            ),
            (
                &[("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "false")],
                |c| !c.custom_network,
                false,
            ),
            (
                &[
                    ("ENABLE_SUBNET_DISCOVERY", "false"),
                    ("ENI_CONFIG_LABEL_DEF", "topology.kubernetes.io/zone"),
                ],
                |c| {
                    !c.subnet_discovery
                        && c.eniconfig_label == "topology.kubernetes.io/zone"
                        && c.eniconfig_annotation == "k8s.amazonaws.com/eniConfig"
                },
                false,
            ),
            (&[("ENABLE_POD_ENI", "true")], |_| true, true),
        ];
        for (vars, check, reported) in rows {
            let c = parse(vars).unwrap_or_else(|e| panic!("{vars:?}: {e}"));
            assert!(check(&c), "{vars:?}: used {}", c.to_json());
            assert_eq!(
                !c.fallbacks.is_empty(),
                *reported,
                "{vars:?}: fallbacks {:?}",
                c.fallbacks
            );
            for f in &c.fallbacks {
                assert!(
                    vars.iter().any(|(k, _)| f.starts_with(k)),
                    "{f:?} names none of {vars:?}"
                );
            }
        }
        // What is said names the variable, the value given and the value used.
        let c = parse(&[("WARM_ENI_TARGET", "-3")]).expect("a fallback, not an error");
        assert_eq!(
            c.fallbacks,
            ["WARM_ENI_TARGET=\"-3\" is negative; using 1, as aws-node does"]
        );
    }

    /// Every value of the `env:` block of aws-vpc-cni's chart (its values.yaml).
    #[test]
    fn aws_node_chart_values_start_the_agent() {
        let c = parse(AWS_NODE_STOCK_ENV)
            .unwrap_or_else(|e| panic!("aws-node's stock values refused: {e}"));
        assert!(c.fallbacks.is_empty(), "{:?}", c.fallbacks);
        assert_eq!(c.mode, Mode::SecondaryIp);
        assert_eq!(c.targets, Targets::default());
    }
}
