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
    aws::{
        ec2::{
            Ec2, Ec2Error, ErrorKind, NewEni, TAG_CLUSTER_NAME, TAG_CREATED_AT, TAG_INSTANCE_ID,
            TAG_MANAGED_BY, format_time, parse_time,
        },
        imds::Imds,
    },
    clock::now_ms,
    host::Host,
    k8s::lease::ChoreLease,
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
    /// When the pool last gave something back: it shrinks at most every [`SHRINK_EVERY`].
    last_shrink: Option<Instant>,
    /// When this agent last changed what EC2 holds (IMDS lags such changes).
    last_change: Option<Instant>,
    next_reconcile: Instant,
    /// Where the periodic reconcile reads the instance (no EC2 call).
    imds: Option<Imds>,
    /// Hears of a changed node identity (the VPC's CIDRs).
    on_node: Option<NodeUpdates>,
    /// ENIs attached whose delete-on-termination EC2 did not take: tried again at each
    /// reconcile (ENI id → attachment id).
    dot_pending: BTreeMap<String, String>,
    /// With a cluster name on Kubernetes: one node at a time sweeps the whole cluster's
    /// leaked ENIs (those of terminated nodes too) under this Lease.
    sweep_lease: Option<ChoreLease>,
    /// Consecutive failed assigns on one ENI (device index, count): after a few, growth
    /// tries another ENI for a while.
    assign_failures: (u32, u32),
    /// The kind of EC2 failure noticed (an Event) since the last call that worked.
    noticed_trouble: Option<ErrorKind>,
}

/// Hears of a node identity that changed while the agent runs.
pub type NodeUpdates = Box<dyn Fn(Node) + Send + Sync>;

const IDLE_TICK: Duration = Duration::from_secs(1);
/// ipamd's pace: the pool gives addresses or ENIs back at most this often, so a burst
/// that ends does not return everything at once only to ask for it again.
const SHRINK_EVERY: Duration = Duration::from_secs(30);
/// ipamd's reconcile period: the datastore against IMDS, which costs no EC2 call.
const RECONCILE_EVERY: Duration = Duration::from_mins(1);
/// IMDS trails EC2 by seconds: a difference right after our own change is not one.
const IMDS_LAG: Duration = Duration::from_secs(10);

/// Leaked ENIs are looked for every 15–25 minutes (jittered so nodes started together
/// do not call together): at steady state that is a node's only EC2 call, well under
/// one per ten minutes.
fn leak_check_interval() -> Duration {
    Duration::from_mins(15) + Duration::from_mins(10).mul_f64(rand::random::<f64>())
}
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
            last_shrink: None,
            last_change: None,
            next_reconcile: Instant::now() + RECONCILE_EVERY,
            imds: None,
            on_node: None,
            dot_pending: BTreeMap::new(),
            sweep_lease: None,
            assign_failures: (0, 0),
            noticed_trouble: None,
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

    /// Reconciles with IMDS every minute, and tells `on_node` of a changed VPC.
    #[must_use]
    pub fn with_imds(mut self, imds: Imds, on_node: NodeUpdates) -> Self {
        self.imds = Some(imds);
        self.on_node = Some(on_node);
        self
    }

    #[must_use]
    pub fn with_sweep_lease(mut self, lease: Option<ChoreLease>) -> Self {
        self.sweep_lease = lease;
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
                    self.recovered().await;
                    (Duration::ZERO, false)
                }
                // Nothing was asked of EC2: nothing to say about it either.
                Ok(Outcome::Idle) => {
                    self.backoff.reset();
                    (IDLE_TICK, true)
                }
                Err(e) => {
                    // Said apart: the chain's temporary must not live across the await.
                    let said = Chain(&e).to_string();
                    self.ipam.set_ec2_trouble(Some(said)).await;
                    (self.failed(&e), false)
                }
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

    /// A pass worked: what EC2 trouble was said is over.
    async fn recovered(&mut self) {
        self.ipam.set_ec2_trouble(None).await;
        if self.noticed_trouble.is_some() {
            info!("EC2 answers again");
            self.notices.normal(
                "EC2Recovered",
                "EC2 answers again; the pool grows as configured",
            );
        }
        self.noticed_refusal = false;
        self.noticed_trouble = None;
        self.backoff.reset();
    }

    /// Decides how long to wait after a failed call.
    fn failed(&mut self, e: &Ec2Error) -> Duration {
        // Said once per episode, after a few failures in a row: one throttled call is
        // routine, a pool that cannot grow is something to look at.
        if e.retryable() && self.backoff.attempts() >= 3 && self.noticed_trouble.is_none() {
            self.noticed_trouble = Some(e.kind());
            let reason = if e.kind() == ErrorKind::Throttled {
                "EC2Throttled"
            } else {
                "EC2Unavailable"
            };
            self.notices.warning(
                reason,
                format!(
                    "{} failures in a row, the last: {}; pods are served from the addresses the node holds while the agent backs off",
                    self.backoff.attempts() + 1,
                    Chain(e)
                ),
            );
        }
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
            ErrorKind::Throttled => {
                // A throttled request was not carried out: nothing to read back.
                let d = self.backoff.next_wait();
                warn!(error = %Chain(e), retry_in = ?d, attempt = self.backoff.attempts(), "EC2 throttled the call; backing off");
                d
            }
            ErrorKind::Transient => {
                // A 5xx or a timeout may have been carried out all the same (an ENI
                // attached, addresses assigned): read what EC2 has before the next step,
                // so nothing is left attached and unknown.
                self.refresh_needed = true;
                let d = self.backoff.next_wait();
                warn!(error = %Chain(e), retry_in = ?d, attempt = self.backoff.attempts(), "EC2 call failed; backing off, then reading EC2 again");
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
        if Instant::now() >= self.next_reconcile {
            self.next_reconcile = Instant::now() + RECONCILE_EVERY;
            self.reconcile_with_imds().await;
            self.retry_delete_on_termination().await;
        }
        if self.refresh_needed {
            self.refresh_from_ec2().await?;
            self.refresh_needed = false;
        }
        if self.settings.leaked_eni_cleanup && Instant::now() >= self.next_leak_check {
            self.next_leak_check = Instant::now() + leak_check_interval();
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
        let waiting = self.ipam.waiting();
        let plan = self
            .ipam
            .read(|store, _| {
                let mut usage = store.usage(now_ms());
                for u in &mut usage {
                    u.subnet_full = full.contains(&u.device_index);
                }
                pool::plan_with_waiting(
                    self.settings.mode,
                    &self.settings.targets,
                    self.limits(),
                    &usage,
                    waiting,
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
            self.last_change = Some(Instant::now());
            return Ok(Outcome::Progress);
        }
        let may_shrink = self.last_shrink.is_none_or(|t| t.elapsed() >= SHRINK_EVERY);
        if plan.release_units > 0 && may_shrink && self.release_units(plan.release_units).await? {
            self.shrunk(true);
            return Ok(Outcome::Progress);
        }
        if let Some(dev) = plan.release_eni {
            // An ENI the pacing already emptied goes at once: it holds nothing a pod
            // could use; one still holding addresses is a shrink of its own.
            let emptied = self
                .ipam
                .read(|s, _| {
                    s.enis()
                        .find(|e| e.device_index == dev)
                        .is_some_and(|e| e.addrs.is_empty() && e.prefixes.is_empty())
                })
                .await;
            if (emptied || may_shrink) && self.release_eni(dev).await? {
                self.shrunk(!emptied);
                return Ok(Outcome::Progress);
            }
        }
        Ok(Outcome::Idle)
    }

    fn shrunk(&mut self, paced: bool) {
        let now = Instant::now();
        if paced {
            self.last_shrink = Some(now);
        }
        self.last_change = Some(now);
    }

    /// ipamd's minute reconcile, against IMDS (no EC2 call): the VPC's CIDRs are read
    /// again (a CIDR added to the VPC is honoured without a restart), and EC2 is read
    /// only when IMDS shows the ENIs or their addresses other than the datastore does.
    async fn reconcile_with_imds(&mut self) {
        let Some(imds) = self.imds.as_mut() else {
            return;
        };
        let meta = match imds.discover().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %Chain(&e), "reconcile: IMDS could not be read; trying again in a minute");
                return;
            }
        };
        if let Some(primary) = meta.enis.iter().find(|e| e.device_index == 0) {
            let cidrs: Vec<ipnet::Ipv4Net> = primary
                .vpc_cidrs
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect();
            if !cidrs.is_empty() && cidrs != self.node.vpc_cidrs {
                info!(was = ?self.node.vpc_cidrs, now = ?cidrs, "the VPC's CIDRs changed; the dataplane takes them");
                self.node.vpc_cidrs = cidrs;
                if let Some(f) = &self.on_node {
                    f(self.node.clone());
                }
            }
        }
        if self.last_change.is_some_and(|t| t.elapsed() < IMDS_LAG) {
            return;
        }
        let prefixes = self.prefixes();
        let theirs = self.unmanaged_indexes.clone();
        self.metrics.awscni.reconciled();
        let seen = ec2_merge::imds_units(&meta.enis, &theirs, prefixes);
        let held = self
            .ipam
            .read(|s, _| ec2_merge::store_units(s, prefixes))
            .await;
        if seen != held {
            info!(imds = ?seen, datastore = ?held, "reconcile: IMDS and the datastore disagree; reading EC2");
            self.refresh_needed = true;
        }
    }

    async fn retry_delete_on_termination(&mut self) {
        let pending = std::mem::take(&mut self.dot_pending);
        for (eni, attachment) in pending {
            match self.ec2.set_delete_on_termination(&eni, &attachment).await {
                Ok(()) => info!(%eni, "delete-on-termination set"),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(%eni, error = %Chain(&e), "delete-on-termination still not set; trying again in a minute");
                    self.dot_pending.insert(eni, attachment);
                }
            }
        }
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
                    Err(e)
                        if e.kind() != ErrorKind::Throttled
                            && e.kind() != ErrorKind::SubnetFull =>
                    {
                        // Throttling is the account's, not the ENI's; anything else that
                        // keeps failing on one ENI sends growth to another for a while.
                        let (dev, n) = self.assign_failures;
                        let n = if dev == device_index { n + 1 } else { 1 };
                        self.assign_failures = (device_index, n);
                        if n >= 3 {
                            warn!(%eni, failures = n, error = %Chain(&e), "assigns on this ENI keep failing; growing on another ENI for a minute");
                            self.full_enis
                                .insert(device_index, Instant::now() + Duration::from_mins(1));
                            self.assign_failures = (device_index, 0);
                        }
                        return Err(e);
                    }
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
                self.assign_failures = (device_index, 0);
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
        let attachment = match self
            .ec2
            .attach_eni(&eni.id, &self.node.instance_id, device_index)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                // Attached or not, we do not know: a detached ENI is deleted now; an
                // attached one (a timeout that went through) refuses deletion and is
                // adopted by the read of EC2 that follows every failure.
                if let Err(del) = self.ec2.delete_eni(&eni.id).await {
                    warn!(eni = %eni.id, error = %Chain(&del), "could not delete an ENI whose attach failed; reading EC2 adopts it if attached, leaked-ENI cleanup deletes it if not");
                }
                self.refresh_needed = true;
                return Err(e);
            }
        };
        if let Err(e) = self
            .ec2
            .set_delete_on_termination(&eni.id, &attachment)
            .await
        {
            // The ENI is attached: keeping it is right, dropping it would leave it
            // attached and unknown (and the next attach would collide with it).
            warn!(eni = %eni.id, error = %Chain(&e), "the ENI is attached but delete-on-termination was not set; keeping it and trying again at the next reconcile");
            self.metrics.ipam_error("delete_on_termination");
            self.dot_pending.insert(eni.id.clone(), attachment);
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
                s.mark_attached(&eni.id, now_ms());
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

    /// Deletes detached ENIs that vpc-ebpf created and that are old enough not to be in
    /// the middle of an attach: the whole cluster's when this node holds the sweep
    /// Lease, none when another node does, and this node's own without Kubernetes or a
    /// cluster name.
    async fn cleanup_leaked(&mut self) -> Result<(), Ec2Error> {
        let cluster = match (&self.sweep_lease, &self.settings.cluster_name) {
            (Some(lease), Some(cluster)) => match lease.try_take().await {
                Ok(true) => Some(cluster.clone()),
                Ok(false) => {
                    debug!("another node sweeps the cluster's leaked ENIs this period");
                    return Ok(());
                }
                Err(e) => {
                    warn!(error = %Chain(&e), "the sweep Lease could not be read or taken; sweeping this node's own leaked ENIs");
                    None
                }
            },
            _ => None,
        };
        let candidates = match &cluster {
            Some(c) => self.ec2.detached_enis_of_cluster(c).await?,
            None => self.ec2.detached_enis_of(&self.node.instance_id).await?,
        };
        let now = SystemTime::now();
        for e in candidates {
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
                    let of = e.tags.get(TAG_INSTANCE_ID).map_or("", String::as_str);
                    info!(eni = %e.id, ?age, instance = %of, "deleted a leaked ENI");
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
                self.metrics
                    .awscni
                    .force_removed_ips(u64::try_from(report.lost.len()).unwrap_or(u64::MAX));
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
    pub on_node: NodeUpdates,
    /// Custom networking's ENIConfig reader, on Kubernetes.
    pub eniconfigs: Option<crate::k8s::eniconfig::EniConfigs>,
    /// Where introspection finds the placement.
    pub shown: Arc<std::sync::Mutex<placer::Shown>>,
    /// The cluster-wide leaked-ENI sweep's Lease, on Kubernetes.
    pub sweep_lease: Option<ChoreLease>,
    /// On Kubernetes: the Node's allocatable pods cap what the pool holds.
    pub kube: Option<crate::k8s::Kube>,
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
        sweep_lease,
        kube,
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
    let settings = capped_by_node(Settings::from_config(&config), kube.as_ref()).await;
    let mut r = Reconciler::new(discovered.ec2, ipam, node, settings, unmanaged, metrics)
        .with_placer(placer)
        .with_notices(notices)
        .with_imds(Imds::new(&config.imds_endpoint), on_node)
        .with_sweep_lease(sweep_lease)
        .refresh_first();
    if let Some(h) = host {
        r = r.with_host(h);
    }
    r.run(stop).await;
}

/// On Kubernetes, max pods is at most the Node's allocatable pods: more addresses than
/// the kubelet will run pods would only sit idle.
async fn capped_by_node(mut settings: Settings, kube: Option<&crate::k8s::Kube>) -> Settings {
    let Some(k) = kube else {
        return settings;
    };
    if let Some(allocatable) = k
        .own_node(Duration::from_secs(30))
        .await
        .as_ref()
        .and_then(crate::k8s::allocatable_pods)
    {
        let cap = settings
            .targets
            .max_pods
            .map_or(allocatable, |m| m.min(allocatable));
        info!(
            allocatable,
            max_pods = cap,
            "the Node's allocatable pods cap the pool"
        );
        settings.targets.max_pods = Some(cap);
    }
    settings
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

/// aws-node's pool series, from the gauges [`refresh_gauges`] set. Only at a scrape: the
/// per-address shape is not worth building on every reconciler pass.
pub fn refresh_awscni(store: &Store, m: &Metrics) {
    m.awscni.set_pool(
        m.enis.get(),
        m.eni_max.get(),
        m.ip_max.get(),
        (m.total_ips.get(), m.assigned_ips.get()),
        pool_shape(store),
    );
}

/// Assigned addresses per ENI and per CIDR (each prefix, or each address as a /32), as
/// aws-node's `awscni_assigned_ip_per_*` report them.
fn pool_shape(store: &Store) -> crate::metrics::awscni::PoolShape {
    let mut shape = crate::metrics::awscni::PoolShape::default();
    for e in store.enis() {
        let assigned = |ip: &Ipv4Addr| {
            matches!(
                e.addrs.get(ip),
                Some(super::store::AddrState::Assigned { .. })
            )
        };
        let n = e.addrs.keys().filter(|ip| assigned(ip)).count();
        shape
            .per_eni
            .insert(e.id.clone(), u64::try_from(n).unwrap_or(u64::MAX));
        shape.prefixes += u64::try_from(e.prefixes.len()).unwrap_or(u64::MAX);
        if store.mode == Mode::Prefix {
            for base in &e.prefixes {
                let in_prefix = (0..pool::PREFIX_SIZE)
                    .filter(|i| assigned(&Ipv4Addr::from(u32::from(*base) + i)))
                    .count();
                shape.per_cidr.insert(
                    format!("{base}/28"),
                    u64::try_from(in_prefix).unwrap_or(u64::MAX),
                );
            }
        } else {
            for ip in e.addrs.keys() {
                shape
                    .per_cidr
                    .insert(format!("{ip}/32"), u64::from(assigned(ip)));
            }
        }
    }
    shape
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
