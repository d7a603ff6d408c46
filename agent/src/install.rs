//! `vpc-ebpf-agent install-cni`: what the DaemonSet's (privileged) init container does on
//! the host before the agent starts: the plugin binary into the host's CNI bin directory
//! (atomically, so a runtime never execs half a binary) and the kernel settings pods'
//! traffic needs. The network config is written later, by the agent, once it is ready.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { op, path, source }
}

/// Kernel settings for pods: forwarding for what the programs hand to the kernel (Service
/// traffic to other nodes), and loose reverse-path filtering on all interfaces, since a
/// pod's replies may come in on an ENI other than the one the kernel would route to.
pub const SYSCTLS: &[(&str, &str)] = &[
    ("/proc/sys/net/ipv4/ip_forward", "1"),
    ("/proc/sys/net/ipv4/conf/all/rp_filter", "2"),
    ("/proc/sys/net/ipv4/conf/default/rp_filter", "2"),
];

/// Copies a binary into `dir` under its own name, atomically.
fn copy_in(src: &Path, dir: &Path) -> Result<PathBuf, InstallError> {
    let name = src.file_name().unwrap_or_default().to_string_lossy();
    let target = dir.join(&*name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::copy(src, &tmp).map_err(io("copying the plugin to", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(io("chmod of", &tmp))?;
    std::fs::rename(&tmp, &target).map_err(io("renaming over", &target))?;
    Ok(target)
}

/// Copies `plugin` into `bin_dir` (replacing an older one), the reference plugins beside
/// it in the image into `bin_dir` where the host has none of its own (never replacing the
/// host's), and applies [`SYSCTLS`].
pub fn install(plugin: &Path, bin_dir: &Path) -> Result<Vec<String>, InstallError> {
    let mut done = Vec::new();
    std::fs::create_dir_all(bin_dir).map_err(io("creating", bin_dir))?;
    let target = copy_in(plugin, bin_dir)?;
    done.push(format!("installed {}", target.display()));
    if let Some(dir) = plugin.parent()
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for e in entries.flatten() {
            let p = e.path();
            let Some(name) = p.file_name() else { continue };
            if p == plugin || bin_dir.join(name).exists() {
                continue;
            }
            let t = copy_in(&p, bin_dir)?;
            done.push(format!("installed {} (the host had none)", t.display()));
        }
    }
    for (path, value) in SYSCTLS {
        let p = Path::new(path);
        if std::fs::read_to_string(p).is_ok_and(|v| v.trim() == *value) {
            continue;
        }
        std::fs::write(p, value).map_err(io("writing", p))?;
        done.push(format!("{path} = {value}"));
    }
    Ok(done)
}
