//! Prometheus metrics, named after aws-node's `awscni_*` set under our own prefix so
//! dashboards port by renaming: pool sizes, ENIs, EC2 calls with errors and latency,
//! ADD/DEL requests and no-address events.

use std::{sync::atomic::AtomicU64, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

pub mod awscni;

pub const PREFIX: &str = "vpc_ebpf";

/// What `/metrics` is served as: the Prometheus text format, which both vpc-ebpf's
/// series and aws-node's (counters without `_total`) are valid in.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiErrorLabels {
    pub api: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PacketLabels {
    pub direction: String,
    pub reason: String,
}

/// A NetworkPolicy verdict, attributed to a policy (see `policy::flows`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub namespace: String,
    pub policy: String,
    pub direction: String,
    pub verdict: String,
}

type HistogramFamily = Family<ApiLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s: EC2 mutating calls take hundreds of ms, throttled ones seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

pub struct Metrics {
    registry: Registry,
    pub ec2_calls: Family<ApiLabels, Counter>,
    pub ec2_errors: Family<ApiErrorLabels, Counter>,
    pub ec2_latency: HistogramFamily,
    pub assigned_ips: Gauge,
    pub total_ips: Gauge,
    pub cooling_ips: Gauge,
    pub enis: Gauge,
    pub eni_max: Gauge,
    pub ip_max: Gauge,
    /// EKS's max-pods formula for this node (custom networking lowers it).
    pub max_pods: Gauge,
    pub add_requests: Counter,
    /// Time the agent spends on an AddNetwork call, lock wait and checkpoint included.
    pub add_latency: Histogram,
    pub del_requests: Counter,
    pub no_ip: Family<ReasonLabels, Counter>,
    pub ipam_errors: Family<ReasonLabels, Counter>,
    pub reconciles: Counter,
    pub leaked_enis_deleted: Counter,
    pub growth_blocked: Family<ReasonLabels, Gauge>,
    pub packets: Family<PacketLabels, Counter<u64, AtomicU64>>,
    pub policy_verdicts: Family<PolicyLabels, Counter>,
    pub policy_events_lost: Counter,
    /// aws-node's `awscni_*` series.
    pub awscni: awscni::AwsCni,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[allow(clippy::too_many_lines)] // one registration per metric, nothing to factor
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let m = Self {
            ec2_calls: Family::default(),
            ec2_errors: Family::default(),
            ec2_latency: Family::new_with_constructor(latency_histogram),
            assigned_ips: Gauge::default(),
            total_ips: Gauge::default(),
            cooling_ips: Gauge::default(),
            enis: Gauge::default(),
            eni_max: Gauge::default(),
            ip_max: Gauge::default(),
            max_pods: Gauge::default(),
            add_requests: Counter::default(),
            // 10 us .. ~5 s: a warm-pool answer is microseconds; a refill wait is seconds.
            add_latency: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            del_requests: Counter::default(),
            no_ip: Family::default(),
            ipam_errors: Family::default(),
            reconciles: Counter::default(),
            leaked_enis_deleted: Counter::default(),
            growth_blocked: Family::default(),
            packets: Family::default(),
            policy_verdicts: Family::default(),
            policy_events_lost: Counter::default(),
            awscni: awscni::AwsCni::default(),
            registry: Registry::default(),
        };
        registry.register(
            "aws_api_calls",
            "EC2 API calls made, by API",
            m.ec2_calls.clone(),
        );
        registry.register(
            "aws_api_errors",
            "EC2 API calls that failed, by API and AWS error code",
            m.ec2_errors.clone(),
        );
        registry.register(
            "aws_api_latency_seconds",
            "EC2 API call latency, by API",
            m.ec2_latency.clone(),
        );
        registry.register(
            "assigned_ip_addresses",
            "Pod addresses assigned",
            m.assigned_ips.clone(),
        );
        registry.register(
            "total_ip_addresses",
            "Pod addresses the node holds (assigned, cooling down and free)",
            m.total_ips.clone(),
        );
        registry.register(
            "cooldown_ip_addresses",
            "Addresses released by pods and not reusable until their cooldown ends",
            m.cooling_ips.clone(),
        );
        registry.register("eni_allocated", "ENIs attached", m.enis.clone());
        registry.register(
            "eni_max",
            "ENIs the instance type (or MAX_ENI) allows",
            m.eni_max.clone(),
        );
        registry.register(
            "ip_max",
            "Pod addresses the node could hold at most",
            m.ip_max.clone(),
        );
        registry.register(
            "max_pods",
            "Pods the node can network by EKS's max-pods formula (custom networking leaves out the primary ENI)",
            m.max_pods.clone(),
        );
        registry.register(
            "add_ip_requests",
            "Address requests from the CNI plugin",
            m.add_requests.clone(),
        );
        registry.register(
            "add_ip_latency_seconds",
            "Time the agent takes to answer an address request",
            m.add_latency.clone(),
        );
        registry.register(
            "del_ip_requests",
            "Address releases from the CNI plugin",
            m.del_requests.clone(),
        );
        registry.register(
            "no_available_ip",
            "ADDs refused for lack of a free address, by reason",
            m.no_ip.clone(),
        );
        registry.register(
            "ipamd_errors",
            "IPAM failures, by operation",
            m.ipam_errors.clone(),
        );
        registry.register(
            "reconcile",
            "Pool reconciliation passes",
            m.reconciles.clone(),
        );
        registry.register(
            "leaked_enis_deleted",
            "Detached ENIs of this node deleted by leaked-ENI cleanup",
            m.leaked_enis_deleted.clone(),
        );
        registry.register(
            "pool_growth_blocked",
            "1 while the pool cannot grow, by reason",
            m.growth_blocked.clone(),
        );
        registry.register(
            "dataplane_packets",
            "Packets seen by the eBPF programs, by direction and verdict reason",
            m.packets.clone(),
        );
        registry.register(
            "policy_verdicts",
            "NetworkPolicy verdicts by policy: new connections a policy admitted, and packets \
             and connections denied while a policy isolated the pod without admitting them",
            m.policy_verdicts.clone(),
        );
        registry.register(
            "policy_events_lost",
            "Policy verdicts the flow log missed because its buffer was full (counters and \
             logs undercount by this much)",
            m.policy_events_lost.clone(),
        );
        Self { registry, ..m }
    }

    pub fn ec2_call(&self, api: &str, error_code: &str, status: u16, took: Duration) {
        self.awscni.ec2_call(api, error_code, status, took);
        let l = ApiLabels {
            api: api.to_owned(),
        };
        self.ec2_calls.get_or_create(&l).inc();
        self.ec2_latency
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        if !error_code.is_empty() {
            self.ec2_errors
                .get_or_create(&ApiErrorLabels {
                    api: api.to_owned(),
                    error: error_code.to_owned(),
                })
                .inc();
        }
    }

    pub fn ipam_error(&self, op: &str) {
        self.awscni.ipamd_error(op);
        self.ipam_errors
            .get_or_create(&ReasonLabels {
                reason: op.to_owned(),
            })
            .inc();
    }

    /// vpc-ebpf's series, then aws-node's, in the Prometheus text format
    /// ([`CONTENT_TYPE`]): the encoder's OpenMetrics end marker is dropped (the text
    /// format has none), its `# UNIT` lines are comments there.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        if let Some(body) = out.strip_suffix("# EOF\n") {
            out.truncate(body.len());
        }
        self.awscni.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_our_prefix_and_labels() {
        let m = Metrics::new();
        awscni::two_assigns(|api, code, status, took| m.ec2_call(api, code, status, took));
        m.assigned_ips.set(7);
        let text = m.encode();
        assert!(
            text.contains(r#"vpc_ebpf_aws_api_calls_total{api="AssignPrivateIpAddresses"} 2"#),
            "{text}"
        );
        assert!(text.contains(
            r#"vpc_ebpf_aws_api_errors_total{api="AssignPrivateIpAddresses",error="RequestLimitExceeded"} 1"#
        ));
        assert!(text.contains("vpc_ebpf_assigned_ip_addresses 7"));
        assert!(text.contains("vpc_ebpf_aws_api_latency_seconds_bucket"));
        // aws-node's series follow, and no OpenMetrics end marker is left in the text.
        assert!(text.contains("awscni_ec2api_req_count{fn=\"AssignPrivateIpAddresses\"} 2"));
        assert!(!text.contains("# EOF"));
    }
}
