//! The dataplane owner: one task owns the loaded programs, their maps and links, and the
//! kernel state that goes with them (ENIs brought up with their per-ENI routing tables,
//! pods' `ip rule`s). Everyone else sends it commands through a [`DataplaneHandle`]. It
//! runs on a thread of its own, so its bpf and netlink syscalls never block the agent's
//! async workers, and commands are applied one at a time, in order.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use vpc_ebpf_common::counters::{direction, reason};
use vpc_ebpf_rpc::{
    report::Chain,
    types::{HostPort, MacAddr},
};

use super::{
    CounterRow, Dataplane, DataplaneError, EndpointSpec, EniSpec, NodeSpec, monotonic_now_ns,
    settings::NodeSettings,
};
use crate::{
    host::Host,
    ipam::EniDesc,
    metrics::{Metrics, PacketLabels},
};

/// A pod as the dataplane takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointDesc {
    pub ip: Ipv4Addr,
    pub host_ifindex: u32,
    pub host_mac: MacAddr,
    pub pod_mac: MacAddr,
    /// The ENI that owns `ip`: programmed on the spot when it is newer than the last
    /// ENI set.
    pub eni: EniDesc,
    pub host_ports: Vec<HostPort>,
    /// Deliver through the host veth's qdisc (the pod's received traffic is limited);
    /// `None` keeps what the pinned entry says (a restart does not know).
    pub via_host_qdisc: Option<bool>,
}

type Reply<T> = oneshot::Sender<Result<T, DataplaneError>>;

/// What the (pinned) maps hold: what an earlier run programmed.
#[derive(Clone, Debug, Default)]
pub struct Programmed {
    pub endpoints: Vec<EndpointSpec>,
    pub host_ports: BTreeMap<Ipv4Addr, Vec<HostPort>>,
}

enum Command {
    SetNode(NodeSettings, Reply<()>),
    SetEnis(Vec<EniDesc>, Reply<usize>),
    Upsert(Box<EndpointDesc>, Reply<()>),
    Remove(Ipv4Addr, Reply<()>),
    Attached(Ipv4Addr, Reply<bool>),
    Programmed(Reply<Programmed>),
    RemoveOtherVersions(Reply<Vec<std::path::PathBuf>>),
    SweepRules(HashSet<Ipv4Addr>, Reply<usize>),
    ExportCounters(Reply<()>),
    ApplyPolicy(
        BTreeMap<Ipv4Addr, crate::policy::compile::PodRules>,
        bool,
        Reply<PolicyApplied>,
    ),
}

/// What a policy apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyApplied {
    pub sets_written: usize,
    pub pods_changed: usize,
    pub sets_removed: usize,
    /// Pods isolated in at least one direction, and rule sets, after the change.
    pub pods: usize,
    pub sets: usize,
}

/// How the rest of the agent reaches the dataplane.
#[derive(Clone, Debug)]
pub struct DataplaneHandle {
    tx: mpsc::Sender<Command>,
}

impl DataplaneHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, DataplaneError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| DataplaneError::Stopped)?;
        rx.await.map_err(|_| DataplaneError::Stopped)?
    }

    /// The node-wide tables and config; until the first call the programs hand every
    /// packet to the kernel.
    pub async fn set_node(&self, s: NodeSettings) -> Result<(), DataplaneError> {
        self.ask(|r| Command::SetNode(s, r)).await
    }

    /// Makes the programmed ENIs those of `enis` that are in the kernel (the rest are
    /// retried every second). Returns how many are programmed.
    pub async fn set_enis(&self, enis: Vec<EniDesc>) -> Result<usize, DataplaneError> {
        self.ask(|r| Command::SetEnis(enis, r)).await
    }

    pub async fn upsert(&self, ep: EndpointDesc) -> Result<(), DataplaneError> {
        self.ask(|r| Command::Upsert(Box::new(ep), r)).await
    }

    /// Takes a pod out: its map entries, programs, hostPorts and ip rule. An unknown pod
    /// is success.
    pub async fn remove(&self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        self.ask(|r| Command::Remove(ip, r)).await
    }

    /// Whether the pod's entry exists and its programs run on its veth.
    pub async fn attached(&self, ip: Ipv4Addr) -> Result<bool, DataplaneError> {
        self.ask(|r| Command::Attached(ip, r)).await
    }

    /// What the (pinned) maps hold: what an earlier run programmed.
    pub async fn programmed(&self) -> Result<Programmed, DataplaneError> {
        self.ask(Command::Programmed).await
    }

    /// Removes the pins of other layout versions (see
    /// [`Dataplane::remove_other_versions`]).
    pub async fn remove_other_versions(&self) -> Result<Vec<std::path::PathBuf>, DataplaneError> {
        self.ask(Command::RemoveOtherVersions).await
    }

    /// Removes the pod rules of addresses not in `live`. Returns how many went.
    pub async fn sweep_rules(&self, live: HashSet<Ipv4Addr>) -> Result<usize, DataplaneError> {
        self.ask(|r| Command::SweepRules(live, r)).await
    }

    /// Makes the policy maps enforce `desired` (every local pod's compiled rules; pods
    /// absent are not isolated), changing only what differs from what they enforce now.
    pub async fn apply_policy(
        &self,
        desired: BTreeMap<Ipv4Addr, crate::policy::compile::PodRules>,
    ) -> Result<PolicyApplied, DataplaneError> {
        self.ask(|r| Command::ApplyPolicy(desired, false, r)).await
    }

    /// Changes the policy of the pods in `changes` only; the others keep what the maps
    /// hold (a new pod's policy before the watches have listed).
    pub async fn amend_policy(
        &self,
        changes: BTreeMap<Ipv4Addr, crate::policy::compile::PodRules>,
    ) -> Result<PolicyApplied, DataplaneError> {
        self.ask(|r| Command::ApplyPolicy(changes, true, r)).await
    }

    /// Adds what the programs counted since the last export to the packet metrics.
    pub async fn export_counters(&self) -> Result<(), DataplaneError> {
        self.ask(Command::ExportCounters).await
    }
}

/// Keeps the dataplane's ENIs those of the store: every change IPAM publishes is sent on.
pub async fn follow_enis(
    dp: DataplaneHandle,
    mut enis: tokio::sync::watch::Receiver<Vec<EniDesc>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            r = enis.changed() => if r.is_err() { return },
        }
        let want = enis.borrow_and_update().clone();
        if let Err(e) = dp.set_enis(want).await {
            warn!(error = %Chain(&e), "programming the ENIs failed; retrying on the next change or tick");
        }
    }
}

struct Owner {
    dp: Dataplane,
    host: Host,
    gateway: Ipv4Addr,
    /// The ENIs the agent holds (last `SetEnis`, plus any an endpoint brought).
    wanted: BTreeMap<String, EniDesc>,
    /// ENI id -> (ifindex, device index), once programmed.
    programmed: HashMap<String, (u32, u32)>,
    /// ENI id -> the gateway it was programmed with.
    gateways: HashMap<String, Ipv4Addr>,
    metrics: Arc<Metrics>,
    counted: HashMap<(u8, u16), u64>,
    /// What the policy maps enforce; read from the (pinned) maps on first use, so that a
    /// restarted agent changes only what differs.
    policy: Option<crate::policy::sets::Applied>,
    /// `AWS_VPC_ENI_MTU`, from the node's settings.
    eni_mtu: Option<u32>,
}

const TICK: Duration = Duration::from_secs(1);
/// Ticks between conntrack GCs and counter exports.
const GC_EVERY: u64 = 10;

/// Starts the owner on its own thread. `gateway` is the subnet gateway, next hop out of
/// every ENI.
pub fn spawn(
    dp: Dataplane,
    gateway: Ipv4Addr,
    metrics: Arc<Metrics>,
) -> std::io::Result<(DataplaneHandle, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Command>(256);
    let thread = std::thread::Builder::new()
        .name("dataplane".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "the dataplane owner cannot start its runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let host = match Host::open() {
                    Ok(h) => h,
                    Err(e) => {
                        warn!(error = %Chain(&e), "the dataplane owner cannot open netlink");
                        return;
                    }
                };
                let mut owner = Owner {
                    dp,
                    host,
                    gateway,
                    wanted: BTreeMap::new(),
                    programmed: HashMap::new(),
                    gateways: HashMap::new(),
                    metrics,
                    counted: HashMap::new(),
                    policy: None,
                    eni_mtu: None,
                };
                let mut tick = tokio::time::interval(TICK);
                let mut ticks = 0u64;
                loop {
                    tokio::select! {
                        cmd = rx.recv() => match cmd {
                            Some(cmd) => owner.handle(cmd).await,
                            None => return,
                        },
                        _ = tick.tick() => {
                            ticks += 1;
                            owner.tick(ticks).await;
                        }
                    }
                }
            });
        })?;
    Ok((DataplaneHandle { tx }, thread))
}

impl Owner {
    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::SetNode(s, r) => {
                let _ = r.send(self.set_node(&s).await);
            }
            Command::SetEnis(enis, r) => {
                self.wanted = enis.into_iter().map(|e| (e.id.clone(), e)).collect();
                let _ = r.send(self.sync_enis().await);
            }
            Command::Upsert(ep, r) => {
                let _ = r.send(self.upsert(&ep).await);
            }
            Command::Remove(ip, r) => {
                let _ = r.send(self.remove(ip).await);
            }
            Command::Attached(ip, r) => {
                let _ = r.send(Ok(self.dp.endpoint_attached(ip)));
            }
            Command::Programmed(r) => {
                let p = self.dp.endpoints().and_then(|endpoints| {
                    Ok(Programmed {
                        endpoints,
                        host_ports: self.dp.hostports()?,
                    })
                });
                let _ = r.send(p);
            }
            Command::RemoveOtherVersions(r) => {
                let _ = r.send(self.dp.remove_other_versions());
            }
            Command::SweepRules(live, r) => {
                let _ = r.send(self.sweep_rules(&live).await);
            }
            Command::ExportCounters(r) => {
                self.export_counters();
                let _ = r.send(Ok(()));
            }
            Command::ApplyPolicy(desired, amend, r) => {
                let _ = r.send(self.apply_policy(desired, amend));
            }
        }
    }

    fn apply_policy(
        &mut self,
        mut desired: BTreeMap<Ipv4Addr, crate::policy::compile::PodRules>,
        amend: bool,
    ) -> Result<PolicyApplied, DataplaneError> {
        let applied = match self.policy.take() {
            Some(a) => a,
            None => self.dp.policy_applied()?,
        };
        if amend {
            let mut all = applied.current();
            all.append(&mut desired);
            desired = all;
        }
        let (plan, next) = applied.plan(&desired);
        // On an error the maps may be half changed: `self.policy` stays empty, so the
        // next apply reads them again.
        self.dp.apply_policy(&plan)?;
        let out = PolicyApplied {
            sets_written: plan.new_sets.len() + plan.amended.len(),
            pods_changed: plan.pods_set.len() + plan.pods_removed.len(),
            sets_removed: plan.dead_sets.len(),
            pods: next.pods.len(),
            sets: next.sets.len(),
        };
        self.policy = Some(next);
        Ok(out)
    }

    async fn tick(&mut self, n: u64) {
        // ENIs show up in the kernel a moment after EC2 attaches them.
        if self
            .wanted
            .keys()
            .any(|id| !self.programmed.contains_key(id))
            && let Err(e) = self.sync_enis().await
        {
            warn!(error = %Chain(&e), "ENI sync failed");
        }
        if n.is_multiple_of(GC_EVERY) {
            match self.dp.gc_conntrack(monotonic_now_ns()) {
                Ok(0) => {}
                Ok(n) => info!(expired = n, "conntrack GC"),
                Err(e) => warn!(error = %Chain(&e), "conntrack GC failed"),
            }
            self.export_counters();
        }
    }

    async fn set_node(&mut self, s: &NodeSettings) -> Result<(), DataplaneError> {
        let links = self.host.links_by_mac().await?;
        let primary = links.get(&s.primary_mac).ok_or_else(|| {
            DataplaneError::InvalidSpec(format!(
                "no interface has the primary ENI's MAC {}",
                s.primary_mac
            ))
        })?;
        self.gateway = s.gateway;
        if self.eni_mtu != Some(s.eni_mtu) {
            self.eni_mtu = Some(s.eni_mtu);
            // ENIs programmed under another MTU take this one.
            for (index, _) in self.programmed.values() {
                if let Some(l) = links.values().find(|l| l.index == *index) {
                    self.apply_mtu(l).await;
                }
            }
            self.apply_mtu(primary).await;
        }
        self.dp.set_node(&NodeSpec {
            node_ip: s.node_ip,
            primary_eni_ifindex: primary.index,
            vpc_cidrs: s.vpc_cidrs.clone(),
            snat_exclusions: s.snat_exclusions.clone(),
            passthrough_cidrs: s.passthrough_cidrs.clone(),
            external_snat: s.external_snat,
            network_policy: s.network_policy,
            snat_ports: s.snat_ports,
            snat_skip: Some(s.snat_skip),
        })
    }

    /// Gives the ENI `AWS_VPC_ENI_MTU` (once known), when it has another.
    async fn apply_mtu(&self, link: &crate::host::Link) {
        let Some(mtu) = self.eni_mtu else { return };
        if link.mtu == mtu {
            return;
        }
        match self.host.set_mtu(link.index, mtu).await {
            Ok(()) => {
                info!(iface = %link.name, from = link.mtu, to = mtu, "ENI MTU set (AWS_VPC_ENI_MTU)");
            }
            Err(e) => {
                warn!(iface = %link.name, mtu, error = %Chain(&e), "could not set the ENI's MTU (AWS_VPC_ENI_MTU)");
            }
        }
    }

    /// Programs every wanted ENI the kernel shows (bringing secondary ones up with their
    /// primary address and VPC CNI's per-ENI table) and forgets the ENIs no longer wanted.
    async fn sync_enis(&mut self) -> Result<usize, DataplaneError> {
        let links = self.host.links_by_mac().await?;
        let wanted: Vec<EniDesc> = self.wanted.values().cloned().collect();
        for e in &wanted {
            let Some(link) = links.get(&e.mac) else {
                continue;
            };
            let gateway = e.gateway.unwrap_or(self.gateway);
            if self.programmed.get(&e.id).map(|(i, _)| *i) == Some(link.index)
                && self.gateways.get(&e.id) == Some(&gateway)
            {
                continue;
            }
            if e.device_index != 0
                && let Err(err) = self
                    .host
                    .ensure_up_with_address(link.index, e.primary_ip)
                    .await
            {
                warn!(eni = %e.id, iface = %link.name, error = %Chain(&err), "could not bring the ENI up");
                continue;
            }
            self.apply_mtu(link).await;
            // An ENI in another subnet (custom networking, subnet discovery) leaves by
            // that subnet's gateway.
            self.dp.upsert_eni(&EniSpec {
                ifindex: link.index,
                mac: e.mac,
                primary_ip: e.primary_ip,
                gateway,
                is_primary: e.device_index == 0,
            })?;
            if e.device_index != 0 {
                self.host
                    .ensure_eni_table(link.index, e.device_index + 1, gateway)
                    .await?;
            }
            info!(eni = %e.id, ifindex = link.index, %gateway, "ENI programmed");
            self.gateways.insert(e.id.clone(), gateway);
            self.programmed
                .insert(e.id.clone(), (link.index, e.device_index));
        }
        let gone: Vec<(String, u32)> = self
            .programmed
            .iter()
            .filter(|(id, _)| !self.wanted.contains_key(*id))
            .map(|(id, (i, _))| (id.clone(), *i))
            .collect();
        for (id, ifindex) in gone {
            if let Err(e) = self.dp.remove_eni(ifindex) {
                warn!(eni = %id, error = %Chain(&e), "could not remove a detached ENI from the dataplane");
            }
            self.programmed.remove(&id);
            self.gateways.remove(&id);
        }
        Ok(self.programmed.len())
    }

    async fn upsert(&mut self, ep: &EndpointDesc) -> Result<(), DataplaneError> {
        if !self.programmed.contains_key(&ep.eni.id) {
            // Attached moments ago, newer than the last ENI set: program it now.
            self.wanted
                .entry(ep.eni.id.clone())
                .or_insert_with(|| ep.eni.clone());
            self.sync_enis().await?;
        }
        let (eni_ifindex, device_index) = *self
            .programmed
            .get(&ep.eni.id)
            .ok_or_else(|| DataplaneError::EniNotUp(ep.eni.id.clone()))?;
        if device_index != 0 {
            // For what the programs hand to the kernel (Services, the node): it must
            // leave by the ENI that owns the pod's address.
            self.host.add_pod_rule(ep.ip, device_index + 1).await?;
        }
        self.dp.upsert_endpoint(&EndpointSpec {
            ipv4: ep.ip,
            host_ifindex: ep.host_ifindex,
            host_mac: ep.host_mac,
            pod_mac: ep.pod_mac,
            eni_ifindex,
        })?;
        if let Some(on) = ep.via_host_qdisc {
            self.dp.set_via_host_qdisc(ep.ip, on)?;
        }
        self.dp.set_hostports(ep.ip, &ep.host_ports)?;
        debug!(ip = %ep.ip, host_ifindex = ep.host_ifindex, eni = %ep.eni.id, "endpoint programmed");
        Ok(())
    }

    async fn remove(&mut self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        let r = self.dp.remove_endpoint(ip);
        // The rule goes even when the map entry could not.
        self.host.del_pod_rules(ip).await?;
        r
    }

    async fn sweep_rules(&mut self, live: &HashSet<Ipv4Addr>) -> Result<usize, DataplaneError> {
        let mut n = 0;
        for (ip, ..) in self.host.pod_rules().await? {
            if !live.contains(&ip) {
                self.host.del_pod_rules(ip).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn export_counters(&mut self) {
        let rows: Vec<CounterRow> = match self.dp.counters() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %Chain(&e), "reading the dataplane counters failed");
                return;
            }
        };
        let mut totals: HashMap<(u8, u16), u64> = HashMap::new();
        for r in rows {
            *totals.entry((r.key.direction, r.key.reason)).or_default() += r.value.packets;
        }
        for (k, total) in totals {
            let before = self.counted.insert(k, total).unwrap_or(0);
            self.metrics
                .packets
                .get_or_create(&PacketLabels {
                    direction: direction::name(k.0).into(),
                    reason: reason::name(k.1).into(),
                })
                .inc_by(total.saturating_sub(before));
        }
    }
}
