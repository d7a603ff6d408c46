//! The flow log: reads the programs' policy verdicts, describes them ([`super::flows`]),
//! counts them per policy, logs them when `ENABLE_POLICY_EVENT_LOGS` is on (denials at
//! info, admissions at debug), and keeps the recent ones and a live feed for
//! `vpc-ebpf-agent flows`.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};
use vpc_ebpf_common::policy::PolicyEvent;
use vpc_ebpf_rpc::report::Chain;

use super::{
    engine::Engine,
    flows::{Describer, Filter, FlowRecord},
};
use crate::{
    dataplane::{events::PolicyEvents, monotonic_now_ns},
    metrics::{Metrics, PolicyLabels},
};

/// Records kept for a viewer that asks for the past.
const RECENT: usize = 4096;
/// Records a slow live viewer may fall behind by before it skips some (and is told).
const FEED: usize = 4096;
/// Log lines per second at most; the rest are counted and said in one line.
const LOG_LINES_PER_SECOND: u32 = 100;

/// The recent records and the live feed.
#[derive(Debug)]
pub struct Hub {
    recent: Mutex<VecDeque<Arc<FlowRecord>>>,
    feed: broadcast::Sender<Arc<FlowRecord>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            feed: broadcast::channel(FEED).0,
        }
    }
}

impl Hub {
    pub fn publish(&self, r: FlowRecord) {
        let r = Arc::new(r);
        {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(r.clone());
        }
        // No viewer: nothing to send to.
        let _ = self.feed.send(r);
    }

    /// The last `n` records `f` matches, oldest first.
    pub fn recent(&self, f: &Filter, n: usize) -> Vec<Arc<FlowRecord>> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = recent
            .iter()
            .rev()
            .filter(|r| f.matches(r))
            .take(n)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowRecord>> {
        self.feed.subscribe()
    }
}

/// Counts one record under each policy it names.
fn count(metrics: &Metrics, r: &FlowRecord) {
    for j in &r.judged {
        for p in &j.policies {
            let (namespace, policy) = p.split_once('/').unwrap_or(("", p));
            metrics
                .policy_verdicts
                .get_or_create(&PolicyLabels {
                    namespace: namespace.to_owned(),
                    policy: policy.to_owned(),
                    direction: j.direction.clone(),
                    verdict: r.verdict.clone(),
                })
                .inc();
        }
    }
}

/// At most [`LOG_LINES_PER_SECOND`] lines; what is left out is said once a second.
struct LogBudget {
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    fn take(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                info!(
                    suppressed = self.suppressed,
                    "policy flow log lines left out (more than {LOG_LINES_PER_SECOND} a second); the live view and the counters have them all"
                );
            }
            *self = Self {
                window: Instant::now(),
                used: 0,
                suppressed: 0,
            };
        }
        self.used += 1;
        if self.used > LOG_LINES_PER_SECOND {
            self.suppressed += 1;
            return false;
        }
        true
    }
}

fn log(r: &FlowRecord, budget: &mut LogBudget) {
    if r.verdict == "allow" {
        if tracing::enabled!(tracing::Level::DEBUG) && budget.take() {
            debug!(flow = %r.line(), "policy verdict");
        }
    } else if budget.take() {
        info!(flow = %r.line(), "policy verdict");
    }
}

/// Unix milliseconds of a `CLOCK_MONOTONIC` nanosecond stamp.
fn wall_ms(ts_ns: u64) -> u64 {
    let now_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let age_ms = monotonic_now_ns().saturating_sub(ts_ns) / 1_000_000;
    now_unix_ms.saturating_sub(age_ms)
}

/// Reads events until `stop`.
pub async fn run(
    events: PolicyEvents,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    log_events: bool,
    mut stop: watch::Receiver<bool>,
) {
    let mut events = match events.into_async() {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "cannot poll the policy events; there will be no flow log");
            return;
        }
    };
    let hub = engine.flows();
    let mut describer = Describer::default();
    let mut budget = LogBudget {
        window: Instant::now(),
        used: 0,
        suppressed: 0,
    };
    let mut lost_seen = events.lost().unwrap_or(0);
    let mut lost_check = tokio::time::interval(Duration::from_secs(10));
    let mut batch: Vec<PolicyEvent> = Vec::with_capacity(256);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            r = events.next_batch(&mut batch) => {
                if let Err(e) = r {
                    warn!(error = %e, "polling the policy events failed; the flow log stops");
                    return;
                }
            }
            _ = lost_check.tick() => {
                match events.lost() {
                    Ok(lost) if lost > lost_seen => {
                        warn!(lost = lost - lost_seen, "policy events were lost: the flow log's buffer was full");
                        metrics.policy_events_lost.inc_by(lost - lost_seen);
                        lost_seen = lost;
                    }
                    Ok(_) => {}
                    Err(e) => debug!(error = %Chain(&e), "reading the lost-events counter failed"),
                }
                continue;
            }
        }
        let records = engine.describe(
            &mut describer,
            batch.drain(..).map(|ev| (ev, wall_ms(ev.ts_ns))),
        );
        for r in records {
            count(&metrics, &r);
            if log_events {
                log(&r, &mut budget);
            }
            hub.publish(r);
        }
    }
}
