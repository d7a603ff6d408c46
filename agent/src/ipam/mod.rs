//! IP address management: the pure warm-pool arithmetic (`pool`), the node's address
//! datastore (`store`) and its crash-safe persistence (`checkpoint`). None of these do
//! network I/O; the reconciler that drives EC2 and IMDS builds on them.

pub mod checkpoint;
pub mod pool;
pub mod store;
pub mod sync;
