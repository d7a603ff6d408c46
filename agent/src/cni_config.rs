//! The CNI network configuration the container runtime reads (`10-vpc-ebpf.conflist`),
//! rendered from the agent's own settings so the plugin and the agent always agree (veth
//! prefix, pod MTU, socket), and written by the agent once it is ready: the kubelet
//! reports the node's network ready only when pods can be served, as aws-node does.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::{config::Config, persist};

pub const FILE_NAME: &str = "10-vpc-ebpf.conflist";
/// aws-node's network name: the attachments the runtime keys by it carry over.
pub const NETWORK_NAME: &str = "aws-cni";
/// The spec version every runtime reads (containerd 1.6's libcni knows up to 1.0.0) ...
pub const CNI_VERSION: &str = "1.0.0";
/// ... and the versions the config supports, for CNI 1.1 runtimes, which pick the highest
/// they speak (and then use STATUS and GC); older ones ignore the list.
pub const CNI_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];

/// The conflist for `config`, with `plugin_log` as the plugin's log file (as the host sees
/// it).
pub fn render(config: &Config, plugin_log: &Path) -> Value {
    let mut plugins = vec![json!({
        "type": "vpc-ebpf-cni",
        "agentSocket": config.agent_socket,
        "vethPrefix": config.veth_prefix,
        "mtu": config.pod_mtu,
        "logFile": plugin_log,
        "logLevel": config.log_level,
        "capabilities": {"portMappings": true}
    })];
    if config.bandwidth_plugin {
        // vpc-ebpf reads the limits too: the dataplane sends a limited pod's traffic
        // through the qdisc `bandwidth` puts on the host veth (which redirecting to the
        // pod's namespace would skip), and limits what the pod sends itself, since the
        // dataplane redirects it before `bandwidth`'s ifb redirect would run.
        plugins[0]["capabilities"]["bandwidth"] = json!(true);
        plugins.push(json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}));
    }
    json!({
        "cniVersion": CNI_VERSION,
        "cniVersions": CNI_VERSIONS,
        "name": NETWORK_NAME,
        "disableCheck": false,
        "plugins": plugins,
    })
}

/// Writes the conflist into `dir` atomically (the runtime never reads half a file).
pub fn write(dir: &Path, conflist: &Value) -> Result<PathBuf, persist::PersistError> {
    let path = dir.join(FILE_NAME);
    let mut text = serde_json::to_string_pretty(conflist).unwrap_or_default();
    text.push('\n');
    persist::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conflist shipped in the repository (what `cargo xtask image` puts in the image
    /// for hand installs) is the agent's rendering of its defaults.
    #[test]
    fn the_shipped_conflist_is_the_default_rendering() {
        let c = Config::from_lookup(&|_| None).unwrap_or_else(|e| panic!("defaults: {e}"));
        let rendered = render(&c, Path::new("/var/log/vpc-ebpf/plugin.log"));
        let shipped: Value = serde_json::from_str(include_str!("../../cni/10-vpc-ebpf.conflist"))
            .expect("the shipped conflist is JSON");
        assert_eq!(rendered, shipped);
    }

    /// ENABLE_BANDWIDTH_PLUGIN chains `bandwidth` as aws-node does, and vpc-ebpf asks
    /// for the limits too.
    #[test]
    fn the_bandwidth_plugin_is_chained_on_request() {
        let c = Config::from_lookup(&|k| (k == "ENABLE_BANDWIDTH_PLUGIN").then(|| "true".into()))
            .unwrap_or_else(|e| panic!("{e}"));
        let rendered = render(&c, Path::new("/var/log/vpc-ebpf/plugin.log"));
        let plugins = rendered["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[0]["type"], "vpc-ebpf-cni");
        assert_eq!(plugins[0]["capabilities"]["bandwidth"], true);
        assert_eq!(plugins[0]["capabilities"]["portMappings"], true);
        assert_eq!(
            plugins[1],
            json!({"type": "bandwidth", "capabilities": {"bandwidth": true}})
        );
    }
}
