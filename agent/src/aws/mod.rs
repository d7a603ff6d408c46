//! The agent's view of AWS: instance metadata (IMDSv2).

pub mod ec2;
pub mod imds;
