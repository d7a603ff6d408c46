//! Releases the plugin recorded while the agent was unreachable (a DEL must succeed even
//! then). Applied at start, before the agent serves, so those addresses go through
//! cooldown instead of being held forever by pods that no longer exist.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tracing::{info, warn};

use crate::ipam::store::{AttachmentKey, Store};

#[derive(Deserialize)]
struct Pending {
    network: String,
    container_id: String,
    ifname: String,
    /// Wall-clock time of the record; absent in records of older plugins.
    #[serde(default)]
    recorded_ms: Option<u64>,
}

/// What `apply` did: the addresses it freed and the records it consumed. The records
/// must be removed (`Applied::remove`) only after the store is checkpointed, or a crash in
/// between would forget the release.
#[derive(Debug, Default)]
pub struct Applied {
    pub freed: usize,
    pub records: Vec<PathBuf>,
}

impl Applied {
    pub fn remove(self) {
        for path in self.records {
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), error = %e, "could not remove a pending release");
            }
        }
    }
}

/// Releases every recorded attachment. Unreadable records are left in place and logged,
/// never guessed at.
pub fn apply(dir: &Path, store: &mut Store, now_ms: u64) -> Applied {
    let mut out = Applied::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let parsed = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Pending>(&b).ok());
        let Some(p) = parsed else {
            warn!(path = %path.display(), "unreadable pending release left in place");
            continue;
        };
        let key = AttachmentKey {
            network: p.network,
            container_id: p.container_id,
            ifname: p.ifname,
        };
        let newer = p
            .recorded_ms
            .zip(store.assigned_since(&key))
            .is_some_and(|(recorded, since)| since > recorded);
        if newer {
            info!(container = %key.container_id, "ignoring a recorded release older than the attachment's current address");
        } else if let Some(ip) = store.release(&key, now_ms) {
            info!(%ip, container = %key.container_id, "released a DEL recorded while the agent was down");
            out.freed += 1;
        }
        out.records.push(path);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{pool::Mode, store::PodMeta};

    #[test]
    fn recorded_dels_are_released_once() {
        let dir = std::env::temp_dir().join(format!("vpc-ebpf-pending-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Store::new(Mode::SecondaryIp, 1_000);
        s.upsert_eni("eni-0", 0, "m", "10.0.0.10".parse().unwrap());
        s.add_ips("eni-0", &["10.0.0.20".parse().unwrap()]).unwrap();
        let key = AttachmentKey {
            network: "aws-cni".into(),
            container_id: "gone".into(),
            ifname: "eth0".into(),
        };
        s.assign(&key, &PodMeta::default(), 0).unwrap();
        std::fs::write(
            dir.join("aws-cni_gone_eth0.json"),
            br#"{"network":"aws-cni","container_id":"gone","ifname":"eth0"}"#,
        )
        .unwrap();
        std::fs::write(dir.join("broken.json"), b"{").unwrap();
        let applied = apply(&dir, &mut s, 10);
        assert_eq!(applied.freed, 1);
        assert_eq!(s.lookup(&key), None);
        assert!(
            dir.join("aws-cni_gone_eth0.json").exists(),
            "records stay until the caller has checkpointed"
        );
        applied.remove();
        assert!(!dir.join("aws-cni_gone_eth0.json").exists());
        assert!(
            dir.join("broken.json").exists(),
            "unreadable records are kept"
        );
        assert_eq!(apply(&dir, &mut s, 20).freed, 0);

        // A record older than the key's current assignment is stale: it is consumed
        // without touching the newer pod.
        s.assign(&key, &PodMeta::default(), 2_000).unwrap();
        std::fs::write(
            dir.join("aws-cni_gone_eth0.json"),
            br#"{"network":"aws-cni","container_id":"gone","ifname":"eth0","recorded_ms":1500}"#,
        )
        .unwrap();
        let applied = apply(&dir, &mut s, 2_100);
        assert_eq!(applied.freed, 0);
        assert!(s.lookup(&key).is_some());
        applied.remove();
        assert!(!dir.join("aws-cni_gone_eth0.json").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
