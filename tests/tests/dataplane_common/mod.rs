//! Shared by the dataplane test files: private pin roots and a small node model.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::{net::Ipv4Addr, path::PathBuf};

use vpc_ebpf_agent::dataplane::{AttachMode, CounterRow, DataplaneConfig};
use vpc_ebpf_common::counters::{Counter, CounterKey, direction};
use vpc_ebpf_tests::require_root;

/// A private pin root per test so parallel tests never share maps or links; removed on
/// drop, even when the test fails.
pub struct PinRoot(pub PathBuf);

impl PinRoot {
    pub fn new(tag: &str) -> Self {
        require_root();
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/vpc-ebpf-test-{tag}-{}",
            std::process::id()
        )))
    }

    pub fn config(&self, attach_mode: Option<AttachMode>) -> DataplaneConfig {
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

pub fn counter(rows: &[CounterRow], ifindex: u32, reason: u16) -> Counter {
    rows.iter()
        .find(|r| r.key == CounterKey::new(ifindex, reason, direction::INGRESS))
        .map(|r| r.value)
        .unwrap_or_default()
}

pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "no interface {name}");
    idx
}

/// The MAC of `name` in the calling thread's namespace (sysfs shows the mounter's
/// namespace, so ask netlink through `ip`, which inherits the thread's).
pub fn mac_of(name: &str) -> [u8; 6] {
    let out = vpc_ebpf_tests::netns::run(
        std::process::Command::new("ip").args(["-o", "link", "show", "dev", name]),
    );
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {out}"));
    let v: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

pub const fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}
