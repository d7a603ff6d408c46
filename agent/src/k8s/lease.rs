//! A Lease that gives one node at a time a chore done for the whole cluster: the sweep
//! of ENIs left detached by terminated nodes. A node takes the Lease only when nobody
//! holds it (absent or expired) and never renews it, so across the cluster the chore
//! runs about once per lease period, whatever the number of nodes: the EC2 calls it
//! costs do not grow with the cluster.
//!
//! The API server's optimistic concurrency decides between nodes that try at once: a
//! create or replace that lost the race fails with a conflict and that node stands
//! back.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, Client, api::PostParams};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("reading Lease {namespace}/{name}")]
    Get {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing Lease {namespace}/{name} (does the agent's ClusterRole allow leases?)")]
    Write {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The Lease of one cluster-wide chore.
#[derive(Clone)]
pub struct ChoreLease {
    api: Api<Lease>,
    namespace: String,
    name: String,
    holder: String,
    period: Duration,
}

/// Whether a Lease is held by someone at `now`: renewed within its duration. A Lease
/// without either is free (as client-go's leader election reads it).
pub fn held(spec: Option<&LeaseSpec>, now: Timestamp) -> bool {
    let Some(spec) = spec else {
        return false;
    };
    let (Some(renewed), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return false;
    };
    renewed
        .0
        .checked_add(SignedDuration::from_secs(i64::from(secs)))
        .is_ok_and(|until| until > now)
}

fn conflict(e: &kube::Error) -> bool {
    // A create that lost (AlreadyExists) or a replace of a stale read (Conflict).
    matches!(e, kube::Error::Api(s) if s.is_conflict() || s.is_already_exists())
}

impl ChoreLease {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        holder: &str,
        period: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            holder: holder.to_owned(),
            period,
        }
    }

    fn spec(&self, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(i32::try_from(self.period.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Takes the Lease when no node holds it. `Ok(true)`: this node does the chore now,
    /// and no other will before the period ends.
    pub async fn try_take(&self) -> Result<bool, LeaseError> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| LeaseError::Get {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source,
            })?;
        let written = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, 0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(lease) if held(lease.spec.as_ref(), now) => return Ok(false),
            Some(mut lease) => {
                let transitions = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_transitions)
                    .unwrap_or(0)
                    .saturating_add(1);
                lease.spec = Some(self.spec(now, transitions));
                // The read's resourceVersion rides along: a node that took it meanwhile
                // makes this a conflict.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(source) => Err(LeaseError::Write {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(renewed: Option<Timestamp>, secs: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            renew_time: renewed.map(MicroTime),
            lease_duration_seconds: secs,
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_is_held_only_within_its_duration() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let ago = |s: i64| now.checked_sub(SignedDuration::from_secs(s)).unwrap();
        assert!(held(Some(&spec(Some(ago(60)), Some(1800))), now));
        assert!(!held(Some(&spec(Some(ago(1800)), Some(1800))), now));
        assert!(!held(Some(&spec(Some(ago(4000)), Some(1800))), now));
        // Absent, never renewed, or without a duration: free.
        assert!(!held(None, now));
        assert!(!held(Some(&spec(None, Some(1800))), now));
        assert!(!held(Some(&spec(Some(ago(1)), None)), now));
    }
}
