//! The counter program end to end: embedded object → kernel → packets → counters.

use std::{net::UdpSocket, path::PathBuf, time::Duration};

use aya::programs::{SchedClassifier, TcAttachType};
use vpc_ebpf_agent::dataplane::{AttachMode, CounterRow, Dataplane, DataplaneConfig};
use vpc_ebpf_common::{
    counters::{Counter, CounterKey, direction, reason},
    programs,
};
use vpc_ebpf_tests::{
    netns::{NetNs, veth_pair},
    packets::{self, Ipv4},
    raw, require_root,
};

/// A private pin root per test so parallel tests never share a counters map; removed on
/// drop, even when the test fails.
struct PinRoot(PathBuf);

impl PinRoot {
    fn new(tag: &str) -> Self {
        require_root();
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/vpc-ebpf-test-{tag}-{}",
            std::process::id()
        )))
    }

    fn config(&self, attach_mode: Option<AttachMode>) -> DataplaneConfig {
        DataplaneConfig {
            pin_root: self.0.clone(),
            attach_mode,
            nat_max_entries: Some(4096),
        }
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn get(rows: &[CounterRow], ifindex: u32, reason: u16, dir: u8) -> Counter {
    rows.iter()
        .find(|r| r.key == CounterKey::new(ifindex, reason, dir))
        .map(|r| r.value)
        .unwrap_or_default()
}

const DATAGRAMS: u64 = 10;
const PAYLOAD: usize = 100;
/// Ethernet + IPv4 + UDP headers around each payload, as counted at the TC hook.
const FRAME: u64 = (14 + 20 + 8 + PAYLOAD) as u64;

/// Sends UDP datagrams across a veth pair into a namespace whose end carries the counters,
/// and checks that every datagram was counted once, with its exact frame size, and was
/// still delivered (the counters never change a verdict).
fn counts_real_traffic(mode: AttachMode) {
    let pins = PinRoot::new(&format!("traffic-{mode:?}").to_lowercase());
    let a = NetNs::new("cnt-a");
    let b = NetNs::new("cnt-b");
    veth_pair(&a, "va", "192.0.2.1/24", &b, "vb", "192.0.2.2/24");

    let (rows, ifindex, received) = b.run(|| {
        let mut dp = Dataplane::load(&pins.config(Some(mode))).expect("load dataplane");
        assert_eq!(dp.attach_mode(), mode);
        dp.attach_counters("vb").expect("attach to vb");
        let sink = UdpSocket::bind("192.0.2.2:9000").expect("bind in b");
        sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

        a.run(|| {
            let s = UdpSocket::bind("192.0.2.1:0").expect("bind in a");
            for _ in 0..DATAGRAMS {
                s.send_to(&[0x5a; PAYLOAD], "192.0.2.2:9000").expect("send");
            }
        });
        let mut buf = [0u8; 2048];
        let mut received = 0;
        while received < DATAGRAMS {
            let n = sink
                .recv(&mut buf)
                .expect("datagram delivered through the program");
            assert_eq!(n, PAYLOAD);
            received += 1;
        }
        let ifindex = nix_ifindex("vb");
        let rows = dp.counters().expect("read counters");
        (rows, ifindex, received)
    });

    assert_eq!(received, DATAGRAMS);
    let udp = get(&rows, ifindex, reason::PASS_IPV4_UDP, direction::INGRESS);
    assert_eq!(
        udp,
        Counter {
            packets: DATAGRAMS,
            bytes: DATAGRAMS * FRAME
        },
        "ingress UDP counter on vb; all rows: {rows:?}"
    );
    // b answered a's ARP request: at least one ARP in each direction.
    assert!(get(&rows, ifindex, reason::PASS_ARP, direction::INGRESS).packets >= 1);
    assert!(get(&rows, ifindex, reason::PASS_ARP, direction::EGRESS).packets >= 1);
    // Nothing was sent from b over UDP.
    assert_eq!(
        get(&rows, ifindex, reason::PASS_IPV4_UDP, direction::EGRESS).packets,
        0
    );
    // Only vb carries the programs.
    assert!(rows.iter().all(|r| r.key.ifindex == ifindex), "{rows:?}");
}

fn nix_ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "no interface {name}");
    idx
}

vpc_ebpf_tests::attach_modes!(counts_real_traffic_in_both_modes, counts_real_traffic);

#[test]
fn detach_and_drop_remove_the_programs() {
    let pins = PinRoot::new("detach");
    let a = NetNs::new("det-a");
    let b = NetNs::new("det-b");
    veth_pair(&a, "va", "192.0.2.1/24", &b, "vb", "192.0.2.2/24");
    b.run(|| {
        let tcx_count = |hook| {
            SchedClassifier::query_tcx("vb", hook)
                .expect("query tcx")
                .1
                .len()
        };
        let mut dp = Dataplane::load(&pins.config(Some(AttachMode::Tcx))).unwrap();
        dp.attach_counters("vb").unwrap();
        dp.attach_counters("vb").unwrap(); // idempotent
        assert_eq!(tcx_count(TcAttachType::Ingress), 1);
        assert_eq!(tcx_count(TcAttachType::Egress), 1);
        dp.detach("vb").unwrap();
        dp.detach("vb").unwrap(); // nothing left: still fine
        assert_eq!(tcx_count(TcAttachType::Ingress), 0);
        assert_eq!(tcx_count(TcAttachType::Egress), 0);

        dp.attach_counters("vb").unwrap();
        drop(dp);
        assert_eq!(tcx_count(TcAttachType::Ingress), 0, "drop detaches");
    });
}

/// Frames too short for the headers their ethertype promises, injected on the wire (the
/// kernel's test-run refuses to build them): counted as truncated with their real length,
/// and the program does not fall over on them.
#[test]
fn short_frames_from_the_wire_are_counted_as_truncated() {
    let pins = PinRoot::new("short");
    let a = NetNs::new("short-a");
    let b = NetNs::new("short-b");
    veth_pair(&a, "va", "192.0.2.1/24", &b, "vb", "192.0.2.2/24");
    let bcast = |ether_type: u16, payload: &[u8]| {
        let mut f = packets::eth(ether_type, payload);
        f[..6].copy_from_slice(&[0xff; 6]);
        f
    };
    let short_ip = bcast(packets::ETH_P_IP, &[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 17]);
    let bare_ip = bcast(packets::ETH_P_IP, &[]);
    b.run(|| {
        let mut dp = Dataplane::load(&pins.config(None)).unwrap();
        dp.attach_counters("vb").unwrap();
        a.run(|| {
            raw::send_frame("va", &short_ip);
            raw::send_frame("va", &bare_ip);
        });
        let ifindex = nix_ifindex("vb");
        // AF_PACKET transmission is synchronous through the veth, but give the receive
        // softirq a moment on a loaded machine.
        let mut rows = Vec::new();
        for _ in 0..50 {
            rows = dp.counters().unwrap();
            if get(
                &rows,
                ifindex,
                reason::PASS_TRUNCATED_IPV4,
                direction::INGRESS,
            )
            .packets
                == 2
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            get(
                &rows,
                ifindex,
                reason::PASS_TRUNCATED_IPV4,
                direction::INGRESS
            ),
            Counter {
                packets: 2,
                bytes: (short_ip.len() + bare_ip.len()) as u64
            },
            "{rows:?}"
        );
    });
}

#[test]
fn pinned_counters_survive_a_reload() {
    let pins = PinRoot::new("reload");
    let ns = NetNs::new("reload");
    ns.run(|| {
        let frame = packets::eth(packets::ETH_P_ARP, &packets::arp_request([1; 4], [2; 4]));
        let mut dp = Dataplane::load(&pins.config(None)).unwrap();
        dp.test_run(programs::COUNT_INGRESS, &frame).unwrap();
        drop(dp);
        let dp = Dataplane::load(&pins.config(None)).unwrap();
        let rows = dp.counters().unwrap();
        assert_eq!(
            get(&rows, 1, reason::PASS_ARP, direction::INGRESS).packets,
            1
        );
        assert!(
            pins.0
                .join("v1")
                .join(vpc_ebpf_common::maps::COUNTERS)
                .exists()
        );
    });
}

/// Hand-built frames through BPF_PROG_TEST_RUN: every classification branch, including
/// malformed and truncated input, passes the packet on (-1, tcx "next") and is counted
/// under its own reason with its exact length.
/// One frame per classification branch: (name, frame, expected reason).
#[expect(
    clippy::too_many_lines,
    reason = "a flat table of test frames reads best in one place"
)]
fn classification_cases() -> Vec<(&'static str, Vec<u8>, u16)> {
    let udp = packets::ipv4(&Ipv4::default(), &packets::udp(1000, 53, &[7; 32]));
    let tcp = packets::ipv4(
        &Ipv4 {
            proto: 6,
            ..Ipv4::default()
        },
        &packets::tcp_syn(40000, 80),
    );
    let icmp = packets::ipv4(
        &Ipv4 {
            proto: 1,
            ..Ipv4::default()
        },
        &packets::icmp_echo(1, 1),
    );
    let with_options = packets::ipv4(
        &Ipv4 {
            ihl: 7,
            ..Ipv4::default()
        },
        &packets::udp(1, 2, b"opt"),
    );
    let bad_ihl = {
        let mut p = udp.clone();
        p[0] = 0x43;
        p
    };
    let bad_version = {
        let mut p = udp.clone();
        p[0] = 0x65;
        p
    };
    let fragment = packets::ipv4(
        &Ipv4 {
            frag: 0x0010,
            ..Ipv4::default()
        },
        &[0u8; 24],
    );
    let gre = packets::ipv4(
        &Ipv4 {
            proto: 47,
            ..Ipv4::default()
        },
        &[0u8; 8],
    );
    vec![
        (
            "udp",
            packets::eth(packets::ETH_P_IP, &udp),
            reason::PASS_IPV4_UDP,
        ),
        (
            "tcp",
            packets::eth(packets::ETH_P_IP, &tcp),
            reason::PASS_IPV4_TCP,
        ),
        (
            "icmp",
            packets::eth(packets::ETH_P_IP, &icmp),
            reason::PASS_IPV4_ICMP,
        ),
        (
            "ipv4 options",
            packets::eth(packets::ETH_P_IP, &with_options),
            reason::PASS_IPV4_UDP,
        ),
        (
            "gre",
            packets::eth(packets::ETH_P_IP, &gre),
            reason::PASS_IPV4_OTHER,
        ),
        (
            "arp",
            packets::eth(packets::ETH_P_ARP, &packets::arp_request([1; 4], [2; 4])),
            reason::PASS_ARP,
        ),
        (
            "truncated tcp header",
            packets::eth(packets::ETH_P_IP, &tcp[..30]),
            reason::PASS_TRUNCATED_IPV4,
        ),
        (
            "options longer than the packet",
            packets::eth(packets::ETH_P_IP, &with_options[..22]),
            reason::PASS_TRUNCATED_IPV4,
        ),
        (
            "ihl 3",
            packets::eth(packets::ETH_P_IP, &bad_ihl),
            reason::PASS_MALFORMED_IPV4,
        ),
        (
            "version 6 in an ipv4 frame",
            packets::eth(packets::ETH_P_IP, &bad_version),
            reason::PASS_MALFORMED_IPV4,
        ),
        (
            "non-first fragment",
            packets::eth(packets::ETH_P_IP, &fragment),
            reason::PASS_IPV4_FRAGMENT,
        ),
        (
            "vlan tagged",
            packets::eth(packets::ETH_P_8021Q, &[0, 5, 8, 0, 0x45, 0, 0, 20]),
            reason::PASS_VLAN,
        ),
        (
            "ipv6",
            packets::eth(packets::ETH_P_IPV6, &[0x60; 40]),
            reason::PASS_IPV6,
        ),
        (
            "lldp",
            packets::eth(packets::ETH_P_LLDP, &[0; 20]),
            reason::PASS_OTHER_ETHERTYPE,
        ),
    ]
}

#[test]
fn test_run_classifies_and_counts_hand_built_frames() {
    let pins = PinRoot::new("testrun");
    let ns = NetNs::new("testrun");
    let cases = classification_cases();
    let udp = packets::ipv4(&Ipv4::default(), &packets::udp(1000, 53, &[7; 32]));
    ns.run(|| {
        let mut dp = Dataplane::load(&pins.config(None)).expect("load");
        let mut expected = std::collections::BTreeMap::<u16, Counter>::new();
        for (name, frame, want) in &cases {
            let verdict = dp
                .test_run(programs::COUNT_INGRESS, frame)
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(verdict, -1, "{name}: the counter must pass every packet on");
            let c = expected.entry(*want).or_default();
            c.packets += 1;
            c.bytes += frame.len() as u64;
        }
        // The egress program classifies the same way but counts under its own direction.
        let udp_frame = &cases[0].1;
        assert_eq!(dp.test_run(programs::COUNT_EGRESS, udp_frame).unwrap(), -1);

        // The kernel refuses, before the program runs, frames shorter than an Ethernet
        // header and IPv4 frames shorter than an IPv4 header; real frames of that shape
        // are covered by `short_frames_from_the_wire_are_counted_as_truncated`.
        for short in [
            vec![0u8; 13],
            packets::eth(packets::ETH_P_IP, &udp[..10]),
            packets::eth(packets::ETH_P_IP, &[]),
        ] {
            assert!(dp.test_run(programs::COUNT_INGRESS, &short).is_err());
        }

        let rows = dp.counters().unwrap();
        // BPF_PROG_TEST_RUN presents frames as received on the namespace's loopback (1).
        for (reason, want) in &expected {
            assert_eq!(
                get(&rows, 1, *reason, direction::INGRESS),
                *want,
                "reason {}",
                reason::name(*reason)
            );
        }
        assert_eq!(
            get(&rows, 1, reason::PASS_IPV4_UDP, direction::EGRESS),
            Counter {
                packets: 1,
                bytes: udp_frame.len() as u64
            }
        );
        let total: u64 = rows.iter().map(|r| r.value.packets).sum();
        assert_eq!(
            total,
            cases.len() as u64 + 1,
            "nothing counted twice: {rows:?}"
        );
    });
}
