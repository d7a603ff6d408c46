//! What the agent tells the dataplane, in its own terms, and how that becomes map values.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use vpc_ebpf_common::node::{Endpoint, Eni, NodeConfig, config_flags, eni_flags};
use vpc_ebpf_rpc::types::MacAddr;

/// A pod on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub ipv4: Ipv4Addr,
    /// ifindex of the host side of the pod's veth (in the agent's network namespace).
    pub host_ifindex: u32,
    /// MAC of the host side of the veth: what the pod's gateway ARP resolves to.
    pub host_mac: MacAddr,
    /// MAC of the pod's `eth0`.
    pub pod_mac: MacAddr,
    /// ifindex of the ENI that owns `ipv4`.
    pub eni_ifindex: u32,
}

/// An ENI attached to this node, found in the kernel by its MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EniSpec {
    pub ifindex: u32,
    pub mac: MacAddr,
    pub primary_ip: Ipv4Addr,
    /// The subnet's gateway (its first host address): next hop of all traffic leaving.
    pub gateway: Ipv4Addr,
    pub is_primary: bool,
}

/// Node-wide settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// The primary ENI's primary address: the SNAT source.
    pub node_ip: Ipv4Addr,
    pub primary_eni_ifindex: u32,
    /// The VPC's CIDR blocks (primary and secondary): reached without SNAT.
    pub vpc_cidrs: Vec<Ipv4Net>,
    /// `AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS`.
    pub snat_exclusions: Vec<Ipv4Net>,
    /// Destinations handed to the kernel untouched: the Service CIDR (kube-proxy DNATs
    /// ClusterIPs in the host stack) and anything else the host must see.
    pub passthrough_cidrs: Vec<Ipv4Net>,
    /// `AWS_VPC_K8S_CNI_EXTERNALSNAT`: no SNAT at all.
    pub external_snat: bool,
    /// `ENABLE_NETWORK_POLICY`: the programs judge new flows against the policy maps.
    pub network_policy: bool,
    /// Inclusive SNAT source-port range.
    pub snat_ports: (u16, u16),
    /// Inclusive band inside `snat_ports` never allocated: the host's
    /// `net.ipv4.ip_local_port_range`, since replies to SNAT ports on the node address
    /// are taken by the dataplane before the host stack sees them.
    pub snat_skip: Option<(u16, u16)>,
}

/// Network-order `u32` of an address, as the programs compare it with packet bytes.
pub fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn from_be(ip: u32) -> Ipv4Addr {
    Ipv4Addr::from(ip.to_ne_bytes())
}

impl EndpointSpec {
    pub(crate) fn value(&self) -> Endpoint {
        Endpoint {
            host_ifindex: self.host_ifindex,
            eni_ifindex: self.eni_ifindex,
            policy_id: 0,
            flags: 0,
            pod_mac: self.pod_mac.octets(),
            host_mac: self.host_mac.octets(),
        }
    }
}

impl EniSpec {
    pub(crate) fn value(&self) -> Eni {
        Eni {
            primary_ip: be(self.primary_ip),
            gateway_ip: be(self.gateway),
            flags: if self.is_primary {
                eni_flags::PRIMARY
            } else {
                0
            },
            mac: self.mac.octets(),
            pad: [0; 2],
        }
    }
}

impl NodeSpec {
    pub(crate) fn value(&self) -> NodeConfig {
        let mut flags = config_flags::CONFIGURED;
        if self.external_snat {
            flags |= config_flags::EXTERNAL_SNAT;
        }
        if self.network_policy {
            flags |= config_flags::NETWORK_POLICY;
        }
        NodeConfig {
            node_ip: be(self.node_ip),
            primary_eni_ifindex: self.primary_eni_ifindex,
            snat_port_min: self.snat_ports.0,
            snat_port_max: self.snat_ports.1,
            flags,
            snat_skip_min: self.snat_skip.map_or(0, |s| s.0),
            snat_skip_max: self.snat_skip.map_or(0, |s| s.1),
        }
    }
}
