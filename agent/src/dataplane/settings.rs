//! What the node's settings mean for the programs: the node-wide table entries
//! ([`super::NodeSpec`]) from the configuration and the node's identity. Pure but for
//! reading the node's ephemeral port range.

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use tracing::warn;
use vpc_ebpf_common::nat::SnatPorts;
use vpc_ebpf_rpc::types::MacAddr;

use crate::{
    config::{Config, MIN_SNAT_PORTS},
    node::Node,
};

const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// Linux's default `ip_local_port_range`.
pub const LINUX_EPHEMERAL_PORTS: (u16, u16) = (32_768, 60_999);

/// The node-wide settings before the primary ENI is found in the kernel (by its MAC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    pub node_ip: Ipv4Addr,
    pub primary_mac: MacAddr,
    pub gateway: Ipv4Addr,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub snat_exclusions: Vec<Ipv4Net>,
    pub passthrough_cidrs: Vec<Ipv4Net>,
    pub external_snat: bool,
    /// Whether the programs judge flows against the policy maps.
    pub network_policy: bool,
    pub snat_ports: (u16, u16),
    pub snat_skip: (u16, u16),
    /// `AWS_VPC_ENI_MTU`, set on every ENI.
    pub eni_mtu: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "VPC_EBPF_SNAT_PORT_RANGE={lo}-{hi} leaves {usable} ports once the node's ephemeral range \
     {}-{} (net.ipv4.ip_local_port_range) is skipped; at least {MIN_SNAT_PORTS} are needed: \
     widen the range or narrow ip_local_port_range",
    skip.0,
    skip.1
)]
pub struct SnatRangeError {
    pub lo: u16,
    pub hi: u16,
    pub usable: u32,
    pub skip: (u16, u16),
}

/// The node's settings for the programs. `ephemeral` is the host's
/// `ip_local_port_range`, which SNAT must not allocate from.
pub fn node_settings(
    config: &Config,
    node: &Node,
    ephemeral: (u16, u16),
) -> Result<NodeSettings, SnatRangeError> {
    let (lo, hi) = config.snat_ports;
    let usable = SnatPorts::new(lo, hi, ephemeral.0, ephemeral.1).usable();
    if !config.external_snat && usable < MIN_SNAT_PORTS {
        return Err(SnatRangeError {
            lo,
            hi,
            usable,
            skip: ephemeral,
        });
    }
    Ok(NodeSettings {
        node_ip: node.primary_ip,
        primary_mac: node.primary_mac,
        gateway: node.gateway(),
        vpc_cidrs: node.vpc_cidrs.clone(),
        snat_exclusions: config.exclude_snat_cidrs.clone(),
        passthrough_cidrs: config
            .service_cidrs
            .clone()
            .unwrap_or_else(|| vec![default_service_cidr(&node.vpc_cidrs)]),
        external_snat: config.external_snat,
        network_policy: config.network_policy,
        snat_ports: config.snat_ports,
        snat_skip: ephemeral,
        eni_mtu: config.mtu,
    })
}

/// The node's ephemeral port range (this process's network namespace): SNAT skips it,
/// since replies to those ports on the node address may belong to a host socket the
/// programs do not see. Linux's default when the file cannot be read.
pub fn host_ephemeral_ports() -> (u16, u16) {
    match std::fs::read_to_string(LOCAL_PORT_RANGE) {
        Ok(text) => parse_port_range(&text).unwrap_or_else(|| {
            warn!(file = LOCAL_PORT_RANGE, %text, "unparsable; assuming Linux's default");
            LINUX_EPHEMERAL_PORTS
        }),
        Err(error) => {
            warn!(file = LOCAL_PORT_RANGE, %error, "unreadable; assuming Linux's default");
            LINUX_EPHEMERAL_PORTS
        }
    }
}

/// `ip_local_port_range`'s text: two numbers separated by white space.
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (it.next().is_none() && lo <= hi).then_some((lo, hi))
}

/// EKS's Service CIDR defaults: 10.100.0.0/16, or 172.20.0.0/16 when the VPC is in 10/8.
pub fn default_service_cidr(vpc_cidrs: &[Ipv4Net]) -> Ipv4Net {
    let in_ten = vpc_cidrs.iter().any(|c| c.network().octets()[0] == 10);
    let base = if in_ten {
        Ipv4Addr::new(172, 20, 0, 0)
    } else {
        Ipv4Addr::new(10, 100, 0, 0)
    };
    Ipv4Net::new(base, 16).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_cidr_follows_eks() {
        let ten: Ipv4Net = "10.0.0.0/16".parse().unwrap();
        let other: Ipv4Net = "192.168.0.0/16".parse().unwrap();
        assert_eq!(default_service_cidr(&[ten]).to_string(), "172.20.0.0/16");
        assert_eq!(default_service_cidr(&[other]).to_string(), "10.100.0.0/16");
    }

    #[test]
    fn port_ranges_parse_as_the_kernel_prints_them() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32_768, 60_999)));
        assert_eq!(parse_port_range("1024 1024"), Some((1024, 1024)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_port_range("x y"), None);
    }

    #[test]
    fn too_few_snat_ports_is_a_clear_error() {
        let node = crate::node::tests::sample();
        let mut c = Config::from_lookup(&|_| None).unwrap();
        c.snat_ports = (32_000, 33_500);
        let e = node_settings(&c, &node, LINUX_EPHEMERAL_PORTS).unwrap_err();
        assert!(
            e.to_string()
                .contains("VPC_EBPF_SNAT_PORT_RANGE=32000-33500"),
            "{e}"
        );
        c.external_snat = true;
        let s = node_settings(&c, &node, LINUX_EPHEMERAL_PORTS).unwrap();
        assert_eq!(s.passthrough_cidrs, vec!["172.20.0.0/16".parse().unwrap()]);
        assert_eq!(s.gateway, Ipv4Addr::new(10, 0, 16, 1));
    }
}
