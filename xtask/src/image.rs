//! `cargo xtask image`: the OCI images, built without a container engine. Each image is
//! one layer (a reproducible tar: fixed times, owners and order) in an OCI image layout
//! under `<target-dir>/images/<name>/`, which the lab pushes to its registry.
//!
//! - `vpc-ebpf`: the agent (dynamically linked, with the few glibc libraries it needs),
//!   the plugin (statically linked: it runs on the host, whatever its libc), the conflist
//!   a hand install would use, the CA bundle for EC2's TLS. The chart runs it as the
//!   DaemonSet's init container (`install-cni`) and agent.
//! - `pause`: the pod sandbox process.
//! - `workload`: the checks' servers and clients, and busybox for a shell in the pods.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use flate2::{Compression, write::GzEncoder};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::util::{cargo, output, root, run, target_dir};

/// Debian's reference CNI plugins shipped in the image: `loopback` (containerd's CRI
/// calls it for every pod) and the ones users chain after vpc-ebpf.
const CHAINED_PLUGINS: [&str; 4] = ["loopback", "portmap", "bandwidth", "tuning"];

/// One file of an image: where it goes, where it comes from, its mode.
struct Entry {
    path: String,
    source: Source,
    mode: u32,
}

enum Source {
    File(PathBuf),
    Symlink(String),
}

pub struct Built {
    pub name: &'static str,
    pub dir: PathBuf,
    pub tag: String,
    pub layer_bytes: u64,
}

/// The images' tag: the workspace version and the commit, `-dirty` with local changes;
/// `--tag` overrides it (an upgrade test builds two).
pub fn default_tag() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let commit = output(
        Command::new("git")
            .args(["rev-parse", "--short=10", "HEAD"])
            .current_dir(root()),
    )
    .map_or_else(|| "unknown".into(), |s| s.trim().to_owned());
    let dirty = output(
        Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .current_dir(root()),
    )
    .is_some_and(|s| !s.trim().is_empty());
    format!("{version}-{commit}{}", if dirty { "-dirty" } else { "" })
}

/// `cargo xtask image [--tag T] [--profile release|dev]`.
pub fn run_cli(args: &[String]) -> anyhow::Result<()> {
    let mut tag = default_tag();
    let mut release = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tag" => tag.clone_from(it.next().context("--tag needs a value")?),
            "--profile" => {
                release = match it.next().map(String::as_str) {
                    Some("release") => true,
                    Some("dev") => false,
                    other => bail!("--profile {other:?}: release or dev"),
                }
            }
            other => bail!(
                "unknown argument {other:?}: cargo xtask image [--tag T] [--profile release|dev]"
            ),
        }
    }
    for b in build_all(&tag, release)? {
        println!(
            "{}:{} -> {} ({} KiB compressed)",
            b.name,
            b.tag,
            b.dir.display(),
            b.layer_bytes / 1024
        );
    }
    Ok(())
}

/// Builds the binaries and the three images.
pub fn build_all(tag: &str, release: bool) -> anyhow::Result<Vec<Built>> {
    let out_dir = build_binaries(release)?;
    let images = images_dir(release)?;
    let specs = image_specs(&out_dir, &images)?;
    let mut built = Vec::new();
    for (name, entries, config) in specs {
        let dir = images.join(name);
        let layer_bytes = write_layout(&dir, tag, &entries, &config)
            .with_context(|| format!("writing the {name} image"))?;
        built.push(Built {
            name,
            dir,
            tag: tag.to_owned(),
            layer_bytes,
        });
    }
    Ok(built)
}

/// The agent, the plugin and the images' small programs; returns their directory.
fn build_binaries(release: bool) -> anyhow::Result<PathBuf> {
    crate::deps::ensure_ebpf_toolchain()?;
    crate::ebpf::build(true)?;
    crate::deps::ensure_files(&[
        ("/bin/busybox", "busybox-static"),
        ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    ])?;
    let profile = if release { "release" } else { "dev" };
    let out_dir = target_dir()?.join(if release { "release" } else { "debug" });
    eprintln!("building the agent ({profile}; the first release build takes minutes)");
    run(Command::new(cargo())
        .args(["build", "--profile", profile, "-p", "vpc-ebpf-agent"])
        .current_dir(root()))?;
    // The plugin and the small programs link statically: the plugin runs on the host
    // whatever its libc, the others in images with no libc at all.
    for (pkg, bin) in [
        ("vpc-ebpf-cni", "vpc-ebpf-cni"),
        ("vpc-ebpf-images", "vpc-ebpf-pause"),
        ("vpc-ebpf-images", "vpc-ebpf-testsrv"),
    ] {
        run(Command::new(cargo())
            .args(["rustc", "--profile", profile, "-p", pkg, "--bin", bin, "--"])
            .args(["-C", "target-feature=+crt-static", "-C", "strip=symbols"])
            .current_dir(root()))?;
    }
    Ok(out_dir)
}

type Spec = (&'static str, Vec<Entry>, Value);

/// Where the images of a profile are written: release ones (`cargo xtask lab`) and dev
/// ones (the test suite's) apart.
pub fn images_dir(release: bool) -> anyhow::Result<PathBuf> {
    Ok(target_dir()?.join(if release { "images" } else { "images-dev" }))
}

/// What goes in each image.
fn image_specs(out_dir: &Path, images: &Path) -> anyhow::Result<[Spec; 3]> {
    let agent = out_dir.join("vpc-ebpf-agent");
    // Symbols and debug info are a third of the binary; the image ships without them.
    let stripped = images.join(".staging/vpc-ebpf-agent");
    std::fs::create_dir_all(images.join(".staging"))?;
    run(Command::new("objcopy")
        .arg("--strip-all")
        .arg(&agent)
        .arg(&stripped))?;
    let mut agent_files = vec![
        file("usr/local/bin/vpc-ebpf-agent", &stripped, 0o755),
        // The agent keeps its state under /var/run/vpc-ebpf, which must be the host's
        // /run/vpc-ebpf the chart mounts, as on the host, where /var/run is /run.
        Entry {
            path: "var/run".into(),
            source: Source::Symlink("../run".into()),
            mode: 0o777,
        },
        file(
            "opt/vpc-ebpf/bin/vpc-ebpf-cni",
            &out_dir.join("vpc-ebpf-cni"),
            0o755,
        ),
        file(
            "opt/vpc-ebpf/10-vpc-ebpf.conflist",
            &root().join("cni/10-vpc-ebpf.conflist"),
            0o644,
        ),
    ];
    // The reference plugins the runtime needs beside ours (containerd sets a pod's
    // loopback up with `loopback`) and that users chain after it; installed on a node only
    // where it has none of its own.
    for p in CHAINED_PLUGINS {
        agent_files.push(file(
            &format!("opt/vpc-ebpf/bin/{p}"),
            &Path::new("/usr/lib/cni").join(p),
            0o755,
        ));
    }
    agent_files.extend(shared_libraries(&stripped)?);
    let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if certs.exists() {
        agent_files.push(file("etc/ssl/certs/ca-certificates.crt", certs, 0o644));
    }
    let busybox_links = ["sh", "ls", "cat", "ip", "ping", "wget", "nc", "sleep", "ps"];
    let mut workload = vec![
        file(
            "bin/vpc-ebpf-testsrv",
            &out_dir.join("vpc-ebpf-testsrv"),
            0o755,
        ),
        file("bin/busybox", Path::new("/bin/busybox"), 0o755),
    ];
    workload.extend(busybox_links.iter().map(|l| Entry {
        path: format!("bin/{l}"),
        source: Source::Symlink("busybox".into()),
        mode: 0o777,
    }));
    Ok([
        (
            "vpc-ebpf",
            agent_files,
            json!({"Entrypoint": ["/usr/local/bin/vpc-ebpf-agent"],
                   "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]}),
        ),
        (
            "pause",
            vec![file("pause", &out_dir.join("vpc-ebpf-pause"), 0o755)],
            json!({"Entrypoint": ["/pause"]}),
        ),
        (
            "workload",
            workload,
            json!({"Entrypoint": ["/bin/vpc-ebpf-testsrv"], "Cmd": ["serve"],
                   "Env": ["PATH=/bin"]}),
        ),
    ])
}

fn file(path: &str, source: &Path, mode: u32) -> Entry {
    Entry {
        path: path.to_owned(),
        source: Source::File(source.to_path_buf()),
        mode,
    }
}

/// The shared libraries `binary` loads (what `ldd` resolves), each at the path the
/// dynamic loader looks for it.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<Entry>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!("ldd {} failed", binary.display());
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or the loader's
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            let real = std::fs::canonicalize(p).with_context(|| format!("resolving {p}"))?;
            libs.push(file(p.trim_start_matches('/'), &real, 0o755));
        }
    }
    Ok(libs)
}

fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = std::fmt::Write::write_fmt(&mut s, format_args!("{b:02x}"));
        s
    })
}

/// The layer's tar: parent directories first, then the files, all in path order, with
/// fixed times and owners so the same inputs give the same digest.
fn layer_tar(entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let mut dirs = std::collections::BTreeSet::new();
    for e in entries {
        let mut p = Path::new(&e.path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h
    };
    for d in &dirs {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, format!("{d}/"), std::io::empty())?;
    }
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for e in sorted {
        match &e.source {
            Source::File(src) => {
                let data =
                    std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                let mut h = header(tar::EntryType::Regular, e.mode, data.len() as u64);
                b.append_data(&mut h, &e.path, data.as_slice())?;
            }
            Source::Symlink(target) => {
                let mut h = header(tar::EntryType::Symlink, e.mode, 0);
                b.append_link(&mut h, &e.path, target)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// Writes the OCI image layout for one image; returns the compressed layer's size.
fn write_layout(dir: &Path, tag: &str, entries: &[Entry], config: &Value) -> anyhow::Result<u64> {
    let _ = std::fs::remove_dir_all(dir);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> anyhow::Result<String> {
        let digest = sha256(bytes);
        std::fs::write(blobs.join(&digest), bytes)?;
        Ok(digest)
    };
    let tar = layer_tar(entries)?;
    let diff_id = sha256(&tar);
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    gz.write_all(&tar)?;
    let layer = gz.finish()?;
    let layer_digest = put(&layer)?;
    let config_json = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created_by": "cargo xtask image"}],
    });
    let config_bytes = serde_json::to_vec(&config_json)?;
    let config_digest = put(&config_bytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{config_digest}"), "size": config_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": format!("sha256:{layer_digest}"), "size": layer.len()}],
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = put(&manifest_bytes)?;
    let annotations: BTreeMap<&str, &str> = [("org.opencontainers.image.ref.name", tag)].into();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{manifest_digest}"),
                       "size": manifest_bytes.len(), "annotations": annotations}],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(layer.len() as u64)
}
