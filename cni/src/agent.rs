//! Calls to the agent, and what a plugin does when it is not there.

use std::{path::Path, time::Duration};

use tonic::{Code, Status, transport::Channel};
use vpc_ebpf_rpc::{
    client, reason, reason_of,
    report::chain,
    types::{PendingRelease, pending_dir},
    v1,
    v1::cni_backend_client::CniBackendClient,
};

use crate::spec::{CniError, ErrorCode};

pub type Client = CniBackendClient<Channel>;

/// Connecting is local and quick; a call the agent does not answer in this long means the
/// agent is stuck, and the runtime will retry.
pub const TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn connect(socket: &Path) -> Result<Client, CniError> {
    client::connect_with(socket, CONNECT_TIMEOUT, TIMEOUT)
        .await
        .map(|c| c.max_decoding_message_size(4 << 20))
        .map_err(|e| {
            // The agent restarting (an upgrade, a crash) passes by itself: the runtime
            // should retry, not fail the pod (CNI code 11).
            CniError::new(
                ErrorCode::TryAgainLater,
                "cannot reach the vpc-ebpf agent",
                format!(
                    "{}; is the vpc-ebpf agent (DaemonSet) running on this node? \
                     `kubectl -n kube-system get pods -l app.kubernetes.io/name=vpc-ebpf -o wide`",
                    chain(&e)
                ),
            )
        })
}

/// Maps an agent error to the CNI code the runtime acts on: 11 (retry later) for what
/// passes by itself, a failure otherwise.
pub fn map_status(what: &str, s: &Status) -> CniError {
    match (s.code(), reason_of(s)) {
        (Code::Unavailable, _) => CniError::new(
            ErrorCode::TryAgainLater,
            format!("{what}: the agent is not ready"),
            s.message().to_owned(),
        ),
        (Code::ResourceExhausted, Some(reason::POOL_REFILLING)) => CniError::new(
            ErrorCode::TryAgainLater,
            format!("{what}: no free IP yet, the warm pool is refilling"),
            s.message().to_owned(),
        ),
        (Code::ResourceExhausted, _) => CniError::new(
            ErrorCode::NoAddress,
            format!("{what}: no IP address available for this pod"),
            s.message().to_owned(),
        ),
        (Code::DeadlineExceeded | Code::Cancelled, _) => CniError::new(
            ErrorCode::TryAgainLater,
            format!("{what}: the agent did not answer in time"),
            s.message().to_owned(),
        ),
        _ => CniError::new(
            ErrorCode::Agent,
            format!("{what}: the agent refused ({:?})", s.code()),
            s.message().to_owned(),
        ),
    }
}

/// Whether a failed ADD may still have been carried out by the agent: the connection
/// broke or timed out before an answer, as opposed to an answer saying no.
pub fn outcome_unknown(s: &Status) -> bool {
    vpc_ebpf_rpc::reason_of(s).is_none()
        && matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        )
}

/// Records a release for the agent to do when it is back (see
/// [`vpc_ebpf_rpc::types::PendingRelease`]).
pub fn remember_release(socket: &Path, a: &v1::Attachment) -> std::io::Result<()> {
    // The time lets the agent ignore a record older than a later assignment of the
    // same key (a record that raced with a restart must not strip a newer pod).
    let recorded_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    PendingRelease::new(&a.network, &a.container_id, &a.ifname, recorded_ms)
        .write(&pending_dir(socket))
        .map(|_| ())
}
