//! NetworkPolicy (`networking.k8s.io/v1`) as the compiler reads it: the API object with
//! its defaults applied and its strings parsed, and nothing the compiler does not use.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("selector operator {0:?} is not In, NotIn, Exists or DoesNotExist")]
    Operator(String),
    #[error("ipBlock {0:?} is not a CIDR")]
    Cidr(String),
    #[error("protocol {0:?} is not TCP, UDP or SCTP")]
    Protocol(String),
    #[error("port {0} is not between 1 and 65535")]
    Port(i32),
    #[error("endPort {end} is below port {port}")]
    EndPort { port: i32, end: i32 },
}

/// A label selector. The empty selector selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub labels: BTreeMap<String, String>,
    pub exprs: Vec<Expr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expr {
    pub key: String,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|e| {
                let have = labels.get(&e.key);
                match &e.op {
                    Op::In(vs) => have.is_some_and(|h| vs.contains(h)),
                    // As in the API: a missing key is "not in" any set.
                    Op::NotIn(vs) => have.is_none_or(|h| !vs.contains(h)),
                    Op::Exists => have.is_some(),
                    Op::DoesNotExist => have.is_none(),
                }
            })
    }

    pub fn from_api(s: &LabelSelector) -> Result<Self, ModelError> {
        let exprs = s
            .match_expressions
            .iter()
            .flatten()
            .map(|e| {
                let values = e.values.clone().unwrap_or_default();
                let op = match e.operator.as_str() {
                    "In" => Op::In(values),
                    "NotIn" => Op::NotIn(values),
                    "Exists" => Op::Exists,
                    "DoesNotExist" => Op::DoesNotExist,
                    other => return Err(ModelError::Operator(other.to_owned())),
                };
                Ok(Expr {
                    key: e.key.clone(),
                    op,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            labels: s.match_labels.clone().unwrap_or_default(),
            exprs,
        })
    }
}

/// Which destination ports of a protocol a rule admits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSel {
    All,
    Range(u16, u16),
    /// Resolved on the destination pod, by name and protocol.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRule {
    pub proto: u8,
    pub port: PortSel,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods matching `pods` (all when `None`) in the namespaces matching `namespaces`
    /// (the policy's own when `None`).
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    Block {
        cidr: Ipv4Net,
        except: Vec<Ipv4Net>,
    },
    /// An IPv6 `ipBlock`: the API takes it, and policies written for dual-stack clusters
    /// carry one beside their IPv4 block (`::/0` next to `0.0.0.0/0`). No IPv4 address
    /// matches it; the policy's other peers still count.
    Ipv6Block,
}

/// One ingress or egress rule. No peers: every peer; no ports: every port and protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortRule>,
}

/// A policy. `ingress`/`egress` are `Some` when the policy isolates its pods in that
/// direction (its policy types, defaulted as the API server does), holding the rules that
/// admit traffic (none: nothing is admitted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub selector: Selector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    /// The compiler's view of an API object. A policy that does not parse (the API server
    /// validates, so only a client bypassing it gets here) still isolates the pods it
    /// selects, admitting nothing: failing closed, with the error to report.
    pub fn from_api(np: &NetworkPolicy) -> (Self, Option<ModelError>) {
        let namespace = np.metadata.namespace.clone().unwrap_or_default();
        let name = np.metadata.name.clone().unwrap_or_default();
        let spec = np.spec.clone().unwrap_or_default();
        let selector = Selector::from_api(&spec.pod_selector.clone().unwrap_or_default());
        let types = spec.policy_types.clone().unwrap_or_default();
        let has_egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        // The API's default: Ingress always, Egress when there are egress rules.
        let (isolates_in, isolates_out) = if types.is_empty() {
            (true, has_egress_rules)
        } else {
            (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            )
        };
        let parsed = (|| -> Result<_, ModelError> {
            let selector = selector.clone()?;
            let ingress = spec
                .ingress
                .iter()
                .flatten()
                .map(|r| rule(r.from.as_deref(), r.ports.as_deref()))
                .collect::<Result<Vec<_>, _>>()?;
            let egress = spec
                .egress
                .iter()
                .flatten()
                .map(|r| rule(r.to.as_deref(), r.ports.as_deref()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((selector, ingress, egress))
        })();
        match parsed {
            Ok((selector, ingress, egress)) => (
                Self {
                    namespace,
                    name,
                    selector,
                    ingress: isolates_in.then_some(ingress),
                    egress: isolates_out.then_some(egress),
                },
                None,
            ),
            Err(e) => (
                Self {
                    namespace,
                    name,
                    // A selector that does not parse selects every pod of the namespace.
                    selector: selector.unwrap_or_default(),
                    ingress: isolates_in.then(Vec::new),
                    egress: isolates_out.then(Vec::new),
                },
                Some(e),
            ),
        }
    }
}

fn rule(
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Rule, ModelError> {
    let peers = peers
        .unwrap_or_default()
        .iter()
        .map(peer)
        .collect::<Result<_, _>>()?;
    let ports = ports
        .unwrap_or_default()
        .iter()
        .map(port)
        .collect::<Result<_, _>>()?;
    Ok(Rule { peers, ports })
}

fn peer(p: &NetworkPolicyPeer) -> Result<Peer, ModelError> {
    if let Some(b) = &p.ip_block {
        if b.cidr.parse::<ipnet::Ipv6Net>().is_ok() {
            return Ok(Peer::Ipv6Block);
        }
        let cidr = parse_cidr(&b.cidr)?;
        let except = b
            .except
            .iter()
            .flatten()
            .map(|e| parse_cidr(e))
            .collect::<Result<_, _>>()?;
        return Ok(Peer::Block { cidr, except });
    }
    Ok(Peer::Pods {
        namespaces: p
            .namespace_selector
            .as_ref()
            .map(Selector::from_api)
            .transpose()?,
        pods: p
            .pod_selector
            .as_ref()
            .map(Selector::from_api)
            .transpose()?,
    })
}

fn parse_cidr(s: &str) -> Result<Ipv4Net, ModelError> {
    // The API accepts a host address with a prefix (10.0.0.1/24): the network is meant.
    s.parse::<Ipv4Net>()
        .map(|c| c.trunc())
        .map_err(|_| ModelError::Cidr(s.to_owned()))
}

fn port(p: &NetworkPolicyPort) -> Result<PortRule, ModelError> {
    let proto = match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => TCP,
        "UDP" => UDP,
        "SCTP" => SCTP,
        other => return Err(ModelError::Protocol(other.to_owned())),
    };
    let port = match &p.port {
        None => PortSel::All,
        Some(IntOrString::String(name)) => match name.parse::<i32>() {
            // A number written as a string is a number.
            Ok(n) => range(n, p.end_port)?,
            Err(_) => PortSel::Named(name.clone()),
        },
        Some(IntOrString::Int(n)) => range(*n, p.end_port)?,
    };
    Ok(PortRule { proto, port })
}

fn range(port: i32, end: Option<i32>) -> Result<PortSel, ModelError> {
    let first = u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or(ModelError::Port(port))?;
    let last = match end {
        None => first,
        Some(e) => u16::try_from(e)
            .ok()
            .filter(|e| *e >= first)
            .ok_or(ModelError::EndPort { port, end: e })?,
    };
    Ok(PortSel::Range(first, last))
}

/// A pod's labels. Shared: the pods of one ReplicaSet carry the same set, and
/// [`PodView::new`] takes the process's one copy of each ([`super::intern`]; a 150k-pod
/// cluster's label maps were most of the agent's memory).
pub type Labels = Arc<BTreeMap<String, String>>;

/// (name, protocol number, port) of a pod's containers' named ports; shared as
/// [`Labels`] are.
pub type NamedPorts = Arc<[(String, u8, u16)]>;

/// A pod as policy sees it, on this node or any other.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    pub labels: Labels,
    pub named_ports: NamedPorts,
    pub host_network: bool,
}

impl PodView {
    /// A view whose labels and named ports are the process's shared copies.
    pub fn new(
        namespace: String,
        name: String,
        ip: Option<Ipv4Addr>,
        labels: BTreeMap<String, String>,
        named_ports: Vec<(String, u8, u16)>,
        host_network: bool,
    ) -> Self {
        Self {
            namespace,
            name,
            ip,
            labels: super::intern::labels(labels.into()),
            named_ports: super::intern::named_ports(named_ports.into()),
            host_network,
        }
    }

    /// The port `name` resolves to on this pod for `proto`.
    pub fn named_port(&self, name: &str, proto: u8) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|(n, p, _)| n == name && *p == proto)
            .map(|(_, _, port)| *port)
    }
}

/// The protocol number of a container port's protocol string.
pub fn proto_number(s: &str) -> Option<u8> {
    match s {
        "TCP" => Some(TCP),
        "UDP" => Some(UDP),
        "SCTP" => Some(SCTP),
        _ => None,
    }
}
