//! Crash-safe persistence of the datastore: every change is written to a temporary file in
//! the same directory, fsynced, renamed over the checkpoint and the directory fsynced, so
//! after a crash at any instant the file holds either the old or the new state, whole.

use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::store::Store;

/// Bumped when the file's layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
pub const DEFAULT_PATH: &str = "/var/run/vpc-ebpf/ipam.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "checkpoint {path} is unreadable ({source}); move it aside to start from EC2 and the \
         host's veths alone"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("encoding the checkpoint for {path}: {source}")]
    Encode {
        path: PathBuf,
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

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io { op, path, source }
}

pub fn save(path: &Path, store: &Store) -> Result<(), CheckpointError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let data = serde_json::to_vec(&OnDiskRef {
        version: FORMAT_VERSION,
        store,
    })
    .map_err(|source| CheckpointError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map_or("checkpoint".into(), |n| n.to_string_lossy())
    ));
    let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(&data).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("fsync of", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io("renaming over", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync of", dir))
}

/// The saved store, or `None` when there is no checkpoint yet.
pub fn load(path: &Path) -> Result<Option<Store>, CheckpointError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("reading", path)(e)),
    };
    let v: VersionOnly =
        serde_json::from_slice(&data).map_err(|source| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    if v.version != FORMAT_VERSION {
        return Err(CheckpointError::Version {
            path: path.to_path_buf(),
            found: v.version,
        });
    }
    let mut disk: OnDisk =
        serde_json::from_slice(&data).map_err(|source| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    disk.store.reindex();
    Ok(Some(disk.store))
}

#[cfg(test)]
mod tests {
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
            "02:00:00:00:00:01",
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
    fn a_crash_before_the_rename_leaves_the_previous_state() {
        let dir = tmpdir("crash");
        let path = dir.join("ipam.json");
        save(&path, &sample()).unwrap();
        // What a crash mid-write leaves behind: a torn temporary file.
        fs::write(dir.join(".ipam.json.tmp"), b"{\"version\":1,\"sto").unwrap();
        assert_eq!(load(&path).unwrap().unwrap(), sample());
        // And the next save replaces it.
        save(&path, &Store::new(Mode::Prefix, 1)).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().mode, Mode::Prefix);
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
        fs::write(&path, br#"{"version":99,"store":{}}"#).unwrap();
        assert!(matches!(
            load(&path).unwrap_err(),
            CheckpointError::Version { found: 99, .. }
        ));
        fs::remove_dir_all(dir).unwrap();
    }
}
