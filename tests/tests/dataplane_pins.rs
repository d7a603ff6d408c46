//! The pinned-map layout guard: an agent never re-opens a pinned map whose type, key
//! size, value size, flags or (fixed) size differ from its object's; it re-creates it
//! and says which. The NAT and kernel-flow tables, sized by configuration, keep their
//! pinned size (their entries are live flows).

use std::{ffi::CString, os::fd::RawFd, path::Path};

use aya::maps::MapInfo;
use vpc_ebpf_agent::dataplane::{Dataplane, EndpointSpec, EniSpec, NodeSpec};
use vpc_ebpf_common::{PIN_VERSION, maps};
use vpc_ebpf_rpc::types::MacAddr;
use vpc_ebpf_tests::dataplane::{PinRoot, ifindex, ip, net, tcp_port};
use vpc_ebpf_tests::netns::NetNs;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const HASH: u32 = 1;
const ARRAY: u32 = 2;
const LRU_HASH: u32 = 9;

/// Creates a map with the raw syscall (aya only creates maps from an object) and pins it
/// at `path`.
fn pin_raw_map(path: &Path, map_type: u32, key: u32, value: u32, max: u32) {
    let mut attr = [0u32; 32];
    attr[..5].copy_from_slice(&[map_type, key, value, max, 0]);
    // SAFETY: a zeroed bpf_attr with the map-create fields set; the size covers it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let fd = RawFd::try_from(fd).unwrap();
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    let mut pin = [0u64; 16];
    pin[0] = cpath.as_ptr() as u64;
    pin[1] = u64::from(u32::try_from(fd).unwrap());
    // SAFETY: a zeroed bpf_attr with pathname and fd set; cpath outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            pin.as_ptr(),
            std::mem::size_of_val(&pin),
        )
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our fd; the pin keeps the map.
    unsafe { libc::close(fd) };
}

fn info(pins: &PinRoot, name: &str) -> MapInfo {
    MapInfo::from_pin(pins.0.join(PIN_VERSION).join(name)).expect("pinned map")
}

#[test]
fn a_reload_re_opens_every_pinned_map_of_the_same_layout() {
    let pins = PinRoot::new("layout-same");
    let first = Dataplane::load(&pins.config(None)).expect("first load");
    assert!(first.replaced_maps().is_empty());
    drop(first);
    // The guard's table agrees with the object: nothing the object itself created is
    // taken for another layout.
    let second = Dataplane::load(&pins.config(None)).expect("reload");
    assert_eq!(second.replaced_maps(), &[] as &[&str]);
    assert_eq!(info(&pins, maps::ENDPOINTS).value_size(), 28);
    drop(second);
    // Another configured NAT size does not replace the live table.
    let mut cfg = pins.config(None);
    cfg.nat_max_entries = Some(8192);
    let third = Dataplane::load(&cfg).expect("reload with another NAT size");
    assert!(third.replaced_maps().is_empty());
    assert_eq!(info(&pins, maps::NAT).max_entries(), 4096, "kept its size");
    assert_eq!(info(&pins, maps::KERNEL_FLOWS).max_entries(), 4096);
}

#[test]
fn pinned_maps_of_another_layout_are_re_created_not_reused() {
    let pins = PinRoot::new("layout-other");
    let dir = pins.0.join(PIN_VERSION);
    std::fs::create_dir_all(&dir).unwrap();
    // What an agent built with other types would have left behind.
    pin_raw_map(&dir.join(maps::ENDPOINTS), HASH, 4, 20, 16_384); // value size
    pin_raw_map(&dir.join(maps::HOSTPORTS), ARRAY, 4, 8, 4_096); // type
    pin_raw_map(&dir.join(maps::ENIS), HASH, 4, 20, 8); // fixed size
    pin_raw_map(&dir.join(maps::CONFIG), HASH, 8, 16, 1); // type and key size
    pin_raw_map(&dir.join(maps::NAT), LRU_HASH, 16, 24, 100); // only sized otherwise
    pin_raw_map(&dir.join(maps::POLICY_REVISION), ARRAY, 4, 8, 1); // fixed size
    let nat_id = info(&pins, maps::NAT).id();

    let ns = NetNs::new("layout");
    ns.ip(&["link", "add", "eni0", "type", "veth", "peer", "name", "hv0"]);
    ns.ip(&["link", "set", "eni0", "up"]);
    ns.ip(&["link", "set", "hv0", "up"]);
    ns.run(|| {
        let mut dp = Dataplane::load(&pins.config(None)).expect("load over foreign pins");
        let mut replaced = dp.replaced_maps().to_vec();
        replaced.sort_unstable();
        let mut want = vec![
            maps::CONFIG,
            maps::ENDPOINTS,
            maps::ENIS,
            maps::HOSTPORTS,
            maps::POLICY_REVISION,
        ];
        want.sort_unstable();
        assert_eq!(replaced, want);
        assert_eq!(info(&pins, maps::ENDPOINTS).value_size(), 28);
        assert_eq!(info(&pins, maps::ENIS).max_entries(), 64);
        assert_eq!(info(&pins, maps::CONFIG).key_size(), 4);
        assert_eq!(
            info(&pins, maps::HOSTPORTS).map_type().unwrap(),
            aya::maps::MapType::Hash
        );
        assert_eq!(
            info(&pins, maps::NAT).id(),
            nat_id,
            "the NAT table was kept"
        );

        // And the re-created maps work.
        let eni0 = ifindex("eni0");
        dp.set_node(&NodeSpec {
            node_ip: ip(10, 0, 0, 10),
            primary_eni_ifindex: eni0,
            vpc_cidrs: vec![net("10.0.0.0/16")],
            snat_exclusions: vec![],
            passthrough_cidrs: vec![],
            external_snat: false,
            network_policy: false,
            snat_ports: (61000, 62999),
            snat_skip: None,
        })
        .unwrap();
        dp.upsert_eni(&EniSpec {
            ifindex: eni0,
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            primary_ip: ip(10, 0, 0, 10),
            gateway: ip(10, 0, 0, 1),
            is_primary: true,
        })
        .unwrap();
        let ep = EndpointSpec {
            ipv4: ip(10, 0, 1, 5),
            host_ifindex: ifindex("hv0"),
            host_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            pod_mac: MacAddr([2, 0, 0, 0, 0, 3]),
            eni_ifindex: eni0,
        };
        dp.upsert_endpoint(&ep).unwrap();
        dp.set_hostports(ep.ipv4, &[tcp_port(8080, 80)]).unwrap();
        assert_eq!(dp.endpoints().unwrap(), vec![ep]);
        assert!(dp.endpoint_attached(ep.ipv4));
        drop(dp);
        // Once re-created they are of the object's layout: the next load keeps them.
        let dp = Dataplane::load(&pins.config(None)).expect("reload");
        assert!(dp.replaced_maps().is_empty());
    });
}
