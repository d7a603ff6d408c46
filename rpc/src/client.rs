//! Connecting to the agent's unix socket.

use std::{path::PathBuf, time::Duration};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::v1::cni_backend_client::CniBackendClient;

#[derive(Debug, thiserror::Error)]
#[error("cannot reach the vpc-ebpf agent at {path}")]
pub struct ConnectError {
    pub path: PathBuf,
    #[source]
    pub source: tonic::transport::Error,
}

/// A client on the agent's socket; `timeout` bounds connecting and every call.
pub async fn connect(
    path: impl Into<PathBuf>,
    timeout: Duration,
) -> Result<CniBackendClient<Channel>, ConnectError> {
    connect_with(path, timeout, timeout).await
}

/// A channel on the agent's socket for any of its services (the health check).
pub async fn channel(path: impl Into<PathBuf>, timeout: Duration) -> Result<Channel, ConnectError> {
    channel_with(path.into(), timeout, timeout).await
}

async fn channel_with(
    path: PathBuf,
    connect_timeout: Duration,
    call_timeout: Duration,
) -> Result<Channel, ConnectError> {
    let socket = path.clone();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://agent.invalid")
        .connect_timeout(connect_timeout)
        .timeout(call_timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|source| ConnectError { path, source })
}

/// A client whose connecting and calls have their own bounds: connecting to a local
/// socket is instant or never, while a call may wait for the agent's pool to refill.
pub async fn connect_with(
    path: impl Into<PathBuf>,
    connect_timeout: Duration,
    call_timeout: Duration,
) -> Result<CniBackendClient<Channel>, ConnectError> {
    channel_with(path.into(), connect_timeout, call_timeout)
        .await
        .map(CniBackendClient::new)
}
