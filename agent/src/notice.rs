//! What users must see, raised anywhere in the agent and published as Kubernetes Events
//! on the agent's Node when it talks to Kubernetes (logged either way): EC2 refusing the
//! node role, the instance type's ENI or address limits reached, the subnet full. A
//! notice is raised on a change of state, not per retry, so a stuck node does not flood
//! the API server.

use tokio::sync::mpsc;
use tracing::{info, warn};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub severity: Severity,
    /// Short and `PascalCase`, as Kubernetes Events' reasons are.
    pub reason: &'static str,
    pub message: String,
}

/// Where notices go; cheap to clone. Without a receiver (not on Kubernetes) notices are
/// only logged.
#[derive(Clone, Debug)]
pub struct Notices {
    tx: Option<mpsc::Sender<Notice>>,
}

/// How many notices may wait for the API server; more are dropped (and logged).
const BACKLOG: usize = 64;

impl Notices {
    /// Notices that are only logged.
    pub fn log_only() -> Self {
        Self { tx: None }
    }

    /// Notices for a publisher, which reads them from the receiver.
    pub fn channel() -> (Self, mpsc::Receiver<Notice>) {
        let (tx, rx) = mpsc::channel(BACKLOG);
        (Self { tx: Some(tx) }, rx)
    }

    pub fn raise(&self, severity: Severity, reason: &'static str, message: impl Into<String>) {
        let n = Notice {
            severity,
            reason,
            message: message.into(),
        };
        match severity {
            Severity::Normal => info!(reason, message = %n.message, "notice"),
            Severity::Warning => warn!(reason, message = %n.message, "notice"),
        }
        if let Some(tx) = &self.tx
            && tx.try_send(n).is_err()
        {
            warn!(
                reason,
                "the notice backlog is full; this one is only logged"
            );
        }
    }

    pub fn warning(&self, reason: &'static str, message: impl Into<String>) {
        self.raise(Severity::Warning, reason, message);
    }

    pub fn normal(&self, reason: &'static str, message: impl Into<String>) {
        self.raise(Severity::Normal, reason, message);
    }
}
