//! Wall-clock time as the datastore keeps it: unix milliseconds, so cooldowns and
//! assignment times survive restarts (a monotonic clock restarts with the process).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
