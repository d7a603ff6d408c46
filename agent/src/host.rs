//! The node's kernel state the agent reads: interfaces (ENIs are found by MAC) and the
//! `/32` routes the plugin installs to pod veths, which tell which pods still exist.

use std::{collections::HashMap, net::Ipv4Addr};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, IpVersion, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        link::{LinkAttribute, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteScope},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};
use vpc_ebpf_rpc::types::MacAddr;

const RT_TABLE_MAIN: u8 = 254;

/// Amazon VPC CNI's priority for `from <pod> lookup <eni table>` rules.
pub const POD_RULE_PRIORITY: u32 = 1536;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink {what}")]
    Netlink {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `None` for links without an Ethernet address (loopback, tunnels).
    pub mac: Option<MacAddr>,
    pub mtu: u32,
}

/// A `/32` route to a pod through its host veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRoute {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    pub ifname: String,
}

/// Adding what is already there (a restart redoing its work) is success.
fn exists_is_ok(r: Result<(), rtnetlink::Error>, what: &'static str) -> Result<(), HostError> {
    match r {
        Err(rtnetlink::Error::NetlinkError(m))
            if m.code.is_some_and(|c| -c.get() == libc::EEXIST) =>
        {
            Ok(())
        }
        r => r.map_err(|source| HostError::Netlink { what, source }),
    }
}

pub struct Host {
    handle: Handle,
}

fn link(l: &LinkMessage) -> Link {
    let mut out = Link {
        index: l.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => out.name.clone_from(n),
            LinkAttribute::Address(m) => out.mac = MacAddr::from_slice(m),
            LinkAttribute::Mtu(m) => out.mtu = *m,
            _ => {}
        }
    }
    out
}

impl Host {
    /// Opens a netlink socket in the agent's namespace; must run inside a tokio runtime.
    pub fn open() -> Result<Self, HostError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(HostError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn links(&self) -> Result<Vec<Link>, HostError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| HostError::Netlink {
                what: "listing links",
                source,
            })?;
        Ok(msgs.iter().map(link).collect())
    }

    /// Interfaces by MAC.
    pub async fn links_by_mac(&self) -> Result<HashMap<MacAddr, Link>, HostError> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .filter_map(|l| Some((l.mac?, l)))
            .collect())
    }

    /// Brings a secondary ENI up with its primary address as a `/32`: enough for the
    /// kernel to ARP for the subnet gateway on it, without a connected route that would
    /// compete with the primary ENI's.
    pub async fn ensure_up_with_address(&self, index: u32, ip: Ipv4Addr) -> Result<(), HostError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|source| HostError::Netlink {
                what: "setting an ENI up",
                source,
            })?;
        let r = self
            .handle
            .address()
            .add(index, std::net::IpAddr::V4(ip), 32)
            .execute()
            .await;
        exists_is_ok(r, "adding an ENI's address")
    }

    /// Sets an ENI's MTU (`AWS_VPC_ENI_MTU`), as aws-node does for every ENI it manages.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), HostError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(|source| HostError::Netlink {
                what: "setting an ENI's MTU",
                source,
            })
    }

    /// The routing table of a secondary ENI, as Amazon VPC CNI lays it out (table =
    /// device index + 1): the gateway on the link and a default route through it. Traffic
    /// the programs hand to the kernel (Services, the node) then leaves by the ENI that
    /// owns the pod's address instead of the primary one, which the VPC would drop.
    pub async fn ensure_eni_table(
        &self,
        index: u32,
        table: u32,
        gateway: Ipv4Addr,
    ) -> Result<(), HostError> {
        let link_route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(gateway, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .table_id(table)
            .build();
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(index)
            .table_id(table)
            .build();
        for (what, msg) in [
            ("adding an ENI table's gateway route", link_route),
            ("adding an ENI table's default route", default),
        ] {
            self.handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|source| HostError::Netlink { what, source })?;
        }
        Ok(())
    }

    /// `from <pod>/32 lookup <table>` at VPC CNI's priority for pod rules.
    pub async fn add_pod_rule(&self, ip: Ipv4Addr, table: u32) -> Result<(), HostError> {
        let r = self
            .handle
            .rule()
            .add()
            .v4()
            .source_prefix(ip, 32)
            .table_id(table)
            .priority(POD_RULE_PRIORITY)
            .action(RuleAction::ToTable)
            .execute()
            .await;
        exists_is_ok(r, "adding a pod's ip rule")
    }

    /// Pod rules: (pod address, table) for every rule at the pod-rule priority.
    pub async fn pod_rules(&self) -> Result<Vec<(Ipv4Addr, u32, RuleMessage)>, HostError> {
        let rules: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(|source| HostError::Netlink {
                what: "listing ip rules",
                source,
            })?;
        Ok(rules
            .into_iter()
            .filter_map(|r| {
                let mut src = None;
                let mut prio = None;
                let mut table = u32::from(r.header.table);
                for a in &r.attributes {
                    match a {
                        RuleAttribute::Source(std::net::IpAddr::V4(ip)) => src = Some(*ip),
                        RuleAttribute::Priority(p) => prio = Some(*p),
                        RuleAttribute::Table(t) => table = *t,
                        _ => {}
                    }
                }
                (prio == Some(POD_RULE_PRIORITY) && r.header.src_len == 32)
                    .then_some((src?, table, r))
            })
            .collect())
    }

    /// Removes the pod rules of `ip`; none is fine.
    pub async fn del_pod_rules(&self, ip: Ipv4Addr) -> Result<(), HostError> {
        for (src, _, msg) in self.pod_rules().await? {
            if src == ip {
                self.handle
                    .rule()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|source| HostError::Netlink {
                        what: "deleting a pod's ip rule",
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// `/32` routes of the main table whose interface name starts with `veth_prefix`.
    pub async fn pod_routes(&self, veth_prefix: &str) -> Result<Vec<PodRoute>, HostError> {
        Ok(self
            .host_routes()
            .await?
            .into_iter()
            .filter(|r| r.ifname.starts_with(veth_prefix))
            .collect())
    }

    /// Every `/32` route of the main table with the interface it leaves by: the plugin
    /// installs one per pod, whatever the veth prefix was when it ran.
    pub async fn host_routes(&self) -> Result<Vec<PodRoute>, HostError> {
        let names: HashMap<u32, String> = self
            .links()
            .await?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let routes: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|source| HostError::Netlink {
                what: "listing routes",
                source,
            })?;
        let mut out = Vec::new();
        for r in routes {
            // The dump holds every table; pod routes are in main (local has the node's
            // own addresses, the per-ENI tables their gateways).
            if r.header.destination_prefix_length != 32 || r.header.table != RT_TABLE_MAIN {
                continue;
            }
            let mut dst = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            if let (Some(ip), Some(ifindex)) = (dst, oif)
                && let Some(ifname) = names.get(&ifindex)
            {
                out.push(PodRoute {
                    ip,
                    ifindex,
                    ifname: ifname.clone(),
                });
            }
        }
        Ok(out)
    }
}
