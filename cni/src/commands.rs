//! The CNI commands: orchestration of the agent calls and the pod's interfaces, with
//! rollback on ADD and keep-going teardown on DEL.

use std::{net::Ipv4Addr, path::Path};

use serde_json::Value;
use tracing::{info, warn};
use vpc_ebpf_rpc::{report::chain, v1};

use crate::{
    agent, names,
    netlink::{self, NetlinkError},
    spec::{
        CniError, ErrorCode,
        config::{NetConf, Protocol},
        env::Env,
        result::AddResult,
    },
};

fn attachment(env: &Env, conf: &NetConf) -> v1::Attachment {
    v1::Attachment {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

fn pod(env: &Env) -> v1::Pod {
    v1::Pod {
        namespace: env.args.namespace.clone().unwrap_or_default(),
        name: env.args.name.clone().unwrap_or_default(),
        uid: env.args.uid.clone().unwrap_or_default(),
        infra_container_id: env.args.infra_container_id.clone().unwrap_or_default(),
    }
}

/// VPC CNI's name for Kubernetes pods; for runtimes that pass no pod identity, the same
/// scheme over the container ID and interface.
pub fn host_ifname(env: &Env, conf: &NetConf) -> String {
    match (&env.args.namespace, &env.args.name) {
        (Some(ns), Some(name)) => names::host_veth_name(&conf.veth_prefix, ns, name),
        _ => names::host_veth_name(&conf.veth_prefix, &env.container_id, &env.ifname),
    }
}

fn netlink_error(what: &str, e: &NetlinkError) -> CniError {
    CniError::new(ErrorCode::Netlink, what.to_owned(), chain(e))
}

pub async fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let sockets = netlink::open(Path::new(&env.netns)).map_err(|e| match e {
        NetlinkError::Netns { .. } => CniError::new(
            ErrorCode::ContainerUnknown,
            "the container's network namespace does not exist",
            chain(&e),
        ),
        NetlinkError::NotNetns { .. } => CniError::new(
            ErrorCode::InvalidEnvironment,
            "CNI_NETNS is not a network namespace",
            chain(&e),
        ),
        other => netlink_error("opening netlink sockets", &other),
    })?;
    let mut agent = agent::connect(Path::new(&conf.agent_socket)).await?;
    let att = attachment(env, conf);
    let reply = agent
        .add_network(v1::AddNetworkRequest {
            attachment: Some(att.clone()),
            pod: Some(pod(env)),
            netns: env.netns.clone(),
            port_mappings: conf
                .port_mappings
                .iter()
                .map(|p| v1::PortMapping {
                    host_port: u32::from(p.host_port),
                    container_port: u32::from(p.container_port),
                    protocol: match p.protocol {
                        Protocol::Tcp => v1::Protocol::Tcp,
                        Protocol::Udp => v1::Protocol::Udp,
                    }
                    .into(),
                    host_ip: p.host_ip.clone(),
                })
                .collect(),
        })
        .await;
    let reply = match reply {
        Ok(r) => r.into_inner(),
        Err(s) => {
            // The agent may have assigned and checkpointed before the connection broke
            // (it was killed mid-call): release, now or when it is back, so the address
            // is not held for a sandbox the runtime will never DEL by this key.
            if agent::outcome_unknown(&s) {
                release_or_remember(&mut agent, conf, &att, pod(env)).await;
            }
            return Err(agent::map_status("ADD", &s));
        }
    };
    let ip: Ipv4Addr = reply.ipv4.parse().map_err(|_| {
        CniError::new(
            ErrorCode::Agent,
            "the agent answered an invalid address",
            reply.ipv4.clone(),
        )
    })?;
    let host_ifname = host_ifname(env, conf);

    // A repeated ADD of a sandbox that is already set up: answer what exists.
    if reply.existing
        && let (Ok(Some(pod_link)), Ok(Some(host_link))) = (
            netlink::link_by_name(&sockets.pod, &env.ifname).await,
            netlink::link_by_name(&sockets.host, &host_ifname).await,
        )
    {
        return Ok(result(env, &host_ifname, &host_link, &pod_link, ip, conf));
    }

    match build_and_report(&sockets, &mut agent, env, conf, &att, &host_ifname, ip).await {
        Ok(v) => Ok(v),
        Err(e) => {
            // Undo everything before reporting, so the node is never left half set up.
            // Only the veth this ADD made: one of the same name may be another sandbox's.
            if let Err(re) =
                netlink::delete_host_link(&sockets.host, &host_ifname, Some(&env.container_id))
                    .await
            {
                warn!(error = %re, "rollback: deleting the host veth failed");
            }
            if let Some(l) = netlink::link_by_name(&sockets.pod, &env.ifname)
                .await
                .ok()
                .flatten()
            {
                let _ = sockets.pod.link().del(l.header.index).execute().await;
            }
            release_or_remember(&mut agent, conf, &att, pod(env)).await;
            Err(e)
        }
    }
}

/// Releases the attachment's address; when the agent cannot be reached, records the
/// release for the agent's next start.
async fn release_or_remember(
    agent: &mut agent::Client,
    conf: &NetConf,
    att: &v1::Attachment,
    pod: v1::Pod,
) {
    let r = agent
        .del_network(v1::DelNetworkRequest {
            attachment: Some(att.clone()),
            pod: Some(pod),
        })
        .await;
    if let Err(s) = r {
        warn!(error = %s, "rollback: the agent did not take the release; recording it");
        if let Err(e) = agent::remember_release(Path::new(&conf.agent_socket), att) {
            warn!(error = %e, "rollback: recording the release failed");
        }
    }
}

async fn build_and_report(
    sockets: &netlink::Sockets,
    agent: &mut agent::Client,
    env: &Env,
    conf: &NetConf,
    att: &v1::Attachment,
    host_ifname: &str,
    ip: Ipv4Addr,
) -> Result<Value, CniError> {
    // A host veth of that name belongs to an earlier sandbox of the same pod.
    netlink::delete_host_link(&sockets.host, host_ifname, None)
        .await
        .map_err(|e| netlink_error("removing a stale host veth", &e))?;
    let built = netlink::build(
        sockets,
        &netlink::PodNetwork {
            host_ifname,
            container_id: &env.container_id,
            pod_ifname: &env.ifname,
            ip,
            mtu: conf.mtu,
        },
    )
    .await
    .map_err(|e| netlink_error("setting up the pod's interfaces", &e))?;
    if let Some(limit) = conf.bandwidth.egress {
        let tbf = crate::shaping::tbf(limit, conf.mtu);
        netlink::limit_egress(&sockets.pod, built.pod_ifindex, &tbf)
            .await
            .map_err(|e| {
                netlink_error("limiting what the pod sends (runtimeConfig.bandwidth)", &e)
            })?;
        info!(
            rate_bytes = tbf.rate_bytes,
            burst_bytes = tbf.burst_bytes,
            "egress limited"
        );
    }
    let ready = agent
        .endpoint_ready(v1::EndpointReadyRequest {
            attachment: Some(att.clone()),
            ipv4: ip.to_string(),
            host_ifname: host_ifname.to_owned(),
            host_ifindex: built.host_ifindex,
            host_mac: built.host_mac.to_string(),
            pod_mac: built.pod_mac.to_string(),
            via_host_qdisc: conf.bandwidth.ingress.is_some(),
        })
        .await
        .map_err(|s| agent::map_status("ADD (endpoint ready)", &s))?
        .into_inner();
    if !ready.arp_answered {
        netlink::add_gateway_neighbour(sockets, &env.ifname, built.host_mac)
            .await
            .map_err(|e| netlink_error("adding the gateway neighbour", &e))?;
    }
    info!(%ip, host_ifname, "pod network ready");
    Ok(AddResult {
        host_ifname: host_ifname.to_owned(),
        host_mac: built.host_mac.to_string(),
        container_ifname: env.ifname.clone(),
        container_mac: built.pod_mac.to_string(),
        sandbox: env.netns.clone(),
        address: ip,
    }
    .to_json(conf.cni_version))
}

fn result(
    env: &Env,
    host_ifname: &str,
    host: &rtnetlink::packet_route::link::LinkMessage,
    pod: &rtnetlink::packet_route::link::LinkMessage,
    ip: Ipv4Addr,
    conf: &NetConf,
) -> Value {
    AddResult {
        host_ifname: host_ifname.to_owned(),
        host_mac: netlink::link_mac(host)
            .map(|m| m.to_string())
            .unwrap_or_default(),
        container_ifname: env.ifname.clone(),
        container_mac: netlink::link_mac(pod)
            .map(|m| m.to_string())
            .unwrap_or_default(),
        sandbox: env.netns.clone(),
        address: ip,
    }
    .to_json(conf.cni_version)
}

/// Tears down whatever the host has, releases the address (or remembers to), and reports
/// every failure; what is already gone counts as done.
pub async fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let mut problems = Vec::new();
    let from_prev = conf.prev_result.as_ref().and_then(|p| {
        p["interfaces"][0]["name"]
            .as_str()
            .filter(|n| n.starts_with(&conf.veth_prefix))
            .map(str::to_owned)
    });
    let host_ifname = from_prev.unwrap_or_else(|| host_ifname(env, conf));
    match rtnetlink::new_connection() {
        Ok((connection, host, _)) => {
            tokio::spawn(connection);
            match netlink::delete_host_link(&host, &host_ifname, Some(&env.container_id)).await {
                Ok(removed) => info!(host_ifname, removed, "host veth"),
                Err(e) => problems.push(format!("deleting host veth {host_ifname}: {}", chain(&e))),
            }
        }
        Err(e) => problems.push(format!("opening a netlink socket: {e}")),
    }
    let att = attachment(env, conf);
    let socket = Path::new(&conf.agent_socket);
    let released = match agent::connect(socket).await {
        Ok(mut a) => a
            .del_network(v1::DelNetworkRequest {
                attachment: Some(att.clone()),
                pod: Some(pod(env)),
            })
            .await
            .map(|r| r.into_inner().released_ipv4)
            .map_err(|s| s.to_string()),
        Err(e) => Err(e.details),
    };
    match released {
        Ok(ip) => info!(ip, "released"),
        Err(why) => {
            warn!(
                why,
                "agent unreachable; remembering the release for when it starts"
            );
            if let Err(e) = agent::remember_release(socket, &att) {
                problems.push(format!(
                    "the agent is unreachable ({why}) and the release could not be recorded: {e}"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::Netlink,
            "DEL could not finish",
            problems.join("; "),
        ))
    }
}

pub async fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let fail = |what: String| CniError::new(ErrorCode::CheckFailed, "CHECK failed", what);
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "CHECK needs prevResult",
            "the runtime must pass the ADD result as prevResult",
        )
    })?;
    let ip =
        AddResult::address_in(prev).ok_or_else(|| fail("prevResult has no IPv4 address".into()))?;
    let sockets = netlink::open(Path::new(&env.netns)).map_err(|e| fail(chain(&e)))?;
    let pod_link = netlink::link_by_name(&sockets.pod, &env.ifname)
        .await
        .map_err(|e| fail(chain(&e)))?
        .ok_or_else(|| fail(format!("interface {} is missing in the pod", env.ifname)))?;
    let addrs = netlink::ipv4_addrs(&sockets.pod, pod_link.header.index)
        .await
        .map_err(|e| fail(chain(&e)))?;
    if !addrs.contains(&(ip, 32)) {
        return Err(fail(format!("{} has {addrs:?}, not {ip}/32", env.ifname)));
    }
    if !netlink::has_default_via_gateway(&sockets.pod, pod_link.header.index)
        .await
        .map_err(|e| fail(chain(&e)))?
    {
        return Err(fail("the pod has no default route via 169.254.1.1".into()));
    }
    let host_ifname = host_ifname(env, conf);
    if netlink::link_by_name(&sockets.host, &host_ifname)
        .await
        .map_err(|e| fail(chain(&e)))?
        .is_none()
    {
        return Err(fail(format!("host veth {host_ifname} is missing")));
    }
    if netlink::host_route_oif(&sockets.host, ip)
        .await
        .map_err(|e| fail(chain(&e)))?
        .is_none()
    {
        return Err(fail(format!("the host has no route to {ip}/32")));
    }
    let mut agent = agent::connect(Path::new(&conf.agent_socket)).await?;
    let known = agent
        .check_network(v1::CheckNetworkRequest {
            attachment: Some(attachment(env, conf)),
            ipv4: ip.to_string(),
            host_ifname: host_ifname.clone(),
        })
        .await
        .map_err(|s| agent::map_status("CHECK", &s))?
        .into_inner();
    if known.ipv4 != ip.to_string() {
        return Err(fail(format!(
            "the agent has {:?} for this attachment, the pod has {ip}",
            known.ipv4
        )));
    }
    if !known.dataplane_attached {
        return Err(fail(
            "the agent has not taken the endpoint into its dataplane".into(),
        ));
    }
    Ok(())
}

pub async fn status(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |d: String| {
        CniError::new(
            ErrorCode::NotAvailable,
            "vpc-ebpf cannot set up pods now",
            d,
        )
    };
    let mut agent = agent::connect(Path::new(&conf.agent_socket))
        .await
        .map_err(|e| unavailable(e.details))?;
    let st = agent
        .status(v1::StatusRequest {})
        .await
        .map_err(|s| unavailable(s.message().to_owned()))?
        .into_inner();
    if st.ready {
        Ok(())
    } else {
        Err(unavailable(st.detail))
    }
}

pub async fn gc(conf: &NetConf) -> Result<(), CniError> {
    // Without the list every attachment would look stale: refuse, release nothing.
    let Some(valid) = conf.valid_attachments.clone() else {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "GC needs the runtime's cni.dev/valid-attachments",
            "the configuration has no cni.dev/valid-attachments list, so nothing can be told \
             stale; nothing was released",
        ));
    };
    let keep = valid
        .into_iter()
        .map(|a| v1::Attachment {
            network: conf.name.clone(),
            container_id: a.container_id,
            ifname: a.ifname,
        })
        .collect();
    let mut agent = agent::connect(Path::new(&conf.agent_socket)).await?;
    let released = agent
        .garbage_collect(v1::GarbageCollectRequest {
            network: conf.name.clone(),
            keep,
        })
        .await
        .map_err(|s| agent::map_status("GC", &s))?
        .into_inner();
    let (connection, host, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::new(ErrorCode::Netlink, "GC", e.to_string()))?;
    tokio::spawn(connection);
    let mut problems = Vec::new();
    // The agent answers the released attachments and their addresses in the same order.
    for (att, ip) in released.released.iter().zip(&released.released_ipv4) {
        info!(container = %att.container_id, ifname = %att.ifname, %ip, "GC released a stale attachment");
        let Ok(ip) = ip.parse::<Ipv4Addr>() else {
            continue;
        };
        match netlink::host_route_oif(&host, ip).await {
            Ok(Some(oif)) => {
                if let Ok(Some(l)) = netlink::link_name_by_index(&host, oif).await
                    && l.starts_with(&conf.veth_prefix)
                    && let Err(e) =
                        netlink::delete_host_link(&host, &l, Some(&att.container_id)).await
                {
                    problems.push(format!("deleting {l}: {}", chain(&e)));
                }
            }
            Ok(None) => {}
            Err(e) => problems.push(chain(&e)),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::Netlink,
            "GC could not remove every leftover",
            problems.join("; "),
        ))
    }
}
