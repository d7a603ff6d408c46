//! The reconciler: keeps the node's pool at the warm targets by executing the planner's
//! steps against EC2, one call at a time, checkpointing every change.
//!
//! Ordering is chosen so that a crash at any point loses nothing:
//! - growth: EC2 first, then the store. A crash in between leaves addresses in EC2 that
//!   the next start's sync adds as free; an ENI created but not attached is tagged and
//!   removed by leaked-ENI cleanup.
//! - shrink: the store first (so nothing can hand the address out), then EC2. A crash in
//!   between leaves addresses in EC2 that the next sync adds back as free.
//!
//! Failures never stop the agent: throttling and 5xx back off with jitter, subnet
//! exhaustion pauses growth and is reported to the plugin, and ADDs keep being served
//! from what the node holds.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    aws::ec2::{
        Ec2, Ec2Error, EniInfo, ErrorKind, NewEni, TAG_CLUSTER_NAME, TAG_CREATED_AT,
        TAG_INSTANCE_ID, TAG_MANAGED_BY, format_time, parse_time,
    },
    ipam::{
        pool::{self, InstanceLimits, Mode, Step, Targets},
        sync::{self, EniView, SyncReport},
    },
    metrics::{Metrics, ReasonLabels},
    rpc::{GrowthBlock, Shared, State, now_ms, persist},
};

/// ENIs tagged with this (as in Amazon VPC CNI) are left alone.
pub const TAG_NO_MANAGE: &str = "node.k8s.amazonaws.com/no_manage";

/// What the node is, from IMDS and EC2 at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub instance_id: String,
    pub instance_type: String,
    pub region: String,
    pub subnet_id: String,
    pub subnet_cidr: String,
    pub vpc_cidrs: Vec<String>,
    pub security_groups: Vec<String>,
    pub primary_eni: String,
    pub primary_ip: Ipv4Addr,
    pub primary_mac: String,
    pub limits: InstanceLimits,
}

/// Exponential backoff with full jitter: each wait is uniform in [0, min(cap, base·2^n)],
/// so many nodes throttled together do not retry in lockstep.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next wait, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        self.base.saturating_mul(factor).min(self.cap)
    }

    pub fn next_wait(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// Settings of the reconciler that come from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mode: Mode,
    pub targets: Targets,
    pub cluster_name: Option<String>,
    pub additional_tags: BTreeMap<String, String>,
    pub leaked_eni_cleanup: bool,
    /// Detached ENIs of ours younger than this are left alone (they may be mid-attach).
    pub leaked_eni_age: Duration,
    /// How long growth pauses after InsufficientFreeAddressesInSubnet.
    pub subnet_full_pause: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: Mode::SecondaryIp,
            targets: Targets::default(),
            cluster_name: None,
            additional_tags: BTreeMap::new(),
            leaked_eni_cleanup: true,
            leaked_eni_age: Duration::from_mins(5),
            subnet_full_pause: Duration::from_mins(1),
        }
    }
}

/// Converts EC2's view of attached ENIs for the datastore, leaving out ENIs we must not
/// manage; returns those too, so their device indexes are never reused.
pub fn views(enis: &[EniInfo], instance_id: &str) -> (Vec<EniView>, BTreeSet<u32>) {
    let mut managed = Vec::new();
    let mut unmanaged = BTreeSet::new();
    for e in enis {
        let Some(att) = e
            .attachment
            .as_ref()
            .filter(|a| a.instance_id == instance_id)
        else {
            continue;
        };
        if e.tags.get(TAG_NO_MANAGE).is_some_and(|v| v == "true") {
            unmanaged.insert(att.device_index);
            continue;
        }
        managed.push(EniView {
            id: e.id.clone(),
            device_index: att.device_index,
            mac: e.mac.clone(),
            primary_ip: e.primary_ip,
            secondary_ips: e.secondary_ips.clone(),
            prefixes: e.prefixes.clone(),
        });
    }
    (managed, unmanaged)
}

/// The lowest device index not used by any ENI.
pub fn lowest_free_index(used: impl IntoIterator<Item = u32>) -> u32 {
    let used: BTreeSet<u32> = used.into_iter().collect();
    (0..=u32::MAX)
        .find(|i| !used.contains(i))
        .unwrap_or(u32::MAX)
}

enum Outcome {
    Idle,
    Progress,
}

pub struct Reconciler {
    ec2: Ec2,
    shared: Shared,
    node: Node,
    settings: Settings,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    subnet_full_until: Option<Instant>,
    /// The last growth attempt hit InsufficientFreeAddressesInSubnet; cleared by the next
    /// one that works, so the reported state does not flap between retries.
    subnet_full: bool,
    unmanaged_indexes: BTreeSet<u32>,
    next_leak_check: Instant,
    resync_needed: bool,
    /// When set, a new ENI enters the pool only once its interface is in the kernel, so
    /// no pod gets an address the node cannot route yet.
    host: Option<crate::host::Host>,
}

const IDLE_TICK: Duration = Duration::from_secs(1);
const LEAK_CHECK_EVERY: Duration = Duration::from_mins(1);

impl Reconciler {
    pub fn new(
        ec2: Ec2,
        shared: Shared,
        node: Node,
        settings: Settings,
        unmanaged_indexes: BTreeSet<u32>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            ec2,
            shared,
            node,
            settings,
            metrics,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            subnet_full_until: None,
            subnet_full: false,
            unmanaged_indexes,
            next_leak_check: Instant::now(),
            resync_needed: false,
            host: None,
        }
    }

    #[must_use]
    pub fn with_host(mut self, host: crate::host::Host) -> Self {
        self.host = Some(host);
        self
    }

    /// Waits (up to 15 s) for an interface with `mac` to show up in the kernel.
    async fn wait_for_interface(&self, mac: &str) -> bool {
        let Some(host) = &self.host else {
            return true;
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if host
                .links_by_mac()
                .await
                .is_ok_and(|l| l.contains_key(&mac.to_ascii_lowercase()))
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Runs until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        info!(
            instance = %self.node.instance_id,
            max_enis = self.node.limits.max_enis,
            slots_per_eni = self.node.limits.slots_per_eni,
            "reconciler started"
        );
        loop {
            if *stop.borrow() {
                return;
            }
            let (wait, wake_on_change) = match self.pass().await {
                Ok(Outcome::Progress) => {
                    self.backoff.reset();
                    (Duration::ZERO, false)
                }
                Ok(Outcome::Idle) => {
                    self.backoff.reset();
                    (IDLE_TICK, true)
                }
                Err(e) => (self.failed(&e), false),
            };
            if wait.is_zero() {
                continue;
            }
            let changed = self.shared.pool_changed.clone();
            tokio::select! {
                _ = stop.changed() => return,
                () = changed.notified(), if wake_on_change => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Decides how long to wait after a failed call.
    fn failed(&mut self, e: &Ec2Error) -> Duration {
        self.metrics.ipam_error(match e.kind() {
            ErrorKind::Throttled => "throttled",
            ErrorKind::Transient => "transient",
            ErrorKind::SubnetFull => "subnet_full",
            ErrorKind::Limit => "limit",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Refused => "refused",
        });
        match e.kind() {
            ErrorKind::SubnetFull => {
                warn!(
                    subnet = %self.node.subnet_id,
                    pause = ?self.settings.subnet_full_pause,
                    "the subnet has no free addresses; pausing pool growth and serving from what the node holds"
                );
                self.subnet_full_until = Some(Instant::now() + self.settings.subnet_full_pause);
                self.subnet_full = true;
                Duration::from_millis(100)
            }
            ErrorKind::Limit | ErrorKind::NotFound => {
                // Our picture of the instance is wrong: look again before the next step.
                warn!(error = %e, "EC2 disagrees with the datastore; resyncing");
                self.resync_needed = true;
                self.backoff.next_wait()
            }
            ErrorKind::Throttled | ErrorKind::Transient => {
                let d = self.backoff.next_wait();
                warn!(error = %e, retry_in = ?d, attempt = self.backoff.attempts(), "EC2 call failed; backing off");
                d
            }
            ErrorKind::Refused => {
                let d = self.backoff.next_wait().max(Duration::from_secs(5));
                error!(error = %e, retry_in = ?d, "EC2 refused the call; check the node role's permissions");
                d
            }
        }
    }

    fn growth_paused(&self) -> bool {
        self.subnet_full_until.is_some_and(|t| Instant::now() < t)
    }

    async fn pass(&mut self) -> Result<Outcome, Ec2Error> {
        self.metrics.reconciles.inc();
        if self.resync_needed {
            self.resync().await?;
            self.resync_needed = false;
        }
        if self.settings.leaked_eni_cleanup && Instant::now() >= self.next_leak_check {
            self.next_leak_check = Instant::now() + LEAK_CHECK_EVERY;
            if let Err(e) = self.cleanup_leaked().await {
                warn!(error = %e, "leaked-ENI cleanup failed; trying again later");
            }
        }
        let paused = self.growth_paused();
        let plan = {
            let mut st = self.shared.state.lock().await;
            let usage = st.store.usage(now_ms());
            let plan = pool::plan(
                self.settings.mode,
                &self.settings.targets,
                self.node.limits,
                &usage,
            );
            st.blocked =
                if (paused || self.subnet_full) && (plan.shortfall > 0 || !plan.grow.is_empty()) {
                    Some(GrowthBlock::SubnetExhausted)
                } else {
                    plan.blocked.map(GrowthBlock::Pool)
                };
            refresh_gauges(&st, &self.metrics, self.node.limits, &self.settings);
            plan
        };
        if !paused && let Some(step) = plan.grow.first().copied() {
            self.grow(step).await?;
            self.subnet_full = false;
            return Ok(Outcome::Progress);
        }
        if plan.release_units > 0 && self.release_units(plan.release_units).await? {
            return Ok(Outcome::Progress);
        }
        if let Some(dev) = plan.release_eni
            && self.release_eni(dev).await?
        {
            return Ok(Outcome::Progress);
        }
        Ok(Outcome::Idle)
    }

    fn prefixes(&self) -> bool {
        self.settings.mode == Mode::Prefix
    }

    async fn grow(&mut self, step: Step) -> Result<(), Ec2Error> {
        match step {
            Step::Assign {
                device_index,
                units,
            } => {
                let eni = {
                    let st = self.shared.state.lock().await;
                    st.store
                        .enis()
                        .find(|e| e.device_index == device_index)
                        .map(|e| e.id.clone())
                };
                let Some(eni) = eni else {
                    self.resync_needed = true;
                    return Ok(());
                };
                let got = self.ec2.assign(&eni, units, self.prefixes()).await?;
                info!(%eni, units, got = got.len(), prefixes = self.prefixes(), "added to the pool");
                self.store_addrs(&eni, &got).await;
            }
            Step::AttachEni { units } => self.attach_new_eni(units).await?,
        }
        Ok(())
    }

    async fn store_addrs(&self, eni: &str, addrs: &[Ipv4Addr]) {
        let mut st = self.shared.state.lock().await;
        let r = if self.prefixes() {
            addrs.iter().try_for_each(|b| st.store.add_prefix(eni, *b))
        } else {
            st.store.add_ips(eni, addrs)
        };
        if let Err(e) = r {
            // EC2 handed out something the store cannot take: the next sync sorts it out.
            warn!(%eni, error = %e, "could not record what EC2 assigned");
        }
        save(&st, &self.metrics);
        drop(st);
        self.shared.pool_grown.notify_waiters();
    }

    fn tags(&self) -> BTreeMap<String, String> {
        let mut t = self.settings.additional_tags.clone();
        t.insert(TAG_INSTANCE_ID.into(), self.node.instance_id.clone());
        t.insert(TAG_CREATED_AT.into(), format_time(SystemTime::now()));
        t.insert(TAG_MANAGED_BY.into(), "vpc-ebpf".into());
        if let Some(c) = &self.settings.cluster_name {
            t.insert(TAG_CLUSTER_NAME.into(), c.clone());
        }
        t
    }

    async fn attach_new_eni(&mut self, units: u32) -> Result<(), Ec2Error> {
        let device_index = {
            let st = self.shared.state.lock().await;
            lowest_free_index(
                st.store
                    .enis()
                    .map(|e| e.device_index)
                    .chain(self.unmanaged_indexes.iter().copied()),
            )
        };
        let spec = NewEni {
            subnet_id: self.node.subnet_id.clone(),
            security_groups: self.node.security_groups.clone(),
            description: format!("vpc-ebpf {}", self.node.instance_id),
            tags: self.tags(),
            secondary_ips: if self.prefixes() { 0 } else { units },
            prefixes: if self.prefixes() { units } else { 0 },
        };
        let eni = self.ec2.create_eni(&spec).await?;
        if let Err(e) = self
            .ec2
            .attach_eni(&eni.id, &self.node.instance_id, device_index)
            .await
        {
            // Attached or not, we do not know: a detached ENI is deleted now, anything
            // else by leaked-ENI cleanup once it shows up detached.
            if let Err(del) = self.ec2.delete_eni(&eni.id).await {
                warn!(eni = %eni.id, error = %del, "could not delete an ENI whose attach failed; leaked-ENI cleanup will");
            }
            return Err(e);
        }
        let t0 = Instant::now();
        if self.wait_for_interface(&eni.mac).await {
            info!(eni = %eni.id, device_index, units, mac = %eni.mac, appeared_after = ?t0.elapsed(), "attached a new ENI");
        } else {
            warn!(eni = %eni.id, mac = %eni.mac, "attached, but no interface with its MAC appeared in 15 s; using it anyway");
        }
        let mut st = self.shared.state.lock().await;
        st.store
            .upsert_eni(&eni.id, device_index, &eni.mac, eni.primary_ip);
        let r = if self.prefixes() {
            eni.prefixes
                .iter()
                .try_for_each(|b| st.store.add_prefix(&eni.id, *b))
        } else {
            st.store.add_ips(&eni.id, &eni.secondary_ips)
        };
        if let Err(e) = r {
            warn!(eni = %eni.id, error = %e, "could not record the new ENI's addresses");
        }
        save(&st, &self.metrics);
        drop(st);
        self.shared.pool_grown.notify_waiters();
        Ok(())
    }

    /// Gives back free units from the highest ENI down. Returns whether anything went.
    async fn release_units(&mut self, n: u32) -> Result<bool, Ec2Error> {
        let prefixes = self.prefixes();
        let mut by_eni: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
        {
            let mut st = self.shared.state.lock().await;
            let now = now_ms();
            let candidates = if prefixes {
                st.store.releasable_prefixes(n, now)
            } else {
                st.store.releasable_ips(n, now)
            };
            for (eni, a) in candidates {
                let r = if prefixes {
                    st.store.remove_prefix(&eni, a, now)
                } else {
                    st.store.remove_ip(&eni, a, now)
                };
                if r.is_ok() {
                    by_eni.entry(eni).or_default().push(a);
                }
            }
            if by_eni.is_empty() {
                return Ok(false);
            }
            save(&st, &self.metrics);
        }
        for (eni, addrs) in by_eni {
            match self.ec2.unassign(&eni, &addrs, prefixes).await {
                Ok(()) => info!(%eni, count = addrs.len(), prefixes, "released from the pool"),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    debug!(%eni, "already gone from EC2");
                }
                Err(e) => {
                    // Still ours in EC2: put them back so they are used, not stranded.
                    self.store_addrs(&eni, &addrs).await;
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    async fn release_eni(&mut self, device_index: u32) -> Result<bool, Ec2Error> {
        let eni = {
            let mut st = self.shared.state.lock().await;
            let Some(id) = st
                .store
                .enis()
                .find(|e| e.device_index == device_index)
                .map(|e| e.id.clone())
            else {
                return Ok(false);
            };
            if id == self.node.primary_eni || st.store.remove_eni(&id, now_ms()).is_err() {
                return Ok(false);
            }
            save(&st, &self.metrics);
            id
        };
        let attachment = match self.ec2.eni(&eni).await? {
            Some(info) => info.attachment.map(|a| a.id),
            None => return Ok(true),
        };
        if let Some(att) = attachment {
            match self.ec2.detach_eni(&att).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    self.resync_needed = true;
                    return Err(e);
                }
            }
        }
        // Detaching takes a moment in EC2; until then delete is refused. Whatever is
        // left undeleted here is picked up by leaked-ENI cleanup.
        for _ in 0..20 {
            match self.ec2.eni(&eni).await? {
                Some(i) if i.status != "available" => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ => break,
            }
        }
        match self.ec2.delete_eni(&eni).await {
            Ok(()) => info!(%eni, device_index, "detached and deleted a surplus ENI"),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                warn!(%eni, error = %e, "could not delete a detached ENI; leaked-ENI cleanup will");
            }
        }
        Ok(true)
    }

    /// Deletes this node's detached ENIs that we created and that are old enough not to
    /// be in the middle of our own attach.
    async fn cleanup_leaked(&mut self) -> Result<(), Ec2Error> {
        let now = SystemTime::now();
        for e in self.ec2.detached_enis_of(&self.node.instance_id).await? {
            let age = e
                .tags
                .get(TAG_CREATED_AT)
                .and_then(|t| parse_time(t))
                .and_then(|t| now.duration_since(t).ok());
            if age.is_none_or(|a| a < self.settings.leaked_eni_age) {
                continue;
            }
            match self.ec2.delete_eni(&e.id).await {
                Ok(()) => {
                    self.metrics.leaked_enis_deleted.inc();
                    info!(eni = %e.id, ?age, "deleted a leaked ENI");
                }
                Err(err) => warn!(eni = %e.id, error = %err, "could not delete a leaked ENI"),
            }
        }
        Ok(())
    }

    /// Re-reads the instance's ENIs from EC2 into the store.
    async fn resync(&mut self) -> Result<SyncReport, Ec2Error> {
        let enis = self.ec2.attached_enis(&self.node.instance_id).await?;
        let (views, unmanaged) = views(&enis, &self.node.instance_id);
        self.unmanaged_indexes = unmanaged;
        let mut st = self.shared.state.lock().await;
        let report = sync::merge(&mut st.store, &views);
        log_report(&report);
        if report.changed() {
            save(&st, &self.metrics);
        }
        Ok(report)
    }
}

pub fn log_report(r: &SyncReport) {
    if !r.changed() {
        return;
    }
    info!(
        enis_added = ?r.enis_added,
        enis_removed = ?r.enis_removed,
        addrs_added = r.addrs_added,
        addrs_removed = r.addrs_removed,
        "datastore synced with EC2"
    );
    for (key, ip) in &r.lost {
        error!(%ip, container = %key.container_id, "EC2 no longer has this pod's address; the pod must be recreated");
    }
}

fn save(st: &State, metrics: &Metrics) {
    if persist(st).is_err() {
        metrics.ipam_error("checkpoint");
    }
}

/// Sets the pool gauges from the datastore.
pub fn refresh_gauges(st: &State, m: &Metrics, limits: InstanceLimits, s: &Settings) {
    let usage = st.store.usage(now_ms());
    let t = pool::totals(st.store.mode, &usage);
    let g = |v: u32| i64::from(v);
    m.assigned_ips.set(g(t.assigned));
    m.total_ips.set(g(t.total));
    m.cooling_ips.set(g(t.cooling));
    m.enis.set(i64::try_from(usage.len()).unwrap_or(i64::MAX));
    let max_enis = s
        .targets
        .max_eni
        .map_or(limits.max_enis, |m| m.min(limits.max_enis));
    m.eni_max.set(g(max_enis));
    let per_eni = limits.slots_per_eni.saturating_sub(1)
        * if s.mode == Mode::Prefix {
            pool::PREFIX_SIZE
        } else {
            1
        };
    m.ip_max.set(g(max_enis.saturating_mul(per_eni)));
    for (reason, on) in [
        (
            "eni_limit",
            st.blocked == Some(GrowthBlock::Pool(pool::Blocked::EniLimit)),
        ),
        (
            "max_pods",
            st.blocked == Some(GrowthBlock::Pool(pool::Blocked::MaxPods)),
        ),
        (
            "subnet_exhausted",
            st.blocked == Some(GrowthBlock::SubnetExhausted),
        ),
    ] {
        m.growth_blocked
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .set(i64::from(on));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::ec2::EniAttachment;

    #[test]
    fn backoff_grows_to_the_cap_and_jitters_below_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let ceilings: Vec<u128> = (0..7)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_wait();
                assert!(d <= c);
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        // Full jitter: over many draws the waits spread over the range, not one value.
        let draws: BTreeSet<u128> = (0..50)
            .map(|_| {
                b.reset();
                b.next_wait().as_micros()
            })
            .collect();
        assert!(draws.len() > 40);
    }

    #[test]
    fn lowest_free_index_fills_gaps() {
        assert_eq!(lowest_free_index([0]), 1);
        assert_eq!(lowest_free_index([0, 2, 3]), 1);
        assert_eq!(lowest_free_index([]), 0);
        assert_eq!(lowest_free_index([0, 1, 2]), 3);
    }

    fn eni(id: &str, dev: u32, instance: &str, tags: &[(&str, &str)]) -> EniInfo {
        EniInfo {
            id: id.into(),
            mac: "02:00:00:00:00:01".into(),
            subnet_id: "subnet-1".into(),
            primary_ip: "10.0.0.10".parse().unwrap(),
            secondary_ips: vec![],
            prefixes: vec![],
            attachment: Some(EniAttachment {
                id: format!("att-{id}"),
                instance_id: instance.into(),
                device_index: dev,
                status: "attached".into(),
            }),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            security_groups: vec![],
            status: "in-use".into(),
        }
    }

    #[test]
    fn no_manage_enis_are_left_out_but_keep_their_index() {
        let (v, unmanaged) = views(
            &[
                eni("eni-0", 0, "i-1", &[]),
                eni("eni-efa", 1, "i-1", &[(TAG_NO_MANAGE, "true")]),
                eni("eni-2", 2, "i-1", &[]),
                eni("eni-other", 0, "i-2", &[]),
            ],
            "i-1",
        );
        assert_eq!(
            v.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["eni-0", "eni-2"]
        );
        assert_eq!(unmanaged, BTreeSet::from([1]));
        assert_eq!(
            lowest_free_index(v.iter().map(|e| e.device_index).chain(unmanaged)),
            3
        );
    }
}
