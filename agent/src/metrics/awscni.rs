//! aws-node's own `awscni_*` series, with its names, types and labels, beside vpc-ebpf's:
//! Grafana dashboards, alerts and the CNI metrics helper read these names as they are.
//!
//! They are written in the Prometheus text format by hand, because aws-node's client
//! names counters without the `_total` suffix the OpenMetrics encoder adds, and times
//! EC2 calls in a summary (only `_sum` and `_count`: aws-node declares no quantiles),
//! which the encoder has no type for. What vpc-ebpf has no counterpart for (security
//! groups for pods' errors, ipamd's in-progress actions, force-removed ENIs) is left out
//! rather than reported as a constant.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

/// One EC2 API's calls, as aws-node labels them.
#[derive(Clone, Debug, Default, PartialEq)]
struct Latency {
    count: u64,
    sum_ms: f64,
}

/// The pool as the reconciler last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolShape {
    pub prefixes: u64,
    /// Assigned addresses per ENI id.
    pub per_eni: BTreeMap<String, u64>,
    /// Assigned addresses per CIDR: each /28 prefix in prefix mode, each /32 otherwise.
    pub per_cidr: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
pub struct AwsCni {
    /// (api, error "true"/"false", status) → latency.
    latency: Mutex<BTreeMap<(String, String, String), Latency>>,
    /// (api, AWS error code) → count.
    api_errors: Mutex<BTreeMap<(String, String), u64>>,
    /// api → (requests, failed).
    ec2_requests: Mutex<BTreeMap<String, (u64, u64)>>,
    /// ipamd-style function name → count.
    ipamd_errors: Mutex<BTreeMap<String, u64>>,
    del_requests: Mutex<BTreeMap<String, u64>>,
    add_requests: AtomicU64,
    no_available: AtomicU64,
    force_removed_ips: AtomicU64,
    reconciles: AtomicU64,
    enis: AtomicI64,
    eni_max: AtomicI64,
    ip_max: AtomicI64,
    total_ips: AtomicI64,
    assigned_ips: AtomicI64,
    pool: Mutex<PoolShape>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take the metrics down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A label value as the text format quotes it.
fn quoted(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl AwsCni {
    /// An EC2 call: `error_code` empty when it worked; `status` the HTTP status (0 when
    /// the call never got one, a timeout).
    pub fn ec2_call(&self, api: &str, error_code: &str, status: u16, took: Duration) {
        let failed = !error_code.is_empty();
        let key = (
            api.to_owned(),
            failed.to_string(),
            if status == 0 {
                String::new()
            } else {
                status.to_string()
            },
        );
        let mut l = lock(&self.latency);
        let e = l.entry(key).or_default();
        e.count += 1;
        e.sum_ms += took.as_secs_f64() * 1000.0;
        drop(l);
        let mut r = lock(&self.ec2_requests);
        let e = r.entry(api.to_owned()).or_default();
        e.0 += 1;
        e.1 += u64::from(failed);
        drop(r);
        if failed {
            *lock(&self.api_errors)
                .entry((api.to_owned(), error_code.to_owned()))
                .or_default() += 1;
        }
    }

    pub fn ipamd_error(&self, function: &str) {
        *lock(&self.ipamd_errors)
            .entry(function.to_owned())
            .or_default() += 1;
    }

    pub fn add_request(&self) {
        self.add_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A release, with aws-node's reason (`PodDeleted` for the plugin's DEL).
    pub fn del_request(&self, reason: &str) {
        *lock(&self.del_requests)
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    pub fn no_available_ip(&self) {
        self.no_available.fetch_add(1, Ordering::Relaxed);
    }

    /// Addresses EC2 took from pods behind the agent's back.
    pub fn force_removed_ips(&self, n: u64) {
        self.force_removed_ips.fetch_add(n, Ordering::Relaxed);
    }

    pub fn reconciled(&self) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
    }

    /// The pool's gauges: ENIs, ENI and address maxima, total and assigned addresses, and
    /// the per-ENI and per-CIDR shape.
    pub fn set_pool(
        &self,
        enis: i64,
        eni_max: i64,
        ip_max: i64,
        totals: (i64, i64),
        shape: PoolShape,
    ) {
        self.enis.store(enis, Ordering::Relaxed);
        self.eni_max.store(eni_max, Ordering::Relaxed);
        self.ip_max.store(ip_max, Ordering::Relaxed);
        self.total_ips.store(totals.0, Ordering::Relaxed);
        self.assigned_ips.store(totals.1, Ordering::Relaxed);
        *lock(&self.pool) = shape;
    }

    /// The series in the Prometheus text format (version 0.0.4).
    pub fn render(&self, out: &mut String) {
        let mut w = Writer { out };
        w.family(
            "awscni_ipamd_error_count",
            "counter",
            "The number of errors encountered in ipamd",
            lock(&self.ipamd_errors)
                .iter()
                .map(|(f, n)| (format!("fn=\"{}\"", quoted(f)), count(*n))),
        );
        let gauge = |v: &AtomicI64| v.load(Ordering::Relaxed).to_string();
        w.single(
            "awscni_eni_max",
            "gauge",
            "The maximum number of ENIs that can be attached to the instance, accounting for unmanaged ENIs",
            &gauge(&self.eni_max),
        );
        w.single(
            "awscni_ip_max",
            "gauge",
            "The maximum number of IP addresses that can be allocated to the instance",
            &gauge(&self.ip_max),
        );
        w.family(
            "awscni_reconcile_count",
            "counter",
            "The number of times ipamd reconciles on ENIs and IP/Prefix addresses",
            std::iter::once((
                "fn=\"nodeIPPoolReconcile\"".to_owned(),
                count(self.reconciles.load(Ordering::Relaxed)),
            )),
        );
        w.single(
            "awscni_add_ip_req_count",
            "counter",
            "The number of add IP address requests",
            &count(self.add_requests.load(Ordering::Relaxed)),
        );
        w.family(
            "awscni_del_ip_req_count",
            "counter",
            "The number of delete IP address requests",
            lock(&self.del_requests)
                .iter()
                .map(|(r, n)| (format!("reason=\"{}\"", quoted(r)), count(*n))),
        );
        self.ec2_series(&mut w);
        w.single(
            "awscni_eni_allocated",
            "gauge",
            "The number of ENIs allocated",
            &gauge(&self.enis),
        );
        w.single(
            "awscni_total_ip_addresses",
            "gauge",
            "The total number of IP addresses",
            &gauge(&self.total_ips),
        );
        w.single(
            "awscni_assigned_ip_addresses",
            "gauge",
            "The number of IP addresses assigned to pods",
            &gauge(&self.assigned_ips),
        );
        w.single(
            "awscni_force_removed_ips",
            "counter",
            "The number of IPs force removed while they had assigned pods",
            &count(self.force_removed_ips.load(Ordering::Relaxed)),
        );
        let pool = lock(&self.pool).clone();
        w.single(
            "awscni_total_ipv4_prefixes",
            "gauge",
            "The total number of IPv4 prefixes",
            &count(pool.prefixes),
        );
        w.family(
            "awscni_assigned_ip_per_cidr",
            "gauge",
            "The total number of IP addresses assigned per cidr",
            pool.per_cidr
                .iter()
                .map(|(c, n)| (format!("cidr=\"{}\"", quoted(c)), count(*n))),
        );
        w.single(
            "awscni_no_available_ip_addresses",
            "counter",
            "The number of pod IP assignments that fail due to no available IP addresses",
            &count(self.no_available.load(Ordering::Relaxed)),
        );
        w.family(
            "awscni_assigned_ip_per_eni",
            "gauge",
            "The number of allocated ips partitioned by eni",
            pool.per_eni
                .iter()
                .map(|(e, n)| (format!("eni=\"{}\"", quoted(e)), count(*n))),
        );
    }

    /// aws-node's EC2 call series: latency, errors by code, requests and failures.
    fn ec2_series(&self, w: &mut Writer<'_>) {
        w.summary(&lock(&self.latency));
        w.family(
            "awscni_aws_api_error_count",
            "counter",
            "The number of times AWS API returns an error",
            lock(&self.api_errors).iter().map(|((api, e), n)| {
                (
                    format!("api=\"{}\",error=\"{}\"", quoted(api), quoted(e)),
                    count(*n),
                )
            }),
        );
        let requests = lock(&self.ec2_requests).clone();
        w.family(
            "awscni_ec2api_req_count",
            "counter",
            "The number of requests made to EC2 APIs by CNI",
            requests
                .iter()
                .map(|(api, (n, _))| (format!("fn=\"{}\"", quoted(api)), count(*n))),
        );
        w.family(
            "awscni_ec2api_error_count",
            "counter",
            "The number of failed EC2 APIs requests",
            requests
                .iter()
                .filter(|(_, (_, failed))| *failed > 0)
                .map(|(api, (_, failed))| (format!("fn=\"{}\"", quoted(api)), count(*failed))),
        );
    }
}

fn count(n: u64) -> String {
    n.to_string()
}

struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: &str) {
        self.header(name, kind, help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A labelled family; left out while it has no series, as client_golang does.
    fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        series: impl Iterator<Item = (String, String)>,
    ) {
        let mut series = series.peekable();
        if series.peek().is_none() {
            return;
        }
        self.header(name, kind, help);
        for (labels, value) in series {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }

    fn summary(&mut self, latency: &BTreeMap<(String, String, String), Latency>) {
        const NAME: &str = "awscni_aws_api_latency_ms";
        if latency.is_empty() {
            return;
        }
        self.header(NAME, "summary", "AWS API call latency in ms");
        for ((api, error, status), l) in latency {
            let labels = format!(
                "api=\"{}\",error=\"{}\",status=\"{}\"",
                quoted(api),
                quoted(error),
                quoted(status)
            );
            let _ = writeln!(self.out, "{NAME}_sum{{{labels}}} {}", l.sum_ms);
            let _ = writeln!(self.out, "{NAME}_count{{{labels}}} {}", l.count);
        }
    }
}

/// Two calls of one API, one that worked and one throttled: what the tests of both
/// expositions record.
#[cfg(test)]
pub(crate) fn two_assigns(call: impl Fn(&str, &str, u16, Duration)) {
    call(
        "AssignPrivateIpAddresses",
        "",
        200,
        Duration::from_millis(12),
    );
    call(
        "AssignPrivateIpAddresses",
        "RequestLimitExceeded",
        503,
        Duration::from_millis(3),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_aws_nodes_names_types_and_labels() {
        let a = AwsCni::default();
        two_assigns(|api, code, status, took| a.ec2_call(api, code, status, took));
        a.add_request();
        a.del_request("PodDeleted");
        a.ipamd_error("increaseIPPool");
        a.set_pool(
            2,
            3,
            27,
            (10, 4),
            PoolShape {
                prefixes: 0,
                per_eni: [("eni-1".to_owned(), 4)].into(),
                per_cidr: [("10.0.0.5/32".to_owned(), 1)].into(),
            },
        );
        let mut text = String::new();
        a.render(&mut text);
        for want in [
            "# TYPE awscni_add_ip_req_count counter\nawscni_add_ip_req_count 1\n",
            "awscni_del_ip_req_count{reason=\"PodDeleted\"} 1\n",
            "# TYPE awscni_aws_api_latency_ms summary\n",
            "awscni_aws_api_latency_ms_count{api=\"AssignPrivateIpAddresses\",error=\"false\",status=\"200\"} 1\n",
            "awscni_aws_api_latency_ms_sum{api=\"AssignPrivateIpAddresses\",error=\"true\",status=\"503\"} 3\n",
            "awscni_aws_api_error_count{api=\"AssignPrivateIpAddresses\",error=\"RequestLimitExceeded\"} 1\n",
            "awscni_ec2api_req_count{fn=\"AssignPrivateIpAddresses\"} 2\n",
            "awscni_ec2api_error_count{fn=\"AssignPrivateIpAddresses\"} 1\n",
            "awscni_ipamd_error_count{fn=\"increaseIPPool\"} 1\n",
            "# TYPE awscni_eni_allocated gauge\nawscni_eni_allocated 2\n",
            "awscni_eni_max 3\n",
            "awscni_ip_max 27\n",
            "awscni_total_ip_addresses 10\n",
            "awscni_assigned_ip_addresses 4\n",
            "awscni_assigned_ip_per_eni{eni=\"eni-1\"} 4\n",
            "awscni_assigned_ip_per_cidr{cidr=\"10.0.0.5/32\"} 1\n",
            "awscni_no_available_ip_addresses 0\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // No counter carries OpenMetrics' suffix: dashboards query aws-node's names.
        let suffixed = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .find(|name| name.ends_with("_total"));
        assert_eq!(suffixed, None, "{text}");
        // Families without series are left out, as aws-node's client does.
        assert!(!text.contains("awscni_pod_eni_error_count"));
    }
}
