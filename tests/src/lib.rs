//! Helpers for the root-only integration tests: network namespace guards and hand-built
//! packets.

pub mod agent;

/// The repository's root. Taken from the CARGO_MANIFEST_DIR that cargo and nextest set
/// when they run a binary (every package sits one level below the root), and only then
/// from the compile-time value: several checkouts may share one target dir, and cargo
/// does not rebuild a crate because its checkout moved, so a compiled-in path can name
/// another checkout, or one deleted since.
pub fn repo_root() -> std::path::PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || env!("CARGO_MANIFEST_DIR").into(),
        std::path::PathBuf::from,
    );
    dir.parent()
        .map_or(dir.clone(), std::path::Path::to_path_buf)
}
pub mod cluster;
pub mod cni;
pub mod containerd;
pub mod dataplane;
pub mod lab;
pub mod lab_agent;
pub mod lab_pods;
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
