//! The node's kernel state the agent reads: interfaces (ENIs are found by MAC) and the
//! `/32` routes the plugin installs to pod veths, which tell which pods still exist.

use std::{collections::HashMap, net::Ipv4Addr};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        link::{LinkAttribute, LinkMessage},
        route::{RouteAddress, RouteAttribute},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("opening a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("netlink {what}: {source}")]
    Netlink {
        what: &'static str,
        source: rtnetlink::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: String,
}

/// A `/32` route to a pod through its host veth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRoute {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    pub ifname: String,
}

pub struct Host {
    handle: Handle,
}

fn mac_string(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link(l: &LinkMessage) -> Link {
    let mut out = Link {
        index: l.header.index,
        name: String::new(),
        mac: String::new(),
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => out.name.clone_from(n),
            LinkAttribute::Address(m) => out.mac = mac_string(m),
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

    /// Interfaces by lower-case MAC.
    pub async fn links_by_mac(&self) -> Result<HashMap<String, Link>, HostError> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .filter(|l| !l.mac.is_empty())
            .map(|l| (l.mac.clone(), l))
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
        match r {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(m))
                if m.code.is_some_and(|c| -c.get() == libc::EEXIST) =>
            {
                Ok(())
            }
            Err(source) => Err(HostError::Netlink {
                what: "adding an ENI's address",
                source,
            }),
        }
    }

    /// `/32` routes whose interface name starts with `veth_prefix`.
    pub async fn pod_routes(&self, veth_prefix: &str) -> Result<Vec<PodRoute>, HostError> {
        let names: HashMap<u32, String> = self
            .links()
            .await?
            .into_iter()
            .filter(|l| l.name.starts_with(veth_prefix))
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
            if r.header.destination_prefix_length != 32 {
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
