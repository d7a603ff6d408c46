//! The reconciler: keeps the node's pool at the warm targets by executing the planner's
//! steps against EC2, one call at a time, through [`Ipam`] (so every change is
//! checkpointed), and refreshes the store from EC2 when EC2 and the store disagree.
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

use vpc_ebpf_rpc::report::Chain;

use super::{
    GrowthBlock, Ipam,
    ec2_merge::{self, MergeReport},
    placement::{PlaceError, Target},
    placer::{self, Placer, PlacerError},
    pool::{self, InstanceLimits, Mode, Step},
    store::Store,
};
use crate::{
    aws::ec2::{
        Ec2, Ec2Error, ErrorKind, NewEni, TAG_CLUSTER_NAME, TAG_CREATED_AT, TAG_INSTANCE_ID,
        TAG_MANAGED_BY, format_time, parse_time,
    },
    clock::now_ms,
    host::Host,
    metrics::{Metrics, ReasonLabels},
    node::{Node, Settings},
    notice::Notices,
};

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
    ipam: Arc<Ipam>,
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
    /// EC2 and the store may disagree: read EC2 again before the next step.
    refresh_needed: bool,
    /// When set, a new ENI enters the pool only once its interface is in the kernel, so
    /// no pod gets an address the node cannot route yet.
    host: Option<Host>,
    notices: Notices,
    /// The growth block last noticed, so a notice is raised once per change.
    noticed_block: Option<GrowthBlock>,
    /// Whether EC2 refusing us was noticed since the last call that worked.
    noticed_refusal: bool,
    /// Where new ENIs go, and which ENIs hold no pod addresses.
    placer: Placer,
    /// ENIs (by device index) and subnets that refused addresses lately
    /// (InsufficientFreeAddressesInSubnet): growth tries elsewhere until then.
    full_enis: BTreeMap<u32, Instant>,
    full_subnets: BTreeMap<String, Instant>,
    /// New ENIs cannot be placed (ENIConfig or subnets wrong): look again then.
    placement_retry: Option<Instant>,
    noticed_placement: Option<String>,
}

const IDLE_TICK: Duration = Duration::from_secs(1);
const LEAK_CHECK_EVERY: Duration = Duration::from_mins(1);
/// How soon a placement the cluster's configuration stopped is tried again: ENIConfig
/// reads are cheap API-server GETs, and a fixed ENIConfig should take effect quickly.
const PLACEMENT_RETRY: Duration = Duration::from_secs(10);

impl Reconciler {
    pub fn new(
        ec2: Ec2,
        ipam: Arc<Ipam>,
        node: Node,
        settings: Settings,
        unmanaged_indexes: BTreeSet<u32>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let placer = Placer::new(
            ec2.clone(),
            node.clone(),
            placer::Mode::NodeSubnet,
            settings.cluster_name.clone(),
        );
        Self {
            placer,
            full_enis: BTreeMap::new(),
            full_subnets: BTreeMap::new(),
            placement_retry: None,
            noticed_placement: None,
            ec2,
            ipam,
            node,
            settings,
            metrics,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            subnet_full_until: None,
            subnet_full: false,
            unmanaged_indexes,
            next_leak_check: Instant::now(),
            refresh_needed: false,
            host: None,
            notices: Notices::log_only(),
            noticed_block: None,
            noticed_refusal: false,
        }
    }

    #[must_use]
    pub fn with_host(mut self, host: Host) -> Self {
        self.host = Some(host);
        self
    }

    #[must_use]
    pub fn with_placer(mut self, placer: Placer) -> Self {
        self.placer = placer;
        self
    }

    #[must_use]
    pub fn with_notices(mut self, notices: Notices) -> Self {
        self.notices = notices;
        self
    }

    /// Reads EC2 before the first step (the store came from a checkpoint EC2 may have
    /// moved on from).
    #[must_use]
    pub fn refresh_first(mut self) -> Self {
        self.refresh_needed = true;
        self
    }

    /// Waits (up to 15 s) for an interface with `mac` to show up in the kernel.
    async fn wait_for_interface(&self, mac: vpc_ebpf_rpc::types::MacAddr) -> bool {
        let Some(host) = &self.host else {
            return true;
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if host
                .links_by_mac()
                .await
                .is_ok_and(|l| l.contains_key(&mac))
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
                    self.noticed_refusal = false;
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
            let ipam = self.ipam.clone();
            tokio::select! {
                _ = stop.changed() => return,
                () = ipam.pool_changed().notified(), if wake_on_change => {}
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
                warn!(error = %Chain(e), "EC2 disagrees with the datastore; reading EC2 again");
                self.refresh_needed = true;
                self.backoff.next_wait()
            }
            ErrorKind::Throttled | ErrorKind::Transient => {
                let d = self.backoff.next_wait();
                warn!(error = %Chain(e), retry_in = ?d, attempt = self.backoff.attempts(), "EC2 call failed; backing off");
                d
            }
            ErrorKind::Refused => {
                let d = self.backoff.next_wait().max(Duration::from_secs(5));
                error!(error = %Chain(e), retry_in = ?d, "EC2 refused the call; check the node role's permissions");
                if !self.noticed_refusal {
                    self.noticed_refusal = true;
                    let reason = if matches!(
                        e.code(),
                        "UnauthorizedOperation" | "AccessDenied" | "AuthFailure"
                    ) {
                        "MissingIAMPermissions"
                    } else {
                        "EC2Refused"
                    };
                    self.notices.warning(reason, format!("{}; the pool cannot grow until this is fixed (pods are served from the addresses the node holds)", Chain(e)));
                }
                d
            }
        }
    }

    /// A notice when the pool's growth becomes blocked (once per change).
    fn notice_block(&mut self, blocked: Option<GrowthBlock>) {
        if blocked == self.noticed_block {
            return;
        }
        self.noticed_block = blocked;
        let (reason, what) = match blocked {
            // Noticed where the placement failed, with its words.
            None | Some(GrowthBlock::Placement) => return,
            Some(GrowthBlock::Pool(pool::Blocked::EniLimit)) => (
                "ENILimitReached",
                format!(
                    "every ENI instance type {} allows is attached and full; new pods on this node wait for addresses to free up",
                    self.node.instance_type
                ),
            ),
            Some(GrowthBlock::Pool(pool::Blocked::MaxPods)) => (
                "MaxPodsReached",
                "the node holds as many addresses as it may run pods".to_owned(),
            ),
            Some(GrowthBlock::SubnetExhausted) => (
                "SubnetFull",
                format!(
                    "subnet {} has no free addresses (InsufficientFreeAddressesInSubnet); growth pauses for {:?} at a time",
                    self.node.subnet_id, self.settings.subnet_full_pause
                ),
            ),
        };
        self.notices.warning(reason, what);
    }

    /// The instance's limits less the ENIs that are not ours (no_manage, trunk, EFA):
    /// they take slots the pool cannot have.
    fn limits(&self) -> InstanceLimits {
        let theirs = u32::try_from(self.unmanaged_indexes.len()).unwrap_or(u32::MAX);
        InstanceLimits {
            max_enis: self.node.limits.max_enis.saturating_sub(theirs),
            ..self.node.limits
        }
    }

    fn growth_paused(&self) -> bool {
        self.subnet_full_until.is_some_and(|t| Instant::now() < t)
    }

    async fn pass(&mut self) -> Result<Outcome, Ec2Error> {
        self.metrics.reconciles.inc();
        if self.refresh_needed {
            self.refresh_from_ec2().await?;
            self.refresh_needed = false;
        }
        if self.settings.leaked_eni_cleanup && Instant::now() >= self.next_leak_check {
            self.next_leak_check = Instant::now() + LEAK_CHECK_EVERY;
            if let Err(e) = self.cleanup_leaked().await {
                warn!(error = %Chain(&e), "leaked-ENI cleanup failed; trying again later");
            }
        }
        let paused = self.growth_paused();
        let now = Instant::now();
        self.full_enis.retain(|_, until| *until > now);
        self.full_subnets.retain(|_, until| *until > now);
        let placement_wait = self.placement_retry.is_some_and(|t| now < t);
        let full: BTreeSet<u32> = self.full_enis.keys().copied().collect();
        let plan = self
            .ipam
            .read(|store, _| {
                let mut usage = store.usage(now_ms());
                for u in &mut usage {
                    u.subnet_full = full.contains(&u.device_index);
                }
                pool::plan(
                    self.settings.mode,
                    &self.settings.targets,
                    self.limits(),
                    &usage,
                )
            })
            .await;
        let wants_eni = plan
            .grow
            .first()
            .is_some_and(|s| matches!(s, Step::AttachEni { .. }));
        let blocked = if self.noticed_placement.is_some() && wants_eni {
            Some(GrowthBlock::Placement)
        } else if (paused || self.subnet_full) && (plan.shortfall > 0 || !plan.grow.is_empty()) {
            Some(GrowthBlock::SubnetExhausted)
        } else {
            plan.blocked.map(GrowthBlock::Pool)
        };
        self.ipam.set_blocked(blocked).await;
        self.notice_block(blocked);
        self.ipam
            .read(|store, blocked| {
                refresh_gauges(store, blocked, &self.metrics, self.limits(), &self.settings);
            })
            .await;
        let held = placement_wait && wants_eni;
        if !paused
            && !held
            && let Some(step) = plan.grow.first().copied()
        {
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
                let eni = self
                    .ipam
                    .read(|s, _| {
                        s.enis()
                            .find(|e| e.device_index == device_index)
                            .map(|e| e.id.clone())
                    })
                    .await;
                let Some(eni) = eni else {
                    self.refresh_needed = true;
                    return Ok(());
                };
                let got = match self.ec2.assign(&eni, units, self.prefixes()).await {
                    Err(e) if e.kind() == ErrorKind::SubnetFull && self.placer.discovers() => {
                        // This ENI's subnet is full; another subnet may not be: the
                        // next plan grows elsewhere (a new ENI in the next subnet).
                        warn!(%eni, error = %Chain(&e), "the ENI's subnet is full; growing in another subnet");
                        self.metrics.ipam_error("subnet_full");
                        // At least a second, so a zero pause cannot spin on EC2.
                        let pause = self.settings.subnet_full_pause.max(Duration::from_secs(1));
                        self.full_enis.insert(device_index, Instant::now() + pause);
                        return Ok(());
                    }
                    r => r?,
                };
                info!(%eni, units, got = got.len(), prefixes = self.prefixes(), "added to the pool");
                self.store_addrs(&eni, &got).await;
            }
            Step::AttachEni { units } => self.attach_new_eni(units).await?,
        }
        Ok(())
    }

    async fn store_addrs(&self, eni: &str, addrs: &[Ipv4Addr]) {
        let prefixes = self.prefixes();
        let r = self
            .ipam
            .update(|s| {
                if prefixes {
                    addrs.iter().try_for_each(|b| s.add_prefix(eni, *b))
                } else {
                    s.add_ips(eni, addrs)
                }
            })
            .await;
        match r {
            Ok(Ok(())) => {}
            // EC2 handed out something the store cannot take: the next refresh sorts it.
            Ok(Err(e)) => warn!(%eni, error = %Chain(&e), "could not record what EC2 assigned"),
            Err(e) => self.checkpoint_failed(&e),
        }
        self.ipam.pool_grown().notify_waiters();
    }

    fn checkpoint_failed(&self, e: &super::checkpoint::CheckpointError) {
        warn!(error = %Chain(e), "checkpoint failed; the next refresh from EC2 recovers the change");
        self.metrics.ipam_error("checkpoint");
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
        let unmanaged = self.unmanaged_indexes.clone();
        let device_index = self
            .ipam
            .read(|s, _| lowest_free_index(s.enis().map(|e| e.device_index).chain(unmanaged)))
            .await;
        let Some((eni, target)) = self.create_in_some_subnet(units).await? else {
            return Ok(());
        };
        if let Err(e) = self
            .ec2
            .attach_eni(&eni.id, &self.node.instance_id, device_index)
            .await
        {
            // Attached or not, we do not know: a detached ENI is deleted now, anything
            // else by leaked-ENI cleanup once it shows up detached.
            if let Err(del) = self.ec2.delete_eni(&eni.id).await {
                warn!(eni = %eni.id, error = %Chain(&del), "could not delete an ENI whose attach failed; leaked-ENI cleanup will");
            }
            return Err(e);
        }
        let t0 = Instant::now();
        let Ok(mac) = eni.mac.parse() else {
            return Err(Ec2Error::Malformed {
                op: "CreateNetworkInterface",
                what: format!("a MAC address (got {:?})", eni.mac),
            });
        };
        if self.wait_for_interface(mac).await {
            info!(eni = %eni.id, device_index, units, mac = %eni.mac, appeared_after = ?t0.elapsed(), "attached a new ENI");
        } else {
            warn!(eni = %eni.id, mac = %eni.mac, "attached, but no interface with its MAC appeared in 15 s; using it anyway");
        }
        let prefixes = self.prefixes();
        let subnet = (target.subnet_id != self.node.subnet_id)
            .then(|| (target.subnet_id.clone(), target.subnet_cidr));
        info!(eni = %eni.id, subnet = %target.subnet_id, cidr = %target.subnet_cidr, groups = ?target.security_groups, why = %target.why, "new ENI placed");
        let r = self
            .ipam
            .update(|s| {
                s.upsert_eni(&eni.id, device_index, mac, eni.primary_ip);
                s.set_placement(&eni.id, subnet.clone(), false);
                if prefixes {
                    eni.prefixes
                        .iter()
                        .try_for_each(|b| s.add_prefix(&eni.id, *b))
                } else {
                    s.add_ips(&eni.id, &eni.secondary_ips)
                }
            })
            .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(eni = %eni.id, error = %Chain(&e), "could not record the new ENI's addresses");
            }
            Err(e) => self.checkpoint_failed(&e),
        }
        self.ipam.pool_grown().notify_waiters();
        Ok(())
    }

    /// Creates an ENI in the first placement target whose subnet takes it. `None`: no
    /// placement now (the configuration is wrong, or every subnet is full): said, and
    /// tried again later.
    async fn create_in_some_subnet(
        &mut self,
        units: u32,
    ) -> Result<Option<(crate::aws::ec2::EniInfo, Target)>, Ec2Error> {
        let targets = match self.placer.targets().await {
            Ok(t) => {
                self.placement_ok().await;
                t
            }
            Err(PlacerError::Ec2(e)) => return Err(e),
            Err(e) => {
                self.placement_failed(&e).await;
                return Ok(None);
            }
        };
        let mut last = None;
        for target in targets {
            if self.full_subnets.contains_key(&target.subnet_id) {
                continue;
            }
            let spec = NewEni {
                subnet_id: target.subnet_id.clone(),
                security_groups: target.security_groups.clone(),
                description: format!("vpc-ebpf {}", self.node.instance_id),
                tags: self.tags(),
                secondary_ips: if self.prefixes() { 0 } else { units },
                prefixes: if self.prefixes() { units } else { 0 },
            };
            match self.ec2.create_eni(&spec).await {
                Ok(eni) => return Ok(Some((eni, target))),
                Err(e) if e.kind() == ErrorKind::SubnetFull => {
                    warn!(subnet = %target.subnet_id, why = %target.why, error = %Chain(&e), "the subnet is full; trying the next one");
                    self.full_subnets.insert(
                        target.subnet_id.clone(),
                        Instant::now() + self.settings.subnet_full_pause,
                    );
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
        // Every subnet refused lately: wait as for a full subnet.
        self.subnet_full = true;
        self.subnet_full_until = self.full_subnets.values().min().copied();
        Ok(None)
    }

    async fn placement_ok(&mut self) {
        self.placement_retry = None;
        if self.noticed_placement.take().is_some() {
            info!("new ENIs can be placed again");
            self.ipam.set_placement_problem(None).await;
            self.notices
                .normal("ENIPlacementRestored", "new ENIs can be placed again");
        }
    }

    async fn placement_failed(&mut self, e: &PlacerError) {
        let text = Chain(e).to_string();
        self.placement_retry = Some(Instant::now() + PLACEMENT_RETRY);
        self.metrics.ipam_error("placement");
        if self.noticed_placement.as_deref() == Some(text.as_str()) {
            return;
        }
        error!(error = %text, "no new ENI can be placed");
        // One reason per kind of problem: kube's recorder folds Events of one reason on
        // the Node into a series that keeps its first message, so a different problem
        // needs a reason of its own to be seen.
        let reason = match e {
            PlacerError::Kube(_) => "ENIConfigUnreadable",
            PlacerError::Config(PlaceError::Cluster(_)) => "ENIConfigMissing",
            PlacerError::Config(PlaceError::EniConfig { .. }) => "ENIConfigInvalid",
            PlacerError::Config(PlaceError::NoSubnet { .. }) => "NoPodSubnet",
            PlacerError::Ec2(_) => "EC2Refused",
        };
        self.notices.warning(reason, text.clone());
        self.ipam.set_placement_problem(Some(text.clone())).await;
        self.noticed_placement = Some(text);
    }

    /// Gives back free units from the highest ENI down. Returns whether anything went.
    /// Addresses a pod on this node routes to. The store may not show them assigned (a
    /// lost checkpoint, before the recovery sweep holds them): they must never go back to
    /// EC2.
    async fn routed(&self) -> BTreeSet<Ipv4Addr> {
        let Some(host) = &self.host else {
            return BTreeSet::new();
        };
        match host.host_routes().await {
            Ok(r) => r.into_iter().map(|r| r.ip).collect(),
            Err(e) => {
                warn!(error = %Chain(&e), "listing routes failed; releasing nothing this time");
                // Unknown: claim everything is in use, so nothing is released.
                BTreeSet::from([Ipv4Addr::UNSPECIFIED])
            }
        }
    }

    async fn release_units(&mut self, n: u32) -> Result<bool, Ec2Error> {
        let prefixes = self.prefixes();
        let now = now_ms();
        let routed = self.routed().await;
        if routed.contains(&Ipv4Addr::UNSPECIFIED) {
            return Ok(false);
        }
        let in_use = |base: Ipv4Addr| {
            if prefixes {
                (0..pool::PREFIX_SIZE)
                    .any(|i| routed.contains(&Ipv4Addr::from(u32::from(base) + i)))
            } else {
                routed.contains(&base)
            }
        };
        let taken = self
            .ipam
            .update(|s| {
                let mut by_eni: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
                let candidates = if prefixes {
                    s.releasable_prefixes(n, now)
                } else {
                    s.releasable_ips(n, now)
                };
                for (eni, a) in candidates.into_iter().filter(|(_, a)| !in_use(*a)) {
                    let r = if prefixes {
                        s.remove_prefix(&eni, a, now)
                    } else {
                        s.remove_ip(&eni, a, now)
                    };
                    if r.is_ok() {
                        by_eni.entry(eni).or_default().push(a);
                    }
                }
                by_eni
            })
            .await;
        // Nothing leaves EC2 that the store still shows.
        let by_eni = match taken {
            Ok(b) if !b.is_empty() => b,
            Ok(_) => return Ok(false),
            Err(e) => {
                self.checkpoint_failed(&e);
                return Ok(false);
            }
        };
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
        let primary = self.node.primary_eni.clone();
        let now = now_ms();
        let routed = self.routed().await;
        let taken = self
            .ipam
            .update(|s| {
                let e = s.enis().find(|e| e.device_index == device_index)?;
                let id = e.id.clone();
                if e.addrs.keys().any(|a| routed.contains(a))
                    || routed.contains(&Ipv4Addr::UNSPECIFIED)
                {
                    return None;
                }
                (id != primary && s.remove_eni(&id, now).is_ok()).then_some(id)
            })
            .await;
        let eni = match taken {
            Ok(Some(id)) => id,
            Ok(None) => return Ok(false),
            Err(e) => {
                self.checkpoint_failed(&e);
                return Ok(false);
            }
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
                    self.refresh_needed = true;
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
                warn!(%eni, error = %Chain(&e), "could not delete a detached ENI; leaked-ENI cleanup will");
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
                Err(err) => {
                    warn!(eni = %e.id, error = %Chain(&err), "could not delete a leaked ENI");
                }
            }
        }
        Ok(())
    }

    /// Reads the instance's ENIs from EC2 again and merges them into the store.
    async fn refresh_from_ec2(&mut self) -> Result<MergeReport, Ec2Error> {
        let enis = self.ec2.attached_enis(&self.node.instance_id).await?;
        let (views, unmanaged) = ec2_merge::views(&enis, &self.node.instance_id);
        self.unmanaged_indexes = unmanaged;
        let subnets: Vec<(u32, String)> = views
            .iter()
            .map(|v| (v.device_index, v.subnet_id.clone()))
            .collect();
        let judged = self.placer.judge(&subnets, true).await;
        let report = self
            .ipam
            .update(|s| {
                let r = ec2_merge::merge(s, &views);
                for (v, j) in views.iter().zip(&judged) {
                    let Some(j) = j else { continue };
                    let subnet = j.subnet_cidr.map(|c| (v.subnet_id.clone(), c));
                    if s.set_placement(&v.id, subnet, j.excluded) {
                        info!(eni = %v.id, subnet = %v.subnet_id, excluded = j.excluded, "ENI placement recorded");
                    }
                }
                r
            })
            .await;
        match report {
            Ok(report) => {
                log_report(&report);
                Ok(report)
            }
            Err(e) => {
                self.checkpoint_failed(&e);
                self.refresh_needed = true;
                Ok(MergeReport::default())
            }
        }
    }
}

/// What [`run_with_discovery`] works with.
pub struct Ec2Side {
    pub config: crate::config::Config,
    pub ipam: Arc<Ipam>,
    pub metrics: Arc<Metrics>,
    pub notices: Notices,
    /// Hears of a node identity other than the one the agent started with.
    pub on_node: Box<dyn Fn(Node) + Send + Sync>,
    /// Custom networking's ENIConfig reader, on Kubernetes.
    pub eniconfigs: Option<crate::k8s::eniconfig::EniConfigs>,
    /// Where introspection finds the placement.
    pub shown: Arc<std::sync::Mutex<placer::Shown>>,
}

/// The EC2 side of the agent, run in the background once the agent serves: discovery
/// when the node came from its cache (EC2 may be down at start: pods are served from the
/// restored state meanwhile), then the reconciler. `on_node` hears of a node identity
/// that differs from the one the agent started with.
pub async fn run_with_discovery(
    ctx: Ec2Side,
    mut node: Node,
    discovered: Option<crate::node::Discovered>,
    mut stop: watch::Receiver<bool>,
) {
    let Ec2Side {
        config,
        ipam,
        metrics,
        notices,
        on_node,
        eniconfigs,
        shown,
    } = ctx;
    let discovered = if let Some(d) = discovered {
        d
    } else {
        let report = |why: String| debug!(%why, "EC2 discovery in the background");
        let d = tokio::select! {
            _ = stop.changed() => return,
            d = crate::node::discover_with_retry(&config, &metrics, report) => d,
        };
        match d {
            Ok(d) => d,
            Err(e) => {
                error!(error = %Chain(&e), "discovery failed for good; the pool will not grow or shrink until the agent restarts");
                return;
            }
        }
    };
    if discovered.node.instance_id != node.instance_id {
        error!(cached = %node.instance_id, actual = %discovered.node.instance_id, "the cached node identity is another instance's; using the actual one");
    }
    if discovered.node != node {
        node = discovered.node.clone();
        on_node(node.clone());
    }
    let (_, unmanaged) = ec2_merge::views(&discovered.enis, &node.instance_id);
    let host = match Host::open() {
        Ok(h) => Some(h),
        Err(e) => {
            warn!(error = %Chain(&e), "no netlink: new ENIs enter the pool without waiting for their interface");
            None
        }
    };
    let mode = if config.custom_network {
        placer::Mode::Custom(eniconfigs)
    } else if config.subnet_discovery {
        placer::Mode::Discovery
    } else {
        placer::Mode::NodeSubnet
    };
    let limits = node.limits;
    let max_pods = super::placement::max_pods(
        limits.max_enis,
        limits.slots_per_eni,
        config.mode == Mode::Prefix,
        config.custom_network,
    );
    info!(
        max_pods,
        custom_networking = config.custom_network,
        subnet_discovery = config.subnet_discovery,
        "ENI placement; max pods by EKS's formula"
    );
    metrics.max_pods.set(i64::from(max_pods));
    let placer = Placer::new(
        discovered.ec2.clone(),
        node.clone(),
        mode,
        config.cluster_name.clone(),
    )
    .showing(shown);
    let mut r = Reconciler::new(
        discovered.ec2,
        ipam,
        node,
        crate::node::Settings::from_config(&config),
        unmanaged,
        metrics,
    )
    .with_placer(placer)
    .with_notices(notices)
    .refresh_first();
    if let Some(h) = host {
        r = r.with_host(h);
    }
    r.run(stop).await;
}

pub fn log_report(r: &MergeReport) {
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

/// Sets the pool gauges from the datastore.
pub fn refresh_gauges(
    store: &Store,
    blocked: Option<GrowthBlock>,
    m: &Metrics,
    limits: InstanceLimits,
    s: &Settings,
) {
    let usage = store.usage(now_ms());
    let t = pool::totals(store.mode, &usage);
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
            blocked == Some(GrowthBlock::Pool(pool::Blocked::EniLimit)),
        ),
        (
            "max_pods",
            blocked == Some(GrowthBlock::Pool(pool::Blocked::MaxPods)),
        ),
        (
            "subnet_exhausted",
            blocked == Some(GrowthBlock::SubnetExhausted),
        ),
        ("eni_placement", blocked == Some(GrowthBlock::Placement)),
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
}
