//! `vpc-ebpf-bench dataplane`: TCP_RR, TCP_CRR and single-stream throughput, same-node
//! pod↔pod and pod→internet (through SNAT), alternating in one run between (a) one veth
//! pair, (b) a VPC-CNI-style node and (c) vpc-ebpf; medians, spread and ratios.
//!
//! The three setups live side by side in namespaces for the whole run, so a round
//! measures each of them within seconds of the others: drift in a shared, noisy machine
//! hits all three alike, and the medians over rounds drop the outliers.

pub(crate) mod load;
pub(crate) mod plot;
pub(crate) mod stats;
pub(crate) mod topo;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use load::{Metric, Sample};

use crate::args::{flag, only_known, positive};
use serde_json::{Value, json};
use stats::median;
use topo::{Kind, PathKind, Setup};
use vpc_ebpf_agent::dataplane::AttachMode;
use vpc_ebpf_common::counters::{direction, reason};

/// Set by SIGINT/SIGTERM: the run stops after the current measurement and cleans up.
pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

const USAGE: &str = "usage: vpc-ebpf-bench dataplane [--rounds N] [--secs S] [--json FILE] \
                     [--plot FILE] [--metrics rr,crr,stream] [--paths same-node,pod-internet] \
                     [--snat-ports MIN-MAX] [--attach tcx|clsact] [--cpu N|any] \
                     [--object FILE] [--only a|b|c]";

struct Options {
    rounds: usize,
    secs: Duration,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
    metrics: Vec<Metric>,
    paths: Vec<PathKind>,
    snat_ports: (u16, u16),
    attach: Option<AttachMode>,
    /// Where the traffic runs: all of it on one CPU (the default, CPU 0), or anywhere.
    cpu: Option<usize>,
    /// Another build of the programs for (c) than the embedded one, to measure a variant
    /// against the same floor in one run.
    object: Option<Object>,
    /// One setup alone, for profiling it (`perf record -C 0` beside the run).
    only: Option<Kind>,
}

/// A build of the programs: where it was read from, and its bytes.
type Object = (String, Vec<u8>);

/// `--object FILE` and `--only a|b|c`: what (c) runs, and which setups run.
fn variant(args: &[String]) -> Result<(Option<Object>, Option<Kind>), String> {
    let object = match flag(args, "--object") {
        None => None,
        Some(f) => {
            let bytes = std::fs::read(&f).map_err(|e| format!("--object {f:?}: {e}"))?;
            Some((f, bytes))
        }
    };
    let only = match flag(args, "--only") {
        None => None,
        Some(v) => Some(
            Kind::ALL
                .into_iter()
                .find(|k| k.key() == v)
                .ok_or(format!("--only wants a, b or c, got {v:?}"))?,
        ),
    };
    Ok((object, only))
}

fn parse(args: &[String]) -> Result<Options, String> {
    let known = [
        "--rounds",
        "--secs",
        "--json",
        "--plot",
        "--metrics",
        "--paths",
        "--snat-ports",
        "--attach",
        "--cpu",
        "--object",
        "--only",
    ];
    only_known(args, &known)?;
    let num = |name: &str, default: u64| positive(args, name, default);
    let metrics = match flag(args, "--metrics") {
        None => Metric::ALL.to_vec(),
        Some(v) => v
            .split(',')
            .map(|m| Metric::from_key(m).ok_or(format!("unknown metric {m:?}")))
            .collect::<Result<_, _>>()?,
    };
    let paths = match flag(args, "--paths") {
        None => PathKind::ALL.to_vec(),
        Some(v) => v
            .split(',')
            .map(|p| {
                PathKind::ALL
                    .into_iter()
                    .find(|k| k.key() == p)
                    .ok_or(format!("unknown path {p:?}"))
            })
            .collect::<Result<_, _>>()?,
    };
    // The agent's default; the node's ip_local_port_range is skipped inside it.
    let snat_ports = match flag(args, "--snat-ports") {
        None => vpc_ebpf_agent::config::DEFAULT_SNAT_PORTS,
        Some(v) => v
            .split_once('-')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .filter(|(a, b)| *a > 0 && a <= b)
            .ok_or(format!("--snat-ports wants MIN-MAX, got {v:?}"))?,
    };
    let attach = match flag(args, "--attach").as_deref() {
        None => None,
        Some("tcx") => Some(AttachMode::Tcx),
        Some("clsact") => Some(AttachMode::Clsact),
        Some(o) => return Err(format!("--attach wants tcx or clsact, got {o:?}")),
    };
    // One CPU by default: client and server then take turns on it, so a transaction costs
    // the CPU time of its path and nothing else. Spread over CPUs, each transaction waits
    // for the other vCPU to wake from halt, which in a VM varies by tens of percent
    // between rounds and drowns differences of a few percent.
    let cpu = match flag(args, "--cpu").as_deref() {
        None => Some(0),
        Some("any") => None,
        Some(v) => Some(
            v.parse::<usize>()
                .ok()
                .filter(|c| {
                    *c < libc::CPU_SETSIZE as usize
                        && std::path::Path::new(&format!("/sys/devices/system/cpu/cpu{c}")).exists()
                })
                .ok_or(format!(
                    "--cpu wants a CPU number of this machine or \"any\", got {v:?}"
                ))?,
        ),
    };
    let (object, only) = variant(args)?;
    Ok(Options {
        cpu,
        object,
        only,
        rounds: usize::try_from(num("--rounds", 5)?).unwrap_or(5),
        secs: Duration::from_secs(num("--secs", 3)?),
        json: flag(args, "--json").map(PathBuf::from),
        plot: flag(args, "--plot").map(PathBuf::from),
        metrics,
        paths,
        snat_ports,
        attach,
    })
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// First Ctrl-C: finish the current measurement, report, clean up. A second one kills
/// (SA_RESETHAND), for a run stuck somewhere; the next run removes what it left.
pub(crate) fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: zeroed sigaction is valid; the handler only stores to an atomic, which
        // is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
            libc::sigemptyset(&raw mut sa.sa_mask);
            libc::sigaction(sig, &raw const sa, std::ptr::null_mut());
        }
    }
}

fn pid_alive(pid: &str) -> bool {
    std::path::Path::new("/proc").join(pid).exists()
}

/// Removes what an earlier run killed with SIGKILL left: its namespaces (named
/// `vpce-bdp-…-<pid>-<n>`) and its pin root.
pub(crate) fn clean_stale() {
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix("vpce-bdp-") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        if parts.len() >= 2 && !pid_alive(parts[parts.len() - 2]) {
            eprintln!("removing {name}, left by an earlier run");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // `vpc-ebpf-bench-<pid>`, or `-<pid>-<setup>` for the policy bench's.
            if let Some(pid) = name
                .strip_prefix("vpc-ebpf-bench-")
                .and_then(|rest| rest.split('-').next())
                && !pid_alive(pid)
            {
                eprintln!("removing /sys/fs/bpf/{name}, left by an earlier run");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

type Key = (PathKind, Metric, Kind);

struct Cell {
    values: Vec<f64>,
    errors: u64,
    syn_retrans: u64,
    median: f64,
    min: f64,
    max: f64,
}

impl Cell {
    fn of(samples: &[Sample]) -> Self {
        let values: Vec<f64> = samples.iter().map(|s| s.value).collect();
        Self {
            median: median(&values),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            errors: samples.iter().map(|s| s.errors).sum(),
            syn_retrans: samples.iter().map(|s| s.syn_retrans).sum(),
            values,
        }
    }

    /// (max - min) / median, in percent: how far apart the rounds were.
    fn spread_pct(&self) -> f64 {
        (self.max - self.min) / self.median * 100.0
    }
}

/// Connectivity and address checks before anything is timed: every path answers, and
/// the server sees the pod's address (same node, floor) or the node's (SNAT).
fn preflight(setups: &[Setup], paths: &[PathKind]) -> Result<Value, String> {
    let mut seen = serde_json::Map::new();
    for s in setups {
        for &p in paths {
            let e = s.endpoints(p);
            let r = load::transactions(e, Metric::Crr, Duration::from_millis(200), &STOP);
            if r.value <= 0.0 {
                return Err(format!(
                    "{} {}: no transaction completed ({} failed)",
                    s.kind.label(),
                    p.key(),
                    r.errors
                ));
            }
            if r.peers.iter().any(|a| *a != e.expect_peer) {
                return Err(format!(
                    "{} {}: server saw {:?}, expected only {}",
                    s.kind.label(),
                    p.key(),
                    r.peers,
                    e.expect_peer
                ));
            }
            seen.insert(
                format!("{}/{}", s.kind.key(), p.key()),
                json!(r.peers.iter().map(ToString::to_string).collect::<Vec<_>>()),
            );
        }
    }
    Ok(Value::Object(seen))
}

fn netns_output(ns: &str, argv: &[&str]) -> String {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// What shows that each setup is what it claims: (b)'s SNAT rule and conntrack table
/// were used; (c)'s node has no iptables rule and its pods no static neighbour entry.
fn evidence(setups: &[Setup]) -> Value {
    let mut out = serde_json::Map::new();
    for s in setups {
        let Some(node) = s.node_ns() else { continue };
        let rules = netns_output(node, &["iptables-save"])
            .lines()
            .filter(|l| l.starts_with("-A"))
            .count();
        let permanent: usize = s
            .namespaces()
            .map(|ns| {
                netns_output(ns, &["ip", "neigh", "show", "nud", "permanent"])
                    .lines()
                    .count()
            })
            .sum();
        let conntrack = netns_output(node, &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]);
        let mut v = json!({
            "iptables_rules_in_node": rules,
            "static_neighbour_entries": permanent,
            "node_conntrack_entries": conntrack.trim().parse::<u64>().ok(),
        });
        if s.kind == Kind::VpcCni {
            v["nf_conntrack_stat"] =
                json!(netns_output(node, &["cat", "/proc/net/stat/nf_conntrack"]));
            v["snat_chain"] = json!(netns_output(
                node,
                &[
                    "iptables",
                    "-w",
                    "-t",
                    "nat",
                    "-L",
                    "AWS-SNAT-CHAIN-0",
                    "-v",
                    "-n",
                    "-x"
                ]
            ));
        }
        if let Some(rows) = s.counters() {
            v["ebpf_counters"] = rows
                .iter()
                .filter(|(_, r)| r.value.packets > 0)
                .map(|(ifname, r)| {
                    json!({
                        "interface": ifname,
                        "reason": reason::name(r.key.reason),
                        "direction": direction::name(r.key.direction),
                        "packets": r.value.packets,
                        "bytes": r.value.bytes,
                    })
                })
                .collect();
            v["ebpf_nat_entries"] = json!(s.nat_entries());
            v["attach_mode"] = json!(format!("{:?}", s.attach_mode()));
        }
        out.insert(s.kind.key().to_owned(), v);
    }
    Value::Object(out)
}

/// The programs' drop counters by reason, summed over interfaces; empty but for (c).
fn drops(s: &Setup) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for (_, r) in s.counters().unwrap_or_default() {
        let name = reason::name(r.key.reason);
        if name.starts_with("drop_") {
            *out.entry(name).or_default() += r.value.packets;
        }
    }
    out
}

fn fmt_value(m: Metric, v: f64) -> String {
    match m {
        Metric::Stream => format!("{v:.2}"),
        _ => format!("{v:.0}"),
    }
}

struct Goal {
    name: String,
    met: Option<bool>,
    detail: String,
}

fn goals(cells: &BTreeMap<String, Cell>) -> Vec<Goal> {
    let get = |p: PathKind, m: Metric, k: Kind| {
        cells
            .get(&cell_key((p, m, k)))
            .map(|c| c.median)
            .filter(|v| v.is_finite())
    };
    let mut out = Vec::new();
    for m in [Metric::Rr, Metric::Stream] {
        let (a, b, c) = (
            get(PathKind::SameNode, m, Kind::Floor),
            get(PathKind::SameNode, m, Kind::VpcCni),
            get(PathKind::SameNode, m, Kind::Ebpf),
        );
        let met = match (a, b, c) {
            (Some(a), Some(b), Some(c)) => Some(c >= 0.97 * a && c > b),
            _ => None,
        };
        out.push(Goal {
            name: format!("same-node {}: (c) >= 0.97 x (a) and (c) > (b)", m.key()),
            met,
            detail: match (a, b, c) {
                (Some(a), Some(b), Some(c)) => {
                    let paired = paired_ratios(cells, (PathKind::SameNode, m));
                    let interval = stats::ratio_interval(&paired)
                        .map_or(String::new(), |(g, lo, hi)| {
                            format!(", geometric mean {g:.3}, 95% CI [{lo:.3}, {hi:.3}]")
                        });
                    format!(
                        "c/a = {:.3}, c/b = {:.3}; c/a of each round: median {:.3}{interval}",
                        c / a,
                        c / b,
                        median(&paired),
                    )
                }
                _ => "not measured".into(),
            },
        });
    }
    for p in PathKind::ALL {
        let (b, c) = (
            get(p, Metric::Crr, Kind::VpcCni),
            get(p, Metric::Crr, Kind::Ebpf),
        );
        out.push(Goal {
            name: format!("{} tcp_crr: (c) >= (b)", p.key()),
            met: b.zip(c).map(|(b, c)| c >= b),
            detail: b.zip(c).map_or("not measured".into(), |(b, c)| {
                format!("c/b = {:.3}", c / b)
            }),
        });
    }
    out
}

/// (c)/(a) of each round, both measured in that round: the three setups of a round run
/// seconds apart, so drift over the run (which moves all three) cancels out.
fn paired_ratios(cells: &BTreeMap<String, Cell>, (p, m): (PathKind, Metric)) -> Vec<f64> {
    let (Some(a), Some(c)) = (
        cells.get(&cell_key((p, m, Kind::Floor))),
        cells.get(&cell_key((p, m, Kind::Ebpf))),
    ) else {
        return Vec::new();
    };
    a.values
        .iter()
        .zip(&c.values)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, c)| c / a)
        .collect()
}

fn cell_key((p, m, k): Key) -> String {
    format!("{}/{}/{}", p.key(), m.key(), k.key())
}

fn table(opts: &Options, cells: &BTreeMap<String, Cell>) -> String {
    let mut out = String::new();
    out.push_str(
        "| path | metric | (a) veth floor | (b) VPC-CNI-style | (c) vpc-ebpf | c/a | c/b | \
         spread a / b / c | failed (retransmits) a / b / c | SYN retx a / b / c |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for &p in &opts.paths {
        for &m in &opts.metrics {
            let cell = |k| cells.get(&cell_key((p, m, k)));
            let (Some(fl), Some(vc), Some(eb)) =
                (cell(Kind::Floor), cell(Kind::VpcCni), cell(Kind::Ebpf))
            else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {} | {} ({}) | {} | {} | {} | {:.3} | {:.3} | {:.0}% / {:.0}% / {:.0}% | {} / {} / {} | {} / {} / {} |",
                p.key(),
                m.key(),
                m.unit(),
                fmt_value(m, fl.median),
                fmt_value(m, vc.median),
                fmt_value(m, eb.median),
                eb.median / fl.median,
                eb.median / vc.median,
                fl.spread_pct(),
                vc.spread_pct(),
                eb.spread_pct(),
                fl.errors,
                vc.errors,
                eb.errors,
                fl.syn_retrans,
                vc.syn_retrans,
                eb.syn_retrans,
            );
        }
    }
    out
}

pub(crate) fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Which code was measured: the checkout's commit, whether the dataplane's sources
/// differed from it, and a fingerprint of the embedded eBPF object.
pub(crate) fn source_state() -> Value {
    let repo = &vpc_ebpf_tests::repo_root();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    // FNV-1a: only to tell objects apart between runs.
    let object = vpc_ebpf_agent::dataplane::OBJECT;
    let fnv = object.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    json!({
        "head": git(&["rev-parse", "--short", "HEAD"]),
        "dataplane_files_modified": git(&["status", "--porcelain", "--", "ebpf", "agent/src/dataplane"])
            .lines().map(|l| l[3..].to_owned()).collect::<Vec<_>>(),
        "ebpf_object_bytes": object.len(),
        "ebpf_object_fnv1a": format!("{fnv:016x}"),
    })
}

#[derive(Default)]
struct Measured {
    samples: BTreeMap<String, Vec<Sample>>,
    program_drops: BTreeMap<String, BTreeMap<&'static str, u64>>,
}

/// One measurement of `m` on `p` through `s`, logged, with the programs' drops during it.
fn measure_one(
    opts: &Options,
    setup: &Setup,
    p: PathKind,
    m: Metric,
    round: usize,
    acc: &mut Measured,
) {
    let kind = setup.kind;
    let ends = setup.endpoints(p);
    let before = drops(setup);
    let got = match m {
        Metric::Stream => load::stream(ends, opts.secs, &STOP),
        _ => load::transactions(ends, m, opts.secs, &STOP),
    };
    if STOP.load(Ordering::Relaxed) {
        return;
    }
    let mut note = String::new();
    if got.syn_retrans > 0 {
        let _ = write!(note, "; SYN retransmits: {}", got.syn_retrans);
    }
    for (reason, n) in drops(setup) {
        let delta = n - before.get(&reason).copied().unwrap_or(0);
        if delta > 0 {
            *acc.program_drops
                .entry(cell_key((p, m, kind)))
                .or_default()
                .entry(reason)
                .or_default() += delta;
            let _ = write!(note, "; program drop {reason}={delta}");
        }
    }
    let what = if m == Metric::Stream {
        "retransmits"
    } else {
        "failed"
    };
    eprintln!(
        "round {}/{} {} {} {}: {} {} ({} {what}){note}",
        round + 1,
        opts.rounds,
        p.key(),
        m.key(),
        kind.label(),
        fmt_value(m, got.value),
        m.unit(),
        got.errors,
    );
    acc.samples
        .entry(cell_key((p, m, kind)))
        .or_default()
        .push(got);
}

fn measure(o: &Options, setups: &[Setup]) -> Measured {
    let mut acc = Measured::default();
    for round in 0..o.rounds {
        for &p in &o.paths {
            for (mi, &m) in o.metrics.iter().enumerate() {
                // Rotate who goes first, so no setup always follows the same one.
                for i in 0..Kind::ALL.len() {
                    if STOP.load(Ordering::Relaxed) {
                        return acc;
                    }
                    let kind = Kind::ALL[(i + round + mi) % Kind::ALL.len()];
                    if o.only.is_some_and(|k| k != kind) {
                        continue;
                    }
                    let setup = setups.iter().find(|s| s.kind == kind).unwrap();
                    measure_one(o, setup, p, m, round, &mut acc);
                }
            }
        }
    }
    acc
}

fn write_plot(o: &Options, cells: &BTreeMap<String, Cell>, path: &std::path::Path) {
    let panels: Vec<plot::Panel> = o
        .paths
        .iter()
        .flat_map(|&p| o.metrics.iter().map(move |&m| (p, m)))
        .filter_map(|(p, m)| {
            let bars = Kind::ALL
                .iter()
                .map(|&k| {
                    cells.get(&cell_key((p, m, k))).map(|c| plot::Bar {
                        label: k.label(),
                        median: c.median,
                        min: c.min,
                        max: c.max,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            Some(plot::Panel {
                title: format!("{} {}", p.key(), m.key()),
                unit: m.unit(),
                bars,
            })
        })
        .collect();
    let title = format!(
        "vpc-ebpf dataplane: medians of {} rounds x {} s, whiskers min-max (kernel {})",
        o.rounds,
        o.secs.as_secs(),
        kernel()
    );
    match plot::draw(path, &title, &panels) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("plot {}: {e}", path.display()),
    }
}

fn ratios(o: &Options, cells: &BTreeMap<String, Cell>) -> Vec<Value> {
    o.paths
        .iter()
        .flat_map(|&p| o.metrics.iter().map(move |&m| (p, m)))
        .filter_map(|(p, m)| {
            let median = |k| cells.get(&cell_key((p, m, k))).map(|c| c.median);
            let (fl, vc, eb) = (
                median(Kind::Floor)?,
                median(Kind::VpcCni)?,
                median(Kind::Ebpf)?,
            );
            Some(json!({"path": p.key(), "metric": m.key(), "unit": m.unit(),
                "a": fl, "b": vc, "c": eb, "c_over_a": eb / fl, "c_over_b": eb / vc}))
        })
        .collect()
}

pub fn main(args: &[String]) -> i32 {
    vpc_ebpf_tests::require_root();
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return 2;
        }
    };
    install_signal_handlers();
    clean_stale();
    load::set_cpu(opts.cpu);
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/vpc-ebpf-bench-{}", std::process::id()));
    eprintln!("building the three setups in network namespaces");
    let setups = vec![
        topo::floor(),
        topo::vpc_cni(),
        topo::ebpf(
            pin_root,
            opts.attach,
            opts.snat_ports,
            opts.object.as_ref().map(|(_, o)| o.as_slice()),
        ),
    ];
    let seen = match preflight(&setups, &opts.paths) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("preflight failed: {e}");
            eprintln!("{:#}", evidence(&setups));
            return 1;
        }
    };
    let load_before = loadavg();
    let started = Instant::now();
    let measured = measure(&opts, &setups);
    if STOP.load(Ordering::Relaxed) {
        eprintln!("interrupted: reporting what was measured, then cleaning up");
    }
    let cells: BTreeMap<String, Cell> = measured
        .samples
        .iter()
        .map(|(k, v)| (k.clone(), Cell::of(v)))
        .collect();
    let gs = goals(&cells);
    let mut report = table(&opts, &cells);
    report.push('\n');
    for g in &gs {
        let verdict = match g.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let _ = writeln!(report, "- {}: {verdict} ({})", g.name, g.detail);
    }
    println!("{report}");
    let doc = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "source": source_state(),
        "config": {
            "rounds": opts.rounds, "secs_per_measurement": opts.secs.as_secs(),
            "snat_ports": [opts.snat_ports.0, opts.snat_ports.1],
            "traffic_cpu": opts.cpu.map_or(json!("any"), |c| json!(c)),
            // "source" describes the checkout; with --object, (c) ran another build.
            "programs_of_c": opts.object.as_ref().map_or(json!("embedded"), |(f, o)| {
                json!({"object": f, "bytes": o.len()})
            }),
            "only": opts.only.map(Kind::key),
            "throughput_tool": "iperf3, one stream, first second omitted",
            "rr_crr_tool": "vpc-ebpf-bench (own client/server, one thread each)",
            "kernel": kernel(), "cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "loadavg_before": load_before, "loadavg_after": loadavg(),
            "wall_secs": started.elapsed().as_secs(),
            "interrupted": STOP.load(Ordering::Relaxed),
        },
        "results": cells.iter().map(|(k, c)| json!({
            "cell": k, "median": c.median, "min": c.min, "max": c.max,
            "spread_pct": c.spread_pct(), "samples": c.values, "errors": c.errors,
            "syn_retransmits": c.syn_retrans,
        })).collect::<Vec<_>>(),
        "ratios": ratios(&opts, &cells),
        "goals": gs.iter().map(|g| json!({"goal": g.name, "met": g.met, "detail": g.detail})).collect::<Vec<_>>(),
        "server_saw": seen,
        "program_drops_during_measurements": measured.program_drops,
        "evidence": evidence(&setups),
        "table_markdown": report,
    });
    if let Some(path) = &opts.json {
        match std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap()) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("writing {}: {e}", path.display()),
        }
    }
    if let Some(path) = &opts.plot {
        write_plot(&opts, &cells, path);
    }
    drop(setups);
    i32::from(STOP.load(Ordering::Relaxed))
}
