//! Keeps the eBPF dataplane in step with IPAM and the kernel: node settings once, ENIs as
//! they appear (found by MAC, brought up with their primary address so the kernel can
//! resolve the subnet gateway on them), pods as the plugin reports them, conntrack GC and
//! the packet counters exported as metrics.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Mutex,
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};
use vpc_ebpf_common::counters::{direction, reason};

use crate::{
    config::ipnet_lite::Cidr,
    dataplane::{Dataplane, DataplaneError, EndpointSpec, EniSpec, NodeSpec, monotonic_now_ns},
    host::{Host, Link},
    metrics::{Metrics, PacketLabels},
    rpc::Shared,
};

const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// Linux's default `ip_local_port_range`.
pub const LINUX_EPHEMERAL_PORTS: (u16, u16) = (32_768, 60_999);

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
pub fn default_service_cidr(vpc_cidrs: &[Cidr]) -> Cidr {
    let in_ten = vpc_cidrs.iter().any(|c| c.addr.octets()[0] == 10);
    if in_ten {
        Cidr {
            addr: Ipv4Addr::new(172, 20, 0, 0),
            len: 16,
        }
    } else {
        Cidr {
            addr: Ipv4Addr::new(10, 100, 0, 0),
            len: 16,
        }
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The subnet's gateway: its first host address, as in every VPC subnet.
pub fn gateway_of(subnet: Cidr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.addr) + 1)
}

/// The dataplane and what the agent knows about where things are in the kernel.
pub struct Datapath {
    dp: Mutex<Dataplane>,
    host: Host,
    /// The subnet gateway: next hop out of every ENI.
    gateway: Ipv4Addr,
    /// ENI id -> (ifindex in the kernel, device index), once found.
    eni_ifindex: Mutex<HashMap<String, (u32, u32)>>,
    counted: Mutex<HashMap<(u8, u16), u64>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Dataplane(#[from] Box<DataplaneError>),
    #[error("the ENI {0} of this pod's address is not up in the kernel yet")]
    EniNotFound(String),
    #[error(transparent)]
    Host(crate::host::HostError),
    #[error("{what} {value:?} is not a MAC address")]
    Mac { what: &'static str, value: String },
}

impl Datapath {
    pub fn new(dp: Dataplane, host: Host, gateway: Ipv4Addr) -> Self {
        Self {
            dp: Mutex::new(dp),
            host,
            gateway,
            eni_ifindex: Mutex::new(HashMap::new()),
            counted: Mutex::new(HashMap::new()),
        }
    }

    fn dp(&self) -> std::sync::MutexGuard<'_, Dataplane> {
        // A panic while holding the lock cannot leave the kernel objects inconsistent
        // (each call is one syscall sequence); keep going with the inner value.
        self.dp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_node(&self, n: &NodeSpec) -> Result<(), DataplaneError> {
        self.dp().set_node(n)
    }

    pub fn eni_ifindex(&self, eni_id: &str) -> Option<u32> {
        self.eni(eni_id).map(|(i, _)| i)
    }

    fn eni(&self, eni_id: &str) -> Option<(u32, u32)> {
        self.eni_ifindex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(eni_id)
            .copied()
    }

    /// Programs a pod: its ENI must already be known. A pod on a secondary ENI also gets
    /// VPC CNI's `from <pod> lookup <eni table>` rule, for the traffic the programs hand
    /// to the kernel.
    pub async fn upsert_endpoint(
        &self,
        ipv4: Ipv4Addr,
        eni_id: &str,
        host_ifindex: u32,
        host_mac: &str,
        pod_mac: &str,
    ) -> Result<(), DatapathError> {
        let (eni_ifindex, device_index) = self
            .eni(eni_id)
            .ok_or_else(|| DatapathError::EniNotFound(eni_id.to_owned()))?;
        if device_index != 0 {
            self.host
                .add_pod_rule(ipv4, device_index + 1)
                .await
                .map_err(DatapathError::Host)?;
        }
        let mac = |what, v: &str| {
            parse_mac(v).ok_or_else(|| DatapathError::Mac {
                what,
                value: v.to_owned(),
            })
        };
        let spec = EndpointSpec {
            ipv4,
            host_ifindex,
            host_mac: mac("host MAC", host_mac)?,
            pod_mac: mac("pod MAC", pod_mac)?,
            eni_ifindex,
        };
        self.dp()
            .upsert_endpoint(&spec)
            .map_err(|e| DatapathError::Dataplane(Box::new(e)))
    }

    /// Takes a pod out: its map entry, programs and ip rule.
    pub async fn remove_endpoint(&self, ipv4: Ipv4Addr) -> Result<(), DatapathError> {
        let r = self.dp().remove_endpoint(ipv4);
        self.host
            .del_pod_rules(ipv4)
            .await
            .map_err(DatapathError::Host)?;
        r.map_err(|e| DatapathError::Dataplane(Box::new(e)))
    }

    /// Removes pod rules of addresses no pod on this node holds any more (deleted while
    /// the agent was down). Returns how many went.
    pub async fn sweep_rules(&self, live: &std::collections::HashSet<Ipv4Addr>) -> usize {
        let Ok(rules) = self.host.pod_rules().await else {
            return 0;
        };
        let mut n = 0;
        for (ip, ..) in rules {
            if !live.contains(&ip) && self.host.del_pod_rules(ip).await.is_ok() {
                n += 1;
            }
        }
        n
    }

    pub fn endpoint_attached(&self, ipv4: Ipv4Addr) -> bool {
        self.dp().endpoint_attached(ipv4)
    }

    pub fn endpoints(&self) -> Result<Vec<EndpointSpec>, DataplaneError> {
        self.dp().endpoints()
    }

    pub async fn reprogram(&self, ep: &EndpointSpec) -> Result<(), DatapathError> {
        self.dp()
            .upsert_endpoint(ep)
            .map_err(|e| DatapathError::Dataplane(Box::new(e)))?;
        let device = self
            .eni_ifindex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .find(|(i, _)| *i == ep.eni_ifindex)
            .map(|(_, d)| *d);
        if let Some(d) = device.filter(|d| *d != 0) {
            self.host
                .add_pod_rule(ep.ipv4, d + 1)
                .await
                .map_err(DatapathError::Host)?;
        }
        Ok(())
    }

    pub fn set_hostports(
        &self,
        ipv4: Ipv4Addr,
        maps: &[(u8, u16, u16)],
    ) -> Result<(), DataplaneError> {
        self.dp().set_hostports(ipv4, maps)
    }

    /// Brings every ENI of the store that the kernel shows into the dataplane; forgets
    /// ENIs the store no longer has. Returns how many are programmed.
    pub async fn sync_enis(
        &self,
        enis: &[(String, u32, String, Ipv4Addr)],
    ) -> Result<usize, DatapathError> {
        let (host, gateway) = (&self.host, self.gateway);
        let links = host.links_by_mac().await.unwrap_or_default();
        let mut found: BTreeMap<String, (u32, u32, EniSpec)> = BTreeMap::new();
        for (id, device_index, mac, primary_ip) in enis {
            let Some(link) = links.get(&mac.to_ascii_lowercase()) else {
                continue;
            };
            let Some(mac_bytes) = parse_mac(mac) else {
                continue;
            };
            if *device_index != 0
                && let Err(e) = host.ensure_up_with_address(link.index, *primary_ip).await
            {
                warn!(eni = %id, iface = %link.name, error = %e, "could not bring the ENI up");
                continue;
            }
            found.insert(
                id.clone(),
                (
                    link.index,
                    *device_index,
                    EniSpec {
                        ifindex: link.index,
                        mac: mac_bytes,
                        primary_ip: *primary_ip,
                        gateway,
                        is_primary: *device_index == 0,
                    },
                ),
            );
        }
        let tables = self.program_enis(&found, enis)?;
        for (ifindex, table) in tables {
            self.host
                .ensure_eni_table(ifindex, table, gateway)
                .await
                .map_err(DatapathError::Host)?;
        }
        Ok(self
            .eni_ifindex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len())
    }

    /// The synchronous part of `sync_enis`: map entries and program attachments. Returns
    /// the (ifindex, table) of secondary ENIs newly programmed.
    fn program_enis(
        &self,
        found: &BTreeMap<String, (u32, u32, EniSpec)>,
        enis: &[(String, u32, String, Ipv4Addr)],
    ) -> Result<Vec<(u32, u32)>, DatapathError> {
        let mut known = self
            .eni_ifindex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut dp = self.dp();
        let mut tables = Vec::new();
        for (id, (ifindex, device, spec)) in found {
            if known.get(id).map(|(i, _)| i) != Some(ifindex) {
                dp.upsert_eni(spec)
                    .map_err(|e| DatapathError::Dataplane(Box::new(e)))?;
                info!(eni = %id, ifindex, "ENI programmed");
                known.insert(id.clone(), (*ifindex, *device));
                if *device != 0 {
                    tables.push((*ifindex, *device + 1));
                }
            }
        }
        let gone: Vec<(String, u32)> = known
            .iter()
            .filter(|(id, _)| !enis.iter().any(|e| &e.0 == *id))
            .map(|(id, (i, _))| (id.clone(), *i))
            .collect();
        for (id, ifindex) in gone {
            if let Err(e) = dp.remove_eni(ifindex) {
                warn!(eni = %id, error = %e, "could not remove a detached ENI from the dataplane");
            }
            known.remove(&id);
        }
        drop(dp);
        *self
            .eni_ifindex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = known;
        Ok(tables)
    }

    /// Adds what the programs counted since the last call to the packet metrics.
    pub fn export_counters(&self, m: &Metrics) {
        let rows = match self.dp().counters() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "reading the dataplane counters failed");
                return;
            }
        };
        let mut totals: HashMap<(u8, u16), u64> = HashMap::new();
        for r in rows {
            *totals.entry((r.key.direction, r.key.reason)).or_default() += r.value.packets;
        }
        let mut counted = self
            .counted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (k, total) in totals {
            let before = counted.insert(k, total).unwrap_or(0);
            m.packets
                .get_or_create(&PacketLabels {
                    direction: direction::name(k.0).into(),
                    reason: reason::name(k.1).into(),
                })
                .inc_by(total.saturating_sub(before));
        }
    }

    pub fn gc(&self) -> Result<usize, DataplaneError> {
        self.dp().gc_conntrack(monotonic_now_ns())
    }
}

/// The ENIs of the store, as `sync_enis` wants them.
pub async fn store_enis(shared: &Shared) -> Vec<(String, u32, String, Ipv4Addr)> {
    let st = shared.state.lock().await;
    st.store
        .enis()
        .map(|e| (e.id.clone(), e.device_index, e.mac.clone(), e.primary_ip))
        .collect()
}

/// Runs until `stop`: ENI sync every second (new ENIs show up in the kernel a moment
/// after EC2 attaches them), conntrack GC and counters every 10 s.
pub async fn run(dp: std::sync::Arc<Datapath>, shared: Shared, mut stop: watch::Receiver<bool>) {
    let mut tick = 0u64;
    loop {
        let enis = store_enis(&shared).await;
        if let Err(e) = dp.sync_enis(&enis).await {
            warn!(error = %e, "ENI sync failed");
        }
        if tick.is_multiple_of(10) {
            match dp.gc() {
                Ok(n) if n > 0 => info!(expired = n, "conntrack GC"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "conntrack GC failed"),
            }
            dp.export_counters(&shared.metrics);
        }
        tick += 1;
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// What a pod route says about its host veth, for rebuilding endpoints after a restart.
pub fn link_mac<S: std::hash::BuildHasher>(
    links: &HashMap<String, Link, S>,
    ifindex: u32,
) -> Option<String> {
    links
        .values()
        .find(|l| l.index == ifindex)
        .map(|l| l.mac.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_gateways() {
        assert_eq!(parse_mac("02:00:0a:FF:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(parse_mac("zz:00:0a:ff:00:01"), None);
        let subnet: Cidr = "10.0.16.0/20".parse().unwrap();
        assert_eq!(gateway_of(subnet), Ipv4Addr::new(10, 0, 16, 1));
    }

    #[test]
    fn service_cidr_follows_eks() {
        let ten: Cidr = "10.0.0.0/16".parse().unwrap();
        let other: Cidr = "192.168.0.0/16".parse().unwrap();
        assert_eq!(default_service_cidr(&[ten]).to_string(), "172.20.0.0/16");
        assert_eq!(default_service_cidr(&[other]).to_string(), "10.100.0.0/16");
    }

    #[test]
    fn local_port_range_text() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32_768, 60_999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65_535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_port_range("a b"), None);
    }
}
