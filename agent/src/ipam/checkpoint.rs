//! The IPAM datastore on disk: written through [`crate::persist`] (temporary file, fsync,
//! rename) after every change and before the change is answered, so after a crash at any
//! instant the file holds either the old or the new state, whole.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::store::Store;
use crate::persist::{self, PersistError};

/// Bumped when the file's layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
pub const DEFAULT_PATH: &str = "/var/run/vpc-ebpf/ipam.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint")]
    Io(#[from] PersistError),
    #[error(
        "checkpoint {path} is unreadable; move it aside to start from EC2 and the host's \
         veths alone"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding the checkpoint for {path}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "checkpoint {path} has format {found}, this agent reads {FORMAT_VERSION}; it was written \
         by another version"
    )]
    Version { path: PathBuf, found: u32 },
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    store: Store,
}

/// Read first, so a file of another format is reported as such rather than as corrupt.
#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

#[derive(Serialize)]
struct OnDiskRef<'a> {
    version: u32,
    store: &'a Store,
}

pub fn save(path: &Path, store: &Store) -> Result<(), CheckpointError> {
    let data = serde_json::to_vec(&OnDiskRef {
        version: FORMAT_VERSION,
        store,
    })
    .map_err(|source| CheckpointError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(persist::write_atomic(path, &data)?)
}

/// The saved store, or `None` when there is no checkpoint yet.
pub fn load(path: &Path) -> Result<Option<Store>, CheckpointError> {
    let Some(data) = persist::read(path)? else {
        return Ok(None);
    };
    let corrupt = |source| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    let v: VersionOnly = serde_json::from_slice(&data).map_err(corrupt)?;
    if v.version != FORMAT_VERSION {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            found: v.version,
        });
    }
    let mut disk: OnDisk = serde_json::from_slice(&data).map_err(corrupt)?;
    disk.store.reindex();
    Ok(Some(disk.store))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::ipam::{
        pool::Mode,
        store::{AttachmentKey, PodMeta},
    };

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vpc-ebpf-ckpt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn sample() -> Store {
        let mut s = Store::new(Mode::SecondaryIp, 30_000);
        s.upsert_eni(
            "eni-0",
            0,
            vpc_ebpf_rpc::types::MacAddr([2, 0, 0, 0, 0, 1]),
            "10.0.0.10".parse().unwrap(),
        );
        s.add_ips("eni-0", &["10.0.0.20".parse().unwrap()]).unwrap();
        let key = AttachmentKey {
            network: "n".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
        };
        s.assign(&key, &PodMeta::default(), 1).unwrap();
        s
    }

    #[test]
    fn round_trips_and_missing_is_none() {
        let dir = tmpdir("rt");
        let path = dir.join("ipam.json");
        assert!(load(&path).unwrap().is_none());
        save(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap().unwrap(), sample());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_or_foreign_checkpoints_are_refused_with_what_to_do() {
        let dir = tmpdir("bad");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ipam.json");
        fs::write(&path, b"{not json").unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, CheckpointError::Corrupt { .. }));
        assert!(e.to_string().contains("move it aside"));
        assert!(
            !e.to_string().contains("key must be a string"),
            "the cause is not repeated in the message: {e}"
        );
        fs::write(&path, br#"{"version":99,"store":{}}"#).unwrap();
        assert!(matches!(
            load(&path).unwrap_err(),
            CheckpointError::Version { found: 99, .. }
        ));
        fs::remove_dir_all(dir).unwrap();
    }
}
