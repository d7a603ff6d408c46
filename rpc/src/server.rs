//! Listening on the agent's unix socket.

use std::{
    io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}")]
pub struct BindError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Binds `path` with mode 0600 (only root may ask for addresses). A stale socket left by
/// a crashed agent is removed first; a socket some live process still serves is not.
pub async fn bind(path: &Path) -> Result<UnixListenerStream, BindError> {
    let err = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| BindError { op, path, source }
    };
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(err("creating"))?;
    }
    if tokio::fs::symlink_metadata(path).await.is_ok() {
        match tokio::net::UnixStream::connect(path).await {
            Ok(_) => {
                return Err(err("another agent is serving")(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "stop it first",
                )));
            }
            Err(_) => tokio::fs::remove_file(path)
                .await
                .map_err(err("removing stale socket"))?,
        }
    }
    // Bound inside a private (0700) directory, made 0600, then renamed into place: at
    // no instant is the socket reachable with the mode the umask would give it.
    let dir = path.parent().unwrap_or(Path::new("."));
    let private = dir.join(format!(".bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err("creating a private directory next to"))?;
    let staged = private.join("sock");
    let bound = UnixListener::bind(&staged)
        .map_err(err("binding"))
        .and_then(|l| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
                .map_err(err("chmod 0600 of"))?;
            std::fs::rename(&staged, path).map_err(err("moving the socket to"))?;
            Ok(l)
        });
    let _ = std::fs::remove_dir_all(&private);
    Ok(UnixListenerStream::new(bound?))
}
