//! The pod's interfaces, built and torn down with rtnetlink. Two sockets, opened once: one
//! in the host namespace, one created inside the pod's namespace, passed down together.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
    path::Path,
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
        neighbour::NeighbourState,
        route::{RouteAttribute, RouteScope},
    },
};

use vpc_ebpf_rpc::types::MacAddr;

use crate::spec::result::GATEWAY_IP;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening network namespace {path}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a network namespace (CNI_NETNS must name one, such as /var/run/netns/NAME)"
    )]
    NotNetns { path: String },
    #[error("setns(2) into {path}")]
    Setns {
        path: String,
        source: std::io::Error,
    },
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{op}")]
    Op {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Missing(String),
}

fn op(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = what.into();
    move |source| NetlinkError::Op { op, source }
}

/// ENOENT/ENODEV/ESRCH from the kernel: the thing is already gone.
pub fn is_not_found(e: &NetlinkError) -> bool {
    matches!(e, NetlinkError::Op { source: rtnetlink::Error::NetlinkError(m), .. }
        if m.code.is_some_and(|c| matches!(-c.get(), libc::ENOENT | libc::ENODEV | libc::ESRCH)))
}

pub struct Sockets {
    pub host: Handle,
    pub pod: Handle,
    /// Keeps the pod namespace referenced while we work in it.
    pub pod_ns: File,
    /// The host namespace, by fd: the veth's host end is created straight into it.
    pub host_ns: File,
}

/// Opens the host socket here and the pod socket inside `netns`.
pub fn open(netns: &Path) -> Result<Sockets, NetlinkError> {
    let path = netns.display().to_string();
    let pod_ns = File::open(netns).map_err(|source| NetlinkError::Netns {
        path: path.clone(),
        source,
    })?;
    if !is_netns(&pod_ns) {
        return Err(NetlinkError::NotNetns { path });
    }
    let (conn, host, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    let own = File::open("/proc/thread-self/ns/net").map_err(|source| NetlinkError::Netns {
        path: "/proc/thread-self/ns/net".into(),
        source,
    })?;
    setns(&pod_ns, &path)?;
    let made = rtnetlink::new_connection().map_err(NetlinkError::Socket);
    // Always come back, whatever happened inside.
    setns(&own, "the host namespace")?;
    let (conn, pod, _) = made?;
    tokio::spawn(conn);
    Ok(Sockets {
        host,
        pod,
        pod_ns,
        host_ns: own,
    })
}

/// Whether `f` is a network namespace: a file of the nsfs whose namespace type is net
/// (a plain file, or another kind of namespace, is not).
fn is_netns(f: &File) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: fstatfs fills the zeroed struct from a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(f.as_raw_fd(), &raw mut st) } != 0 || st.f_type != NSFS_MAGIC {
        return false;
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    kind == libc::CLONE_NEWNET
}

fn setns(ns: &File, path: &str) -> Result<(), NetlinkError> {
    // SAFETY: a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetlinkError::Setns {
            path: path.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
    match h
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(l) => Ok(l),
        Err(e) => {
            let e = op(format!("looking up link {name}"))(e);
            if is_not_found(&e) { Ok(None) } else { Err(e) }
        }
    }
}

pub async fn link_name_by_index(h: &Handle, index: u32) -> Result<Option<String>, NetlinkError> {
    let l = h
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(op(format!("looking up link {index}")))?;
    Ok(l.and_then(|l| {
        l.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n),
            _ => None,
        })
    }))
}

pub fn link_mac(l: &LinkMessage) -> Option<MacAddr> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => MacAddr::from_slice(m),
        _ => None,
    })
}

/// What ADD builds.
pub struct PodNetwork<'a> {
    pub host_ifname: &'a str,
    /// The sandbox the veth is made for (its alias).
    pub container_id: &'a str,
    pub pod_ifname: &'a str,
    pub ip: Ipv4Addr,
    pub mtu: u32,
}

pub struct Built {
    pub host_ifindex: u32,
    pub pod_ifindex: u32,
    pub host_mac: MacAddr,
    pub pod_mac: MacAddr,
}

/// Limits what leaves the interface `index` with the tbf `t` as its root qdisc
/// (replacing one a failed earlier ADD left).
pub async fn limit_egress(
    h: &Handle,
    index: u32,
    t: &crate::shaping::Tbf,
) -> Result<(), NetlinkError> {
    use futures_util::StreamExt as _;
    use rtnetlink::{
        packet_core::{
            DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
            NetlinkPayload,
        },
        packet_route::{
            RouteNetlinkMessage,
            tc::{TcAttribute, TcHandle, TcMessage, TcOption},
        },
    };
    let mut msg = TcMessage::with_index(i32::try_from(index).unwrap_or(i32::MAX));
    msg.header.parent = TcHandle::ROOT;
    msg.header.handle = TcHandle { major: 1, minor: 0 };
    msg.attributes.push(TcAttribute::Kind("tbf".into()));
    msg.attributes.push(TcAttribute::Options(
        crate::shaping::tbf_attributes(t)
            .into_iter()
            .map(|(kind, value)| TcOption::Other(DefaultNla::new(kind, value)))
            .collect(),
    ));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    let mut handle = h.clone();
    let mut answers = handle
        .request(req)
        .map_err(op("adding the pod's egress tbf"))?;
    while let Some(m) = answers.next().await {
        if let NetlinkPayload::Error(e) = m.payload
            && e.code.is_some()
        {
            return Err(op("adding the pod's egress tbf")(
                rtnetlink::Error::NetlinkError(e),
            ));
        }
    }
    Ok(())
}

/// The veth pair (host end created directly in the host namespace), the pod's /32 and
/// routes via 169.254.1.1, and the host's /32 route to the pod.
pub async fn build(s: &Sockets, p: &PodNetwork<'_>) -> Result<Built, NetlinkError> {
    let host_mac = MacAddr::random();
    let pod_mac = MacAddr::random();
    let peer = LinkUnspec::new_with_name(p.host_ifname)
        .address(host_mac.octets().to_vec())
        .mtu(p.mtu)
        .setns_by_fd(s.host_ns.as_raw_fd())
        .build();
    let veth = LinkVeth::new(p.pod_ifname, p.host_ifname)
        .address(pod_mac.octets().to_vec())
        .mtu(p.mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    s.pod.link().add(veth).execute().await.map_err(op(format!(
        "creating veth {} / {}",
        p.pod_ifname, p.host_ifname
    )))?;

    let host = link_by_name(&s.host, p.host_ifname).await?.ok_or_else(|| {
        NetlinkError::Missing(format!("host veth {} did not appear", p.host_ifname))
    })?;
    let host_ifindex = host.header.index;
    s.host
        .link()
        .set(
            LinkUnspec::new_with_index(host_ifindex)
                .up()
                .alias(owner_alias(p.container_id))
                .build(),
        )
        .execute()
        .await
        .map_err(op(format!("setting {} up", p.host_ifname)))?;

    let pod_ifindex = configure_pod(s, p).await?;
    s.host
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(p.ip, 32)
                .output_interface(host_ifindex)
                .scope(RouteScope::Link)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(op(format!("adding the host route to {}", p.ip)))?;
    Ok(Built {
        host_ifindex,
        pod_ifindex,
        host_mac,
        pod_mac,
    })
}

/// Inside the pod: lo and the interface up, the /32, the gateway and default routes. The
/// gateway's ARP is answered by the dataplane.
async fn configure_pod(s: &Sockets, p: &PodNetwork<'_>) -> Result<u32, NetlinkError> {
    let pod = link_by_name(&s.pod, p.pod_ifname)
        .await?
        .ok_or_else(|| NetlinkError::Missing(format!("pod interface {} missing", p.pod_ifname)))?;
    let pod_ifindex = pod.header.index;
    if let Some(lo) = link_by_name(&s.pod, "lo").await? {
        s.pod
            .link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(op("setting lo up in the pod"))?;
    }
    s.pod
        .link()
        .set(LinkUnspec::new_with_index(pod_ifindex).up().build())
        .execute()
        .await
        .map_err(op(format!("setting {} up in the pod", p.pod_ifname)))?;
    s.pod
        .address()
        .add(pod_ifindex, IpAddr::V4(p.ip), 32)
        .execute()
        .await
        .map_err(op(format!("adding {}/32 in the pod", p.ip)))?;
    let gw = GATEWAY_IP;
    s.pod
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(gw, 32)
                .output_interface(pod_ifindex)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute()
        .await
        .map_err(op("adding the gateway route in the pod"))?;
    s.pod
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gw)
                .output_interface(pod_ifindex)
                .build(),
        )
        .execute()
        .await
        .map_err(op("adding the default route in the pod"))?;
    Ok(pod_ifindex)
}

/// A permanent neighbour entry for the gateway in the pod: only for an agent without a
/// dataplane, which would otherwise leave the pod's ARP for 169.254.1.1 unanswered.
pub async fn add_gateway_neighbour(
    s: &Sockets,
    pod_ifname: &str,
    host_mac: MacAddr,
) -> Result<(), NetlinkError> {
    let pod = link_by_name(&s.pod, pod_ifname)
        .await?
        .ok_or_else(|| NetlinkError::Missing(format!("pod interface {pod_ifname} missing")))?;
    s.pod
        .neighbours()
        .add(pod.header.index, IpAddr::V4(GATEWAY_IP))
        .link_layer_address(&host_mac.octets())
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(op("adding the gateway's neighbour entry in the pod"))?;
    Ok(())
}

/// Deletes a host link by name; one that is not there is fine. Deleting either end of a
/// veth removes both, and the host /32 route with it.
/// The host veth's alias: which sandbox (container ID) it was made for. Names are derived
/// from the pod's namespace and name, which a re-created sandbox of the same pod shares;
/// the alias tells them apart.
pub fn owner_alias(container_id: &str) -> String {
    format!("vpc-ebpf:{container_id}")
}

fn link_alias(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(s) => Some(s.as_str()),
        _ => None,
    })
}

/// Deletes a host link by name; one that is not there is fine. With `owner`, only a link
/// made for that container (or one without an owner, made by an older plugin): another
/// sandbox's link of the same name is left alone (`Ok(false)`). Deleting either end of a
/// veth removes both, and the host /32 route with it.
pub async fn delete_host_link(
    h: &Handle,
    name: &str,
    owner: Option<&str>,
) -> Result<bool, NetlinkError> {
    let Some(l) = link_by_name(h, name).await? else {
        return Ok(false);
    };
    if let (Some(owner), Some(alias)) = (owner, link_alias(&l))
        && alias.starts_with("vpc-ebpf:")
        && alias != owner_alias(owner)
    {
        tracing::info!(
            name,
            alias,
            "host veth belongs to another sandbox of the pod; left alone"
        );
        return Ok(false);
    }
    match h.link().del(l.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) => {
            let e = op(format!("deleting {name}"))(e);
            if is_not_found(&e) { Ok(false) } else { Err(e) }
        }
    }
}

/// Every IPv4 route of the socket's namespace (main table and the rest).
async fn ipv4_routes(
    h: &Handle,
    what: &'static str,
) -> Result<Vec<rtnetlink::packet_route::route::RouteMessage>, NetlinkError> {
    h.route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(op(what))
}

/// The interface a host route to `ip`/32 leaves by, if there is one.
pub async fn host_route_oif(h: &Handle, ip: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
    for r in ipv4_routes(h, "listing host routes").await? {
        if r.header.destination_prefix_length != 32 {
            continue;
        }
        let dst = r.attributes.iter().any(|a| {
            matches!(a, RouteAttribute::Destination(rtnetlink::packet_route::route::RouteAddress::Inet(d)) if *d == ip)
        });
        if dst
            && let Some(oif) = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        {
            return Ok(Some(oif));
        }
    }
    Ok(None)
}

/// Addresses of a link (CHECK).
pub async fn ipv4_addrs(h: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut out = Vec::new();
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    while let Some(a) = addrs.try_next().await.map_err(op("listing addresses"))? {
        for attr in &a.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                out.push((*ip, a.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// Whether the pod has its default route via the gateway on `index`.
pub async fn has_default_via_gateway(h: &Handle, index: u32) -> Result<bool, NetlinkError> {
    let gw = GATEWAY_IP;
    for r in ipv4_routes(h, "listing pod routes").await? {
        let via = r.attributes.iter().any(|a| {
            matches!(a, RouteAttribute::Gateway(rtnetlink::packet_route::route::RouteAddress::Inet(g)) if *g == gw)
        });
        let oif = r
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index));
        if r.header.destination_prefix_length == 0 && via && oif {
            return Ok(true);
        }
    }
    Ok(false)
}
