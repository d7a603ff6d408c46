//! CNI ADD/DEL latency and pods/s: vpc-ebpf-cni (with an address from a warm pool) against
//! Debian's reference ptp + host-local, at concurrency 1 and 16.
//!
//! Each plugin runs in a node namespace of its own, entered with setns(2) between fork and
//! exec, exactly one process per call, as a runtime execs it.

use std::{
    fs::File,
    io::Write as _,
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use vpc_ebpf_tests::{agent::TestAgent, netns::NetNs};

const REFERENCE_DIR: &str = "/usr/lib/cni";

struct Plugin {
    label: &'static str,
    binary: PathBuf,
    node: NetNs,
    conf: Value,
}

#[derive(Default)]
struct Samples {
    add: Vec<Duration>,
    del: Vec<Duration>,
    add_wall: Duration,
    adds: usize,
}

fn exec(p: &Plugin, command: &str, id: &str, netns: &str) -> Duration {
    let ns = File::open(format!("/run/netns/{}", p.node.name())).expect("node netns");
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(&p.binary);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={id}"),
        )
        .env("CNI_PATH", REFERENCE_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setns is async-signal-safe; fd stays open in the parent until wait returns.
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
        .write_all(p.conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{} {command} {id}: {}\n{}",
        p.label,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// `pods` ADDs then `pods` DELs at `concurrency`; pod namespaces made outside the timing.
fn round(p: &Plugin, pods: usize, concurrency: usize, tag: &str, s: &mut Samples) {
    let netns: Vec<NetNs> = (0..pods).map(|_| NetNs::new("bp")).collect();
    let ids: Vec<String> = (0..pods).map(|i| format!("{tag}-{i}")).collect();
    for (phase, command) in [(0, "ADD"), (1, "DEL")] {
        let start = Instant::now();
        let times: Vec<Duration> = std::thread::scope(|sc| {
            let chunks: Vec<Vec<usize>> = (0..concurrency)
                .map(|w| (w..pods).step_by(concurrency).collect())
                .collect();
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|idx| {
                    let (netns, ids) = (&netns, &ids);
                    sc.spawn(move || {
                        idx.iter()
                            .map(|i| {
                                exec(
                                    p,
                                    command,
                                    &ids[*i],
                                    &format!("/run/netns/{}", netns[*i].name()),
                                )
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        if phase == 0 {
            s.add_wall += start.elapsed();
            s.adds += pods;
            s.add.extend(times);
        } else {
            s.del.extend(times);
        }
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index into a short sample"
    )]
    let i = (((v.len() - 1) as f64) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

pub fn main(args: &[String]) -> i32 {
    vpc_ebpf_tests::require_root();
    let Some(plugin) = flag(args, "--plugin") else {
        eprintln!("--plugin PATH (the vpc-ebpf-cni binary to measure) is required");
        return 2;
    };
    let pods: usize = flag(args, "--pods")
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let rounds: usize = flag(args, "--rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let reference = Path::new(REFERENCE_DIR).join("ptp");
    if !reference.exists() {
        eprintln!(
            "{} is missing: apt-get install containernetworking-plugins",
            reference.display()
        );
        return 2;
    }
    let dir = std::env::temp_dir().join(format!("vpc-ebpf-bench-cni-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A warm pool larger than everything the run will ADD (released addresses cool down).
    let total = pods * rounds * 2;
    let addrs: Vec<Ipv4Addr> = (0..u32::try_from(total + 16).unwrap())
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 16, 0)) + i))
        .collect();
    let agent = TestAgent::start_with(&dir, &addrs);
    let ours = Plugin {
        label: "vpc-ebpf-cni",
        binary: PathBuf::from(plugin),
        node: NetNs::new("bn"),
        conf: json!({"cniVersion": "1.0.0", "name": "aws-cni", "type": "vpc-ebpf-cni",
            "agentSocket": agent.socket, "logFile": dir.join("plugin.log"), "logLevel": "warn"}),
    };
    let reference = Plugin {
        label: "ptp+host-local",
        binary: reference,
        node: NetNs::new("bn"),
        conf: json!({"cniVersion": "1.0.0", "name": "bench-ref", "type": "ptp", "mtu": 9001,
            "ipMasq": false, "ipam": {"type": "host-local", "subnet": "10.99.0.0/16",
            "dataDir": dir.join("host-local"), "routes": [{"dst": "0.0.0.0/0"}]}}),
    };
    let mut rows = Vec::new();
    for concurrency in [1, 16] {
        let mut s = [Samples::default(), Samples::default()];
        for r in 0..rounds {
            // Alternate which goes first, so drift in the machine hits both alike.
            let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let p = if i == 0 { &ours } else { &reference };
                round(
                    p,
                    pods,
                    concurrency,
                    &format!("c{concurrency}r{r}"),
                    &mut s[i],
                );
            }
        }
        for (i, p) in [&ours, &reference].into_iter().enumerate() {
            let x = &mut s[i];
            #[expect(clippy::cast_precision_loss, reason = "a count of pods")]
            let pods_per_s = x.adds as f64 / x.add_wall.as_secs_f64();
            rows.push(json!({
                "plugin": p.label, "concurrency": concurrency, "samples": x.add.len(),
                "add_p50_ms": pct(&mut x.add, 0.5), "add_p99_ms": pct(&mut x.add, 0.99),
                "del_p50_ms": pct(&mut x.del, 0.5), "del_p99_ms": pct(&mut x.del, 0.99),
                "adds_per_s": pods_per_s,
            }));
        }
    }
    println!(
        "| plugin | concurrency | samples | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms | pods/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} |",
            r["plugin"].as_str().unwrap(),
            r["concurrency"],
            r["samples"],
            r["add_p50_ms"].as_f64().unwrap(),
            r["add_p99_ms"].as_f64().unwrap(),
            r["del_p50_ms"].as_f64().unwrap(),
            r["del_p99_ms"].as_f64().unwrap(),
            r["adds_per_s"].as_f64().unwrap()
        );
    }
    if let Some(path) = flag(args, "--json") {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&json!({"cni": rows})).unwrap(),
        )
        .unwrap();
        println!("wrote {path}");
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    0
}
