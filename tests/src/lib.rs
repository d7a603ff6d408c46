//! Helpers for the root-only integration tests: network namespace guards and hand-built
//! packets.

pub mod agent;
pub mod cni;
pub mod containerd;
pub mod lab;
pub mod lab_agent;
pub mod netns;
pub mod packets;
pub mod raw;

/// Fails the calling test, with the reason, unless it runs as root. Root-only tests never
/// pass silently when they cannot run.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (network namespaces, eBPF): run it as root, e.g. \
         `sudo -E cargo xtask test`"
    );
}
