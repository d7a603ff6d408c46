//! Kubernetes NetworkPolicy, layered as Cilium does: the API model ([`model`]), a pure
//! compiler from policies, pods and namespaces to each local pod's rules ([`compile`]),
//! rule sets shared by pods with the same rules and the plan that changes the maps
//! without a window ([`sets`]); the dataplane writes the plan
//! (`dataplane::policy_maps`). The programs' verdicts come back as flow records
//! ([`flows`], [`flow_log`]).

pub mod cache;
pub mod compile;
pub mod engine;
pub mod flow_log;
pub mod flows;
pub mod intern;
pub mod label_index;
pub mod model;
pub mod sets;
#[cfg(test)]
mod testing;
