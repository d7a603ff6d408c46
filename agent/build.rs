//! Finds the eBPF object built by `cargo xtask build-ebpf` so the agent can embed it.
//!
//! The object is built by a nightly toolchain for another target, so it cannot be a normal
//! dependency; xtask writes it to `<target-dir>/ebpf/vpc-ebpf.o` (or `VPC_EBPF_OBJECT`
//! points at it) and this script hands its path to `include_bytes_aligned!`.
use std::{
    env,
    path::{Path, PathBuf},
    process,
};

const RELATIVE: &str = "ebpf/vpc-ebpf.o";

fn main() {
    println!("cargo:rerun-if-env-changed=VPC_EBPF_OBJECT");
    let object = match env::var_os("VPC_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => find_in_target_dir(),
    };
    if !object.is_file() {
        eprintln!(
            "error: the eBPF object {} does not exist.\n\
             Build it first with `cargo xtask build-ebpf` (cargo xtask test and cargo xtask lab \
             do this for you), or point VPC_EBPF_OBJECT at a built object.",
            object.display()
        );
        process::exit(1);
    }
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env=VPC_EBPF_OBJECT={}", object.display());
}

/// `OUT_DIR` is `<target-dir>/[<triple>/]<profile>/build/<pkg>-<hash>/out`; the object sits
/// in the target dir itself, whichever of its ancestors that is.
fn find_in_target_dir() -> PathBuf {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let candidates: Vec<&Path> = out_dir.ancestors().skip(3).take(3).collect();
    candidates
        .iter()
        .map(|dir| dir.join(RELATIVE))
        .find(|p| p.is_file())
        .unwrap_or_else(|| candidates[1].join(RELATIVE))
}
