//! The plugin/agent gRPC contract (generated from `proto/vpc_ebpf/cni/v1/cni.proto`), the
//! values both ends handle (`types`) and the unix-socket plumbing both ends share.

#[allow(clippy::pedantic, missing_docs, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("vpc_ebpf.cni.v1");
}

/// Trailer carrying why no address could be given (RESOURCE_EXHAUSTED).
pub const REASON_KEY: &str = "x-vpc-ebpf-reason";

/// Values of [`REASON_KEY`].
pub mod reason {
    /// The agent is getting more addresses from EC2: try again shortly.
    pub const POOL_REFILLING: &str = "pool-refilling";
    /// Every ENI the instance type allows is attached and full.
    pub const ENI_LIMIT: &str = "eni-limit";
    /// The subnet has no free addresses.
    pub const SUBNET_EXHAUSTED: &str = "subnet-exhausted";
    /// New ENIs cannot be placed: custom networking's ENIConfig or subnet discovery's
    /// subnets are wrong; a user must act.
    pub const ENI_PLACEMENT: &str = "eni-placement";
    /// The node holds as many addresses as it may run pods.
    pub const MAX_PODS: &str = "max-pods";
    /// The agent has not finished discovery; it assigned nothing.
    pub const NOT_READY: &str = "not-ready";
}

/// Reads the reason trailer of a status, if any.
pub fn reason_of(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(REASON_KEY)?.to_str().ok()
}

pub mod report;
pub mod types;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod server;
