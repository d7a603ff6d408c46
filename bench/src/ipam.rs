//! The agent's IPAM in the lab, release builds of the agent and plugin against the lab's
//! EC2 (moto behind the EC2 front) and IMDS: ADD/DEL latency from a warm pool, start to
//! ready with a checkpoint of 100 pods, memory and CPU at 100 pods, EC2 calls per 100
//! pods created, EC2 calls per node per hour at steady state and under pod churn; in
//! secondary-IP and in prefix mode.
//!
//! Plugin calls enter the node namespace with setns(2) between fork and exec, as the cni
//! benchmark does: `ip netns exec` would add its own mount-namespace setup to every sample.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::File,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use vpc_ebpf_tests::{cni::plugin_path, lab::Lab, lab_agent::LabAgent, netns::NetNs};

const START_GOAL_S: f64 = 2.0;
const RSS_GOAL_MIB: f64 = 40.0;
/// The plugin's answer when the pool is refilling or the agent is not ready: a runtime
/// retries the pod later.
const TRY_AGAIN_LATER: u64 = 11;

struct Opts {
    pods: usize,
    burst_pods: usize,
    concurrency: usize,
    restarts: usize,
    instance_type: String,
    modes: Vec<bool>,
    /// Length of each EC2-calls-per-hour window (steady, churn).
    window: Duration,
}

/// The leaked-ENI sweep, the one call a node schedules at steady state: every 15–25
/// minutes (the reconciler's interval), 20 on average.
const SWEEPS_PER_HOUR: f64 = 3.0;

struct Node {
    lab: Lab,
    agent: LabAgent,
    netns: File,
    conf: String,
}

struct Plugin {
    ok: bool,
    took: Duration,
    stdout: String,
    stderr: String,
}

impl Node {
    fn plugin(&self, command: &str, id: &str, pod: &NetNs) -> Plugin {
        let fd = self.netns.as_raw_fd();
        let mut cmd = Command::new(plugin_path());
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", format!("/run/netns/{}", pod.name()))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={id}"),
            )
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: setns is async-signal-safe; the fd stays open in the parent (self.netns)
        // until wait returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let start = Instant::now();
        let mut child = cmd.spawn().expect("spawn plugin");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(self.conf.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Plugin {
            ok: out.status.success(),
            took: start.elapsed(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// One ADD as a runtime would see it through: "try again later" (pool refilling) is
    /// retried after a short pause and counted. Returns the successful call's latency.
    fn add(&self, id: &str, pod: &NetNs) -> (Duration, u32) {
        let mut refused = 0;
        loop {
            let p = self.plugin("ADD", id, pod);
            if p.ok {
                return (p.took, refused);
            }
            let code = serde_json::from_str::<Value>(&p.stdout)
                .ok()
                .and_then(|v| v["code"].as_u64());
            assert!(
                code == Some(TRY_AGAIN_LATER) && refused < 400,
                "ADD {id} failed: {}\n{}\nagent log tail:\n{}",
                p.stdout,
                p.stderr,
                self.log_tail()
            );
            refused += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn del(&self, id: &str, pod: &NetNs) -> Duration {
        let p = self.plugin("DEL", id, pod);
        assert!(p.ok, "DEL {id} failed: {}\n{}", p.stdout, p.stderr);
        p.took
    }

    fn log_tail(&self) -> String {
        let log = self.agent.log_text();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.lab.vpclab(&["status", "--json"])).expect("lab status")
    }

    fn ec2_calls(&self) -> BTreeMap<String, u64> {
        calls_of(&self.status())
    }

    /// Waits until the agent stops calling EC2 (its pool has reached its targets): the EC2
    /// front's call counts unchanged over two polls a second apart. Returns the counts.
    fn settle(&self) -> BTreeMap<String, u64> {
        self.quiet_for(Duration::from_secs(2), Duration::from_secs(90))
    }

    /// Waits until the front has counted no EC2 call for `quiet` (at most `within`);
    /// returns the counts.
    fn quiet_for(&self, quiet: Duration, within: Duration) -> BTreeMap<String, u64> {
        let t0 = Instant::now();
        let mut last = self.ec2_calls();
        let mut since = Instant::now();
        while since.elapsed() < quiet {
            assert!(
                t0.elapsed() < within,
                "EC2 calls did not stop for {quiet:?} within {within:?}; agent log tail:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_secs(1));
            let now = self.ec2_calls();
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
        last
    }

    fn pid(&self) -> u32 {
        self.agent.pid().expect("agent running")
    }

    /// Addresses the agent holds: (ENIs, free and not cooling, assigned, prefixes).
    fn pool(&self) -> (usize, u64, u64, usize) {
        let v = self.agent.introspect("/v1/enis").expect("introspection");
        let enis = v["enis"].as_array().cloned().unwrap_or_default();
        let sum = |k: &str| enis.iter().filter_map(|e| e[k].as_u64()).sum::<u64>();
        let prefixes = enis
            .iter()
            .filter_map(|e| e["prefixes"].as_array().map(Vec::len))
            .sum();
        (enis.len(), sum("free"), sum("assigned"), prefixes)
    }
}

/// `vpc_ebpf_add_ip_latency_seconds`'s cumulative buckets: (upper bound in s, count).
fn add_latency_buckets(n: &Node) -> Vec<(f64, u64)> {
    let text = n.agent.get(61678, "/metrics").expect("metrics");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("vpc_ebpf_add_ip_latency_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.parse().ok()?, count.trim().parse().ok()?))
        })
        .collect()
}

/// Bucket counts of `after` less `before`, up to the first bucket holding every call.
fn bucket_diff(after: &[(f64, u64)], before: &[(f64, u64)]) -> Vec<(f64, u64)> {
    let d: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    let total = d.last().map_or(0, |x| x.1);
    let end = d
        .iter()
        .position(|x| x.1 == total)
        .map_or(d.len(), |i| i + 1);
    d[..end].to_vec()
}

/// AddNetwork round trips the pool can serve without growing.
const RPC_CALLS: u64 = 20;

/// Times AddNetwork and DelNetwork on the agent's socket, one call at a time, for
/// [`RPC_CALLS`] attachments, in rounds until `RPC_ROUNDS` are done. Each round first
/// waits for that many free addresses, so every ADD is served from the warm pool.
fn agent_round_trips(n: &Node, tag: &str) -> (Vec<Duration>, Vec<Duration>) {
    use vpc_ebpf_rpc::v1::{AddNetworkRequest, Attachment, DelNetworkRequest, Pod};
    const RPC_ROUNDS: usize = 5;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut client = rt
        .block_on(vpc_ebpf_rpc::client::connect(
            n.agent.socket(),
            Duration::from_secs(10),
        ))
        .expect("agent socket");
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for round in 0..RPC_ROUNDS {
        let t0 = Instant::now();
        while n.pool().1 < RPC_CALLS {
            assert!(
                t0.elapsed() < Duration::from_mins(2),
                "the pool never had {RPC_CALLS} free addresses: {:?}",
                n.pool()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let keys: Vec<Attachment> = (0..RPC_CALLS)
            .map(|i| Attachment {
                network: "aws-cni".into(),
                container_id: format!("{tag}-rpc{round}-{i}"),
                ifname: "eth0".into(),
            })
            .collect();
        for k in &keys {
            let req = AddNetworkRequest {
                attachment: Some(k.clone()),
                pod: Some(Pod {
                    namespace: "bench".into(),
                    name: k.container_id.clone(),
                    ..Pod::default()
                }),
                ..AddNetworkRequest::default()
            };
            let t = Instant::now();
            let reply = rt.block_on(client.add_network(req));
            adds.push(t.elapsed());
            let reply = reply.expect("AddNetwork from a warm pool").into_inner();
            assert!(!reply.existing && !reply.ipv4.is_empty(), "{reply:?}");
        }
        for k in &keys {
            let req = DelNetworkRequest {
                attachment: Some(k.clone()),
                pod: None,
            };
            let t = Instant::now();
            let reply = rt.block_on(client.del_network(req));
            dels.push(t.elapsed());
            assert!(
                !reply
                    .expect("DelNetwork")
                    .into_inner()
                    .released_ipv4
                    .is_empty()
            );
        }
    }
    (adds, dels)
}

fn calls_of(status: &Value) -> BTreeMap<String, u64> {
    status["ec2_calls"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn diff(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Memory and CPU of a process from /proc: (VmRSS KiB, VmHWM KiB, user+system seconds).
fn proc_stats(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name, which may hold spaces: utime and stime are the 12th
    // and 13th from there.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(clippy::cast_precision_loss, reason = "clock ticks of one process")]
    let cpu = ticks as f64 / hz as f64;
    (kib("VmRSS:"), kib("VmHWM:"), cpu)
}

fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[expect(clippy::cast_precision_loss, reason = "KiB of one process")]
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50, p99 and max of a sample, in ms.
fn summary(v: &[Duration]) -> Value {
    let mut v = v.to_vec();
    v.sort();
    let at = |p: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "index into a short sample"
        )]
        let i = (((v.len() - 1) as f64) * p).round() as usize;
        ms(v[i])
    };
    json!({"samples": v.len(), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)})
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds since the epoch of a tracing timestamp, `2026-11-22T23:11:51.034358Z`.
fn parse_ts(s: &str) -> Option<f64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.split('-').map(|x| x.parse::<i64>().ok());
    let (year, month, day) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.split(':');
    let (hour, minute): (i64, i64) = (hms.next()?.parse().ok()?, hms.next()?.parse().ok()?);
    let second: f64 = hms.next()?.parse().ok()?;
    // Days from the civil date (proleptic Gregorian), in eras of 400 years.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    #[expect(clippy::cast_precision_loss, reason = "seconds since 1970 fit in f64")]
    let whole = (days * 86_400 + hour * 3600 + minute * 60) as f64;
    Some(whole + second)
}

/// Times in a log section of one agent start, in seconds since the epoch, by event.
fn log_events(section: &str) -> BTreeMap<&'static str, (f64, String)> {
    let mut out = BTreeMap::new();
    for line in section.lines() {
        let Some((ts, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some(t) = parse_ts(ts) else { continue };
        let Some((_, msg)) = rest.split_once("vpc_ebpf_agent: ") else {
            continue;
        };
        let event = if msg.starts_with("starting") {
            "starting"
        } else if msg.starts_with("serving ") {
            "serving"
        } else if msg.starts_with("ready ") {
            "discovered"
        } else if msg.starts_with("dataplane ready") {
            "dataplane"
        } else if msg.trim_end() == "ready" {
            "ready"
        } else {
            continue;
        };
        out.entry(event).or_insert((t, msg.to_owned()));
    }
    out
}

/// A `key=value` field of a log message.
fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// kill -9 of the agent and a start with the same state directory; times from the exec
/// to introspection saying ready (polled every 5 ms) and the agent's own log timestamps.
fn restart(n: &mut Node) -> Value {
    let calls0 = n.ec2_calls();
    n.agent.kill9();
    let offset = std::fs::metadata(&n.agent.log).map_or(0, |m| m.len());
    let exec_wall = unix_now();
    let t0 = Instant::now();
    n.agent.restart();
    let ready = loop {
        if let Some(v) = n.agent.introspect("/v1/enis")
            && v["ready"] == true
        {
            break t0.elapsed();
        }
        assert!(
            n.agent.alive() && t0.elapsed() < Duration::from_mins(1),
            "the agent did not become ready; log tail:\n{}",
            n.log_tail()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let pid = n.pid();
    let (rss, hwm, cpu) = proc_stats(pid);
    // A restarted agent's counters start at zero: what they hold now is the EC2 time and
    // calls its start took.
    let scrape = n.agent.get(61678, "/metrics").unwrap_or_default();
    let ec2_at_ready = |suffix: &str| -> f64 {
        scrape
            .lines()
            .filter(|l| l.starts_with(&format!("vpc_ebpf_aws_api_latency_seconds_{suffix}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (ec2_s, ec2_n) = (ec2_at_ready("sum"), ec2_at_ready("count"));
    // The "ready" line is written just after the state flips; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let events = loop {
        let text = std::fs::read(&n.agent.log).unwrap_or_default();
        let section =
            String::from_utf8_lossy(&text[usize::try_from(offset).unwrap()..]).into_owned();
        let ev = log_events(&section);
        if ev.contains_key("ready") || Instant::now() > deadline {
            break ev;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let since_exec = |e: &str| events.get(e).map(|(t, _)| (t - exec_wall) * 1000.0);
    let discovered = events.get("discovered").map(|(_, m)| m.clone());
    let dataplane = events.get("dataplane").map(|(_, m)| m.clone());
    let restored = discovered
        .as_deref()
        .and_then(|m| field(m, "assignments"))
        .and_then(|v| v.parse::<u64>().ok());
    let kept = dataplane
        .as_deref()
        .and_then(|m| field(m, "endpoints_kept"))
        .and_then(|v| v.parse::<u64>().ok());
    let calls = diff(&n.settle(), &calls0);
    json!({
        "exec_to_ready_ms": ms(ready),
        "log_ms_after_exec": {
            "starting": since_exec("starting"),
            "serving": since_exec("serving"),
            "discovered": since_exec("discovered"),
            "dataplane_ready": since_exec("dataplane"),
            "ready": since_exec("ready"),
        },
        "restored_assignments": restored,
        "endpoints_kept": kept,
        "rss_kib_at_ready": rss,
        "hwm_kib_at_ready": hwm,
        "cpu_s_to_ready": cpu,
        "agent_ec2_seconds_before_ready": ec2_s,
        "agent_ec2_calls_before_ready": ec2_n,
        "ec2_calls_until_settled": calls,
    })
}

/// EC2 calls over `window` idle and `window` of churn, scaled to an hour. The leaked-ENI
/// sweep is scheduled far apart (and the first one ran at start), so it is added as
/// scheduled rather than caught by chance in a short window.
fn ec2_per_hour(n: &Node, tag: &str, window: Duration) -> Value {
    let total = |c: &BTreeMap<String, u64>| c.values().sum::<u64>();
    let scale = 3600.0 / window.as_secs_f64();
    // Steady means after the pool has drained from the bursts before: it gives back at
    // most every 30 s and keeps an ENI its first minute, so quiet for 70 s.
    n.quiet_for(Duration::from_secs(70), Duration::from_mins(10));
    let c0 = n.ec2_calls();
    std::thread::sleep(window);
    let idle = diff(&n.ec2_calls(), &c0);
    let live: Vec<NetNs> = (0..5).map(|_| NetNs::new("bip")).collect();
    for (i, pod) in live.iter().enumerate() {
        n.add(&format!("{tag}-c{i}-0"), pod);
    }
    n.settle();
    let c1 = n.ec2_calls();
    let t0 = Instant::now();
    let mut round = 0;
    while t0.elapsed() < window {
        let i = round % live.len();
        let gen_ = round / live.len();
        n.del(&format!("{tag}-c{i}-{gen_}"), &live[i]);
        n.add(&format!("{tag}-c{i}-{}", gen_ + 1), &live[i]);
        round += 1;
        // On a 5 s beat, whatever the calls took.
        let next = Duration::from_secs(u64::try_from(round).unwrap_or(u64::MAX).saturating_mul(5));
        std::thread::sleep(next.saturating_sub(t0.elapsed()));
    }
    let churn = diff(&n.ec2_calls(), &c1);
    for (i, pod) in live.iter().enumerate() {
        let gen_ = (round + live.len() - 1 - i) / live.len();
        let _ = n.plugin("DEL", &format!("{tag}-c{i}-{gen_}"), pod);
    }
    #[expect(clippy::cast_precision_loss, reason = "call counts are small")]
    let rate = |c: &BTreeMap<String, u64>| total(c) as f64 * scale + SWEEPS_PER_HOUR;
    json!({
        "window_s": window.as_secs(),
        "steady": rate(&idle),
        "steady_calls_in_window": idle,
        "churn": rate(&churn),
        "churn_pods_replaced": round,
        "churn_calls_in_window": churn,
        "scheduled_sweeps_per_hour": SWEEPS_PER_HOUR,
    })
}

fn mode_name(prefixes: bool) -> &'static str {
    if prefixes { "prefix" } else { "secondary-ip" }
}

#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn run_mode(o: &Opts, prefixes: bool) -> Value {
    let name = mode_name(prefixes);
    let tag = if prefixes { "bip" } else { "bis" };
    eprintln!("== {name}: lab up ({} node, {})", 1, o.instance_type);
    // Lab::up has no instance-type option; the same guard, with the type the run needs.
    let mut lab = Lab {
        prefix: format!("{tag}{}", std::process::id() % 100_000),
        status: Value::Null,
    };
    let out = lab.vpclab(&[
        "up",
        "--nodes",
        "1",
        "--instance-type",
        &o.instance_type,
        "--imds-lag",
        "0",
        "--json",
    ]);
    lab.status = serde_json::from_str(&out).expect("lab up --json");
    // On tmpfs, as the agent's default /var/run/vpc-ebpf is on a node: the checkpoint's
    // fsync costs what it costs there (this machine's /tmp and /run are on disk).
    let dir = Path::new("/dev/shm").join(format!("vpc-ebpf-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The agent's defaults (WARM_ENI_TARGET=1, 30 s cooldown), at the log level a node runs.
    let mut env = vec![("VPC_EBPF_LOG", "info")];
    if prefixes {
        env.push(("ENABLE_PREFIX_DELEGATION", "true"));
    }
    let mut agent = LabAgent::start(&lab, 1, &dir, &env);
    let first_ready = agent.wait_ready(Duration::from_mins(1));
    let node_ns = File::open(format!("/run/netns/{}", agent.node_ns)).expect("node netns");
    let conf = json!({"cniVersion": "1.1.0", "name": "aws-cni", "type": "vpc-ebpf-cni",
        "agentSocket": agent.socket(), "logFile": dir.join("plugin.log"), "logLevel": "warn"})
    .to_string();
    let mut n = Node {
        lab,
        agent,
        netns: node_ns,
        conf,
    };
    let pid = n.pid();
    let exe = exe_of(pid);
    eprintln!(
        "{name}: agent pid {pid} ({exe}) ready {first_ready:?} after a fresh start; settling"
    );
    let calls_before = n.settle();
    let pool_before = n.pool();
    let (_, _, cpu_before) = proc_stats(pid);

    // 1. Sequential ADDs: the first 100 pods. Their namespaces are made outside the timing.
    let pods: Vec<NetNs> = (0..o.pods).map(|_| NetNs::new("bip")).collect();
    let mut add_seq = Vec::new();
    let mut refused_seq = 0;
    let t_adds = Instant::now();
    for (i, pod) in pods.iter().enumerate() {
        let (took, refused) = n.add(&format!("{tag}-p{i}"), pod);
        add_seq.push(took);
        refused_seq += refused;
    }
    let adds_wall = t_adds.elapsed();
    let calls_after = n.settle();
    let calls = diff(&calls_after, &calls_before);
    let pool_at_pods = n.pool();
    eprintln!(
        "{name}: {} ADDs in {adds_wall:?}, {refused_seq} refused; EC2 calls {calls:?}; pool (enis, free, assigned, prefixes) {pool_at_pods:?}",
        o.pods
    );

    // 2. Memory and CPU at 100 pods, then again after a metrics scrape (the encoder's
    // buffers are part of what a node pays).
    let (rss, hwm, cpu_now) = proc_stats(pid);
    let metrics = n.agent.get(61678, "/metrics").expect("metrics");
    let intro = n.agent.get(61679, "/v1/assignments").expect("assignments");
    let (rss_scraped, hwm_scraped, _) = proc_stats(pid);
    let cpu_adds = cpu_now - cpu_before;

    // 3. Start to ready with the checkpoint of these pods, their veths and routes.
    let mut restarts = Vec::new();
    for r in 0..o.restarts {
        let s = restart(&mut n);
        eprintln!(
            "{name}: restart {r}: exec to ready {:.0} ms; agent log {}",
            s["exec_to_ready_ms"].as_f64().unwrap(),
            s["log_ms_after_exec"]
        );
        restarts.push(s);
    }
    let pid = n.pid();
    let (rss_restarted, hwm_restarted, _) = proc_stats(pid);

    // 4. Concurrent ADDs in bursts, each from a pool the agent has refilled to its target.
    let burst_pods: Vec<NetNs> = (0..o.burst_pods).map(|_| NetNs::new("bip")).collect();
    let mut add_conc = Vec::new();
    let mut refused_conc = 0;
    for (b, chunk) in burst_pods.chunks(o.concurrency).enumerate() {
        n.settle();
        let results: Vec<(Duration, u32)> = std::thread::scope(|sc| {
            let handles: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(i, pod)| {
                    let n = &n;
                    sc.spawn(move || n.add(&format!("{tag}-b{b}-{i}"), pod))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (took, refused) in results {
            add_conc.push(took);
            refused_conc += refused;
        }
    }
    let pool_peak = n.pool();

    // 5. DELs: the sequential pods one by one, the burst pods concurrently.
    let del_seq: Vec<Duration> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| n.del(&format!("{tag}-p{i}"), pod))
        .collect();
    let mut del_conc = Vec::new();
    for (b, chunk) in burst_pods.chunks(o.concurrency).enumerate() {
        let took: Vec<Duration> = std::thread::scope(|sc| {
            let handles: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(i, pod)| {
                    let n = &n;
                    sc.spawn(move || n.del(&format!("{tag}-b{b}-{i}"), pod))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        del_conc.extend(took);
    }
    // 6. The agent alone, from its warm pool: AddNetwork then DelNetwork over its socket,
    // as the plugin calls them but without the veth work around them.
    // The agent's own histogram over the same calls tells its time from the client's
    // (gRPC, scheduling on a 2-core machine shared with the EC2 emulator).
    let hist_before = add_latency_buckets(&n);
    let (rpc_add, rpc_del) = agent_round_trips(&n, tag);
    let agent_add_hist = bucket_diff(&add_latency_buckets(&n), &hist_before);
    eprintln!(
        "{name}: agent-only AddNetwork p50 {:.3} ms p99 {:.3} ms (n={}); agent's own time, cumulative per bucket: {agent_add_hist:?}",
        summary(&rpc_add)["p50_ms"],
        summary(&rpc_add)["p99_ms"],
        rpc_add.len()
    );
    // 7. EC2 calls per node per hour, from what the lab's EC2 front counted: an idle
    // node, then one whose pods churn (one deleted and another created every 5 s, as a
    // rollout or a job queue does).
    let per_hour = ec2_per_hour(&n, tag, o.window);
    eprintln!("{name}: EC2 calls per hour {per_hour}");
    let (rss_end, hwm_end, cpu_end) = proc_stats(pid);
    let status = n.status();
    drop(n);
    let _ = std::fs::remove_dir_all(&dir);

    let exec_ready: Vec<f64> = restarts
        .iter()
        .map(|r| r["exec_to_ready_ms"].as_f64().unwrap())
        .collect();
    let log_ready: Vec<f64> = restarts
        .iter()
        .filter_map(|r| r["log_ms_after_exec"]["ready"].as_f64())
        .collect();
    let phase = |key: &str| -> Vec<f64> {
        restarts
            .iter()
            .filter_map(|r| r["log_ms_after_exec"][key].as_f64())
            .collect()
    };
    let phases: BTreeMap<&str, f64> = [
        "starting",
        "serving",
        "discovered",
        "dataplane_ready",
        "ready",
    ]
    .into_iter()
    .filter_map(|k| {
        let v = phase(k);
        (!v.is_empty()).then(|| (k, median(&v)))
    })
    .collect();
    let total_calls: u64 = calls.values().sum();
    let pool_json = |p: (usize, u64, u64, usize)| json!({"enis": p.0, "free": p.1, "assigned": p.2, "prefixes": p.3});
    json!({
        "mode": name,
        "instance_type": o.instance_type,
        "agent_binary": exe,
        "pods": o.pods,
        "first_start_to_ready_ms": ms(first_ready),
        "add_sequential": summary(&add_seq),
        "add_sequential_refused_try_again": refused_seq,
        "add_sequential_wall_s": adds_wall.as_secs_f64(),
        "add_concurrent": summary(&add_conc),
        "add_concurrent_refused_try_again": refused_conc,
        "concurrency": o.concurrency,
        "del_sequential": summary(&del_seq),
        "agent_add_rpc": summary(&rpc_add),
        "agent_add_own_time_cumulative": agent_add_hist.iter().map(|(le, n)| json!({"le_ms": le * 1000.0, "calls": n})).collect::<Vec<_>>(),
        "agent_del_rpc": summary(&rpc_del),
        "del_concurrent": summary(&del_conc),
        "start_to_ready": {
            "runs": restarts.len(),
            "exec_to_ready_median_ms": median(&exec_ready),
            "exec_to_ready_max_ms": exec_ready.iter().copied().fold(0.0, f64::max),
            "log_ready_after_exec_median_ms": (!log_ready.is_empty()).then(|| median(&log_ready)),
            "log_phase_medians_ms_after_exec": phases,
            "runs_detail": restarts,
        },
        "memory": {
            "rss_kib_at_pods": rss, "hwm_kib_at_pods": hwm,
            "rss_kib_after_scrape": rss_scraped, "hwm_kib_after_scrape": hwm_scraped,
            "metrics_bytes": metrics.len(), "assignments_json_bytes": intro.len(),
            "rss_kib_after_restarts": rss_restarted, "hwm_kib_after_restarts": hwm_restarted,
            "rss_kib_at_end": rss_end, "hwm_kib_at_end": hwm_end,
        },
        "cpu": {
            "agent_cpu_s_during_adds": cpu_adds,
            "agent_cpu_s_last_process_total": cpu_end,
        },
        "ec2": {
            "calls_for_pods": calls,
            "calls_for_pods_total": total_calls,
            "pool_before": pool_json(pool_before),
            "pool_at_pods": pool_json(pool_at_pods),
            "pool_peak": pool_json(pool_peak),
            "lab_calls_whole_run": calls_of(&status),
            "per_hour": per_hour,
        },
    })
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[allow(clippy::too_many_lines)] // one row per measurement, in the table's order
fn print_table(modes: &[Value]) {
    let col = |f: &dyn Fn(&Value) -> String| -> String {
        modes.iter().map(f).collect::<Vec<_>>().join(" | ")
    };
    let f1 = |v: &Value| v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.1}"));
    let f2 = |v: &Value| v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.2}"));
    let head = col(&|m| m["mode"].as_str().unwrap().to_owned());
    println!("\n| measure | {head} | goal |");
    println!("|---|{}---|", "---|".repeat(modes.len()));
    let lat = |key: &'static str, refused: Option<&'static str>| {
        move |m: &Value| {
            let s = &m[key];
            let mut out = format!(
                "{} / {} / {} (n={})",
                f2(&s["p50_ms"]),
                f2(&s["p99_ms"]),
                f2(&s["max_ms"]),
                s["samples"]
            );
            if let Some(r) = refused {
                let _ = write!(out, ", {} try-again", m[r]);
            }
            out
        }
    };
    let c = modes
        .first()
        .map_or(16, |m| m["concurrency"].as_u64().unwrap_or(16));
    println!(
        "| ADD p50 / p99 / max ms, sequential | {} | |",
        col(&lat(
            "add_sequential",
            Some("add_sequential_refused_try_again")
        ))
    );
    println!(
        "| ADD p50 / p99 / max ms, concurrency {c} | {} | |",
        col(&lat(
            "add_concurrent",
            Some("add_concurrent_refused_try_again")
        ))
    );
    println!(
        "| agent alone: AddNetwork p50 / p99 / max ms over gRPC | {} | well under 1 ms |",
        col(&lat("agent_add_rpc", None))
    );
    println!(
        "| agent alone: its own time for those AddNetworks (histogram, calls within) | {} | |",
        col(&|m| {
            m["agent_add_own_time_cumulative"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .filter(|x| x["le_ms"].as_f64().unwrap_or(0.0) >= 0.1)
                        .map(|x| format!("≤{} ms: {}", x["le_ms"], x["calls"]))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        })
    );
    println!(
        "| agent alone: DelNetwork p50 / p99 / max ms over gRPC | {} | |",
        col(&lat("agent_del_rpc", None))
    );
    println!(
        "| DEL p50 / p99 / max ms, sequential | {} | |",
        col(&lat("del_sequential", None))
    );
    println!(
        "| DEL p50 / p99 / max ms, concurrency {c} | {} | |",
        col(&lat("del_concurrent", None))
    );
    let goal = |ok: bool| if ok { "met" } else { "MISSED" };
    let worst_ready = modes
        .iter()
        .map(|m| {
            m["start_to_ready"]["exec_to_ready_median_ms"]
                .as_f64()
                .unwrap()
        })
        .fold(0.0, f64::max);
    println!(
        "| start to ready, {} pods restored: median / max ms (runs) | {} | < {START_GOAL_S} s: {} |",
        modes.first().map_or(0, |m| m["pods"].as_u64().unwrap_or(0)),
        col(&|m| {
            let s = &m["start_to_ready"];
            format!(
                "{} / {} ({})",
                f1(&s["exec_to_ready_median_ms"]),
                f1(&s["exec_to_ready_max_ms"]),
                s["runs"]
            )
        }),
        goal(worst_ready < START_GOAL_S * 1000.0)
    );
    println!(
        "| agent log after exec, median ms: starting / serving / discovered / dataplane / ready | {} | |",
        col(&|m| {
            let p = &m["start_to_ready"]["log_phase_medians_ms_after_exec"];
            [
                "starting",
                "serving",
                "discovered",
                "dataplane_ready",
                "ready",
            ]
            .iter()
            .map(|k| f1(&p[*k]))
            .collect::<Vec<_>>()
            .join(" / ")
        })
    );
    let kib = |k: &'static str| {
        move |m: &Value| format!("{:.1}", mib(m["memory"][k].as_u64().unwrap_or(0)))
    };
    let worst_rss = modes
        .iter()
        .flat_map(|m| {
            [
                "rss_kib_after_scrape",
                "rss_kib_after_restarts",
                "rss_kib_at_end",
            ]
            .map(|k| m["memory"][k].as_u64().unwrap_or(0))
        })
        .max()
        .unwrap_or(0);
    println!(
        "| RSS MiB at pods (VmRSS) | {} | < {RSS_GOAL_MIB} MiB: {} |",
        col(&kib("rss_kib_at_pods")),
        goal(mib(worst_rss) < RSS_GOAL_MIB)
    );
    println!(
        "| RSS / HWM MiB after a metrics scrape | {} | |",
        col(&|m| format!(
            "{} / {}",
            kib("rss_kib_after_scrape")(m),
            kib("hwm_kib_after_scrape")(m)
        ))
    );
    println!(
        "| RSS / HWM MiB of a restarted agent at pods | {} | |",
        col(&|m| format!(
            "{} / {}",
            kib("rss_kib_after_restarts")(m),
            kib("hwm_kib_after_restarts")(m)
        ))
    );
    println!(
        "| RSS / HWM MiB at the end (after the bursts and DELs) | {} | |",
        col(&|m| format!(
            "{} / {}",
            kib("rss_kib_at_end")(m),
            kib("hwm_kib_at_end")(m)
        ))
    );
    println!(
        "| EC2 calls / seconds spent in EC2 by the agent before ready (median) | {} | |",
        col(&|m| {
            let runs = m["start_to_ready"]["runs_detail"].as_array().unwrap();
            let med = |k: &str| {
                let v: Vec<f64> = runs.iter().filter_map(|r| r[k].as_f64()).collect();
                if v.is_empty() { f64::NAN } else { median(&v) }
            };
            format!(
                "{:.0} / {:.3}",
                med("agent_ec2_calls_before_ready"),
                med("agent_ec2_seconds_before_ready")
            )
        })
    );
    println!(
        "| agent CPU s for the sequential ADDs (incl. pool growth) | {} | |",
        col(&|m| f2(&m["cpu"]["agent_cpu_s_during_adds"]))
    );
    println!(
        "| agent CPU s to ready after kill -9 (median) | {} | |",
        col(&|m| {
            let v: Vec<f64> = m["start_to_ready"]["runs_detail"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|r| r["cpu_s_to_ready"].as_f64())
                .collect();
            if v.is_empty() {
                "-".into()
            } else {
                format!("{:.2}", median(&v))
            }
        })
    );
    println!(
        "| EC2 calls for {} pods created (total) | {} | |",
        modes.first().map_or(0, |m| m["pods"].as_u64().unwrap_or(0)),
        col(&|m| m["ec2"]["calls_for_pods_total"].to_string())
    );
    println!(
        "| EC2 calls by action | {} | |",
        col(&|m| {
            m["ec2"]["calls_for_pods"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
    );
    println!(
        "| EC2 calls per node per hour: steady / pod churn (5 s) | {} | steady < 6 |",
        col(&|m| {
            let h = &m["ec2"]["per_hour"];
            format!("{} / {}", f1(&h["steady"]), f1(&h["churn"]))
        })
    );
    println!(
        "| pool at pods: ENIs / free / assigned / prefixes | {} | |",
        col(&|m| {
            let p = &m["ec2"]["pool_at_pods"];
            format!(
                "{} / {} / {} / {}",
                p["enis"], p["free"], p["assigned"], p["prefixes"]
            )
        })
    );
}

pub fn main(args: &[String]) -> i32 {
    vpc_ebpf_tests::require_root();
    let num = |name: &str, default: usize| {
        flag(args, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let modes = match flag(args, "--modes").as_deref() {
        None | Some("both") => vec![false, true],
        Some("secondary") => vec![false],
        Some("prefix") => vec![true],
        Some(other) => {
            eprintln!("--modes {other:?}: one of secondary, prefix, both");
            return 2;
        }
    };
    let o = Opts {
        pods: num("--pods", 100),
        burst_pods: num("--burst-pods", 96),
        concurrency: num("--concurrency", 16),
        restarts: num("--restarts", 7),
        instance_type: flag(args, "--instance-type").unwrap_or_else(|| "m5.4xlarge".into()),
        modes,
        window: Duration::from_secs(num("--ec2-window-s", 180) as u64),
    };
    eprintln!(
        "agent {}, plugin {}; load {}",
        vpc_ebpf_tests::lab_agent::agent_path().display(),
        plugin_path().display(),
        loadavg()
    );
    let load_before = loadavg();
    let results: Vec<Value> = o.modes.iter().map(|&p| run_mode(&o, p)).collect();
    print_table(&results);
    if let Some(path) = flag(args, "--json") {
        let doc = json!({
            "ipam": results,
            "goals": {"start_to_ready_s": START_GOAL_S, "rss_mib": RSS_GOAL_MIB},
            "machine": {"loadavg_before": load_before, "loadavg_after": loadavg(),
                "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get)},
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        println!("wrote {path}");
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_timestamps_are_seconds_since_the_epoch() {
        assert!(parse_ts("1970-01-01T00:00:00Z").unwrap().abs() < 1e-9);
        assert!((parse_ts("2000-02-29T12:00:00Z").unwrap() - 951_825_600.0).abs() < 1e-6);
        let t = parse_ts("2026-11-22T23:11:51.034358Z").unwrap();
        assert!((t - 1_795_389_111.034_358).abs() < 1e-5, "{t}");
        assert!(parse_ts("INFO").is_none());
    }

    #[test]
    fn start_events_are_found_in_the_agent_log() {
        let log = "2026-11-22T23:11:51.034358Z  INFO vpc_ebpf_agent: starting config={}\n\
                   2026-11-22T23:11:51.038078Z  INFO vpc_ebpf_agent: serving socket=/x\n\
                   2026-11-22T23:11:55.269813Z  INFO vpc_ebpf_agent: ready instance=i-1 assignments=100 lost=0\n\
                   2026-11-22T23:11:55.699176Z  INFO vpc_ebpf_agent: dataplane ready enis=1 endpoints_kept=100\n\
                   2026-11-22T23:11:55.700941Z  INFO vpc_ebpf_agent: ready\n";
        let ev = log_events(log);
        assert_eq!(ev.len(), 5);
        assert!(ev["ready"].0 > ev["dataplane"].0);
        assert_eq!(field(&ev["discovered"].1, "assignments"), Some("100"));
        assert_eq!(field(&ev["dataplane"].1, "endpoints_kept"), Some("100"));
    }
}
