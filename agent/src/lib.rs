//! vpc-ebpf node agent as a library: the binary wires these modules together, tests
//! drive them directly. One owner for each kind of state:
//!
//! | module | owns |
//! |---|---|
//! | `config` | the environment, read once (VPC CNI's variable names) |
//! | `node` | who the node is (IMDS/EC2 identity, cached) and its settings |
//! | `ipam` | addresses: the store, its checkpoint, the warm pool and its EC2 reconciler |
//! | `endpoints` | the registry: pod IP → who the pod is and where it sits |
//! | `dataplane` | the eBPF programs, maps and links, behind one owner task |
//! | `restart` | rebuilding all of the above after a restart, and the recovery sweep |
//! | `k8s` | the Kubernetes side: own Node, pods on the node, Events, pod IP annotation |
//! | `notice` | what users must see, raised anywhere, published as Events |
//! | `rpc` | the plugin's gRPC API, a thin adapter over the owners |
//! | `http`, `metrics` | introspection and Prometheus |
//! | `aws`, `host`, `persist`, `clock` | thin seams: EC2/IMDS, netlink, crash-safe files, time |

// The effective configuration is one `json!` object of every variable.
#![recursion_limit = "256"]

pub mod aws;
pub mod clock;
pub mod cni_config;
pub mod config;
pub mod dataplane;
pub mod endpoints;
pub mod flows_client;
pub mod host;
pub mod http;
pub mod install;
pub mod ipam;
pub mod k8s;
pub mod metrics;
pub mod node;
pub mod notice;
pub mod persist;
pub mod policy;
pub mod probe;
pub mod restart;
pub mod rpc;
