//! `vpc-ebpf-bench progcost`: what each program costs per packet on each path, measured
//! by the kernel with `BPF_PROG_TEST_RUN` (one fresh skb per run, so rewrites such as the
//! TTL never accumulate). Unlike the traffic comparison this is free of scheduling noise:
//! it shows what a change to the programs costs, in nanoseconds, without the VM's jitter.
//!
//! The kernel times each run with two clock reads, so every figure includes the same few
//! tens of nanoseconds of clock overhead; compare rows and runs, not against zero.

use std::{net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde_json::json;
use vpc_ebpf_agent::dataplane::{Dataplane, DataplaneConfig, EndpointSpec, EniSpec, NodeSpec};
use vpc_ebpf_common::programs::{COUNT_INGRESS, FROM_ENI, FROM_POD, TO_POD};
use vpc_ebpf_rpc::types::MacAddr;
use vpc_ebpf_tests::{netns::NetNs, packets};

const USAGE: &str =
    "usage: vpc-ebpf-bench progcost [--runs N] [--object FILE] [--json FILE] [--policy]";

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 6);
const VPC_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 9);
const INTERNET: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);
const A_MAC: MacAddr = MacAddr([0x0a, 0, 0, 0, 0, 0xa1]);
const A_HOST_MAC: MacAddr = MacAddr([0x0e, 0, 0, 0, 0, 0xa2]);
const B_MAC: MacAddr = MacAddr([0x0a, 0, 0, 0, 0, 0xb1]);
const B_HOST_MAC: MacAddr = MacAddr([0x0e, 0, 0, 0, 0, 0xb2]);
const ENI_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xe0]);
const ROUTER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x01]);
const TCP_ACK_PSH: u8 = 0x18;

pub fn main(args: &[String]) -> i32 {
    let mut runs = 100_000u32;
    let mut json_out = None;
    // Another build of the programs (e.g. the object of an earlier commit) instead of
    // the one this binary embeds.
    let mut object = None;
    // NetworkPolicy on, pod A's egress and pod B's ingress isolated (admitting every path
    // measured): what judging and tracking connections add per packet.
    let policy = args.iter().any(|a| a == "--policy");
    let args: Vec<&String> = args.iter().filter(|a| *a != "--policy").collect();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--runs", Some(v)) => match v.parse() {
                Ok(n) if n > 0 => runs = n,
                _ => {
                    eprintln!("--runs wants a positive integer, got {v:?}");
                    return 2;
                }
            },
            ("--json", Some(v)) => json_out = Some(PathBuf::from(v)),
            ("--object", Some(v)) => match std::fs::read(v) {
                Ok(b) => object = Some(b),
                Err(e) => {
                    eprintln!("reading --object {v}: {e}");
                    return 2;
                }
            },
            _ => {
                eprintln!("{USAGE}");
                return 2;
            }
        }
    }
    let ns = NetNs::new("bpc");
    for name in ["eni0", "eni1", "hvb"] {
        let peer = format!("{name}p");
        ns.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
        ns.ip(&["link", "set", name, "up"]);
    }
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/vpc-ebpf-bench-{}", std::process::id()));
    let rows = ns.run(|| measure(&pin_root, object.as_deref(), runs, policy));
    let _ = std::fs::remove_dir_all(&pin_root);
    let (rows, load_times) = match rows {
        Ok(r) => r,
        Err(e) => {
            eprintln!("progcost: {e}");
            return 1;
        }
    };
    println!(
        "| program | path | verdict | median ns | p90 ns | mean ns |\n|---|---|---|---|---|---|"
    );
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} |",
            r.program, r.path, r.verdict, r.median, r.p90, r.mean
        );
    }
    println!("\n| program | bpf_prog_load (verifier) ms |\n|---|---|");
    for (name, took) in &load_times {
        println!("| {name} | {:.1} |", took.as_secs_f64() * 1e3);
    }
    if let Some(path) = json_out {
        let mut v: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({"program": r.program, "path": r.path, "verdict": r.verdict,
                       "median_ns": r.median, "p90_ns": r.p90, "mean_ns": r.mean, "runs": runs})
            })
            .collect();
        v.extend(load_times.iter().map(|(name, took)| {
            json!({"program": name, "path": "load", "load_ms": took.as_secs_f64() * 1e3})
        }));
        if let Err(e) = std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap_or_default()) {
            eprintln!("writing {}: {e}", path.display());
            return 1;
        }
    }
    0
}

/// Each program's `bpf_prog_load` time.
type LoadTimes = Vec<(&'static str, std::time::Duration)>;

struct Row {
    program: &'static str,
    path: &'static str,
    verdict: i32,
    median: u64,
    p90: u64,
    mean: f64,
}

/// Pod A may send anywhere (any protocol), pod B receive TCP 80 from the VPC: both
/// isolated, every measured path admitted.
fn isolate(dp: &mut Dataplane) -> Result<(), String> {
    use std::collections::BTreeMap;

    use vpc_ebpf_agent::policy::compile::PodRules;
    use vpc_ebpf_common::policy::PortRange;
    let range = |proto, first, last| PortRange {
        proto,
        pad: 0,
        first,
        last,
    };
    let desired = BTreeMap::from([
        (
            POD_A,
            PodRules {
                egress: Some(std::sync::Arc::new(BTreeMap::from([(
                    Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0),
                    vec![range(0, 0, 0)],
                )]))),
                ..PodRules::default()
            },
        ),
        (
            POD_B,
            PodRules {
                ingress: Some(std::sync::Arc::new(BTreeMap::from([(
                    Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 16),
                    vec![range(6, 80, 80)],
                )]))),
                ..PodRules::default()
            },
        ),
    ]);
    let applied = dp.policy_applied().map_err(|e| e.to_string())?;
    let (plan, _) = applied.plan(&desired);
    dp.apply_policy(&plan).map_err(|e| e.to_string())
}

fn ifindex(name: &str) -> Result<u32, String> {
    let c = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(format!("no interface {name}")),
        i => Ok(i),
    }
}

fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    packets::ipv4_between(src, dst, proto, l4)
}

/// A one-byte TCP segment, as a TCP_RR transaction sends.
fn tcp_rr(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = packets::tcp(sport, dport, TCP_ACK_PSH);
    l4.push(b'x');
    ip_packet(src, dst, 6, &l4)
}

fn from_a(p: &[u8]) -> Vec<u8> {
    packets::eth_with(A_HOST_MAC.octets(), A_MAC.octets(), packets::ETH_P_IP, p)
}

fn from_vpc(p: &[u8]) -> Vec<u8> {
    packets::eth_with(ENI_MAC.octets(), ROUTER_MAC.octets(), packets::ETH_P_IP, p)
}

fn time(
    dp: &mut Dataplane,
    program: &'static str,
    frame: &[u8],
    runs: u32,
) -> Result<(i32, Vec<u64>), String> {
    let mut ns = Vec::with_capacity(runs as usize);
    let mut verdict = 0;
    for _ in 0..runs {
        let (v, took) = dp
            .test_run_timed(program, frame)
            .map_err(|e| e.to_string())?;
        verdict = v;
        ns.push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }
    Ok((verdict, ns))
}

fn summarize(program: &'static str, path: &'static str, verdict: i32, mut ns: Vec<u64>) -> Row {
    ns.sort_unstable();
    let at = |q: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a non-empty vector"
        )]
        let i = ((ns.len() - 1) as f64 * q) as usize;
        ns[i]
    };
    #[expect(clippy::cast_precision_loss, reason = "nanosecond sums")]
    let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64;
    Row {
        program,
        path,
        verdict,
        median: at(0.5),
        p90: at(0.9),
        mean,
    }
}

fn measure(
    pin_root: &std::path::Path,
    object: Option<&[u8]>,
    runs: u32,
    policy: bool,
) -> Result<(Vec<Row>, LoadTimes), String> {
    let (eni0, eni1, b_host) = (ifindex("eni0")?, ifindex("eni1")?, ifindex("hvb")?);
    let config = DataplaneConfig {
        pin_root: pin_root.to_owned(),
        attach_mode: None,
        nat_max_entries: None,
    };
    let mut dp = match object {
        Some(o) => Dataplane::load_object(&config, o),
        None => Dataplane::load(&config),
    }
    .map_err(|e| e.to_string())?;
    let err = |e: vpc_ebpf_agent::dataplane::DataplaneError| e.to_string();
    dp.set_node(&NodeSpec {
        node_ip: NODE_IP,
        primary_eni_ifindex: eni0,
        vpc_cidrs: vec![Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 16)],
        snat_exclusions: vec![],
        passthrough_cidrs: vec![],
        external_snat: false,
        network_policy: policy,
        snat_ports: (1024, 65_535),
        snat_skip: Some((32_768, 60_999)),
    })
    .map_err(err)?;
    for (i, (ifx, primary)) in [(eni0, true), (eni1, false)].into_iter().enumerate() {
        dp.upsert_eni(&EniSpec {
            ifindex: ifx,
            mac: ENI_MAC,
            primary_ip: Ipv4Addr::new(10, 0, 0, 10 + u8::try_from(i).unwrap_or(0)),
            gateway: GW,
            is_primary: primary,
        })
        .map_err(err)?;
    }
    // Test runs present frames as received on `lo` (ifindex 1): pod A lives there.
    for (ipv4, host_ifindex, host_mac, pod_mac, eni) in [
        (POD_A, 1, A_HOST_MAC, A_MAC, eni1),
        (POD_B, b_host, B_HOST_MAC, B_MAC, eni0),
    ] {
        dp.upsert_endpoint(&EndpointSpec {
            ipv4,
            host_ifindex,
            host_mac,
            pod_mac,
            eni_ifindex: eni,
        })
        .map_err(err)?;
    }
    policy.then(|| isolate(&mut dp)).transpose()?;
    // An established SNAT flow: its SYN allocates the port, the reply shows which.
    let syn = from_a(&ip_packet(
        POD_A,
        INTERNET,
        6,
        &packets::tcp_syn(40_000, 443),
    ));
    let (_, out) = dp.test_run_frame(FROM_POD, &syn).map_err(err)?;
    let snat_port = u16::from_be_bytes([out[34], out[35]]);
    let mut reply = packets::tcp(443, snat_port, TCP_ACK_PSH);
    reply.push(b'x');
    let reply = ip_packet(INTERNET, NODE_IP, 6, &reply);

    let cases: [(&'static str, &'static str, Vec<u8>); 7] = [
        (
            COUNT_INGRESS,
            "classify only (reference)",
            from_a(&tcp_rr(POD_A, POD_B, 40_001, 80)),
        ),
        (
            FROM_POD,
            "pod -> pod on this node",
            from_a(&tcp_rr(POD_A, POD_B, 40_001, 80)),
        ),
        (
            FROM_POD,
            "pod -> VPC through its ENI",
            from_a(&tcp_rr(POD_A, VPC_HOST, 40_002, 80)),
        ),
        (
            FROM_POD,
            "pod -> internet, SNAT established",
            from_a(&tcp_rr(POD_A, INTERNET, 40_000, 443)),
        ),
        (FROM_ENI, "internet -> pod, reverse NAT", from_vpc(&reply)),
        (
            FROM_ENI,
            "VPC -> pod",
            from_vpc(&tcp_rr(VPC_HOST, POD_B, 80, 40_003)),
        ),
        (
            TO_POD,
            "host stack -> pod (kernel flow)",
            from_a(&tcp_rr(NODE_IP, POD_A, 50_000, 8080)),
        ),
    ];
    let mut rows = Vec::new();
    for (program, path, frame) in cases {
        // Warm caches and the JIT image first.
        time(&mut dp, program, &frame, runs / 10 + 1)?;
        let (verdict, ns) = time(&mut dp, program, &frame, runs)?;
        rows.push(summarize(program, path, verdict, ns));
    }
    Ok((rows, dp.load_times().to_vec()))
}
