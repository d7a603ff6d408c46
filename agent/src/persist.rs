//! Crash-safe files: every write goes to a temporary file in the same directory, is
//! fsynced, renamed over the target and the directory fsynced, so after a crash at any
//! instant the file holds either the old or the new content, whole. Shared by the IPAM
//! checkpoint, the endpoint registry and the node's identity cache.

use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}")]
pub struct PersistError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PersistError {
    let path = path.to_path_buf();
    move |source| PersistError { op, path, source }
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), PersistError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map_or("state".into(), |n| n.to_string_lossy())
    ));
    let mut f = File::create(&tmp).map_err(io("creating", &tmp))?;
    f.write_all(data).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("fsync of", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io("renaming over", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync of", dir))
}

/// The file's bytes, or `None` when it does not exist.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>, PersistError> {
    match fs::read(path) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("reading", path)(e)),
    }
}

/// Moves an unreadable file aside (never silently overwritten, so it can be inspected),
/// returning where it went.
pub fn move_aside(path: &Path, now_ms: u64) -> Result<PathBuf, PersistError> {
    let aside = path.with_extension(format!("corrupt-{now_ms}"));
    fs::rename(path, &aside).map_err(io("moving aside", path))?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_before_the_rename_leaves_the_previous_content() {
        let dir = std::env::temp_dir().join(format!("vpc-ebpf-persist-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("state.json");
        assert_eq!(read(&path).unwrap(), None);
        write_atomic(&path, b"one").unwrap();
        // What a crash mid-write leaves behind: a torn temporary file.
        fs::write(dir.join(".state.json.tmp"), b"tw").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some(&b"one"[..]));
        write_atomic(&path, b"two").unwrap();
        assert_eq!(read(&path).unwrap().as_deref(), Some(&b"two"[..]));
        let aside = move_aside(&path, 5).unwrap();
        assert_eq!(read(&path).unwrap(), None);
        assert_eq!(fs::read(aside).unwrap(), b"two");
        fs::remove_dir_all(dir).unwrap();
    }
}
