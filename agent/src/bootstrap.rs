//! Start-up: find out what the node is (IMDS, EC2), then rebuild the datastore from the
//! checkpoint, EC2 and the pod routes that still exist on the host, so no pod loses its
//! address and no address is handed to two pods.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path, time::Duration};

use tracing::{error, info, warn};

use crate::{
    aws::{
        ec2::{Ec2, Ec2Error, EniInfo},
        imds::{ImdsError, InstanceMetadata},
    },
    config::Config,
    host::{HostError, PodRoute},
    ipam::{
        checkpoint,
        pool::InstanceLimits,
        store::{AttachmentKey, PodMeta, Store},
        sync::{self, SyncReport},
    },
    pending,
    reconcile::{Node, views},
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Imds(#[from] ImdsError),
    #[error(transparent)]
    Ec2(#[from] Ec2Error),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(
        "EC2 shows no ENI at device index 0 for instance {0}; is the EC2 endpoint the right one?"
    )]
    NoPrimaryEni(String),
    #[error("IMDS does not show the primary ENI {0} (MAC {1})")]
    PrimaryNotInImds(String, String),
}

impl StartError {
    /// Worth retrying: the service may come back (EC2 down at start, IMDS slow).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Imds(_) | Self::Host(_) | Self::PrimaryNotInImds(..) => true,
            Self::Ec2(e) => e.retryable(),
            Self::NoPrimaryEni(_) => false,
        }
    }
}

/// The network name of attachments recovered from host routes: not one a runtime uses,
/// so only the recovery sweep (or CNI GC of a network-less key) ever releases them.
pub const RECOVERED_NETWORK: &str = "vpc-ebpf-recovered";

/// Where the plugin records releases it could not hand over (next to the socket).
pub fn pending_dir(agent_socket: &Path) -> std::path::PathBuf {
    agent_socket
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join("pending-release")
}

/// Reads the instance's limits and ENIs from EC2, given what IMDS said.
pub async fn discover(
    meta: &InstanceMetadata,
    ec2: &Ec2,
) -> Result<(Node, Vec<EniInfo>), StartError> {
    let limits = ec2.instance_type_limits(&meta.instance_type).await?;
    let enis = ec2.attached_enis(&meta.instance_id).await?;
    let primary = enis
        .iter()
        .find(|e| e.attachment.as_ref().is_some_and(|a| a.device_index == 0))
        .ok_or_else(|| StartError::NoPrimaryEni(meta.instance_id.clone()))?;
    let pmeta = meta
        .enis
        .iter()
        .find(|e| e.mac.eq_ignore_ascii_case(&primary.mac))
        .ok_or_else(|| StartError::PrimaryNotInImds(primary.id.clone(), primary.mac.clone()))?;
    let node = Node {
        instance_id: meta.instance_id.clone(),
        instance_type: meta.instance_type.clone(),
        region: meta.region.clone(),
        subnet_id: primary.subnet_id.clone(),
        subnet_cidr: pmeta.subnet_cidr.clone(),
        vpc_cidrs: pmeta.vpc_cidrs.clone(),
        security_groups: primary.security_groups.clone(),
        primary_eni: primary.id.clone(),
        primary_ip: primary.primary_ip,
        primary_mac: primary.mac.clone(),
        limits: InstanceLimits {
            max_enis: limits.max_enis,
            slots_per_eni: limits.ipv4_per_eni,
        },
    };
    Ok((node, enis))
}

/// The datastore as it should be after a start.
#[derive(Debug)]
pub struct Restored {
    pub store: Store,
    pub unmanaged_indexes: BTreeSet<u32>,
    pub sync: SyncReport,
    pub released_pending: usize,
    pub recovered: Vec<PodRoute>,
}

/// Loads the checkpoint; a corrupt one is moved aside (never silently overwritten) and
/// the store is rebuilt from EC2 and the host routes instead.
fn load_checkpoint(path: &Path, config: &Config) -> Store {
    let cooldown_ms = u64::try_from(config.ip_cooldown.as_millis()).unwrap_or(u64::MAX);
    match checkpoint::load(path) {
        Ok(Some(mut s)) => {
            if s.mode != config.mode {
                warn!(from = ?s.mode, to = ?config.mode, "ENABLE_PREFIX_DELEGATION changed since the checkpoint; pods keep their addresses, new ones come from the new mode");
                s.mode = config.mode;
            }
            s.cooldown_ms = cooldown_ms;
            s
        }
        Ok(None) => Store::new(config.mode, cooldown_ms),
        Err(e) => {
            let aside = path.with_extension(format!("corrupt-{}", crate::rpc::now_ms()));
            error!(error = %e, moved_to = %aside.display(), "the checkpoint is unreadable; rebuilding from EC2 and the pod routes on this host");
            if let Err(e) = std::fs::rename(path, &aside) {
                error!(error = %e, "could not move the unreadable checkpoint aside");
            }
            Store::new(config.mode, cooldown_ms)
        }
    }
}

/// Rebuilds the datastore: checkpoint, then EC2's truth, then releases recorded by the
/// plugin while we were down, then addresses pods on this host still use. Saves the
/// result before returning.
pub fn restore(
    config: &Config,
    node: &Node,
    enis: &[EniInfo],
    routes: &[PodRoute],
    now_ms: u64,
) -> Restored {
    let mut store = load_checkpoint(&config.checkpoint, config);
    let (views, unmanaged_indexes) = views(enis, &node.instance_id);
    let report = sync::merge(&mut store, &views);
    crate::reconcile::log_report(&report);
    let applied = pending::apply(&pending_dir(&config.agent_socket), &mut store, now_ms);
    let recovered = claim_routed(&mut store, routes, now_ms);
    let released_pending = applied.freed;
    match checkpoint::save(&config.checkpoint, &store) {
        // Only now are the recorded releases safe to forget.
        Ok(()) => applied.remove(),
        Err(e) => error!(error = %e, "could not save the restored checkpoint"),
    }
    Restored {
        store,
        unmanaged_indexes,
        sync: report,
        released_pending,
        recovered,
    }
}

/// Every pod route to an address the store does not show as assigned is a pod we lost
/// track of (a checkpoint lost or older than the pod): hold its address so nobody else
/// gets it.
fn claim_routed(store: &mut Store, routes: &[PodRoute], now_ms: u64) -> Vec<PodRoute> {
    let assigned: BTreeSet<Ipv4Addr> = store.assignments().map(|(_, _, ip, _)| ip).collect();
    let mut out = Vec::new();
    for r in routes.iter().filter(|r| !assigned.contains(&r.ip)) {
        let key = recovered_key(&r.ifname);
        match store.claim(r.ip, &key, &PodMeta::default(), now_ms) {
            Ok(()) => {
                warn!(ip = %r.ip, veth = %r.ifname, "holding an address a pod on this host uses that the checkpoint did not know");
                out.push(r.clone());
            }
            Err(e) => {
                warn!(ip = %r.ip, veth = %r.ifname, error = %e, "a pod route points at an address this node does not hold");
            }
        }
    }
    out
}

pub fn recovered_key(ifname: &str) -> AttachmentKey {
    AttachmentKey {
        network: RECOVERED_NETWORK.into(),
        container_id: ifname.into(),
        ifname: "eth0".into(),
    }
}

/// Releases recovered holds whose pod route is gone (the pod was deleted). Returns how
/// many were released.
pub fn sweep_recovered(store: &mut Store, routes: &[PodRoute], now_ms: u64) -> usize {
    let live: BTreeSet<(&str, Ipv4Addr)> =
        routes.iter().map(|r| (r.ifname.as_str(), r.ip)).collect();
    let gone: Vec<AttachmentKey> = store
        .assignments()
        .filter(|(k, _, ip, _)| {
            k.network == RECOVERED_NETWORK && !live.contains(&(k.container_id.as_str(), *ip))
        })
        .map(|(k, ..)| k.clone())
        .collect();
    for k in &gone {
        if let Some(ip) = store.release(k, now_ms) {
            info!(%ip, veth = %k.container_id, "released a recovered address: its pod is gone");
        }
    }
    gone.len()
}

/// Waits between start attempts: quick at first, then every 10 s.
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::pool::Mode;

    fn route(ip: &str, name: &str) -> PodRoute {
        PodRoute {
            ip: ip.parse().unwrap(),
            ifindex: 7,
            ifname: name.into(),
        }
    }

    #[test]
    fn routed_addresses_are_held_then_released_when_the_route_goes() {
        let mut s = Store::new(Mode::SecondaryIp, 1_000);
        s.upsert_eni("eni-0", 0, "m", "10.0.0.10".parse().unwrap());
        s.add_ips(
            "eni-0",
            &["10.0.0.20".parse().unwrap(), "10.0.0.21".parse().unwrap()],
        )
        .unwrap();
        let known = AttachmentKey {
            network: "aws-cni".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        let ip20: Ipv4Addr = "10.0.0.20".parse().unwrap();
        s.claim(ip20, &known, &PodMeta::default(), 0).unwrap();
        let routes = [
            route("10.0.0.20", "eniaaa"),
            route("10.0.0.21", "enibbb"),
            route("10.0.0.99", "eniccc"),
            route("10.0.0.10", "eniddd"),
        ];
        let rec = claim_routed(&mut s, &routes, 0);
        assert_eq!(rec, vec![route("10.0.0.21", "enibbb")]);
        assert_eq!(s.lookup(&known), Some(ip20));
        assert_eq!(
            s.lookup(&recovered_key("enibbb")),
            Some("10.0.0.21".parse().unwrap())
        );
        // Nothing else can be handed out: .21 is held.
        assert!(
            s.assign(&recovered_key("x"), &PodMeta::default(), 0)
                .is_err()
        );
        assert_eq!(sweep_recovered(&mut s, &routes, 10), 0);
        assert_eq!(sweep_recovered(&mut s, &routes[..1], 10), 1);
        assert_eq!(s.lookup(&recovered_key("enibbb")), None);
        assert_eq!(
            s.lookup(&known),
            Some(ip20),
            "checkpointed pods are not swept"
        );
    }

    #[test]
    fn retry_delays_are_bounded() {
        assert_eq!(retry_delay(0), Duration::from_millis(250));
        assert_eq!(retry_delay(2), Duration::from_secs(1));
        assert_eq!(retry_delay(30), Duration::from_secs(10));
    }
}
