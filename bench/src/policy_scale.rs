//! `vpc-ebpf-bench policy-scale`: one agent's NetworkPolicy engine under a big cluster.
//! A synthetic watch stream (by default 150k pods in 5k namespaces, 10k policies) is fed
//! to the engine through the calls its watchers make; the engine compiles its node's pods
//! (110 by default, spread over the namespaces) and writes real pinned maps through the
//! dataplane owner, in a network namespace of its own. Reported: the process's RSS, the
//! time to take the stream and compile and apply everything, and the time to re-program
//! after one pod's labels change (compile + plan + map writes; the agent batches changes
//! for 20 ms before this, so end to end add that).
//!
//! The cluster: namespaces labelled `team=t<n % 50>`; pods labelled `app` in web, api, db,
//! cache, monitor (in turn) and each with a named port `http`; in every namespace two
//! policies: `api` (pods app=api admit app=web of their namespace on `http`, and
//! app=monitor of every namespace of their team on 9090) and `default` (every pod isolated
//! both ways, egress to its namespace's pods and to DNS in 10.0.0.0/8 but 10.1.0.0/16).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use vpc_ebpf_agent::{
    dataplane::{Dataplane, DataplaneConfig, owner},
    endpoints::{Endpoint, PodRef, Registry},
    ipam::{EniRef, store::AttachmentKey},
    metrics::Metrics,
    policy::{
        engine::{EnforcingMode, Engine},
        model::{PodView, Policy, TCP},
    },
};
use vpc_ebpf_tests::netns::NetNs;

const USAGE: &str = "usage: vpc-ebpf-bench policy-scale [--pods N] [--namespaces N] [--local N] \
                     [--changes N] [--json FILE]";

const APPS: [&str; 5] = ["web", "api", "db", "cache", "monitor"];
const TEAMS: usize = 50;

struct Options {
    pods: usize,
    namespaces: usize,
    local: usize,
    changes: usize,
    json: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        pods: 150_000,
        namespaces: 5_000,
        local: 110,
        changes: 300,
        json: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or(format!("{a} needs a value"))?;
        let n = || {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("{a} wants a positive integer, got {v:?}"))
        };
        match a.as_str() {
            "--pods" => o.pods = n()?,
            "--namespaces" => o.namespaces = n()?,
            "--local" => o.local = n()?,
            "--changes" => o.changes = n()?,
            "--json" => o.json = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    if o.local > o.pods || o.namespaces > o.pods {
        return Err("--local and --namespaces must not exceed --pods".into());
    }
    Ok(o)
}

pub fn main(args: &[String]) -> i32 {
    let o = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return 2;
        }
    };
    let ns = NetNs::new("bps");
    let pin_root = PathBuf::from(format!(
        "/sys/fs/bpf/vpc-ebpf-bench-ps-{}",
        std::process::id()
    ));
    let r = ns.run(|| measure(&o, &pin_root));
    let _ = std::fs::remove_dir_all(&pin_root);
    match r {
        Ok(v) => {
            if let Some(f) = &o.json
                && let Err(e) = std::fs::write(f, serde_json::to_vec_pretty(&v).unwrap_or_default())
            {
                eprintln!("writing {}: {e}", f.display());
                return 1;
            }
            0
        }
        Err(e) => {
            eprintln!("policy-scale: {e}");
            1
        }
    }
}

fn pod_ip(i: usize) -> Ipv4Addr {
    // 100.64.0.0/10 holds 4M addresses: room for any pod count this takes.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + u32::try_from(i).unwrap_or(0))
}

fn ns_name(n: usize) -> String {
    format!("ns-{n:05}")
}

/// Pod `i`: namespace `i % namespaces`, so a namespace's pods have every app.
fn pod(o: &Options, i: usize, app: &str) -> PodView {
    // As the watcher makes them: labels and named ports shared between equal pods.
    PodView::new(
        ns_name(i % o.namespaces),
        format!("pod-{i:06}"),
        Some(pod_ip(i)),
        BTreeMap::from([
            ("app".to_owned(), app.to_owned()),
            ("pod-template-hash".to_owned(), format!("{:08x}", i / 7)),
            ("version".to_owned(), "v1".to_owned()),
        ]),
        vec![("http".to_owned(), TCP, 8080)],
        false,
    )
}

fn app_of(i: usize, o: &Options) -> &'static str {
    APPS[(i / o.namespaces) % APPS.len()]
}

fn policies(ns: &str, team: usize) -> [Policy; 2] {
    let api: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": "api"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "api"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "http"}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{team}")}},
                           "podSelector": {"matchLabels": {"app": "monitor"}}}],
                 "ports": [{"port": 9090}]},
            ],
        },
    }))
    .expect("a valid policy");
    let default: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"namespace": ns, "name": "default"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "egress": [
                {"to": [{"podSelector": {}}]},
                {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                 "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53}]},
            ],
        },
    }))
    .expect("a valid policy");
    [Policy::from_api(&api).0, Policy::from_api(&default).0]
}

fn mib(kib: u64) -> f64 {
    f64::from(u32::try_from(kib).unwrap_or(u32::MAX)) / 1024.0
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn endpoint(o: &Options, i: usize) -> Endpoint {
    let p = pod(o, i, app_of(i, o));
    Endpoint {
        ip: pod_ip(i),
        key: AttachmentKey {
            network: "vpc-ebpf".into(),
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        },
        pod: PodRef {
            namespace: p.namespace,
            name: p.name,
            uid: format!("u{i}"),
        },
        eni: EniRef {
            id: "eni-0".into(),
            device_index: 0,
        },
        host_ports: Vec::new(),
        wiring: None,
        labels: BTreeMap::new(),
        named_ports: Vec::new(),
        policy_id: 0,
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[expect(
    clippy::too_many_lines,
    reason = "one measurement, in the order it runs"
)]
fn measure(o: &Options, pin_root: &std::path::Path) -> Result<serde_json::Value, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        let dp = Dataplane::load(&DataplaneConfig {
            pin_root: pin_root.to_path_buf(),
            attach_mode: None,
            nat_max_entries: Some(4096),
        })
        .map_err(|e| format!("loading the dataplane: {e}"))?;
        let (handle, thread) = owner::spawn(dp, Ipv4Addr::new(10, 0, 0, 1), Arc::new(Metrics::new()))
            .map_err(|e| format!("starting the owner: {e}"))?;
        // The node's pods: spread over the cluster, one in every `pods / local`.
        let stride = o.pods / o.local;
        let locals: Vec<usize> = (0..o.local).map(|k| k * stride).collect();
        let dir = std::env::temp_dir().join(format!("vpc-ebpf-bench-ps-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let registry = Arc::new(Registry::new(
            locals.iter().map(|&i| endpoint(o, i)).collect(),
            dir.join("endpoints.json"),
        ));
        let rss_before = rss_kib();
        let engine = Engine::new(registry, handle.clone(), EnforcingMode::Standard);

        // The stream, as the three watchers hand it over after their lists.
        let t_feed = Instant::now();
        engine.namespaces_listed(
            (0..o.namespaces)
                .map(|n| {
                    (
                        ns_name(n),
                        BTreeMap::from([
                            ("team".to_owned(), format!("t{}", n % TEAMS)),
                            ("kubernetes.io/metadata.name".to_owned(), ns_name(n)),
                        ]),
                    )
                })
                .collect(),
        );
        engine.policies_listed(
            (0..o.namespaces)
                .flat_map(|n| policies(&ns_name(n), n % TEAMS))
                .collect(),
        );
        engine.pods_listed((0..o.pods).map(|i| pod(o, i, app_of(i, o))).collect());
        let fed = t_feed.elapsed();
        let t_compile = Instant::now();
        let applied = engine
            .sync()
            .await
            .map_err(|e| format!("the first apply: {e}"))?
            .ok_or("the engine did not take the lists as synced")?;
        let compiled = t_compile.elapsed();
        let rss_after = rss_kib();

        // One pod's labels change at a time; the three kinds in turn: a peer of local
        // pods (web↔cache next to a local api pod), a local pod itself (api↔db), and a
        // pod nothing local depends on.
        let mut took = [Vec::new(), Vec::new(), Vec::new()];
        let mut changed_maps = [0usize; 3];
        for c in 0..o.changes {
            let kind = c % 3;
            let local = locals[(c / 3) % locals.len()];
            let i = match kind {
                // Another pod of the local pod's namespace (same `i % namespaces`).
                0 => (local + o.namespaces) % o.pods,
                1 => local,
                _ => (local + o.namespaces / 2 + 1) % o.pods,
            };
            let flip = (c / 3) % 2 == 0;
            let app = [["web", "cache"], ["db", "api"], ["cache", "db"]][kind][usize::from(!flip)];
            engine.pod_applied(pod(o, i, app));
            let t = Instant::now();
            let a = engine
                .sync()
                .await
                .map_err(|e| format!("a re-apply: {e}"))?
                .ok_or("not synced")?;
            took[kind].push(t.elapsed());
            changed_maps[kind] += a.sets_written + a.pods_changed + a.sets_removed;
        }
        let mut all: Vec<Duration> = took.iter().flatten().copied().collect();
        all.sort_unstable();
        for t in &mut took {
            t.sort_unstable();
        }
        let kinds = ["peer of local pods", "local pod", "unrelated pod"];
        println!(
            "policy-scale: {} pods, {} namespaces, {} policies; {} local pods ({} isolated, {} rule sets)",
            o.pods, o.namespaces, 2 * o.namespaces, o.local, applied.pods, applied.sets
        );
        println!(
            "  RSS: {:.0} MiB before the stream, {:.0} MiB after it is compiled (goal < 200 MiB)",
            mib(rss_before),
            mib(rss_after)
        );
        println!(
            "  taking the stream: {:.0} ms; compiling and applying everything: {:.0} ms",
            ms(fed),
            ms(compiled)
        );
        println!(
            "  re-programming after one pod's labels change ({} changes): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (goal p99 < 5 ms)",
            all.len(),
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            ms(all[all.len() - 1])
        );
        for (k, t) in took.iter().enumerate() {
            println!(
                "    {:<20} p50 {:.2} ms, p99 {:.2} ms; map changes {}",
                kinds[k],
                ms(percentile(t, 0.5)),
                ms(percentile(t, 0.99)),
                changed_maps[k]
            );
        }
        drop(engine);
        drop(handle);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(json!({
            "pods": o.pods,
            "namespaces": o.namespaces,
            "policies": 2 * o.namespaces,
            "local_pods": o.local,
            "isolated_local_pods": applied.pods,
            "rule_sets": applied.sets,
            "rss_mib_before": mib(rss_before),
            "rss_mib_after": mib(rss_after),
            "feed_ms": ms(fed),
            "compile_apply_ms": ms(compiled),
            "reprogram_ms": {
                "p50": ms(percentile(&all, 0.5)),
                "p99": ms(percentile(&all, 0.99)),
                "max": ms(all[all.len() - 1]),
            },
        }))
    })
}
