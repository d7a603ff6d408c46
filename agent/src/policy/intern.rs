//! One shared copy of each distinct pod label set and named-port list. A cluster's pods
//! repeat them (every pod of a ReplicaSet has the same), and at 150k pods one map per pod
//! was most of the agent's memory. Shared process-wide and taken where a pod view is
//! made (the watcher's relist hands over every pod at once; interning only when the
//! engine stores them would leave the relist's own copies as the peak).

use std::{
    collections::{BTreeMap, HashSet},
    hash::Hash,
    sync::{Arc, LazyLock, Mutex},
};

use super::model::{Labels, NamedPorts};

type Shared<T> = LazyLock<Mutex<Interner<T>>>;

static LABEL_SETS: Shared<BTreeMap<String, String>> = LazyLock::new(Mutex::default);
static PORT_LISTS: Shared<[(String, u8, u16)]> = LazyLock::new(Mutex::default);

/// The process's shared copy of `labels`.
pub fn labels(labels: Labels) -> Labels {
    // A poisoned lock only means another thread panicked mid-insert; the set is intact.
    LABEL_SETS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .intern(labels)
}

/// The process's shared copy of `ports`.
pub fn named_ports(ports: NamedPorts) -> NamedPorts {
    PORT_LISTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .intern(ports)
}

/// Below this many values nothing is purged: the walk would cost more than it frees.
const MIN_PURGE: usize = 1024;

#[derive(Debug)]
pub struct Interner<T: ?Sized> {
    set: HashSet<Arc<T>>,
    /// The size at which the next insert first drops the values no pod holds any more,
    /// twice the size left by the last purge: amortised O(1) per insert.
    purge_at: usize,
}

// Not derived: a derive would ask `T: Clone`, and the values are shared, not copied.
impl<T: ?Sized> Clone for Interner<T> {
    fn clone(&self) -> Self {
        Self {
            set: self.set.clone(),
            purge_at: self.purge_at,
        }
    }
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Self {
            set: HashSet::new(),
            purge_at: MIN_PURGE,
        }
    }
}

impl<T: ?Sized + Eq + Hash> Interner<T> {
    /// The shared copy equal to `v` (`v` itself when it is the first).
    pub fn intern(&mut self, v: Arc<T>) -> Arc<T> {
        if let Some(have) = self.set.get(&v) {
            return Arc::clone(have);
        }
        if self.set.len() >= self.purge_at {
            self.set.retain(|v| Arc::strong_count(v) > 1);
            self.purge_at = (self.set.len() * 2).max(MIN_PURGE);
        }
        self.set.insert(Arc::clone(&v));
        v
    }

    /// How many distinct values are held (some perhaps no longer used).
    pub fn held(&self) -> usize {
        self.set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_copy_and_unused_ones_go() {
        let mut i: Interner<str> = Interner::default();
        let a = i.intern(Arc::from("app=web"));
        let b = i.intern(Arc::from("app=web"));
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        // Past the purge threshold, what only the interner holds is dropped.
        let kept: Vec<Arc<str>> = (0..=MIN_PURGE)
            .map(|n| i.intern(Arc::from(format!("v{n}").as_str())))
            .collect();
        assert_eq!(i.held(), MIN_PURGE + 1);
        assert!(i.set.iter().all(|v| &**v != "app=web"));
        assert_eq!(kept.len(), MIN_PURGE + 1);
    }
}
