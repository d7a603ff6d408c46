//! The agent's configuration from its environment, with Amazon VPC CNI's variable names
//! and defaults where they exist. Every problem names the variable, what it got and what
//! it accepts; all problems are reported at once.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::Ipv4Net;

use crate::ipam::pool::{Mode, Targets};

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
    /// VPC_EBPF_LEAKED_ENI_AGE: how old a detached ENI of ours must be before cleanup
    /// deletes it (younger ones may be in the middle of our own attach).
    pub leaked_eni_age: Duration,
    /// VPC_EBPF_SUBNET_FULL_PAUSE: how long growth pauses after
    /// InsufficientFreeAddressesInSubnet before EC2 is asked again.
    pub subnet_full_pause: Duration,
    /// AWS_EC2_METADATA_SERVICE_ENDPOINT, as the AWS SDKs name it.
    pub imds_endpoint: String,
    pub external_snat: bool,
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
    pub log_level: String,
    /// MY_NODE_NAME: the node's name in Kubernetes (from `spec.nodeName`).
    pub node_name: Option<String>,
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

    fn flag(&mut self, key: &str, default: bool) -> bool {
        let Some(v) = self.raw(key) else {
            return default;
        };
        // Go's strconv.ParseBool, which VPC CNI uses, so existing manifests keep working.
        match v.as_str() {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
            "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
            _ => {
                self.problems
                    .push(format!("{key}={v:?}: expected true or false"));
                default
            }
        }
    }

    fn addr(&mut self, key: &str, default: SocketAddr) -> SocketAddr {
        let Some(v) = self.raw(key) else {
            return default;
        };
        v.parse().unwrap_or_else(|_| {
            self.problems.push(format!(
                "{key}={v:?}: expected an address:port such as {default}"
            ));
            default
        })
    }

    fn eni_tags(&mut self) -> BTreeMap<String, String> {
        let tags = match self.raw("ADDITIONAL_ENI_TAGS") {
            None => BTreeMap::new(),
            Some(v) => serde_json::from_str::<BTreeMap<String, String>>(&v).unwrap_or_else(|e| {
                self.problems.push(format!(
                    "ADDITIONAL_ENI_TAGS={v:?}: expected a JSON object of string tags, such as \
                     {{\"team\":\"net\"}} ({e})"
                ));
                BTreeMap::new()
            }),
        };
        if let Some(k) = tags
            .keys()
            .find(|k| k.starts_with("k8s.amazonaws.com") || k.starts_with("aws:"))
        {
            self.problems.push(format!(
                "ADDITIONAL_ENI_TAGS: tag {k:?} uses a reserved prefix (k8s.amazonaws.com, aws:)"
            ));
        }
        tags
    }

    fn cidrs(&mut self, key: &str) -> Option<Vec<Ipv4Net>> {
        let v = self.raw(key)?;
        let mut out = Vec::new();
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<Ipv4Net>() {
                Ok(c) if c.trunc() == c => out.push(c),
                _ => self.problems.push(format!(
                    "{key}: {part:?} is not an IPv4 CIDR such as 10.10.0.0/16"
                )),
            }
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

    fn snat_exclusions(&mut self) -> Vec<Ipv4Net> {
        self.cidrs("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS")
            .unwrap_or_default()
    }
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    #[allow(clippy::too_many_lines)] // one flat list of variables reads best
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut r = Reader {
            get,
            problems: Vec::new(),
        };
        let prefix = r.flag("ENABLE_PREFIX_DELEGATION", false);
        let max_eni = match r.raw("MAX_ENI").as_deref() {
            // VPC CNI's "no limit".
            None | Some("-1") => None,
            Some(_) => r.count("MAX_ENI"),
        };
        if max_eni == Some(0) {
            r.problems
                .push("MAX_ENI=\"0\": at least 1 (the primary ENI), or -1 for no limit".into());
        }
        let targets = Targets {
            warm_eni: r.count("WARM_ENI_TARGET").unwrap_or(1),
            warm_ip: r.count("WARM_IP_TARGET"),
            minimum_ip: r.count("MINIMUM_IP_TARGET"),
            warm_prefix: r.count("WARM_PREFIX_TARGET"),
            max_eni,
            max_pods: r.count("MAX_PODS"),
        };
        if !prefix && targets.warm_prefix.is_some() {
            r.problems.push(
                "WARM_PREFIX_TARGET is set but ENABLE_PREFIX_DELEGATION is not true: set \
                 ENABLE_PREFIX_DELEGATION=true or remove WARM_PREFIX_TARGET"
                    .into(),
            );
        }
        let ip_cooldown =
            Duration::from_secs(u64::from(r.count("IP_COOLDOWN_PERIOD").unwrap_or(30)));
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
        let mtu = r.count("AWS_VPC_ENI_MTU").unwrap_or(9001);
        if !(576..=9001).contains(&mtu) {
            r.problems
                .push(format!("AWS_VPC_ENI_MTU={mtu}: between 576 and 9001"));
        }
        let pod_mtu = r.count("POD_MTU");
        if let Some(m) = pod_mtu
            && !(576..=9001).contains(&m)
        {
            r.problems
                .push(format!("POD_MTU={m}: between 576 and 9001"));
        }
        let pod_mtu = pod_mtu.unwrap_or(mtu);
        let log_level = r
            .raw("AWS_VPC_K8S_CNI_LOGLEVEL")
            .unwrap_or_else(|| "INFO".into())
            .to_lowercase();
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            r.problems.push(format!(
                "AWS_VPC_K8S_CNI_LOGLEVEL={log_level:?}: one of ERROR, WARN, INFO, DEBUG, TRACE"
            ));
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
            disable_leaked_eni_cleanup: r.flag("DISABLE_LEAKED_ENI_CLEANUP", false),
            leaked_eni_age: Duration::from_secs(u64::from(
                r.count("VPC_EBPF_LEAKED_ENI_AGE").unwrap_or(300),
            )),
            subnet_full_pause: Duration::from_secs(u64::from(
                r.count("VPC_EBPF_SUBNET_FULL_PAUSE").unwrap_or(60),
            )),
            imds_endpoint: r
                .raw("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                .unwrap_or_else(|| crate::aws::imds::DEFAULT_ENDPOINT.into()),
            external_snat: r.flag("AWS_VPC_K8S_CNI_EXTERNALSNAT", false),
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
            metrics_addr: r.addr(
                "METRICS_BIND_ADDRESS",
                SocketAddr::from(([127, 0, 0, 1], 61678)),
            ),
            introspection_addr: r.addr(
                "INTROSPECTION_BIND_ADDRESS",
                SocketAddr::from(([127, 0, 0, 1], 61679)),
            ),
            log_level,
            node_name: r.raw(crate::k8s::NODE_NAME_VAR),
            annotate_pod_ip: r.flag("ANNOTATE_POD_IP", false),
            cni_conf_dir: r.raw("VPC_EBPF_CNI_CONF_DIR").map(PathBuf::from),
            pod_mtu,
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
            "VPC_EBPF_LEAKED_ENI_AGE": self.leaked_eni_age.as_secs(),
            "VPC_EBPF_SUBNET_FULL_PAUSE": self.subnet_full_pause.as_secs(),
            "AWS_VPC_K8S_CNI_EXTERNALSNAT": self.external_snat,
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
            "AWS_VPC_K8S_CNI_LOGLEVEL": self.log_level,
            "MY_NODE_NAME": self.node_name,
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
    fn every_problem_is_named_with_what_is_accepted() {
        let e = parse(&[
            ("WARM_IP_TARGET", "lots"),
            ("ENABLE_PREFIX_DELEGATION", "yes"),
            ("MAX_ENI", "0"),
            ("ADDITIONAL_ENI_TAGS", "team=net"),
            ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.1/8"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "eth"),
            ("AWS_VPC_ENI_MTU", "100"),
            ("INTROSPECTION_BIND_ADDRESS", "localhost"),
            ("VPC_EBPF_SNAT_PORT_RANGE", "80-90"),
        ])
        .unwrap_err();
        let text = e.to_string();
        for var in [
            "WARM_IP_TARGET",
            "ENABLE_PREFIX_DELEGATION",
            "MAX_ENI",
            "ADDITIONAL_ENI_TAGS",
            "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
            "AWS_VPC_K8S_CNI_VETHPREFIX",
            "AWS_VPC_ENI_MTU",
            "INTROSPECTION_BIND_ADDRESS",
            "VPC_EBPF_SNAT_PORT_RANGE",
        ] {
            assert!(text.contains(var), "{var} not named in:\n{text}");
        }
        assert_eq!(e.0.len(), 9, "{text}");
        let e = parse(&[("WARM_PREFIX_TARGET", "1")]).unwrap_err();
        assert!(e.to_string().contains("ENABLE_PREFIX_DELEGATION=true"));
    }
}
