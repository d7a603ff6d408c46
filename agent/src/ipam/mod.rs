//! IP address management. The pure parts — warm-pool arithmetic (`pool`), the node's
//! address datastore (`store`), merging EC2's view into it (`ec2_merge`) — do no I/O;
//! `checkpoint` persists the store; `reconciler` drives EC2 to the pool's targets.
//!
//! [`Ipam`] owns the IPAM state: the store, its checkpoint and the pool's growth state.
//! Every change goes through it, and is on disk before anyone sees it (a change that
//! cannot be saved is not made), so an agent killed right after answering has the
//! assignment on disk.

pub mod checkpoint;
pub mod ec2_merge;
pub mod placement;
pub mod placer;
pub mod pool;
pub mod reconciler;
pub mod store;

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, watch};
use vpc_ebpf_rpc::types::MacAddr;

use self::{
    checkpoint::CheckpointError,
    pool::Blocked,
    store::{Assigned, AttachmentKey, PodMeta, Store, StoreError},
};

/// Which ENI: its EC2 id and the device index it is attached at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EniRef {
    pub id: String,
    pub device_index: u32,
}

/// An attached ENI as the dataplane needs it: found in the kernel by its MAC, brought up
/// with its primary address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EniDesc {
    pub id: String,
    pub device_index: u32,
    pub mac: MacAddr,
    pub primary_ip: Ipv4Addr,
    /// Next hop out of this ENI when its subnet is not the node's.
    pub gateway: Option<Ipv4Addr>,
}

/// Why the pool cannot grow, as the reconciler last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrowthBlock {
    Pool(Blocked),
    SubnetExhausted,
    /// The ENIConfig or the subnets cannot take a new ENI; the words are in
    /// [`Ipam::placement_problem`].
    Placement,
}

/// Whether the IPAM state is the node's: until it is (checkpoint restored, node known),
/// nothing may be assigned or released from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    NotReady(String),
    Ready,
}

#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    #[error("the agent is not ready yet: {0}")]
    NotReady(String),
    #[error("no free address on this node ({total} held, {cooling} cooling down); {why}")]
    Exhausted {
        total: u32,
        cooling: u32,
        block: Option<GrowthBlock>,
        why: String,
    },
    #[error("the agent could not save its checkpoint")]
    Checkpoint(#[source] CheckpointError),
    #[error("the datastore refused the assignment")]
    Store(#[source] StoreError),
}

/// What stops the pool from growing, in words for the pod's error.
pub fn describe(block: Option<GrowthBlock>) -> &'static str {
    match block {
        Some(GrowthBlock::Pool(Blocked::EniLimit)) => {
            "every ENI this instance type allows is attached and full"
        }
        Some(GrowthBlock::Pool(Blocked::MaxPods)) => "the node holds as many addresses as max pods",
        Some(GrowthBlock::SubnetExhausted) => {
            "the subnet has no free addresses (InsufficientFreeAddressesInSubnet)"
        }
        Some(GrowthBlock::Placement) => "no new ENI can be placed",
        None => "more are being requested from EC2",
    }
}

/// One ADD counted in [`Ipam::waiting`] for as long as it lives.
struct Waiting<'a>(&'a AtomicU32);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicU32) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct State {
    store: Store,
    checkpoint: PathBuf,
    blocked: Option<GrowthBlock>,
    /// Why new ENIs cannot be placed, for pods' errors.
    placement_problem: Option<String>,
    /// What EC2 answered to the last call that failed, until one works again: a pod
    /// that finds nothing free is told it, not only that more is being requested.
    ec2_trouble: Option<String>,
}

pub struct Ipam {
    state: Mutex<State>,
    /// Poked whenever the pool changed, so the reconciler looks again at once.
    pool_changed: Notify,
    /// Poked when addresses were added, for ADDs waiting on a refill.
    pool_grown: Notify,
    /// ADDs waiting on a refill now: the planner grows for them at once.
    waiting: AtomicU32,
    readiness: watch::Sender<Readiness>,
    enis: watch::Sender<Vec<EniDesc>>,
}

impl std::fmt::Debug for Ipam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ipam").finish_non_exhaustive()
    }
}

fn eni_descs(store: &Store) -> Vec<EniDesc> {
    store.enis().map(store::Eni::desc).collect()
}

impl Ipam {
    /// Owner of `store`, saved to `checkpoint`; not ready until [`Self::set_ready`].
    pub fn new(store: Store, checkpoint: PathBuf) -> Self {
        let enis = eni_descs(&store);
        Self {
            state: Mutex::new(State {
                store,
                checkpoint,
                blocked: None,
                placement_problem: None,
                ec2_trouble: None,
            }),
            pool_changed: Notify::new(),
            waiting: AtomicU32::new(0),
            pool_grown: Notify::new(),
            readiness: watch::Sender::new(Readiness::NotReady("starting".into())),
            enis: watch::Sender::new(enis),
        }
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.borrow().clone()
    }

    pub fn is_ready(&self) -> bool {
        *self.readiness.borrow() == Readiness::Ready
    }

    pub fn set_ready(&self) {
        self.readiness.send_replace(Readiness::Ready);
        self.pool_changed.notify_one();
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.readiness
            .send_replace(Readiness::NotReady(reason.into()));
    }

    /// Waits up to `max` for readiness; the reason otherwise.
    pub async fn wait_ready(&self, max: Duration) -> Result<(), String> {
        let mut rx = self.readiness.subscribe();
        let r = tokio::time::timeout(max, rx.wait_for(|r| *r == Readiness::Ready)).await;
        match (r, self.readiness()) {
            (Ok(Ok(_)), _) | (_, Readiness::Ready) => Ok(()),
            (_, Readiness::NotReady(why)) => Err(why),
        }
    }

    /// The ENIs the store holds, updated on every change.
    pub fn enis(&self) -> watch::Receiver<Vec<EniDesc>> {
        self.enis.subscribe()
    }

    pub fn pool_changed(&self) -> &Notify {
        &self.pool_changed
    }

    pub fn pool_grown(&self) -> &Notify {
        &self.pool_grown
    }

    /// Reads the state.
    pub async fn read<R>(&self, f: impl FnOnce(&Store, Option<GrowthBlock>) -> R) -> R {
        let st = self.state.lock().await;
        f(&st.store, st.blocked)
    }

    /// Changes the store as one transaction: on a copy, saved, then swapped in. When the
    /// save fails nothing changed.
    pub async fn update<R>(&self, f: impl FnOnce(&mut Store) -> R) -> Result<R, CheckpointError> {
        let mut st = self.state.lock().await;
        let mut next = st.store.clone();
        let r = f(&mut next);
        if next != st.store {
            checkpoint::save(&st.checkpoint, &next)?;
            let enis = eni_descs(&next);
            st.store = next;
            self.enis.send_if_modified(|have| {
                let changed = *have != enis;
                *have = enis;
                changed
            });
        }
        Ok(r)
    }

    /// Saves the current state (at exit).
    pub async fn save(&self) -> Result<(), CheckpointError> {
        let st = self.state.lock().await;
        checkpoint::save(&st.checkpoint, &st.store)
    }

    pub async fn set_blocked(&self, blocked: Option<GrowthBlock>) {
        self.state.lock().await.blocked = blocked;
    }

    /// How many ADDs wait for the pool to grow.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// EC2's last failure (`None`: the last call worked).
    pub async fn set_ec2_trouble(&self, trouble: Option<String>) {
        self.state.lock().await.ec2_trouble = trouble;
    }

    /// Why new ENIs cannot be placed (`None`: they can).
    pub async fn set_placement_problem(&self, problem: Option<String>) {
        self.state.lock().await.placement_problem = problem;
    }

    /// Gives `key` an address (a key that has one gets the same one again). When the pool
    /// is empty but being refilled, waits for the refill until `deadline`: a short wait
    /// here beats failing the pod into kubelet's much longer retry backoff.
    pub async fn assign(
        &self,
        key: &AttachmentKey,
        pod: &PodMeta,
        now_ms: impl Fn() -> u64,
        deadline: tokio::time::Instant,
    ) -> Result<Assigned, AssignError> {
        loop {
            if let Readiness::NotReady(why) = self.readiness() {
                return Err(AssignError::NotReady(why));
            }
            let grown = self.pool_grown.notified();
            tokio::pin!(grown);
            grown.as_mut().enable();
            let (result, blocked, problem, trouble) = {
                let mut st = self.state.lock().await;
                let mut next = st.store.clone();
                let result = next.assign(key, pod, now_ms());
                if let Ok(a) = &result
                    && !a.existing
                {
                    checkpoint::save(&st.checkpoint, &next).map_err(AssignError::Checkpoint)?;
                    st.store = next;
                }
                // The words for a refusal are copied only when there is one: not on
                // every ADD.
                let refused = matches!(result, Err(StoreError::NoFreeAddress { .. }));
                let words = |w: &Option<String>| w.as_ref().filter(|_| refused).cloned();
                (
                    result,
                    st.blocked,
                    words(&st.placement_problem),
                    words(&st.ec2_trouble),
                )
            };
            self.pool_changed.notify_one();
            match result {
                Ok(a) => return Ok(a),
                Err(StoreError::NoFreeAddress { cooling, total }) => {
                    let refilling = blocked.is_none() && tokio::time::Instant::now() < deadline;
                    if !refilling {
                        let why = match (blocked, problem, trouble) {
                            (Some(GrowthBlock::Placement), Some(p), _) => p,
                            (None, _, Some(t)) => {
                                format!(
                                    "more are being requested from EC2, which last answered: {t}"
                                )
                            }
                            _ => describe(blocked).to_owned(),
                        };
                        return Err(AssignError::Exhausted {
                            total,
                            cooling,
                            block: blocked,
                            why,
                        });
                    }
                    // Counted while it waits (also when the caller gives up and drops
                    // this future), and the planner is told.
                    let _waiting = Waiting::new(&self.waiting);
                    self.pool_changed.notify_one();
                    let _ = tokio::time::timeout_at(deadline, grown).await;
                }
                Err(e) => return Err(AssignError::Store(e)),
            }
        }
    }

    /// Frees `key`'s address into cooldown; an unknown key is not an error (DEL is
    /// idempotent). Returns the address released.
    pub async fn release(
        &self,
        key: &AttachmentKey,
        now_ms: u64,
    ) -> Result<Option<Ipv4Addr>, CheckpointError> {
        let r = self.update(|s| s.release(key, now_ms)).await?;
        if r.is_some() {
            self.pool_changed.notify_one();
        }
        Ok(r)
    }

    /// Releases every attachment of `network` not in `keep` (CNI GC).
    pub async fn release_all_but(
        &self,
        network: &str,
        keep: &HashSet<AttachmentKey>,
        now_ms: u64,
    ) -> Result<Vec<(AttachmentKey, Ipv4Addr)>, CheckpointError> {
        let r = self
            .update(|s| {
                let stale: Vec<AttachmentKey> = s
                    .assignments()
                    .map(|(k, ..)| k.clone())
                    .filter(|k| k.network == network && !keep.contains(k))
                    .collect();
                stale
                    .into_iter()
                    .filter_map(|k| s.release(&k, now_ms).map(|ip| (k, ip)))
                    .collect::<Vec<_>>()
            })
            .await?;
        if !r.is_empty() {
            self.pool_changed.notify_one();
        }
        Ok(r)
    }

    /// `key`'s address and the ENI that holds it.
    pub async fn lookup(&self, key: &AttachmentKey) -> Option<(Ipv4Addr, EniDesc)> {
        self.read(|s, _| {
            let ip = s.lookup(key)?;
            let e = s.eni_of(ip)?;
            Some((ip, e.desc()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: &str) -> AttachmentKey {
        AttachmentKey {
            network: "aws-cni".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn ipam(tag: &str, addrs: u8) -> (Ipam, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vpc-ebpf-ipam-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = Store::new(pool::Mode::SecondaryIp, 1_000);
        s.upsert_eni(
            "eni-0",
            0,
            MacAddr([2, 0, 0, 0, 0, 1]),
            Ipv4Addr::new(10, 0, 0, 10),
        );
        let ips: Vec<Ipv4Addr> = (0..addrs)
            .map(|i| Ipv4Addr::new(10, 0, 0, 20 + i))
            .collect();
        s.add_ips("eni-0", &ips).unwrap();
        let path = dir.join("ipam.json");
        (Ipam::new(s, path.clone()), dir)
    }

    #[tokio::test]
    async fn nothing_is_assigned_before_ready_and_every_change_is_on_disk() {
        let (ipam, dir) = ipam("ready", 2);
        let soon = tokio::time::Instant::now() + Duration::from_millis(10);
        let e = ipam
            .assign(&key("c1"), &PodMeta::default(), || 0, soon)
            .await
            .unwrap_err();
        assert!(matches!(e, AssignError::NotReady(_)), "{e}");
        assert!(ipam.wait_ready(Duration::from_millis(10)).await.is_err());
        ipam.set_ready();
        let a = ipam
            .assign(&key("c1"), &PodMeta::default(), || 0, soon)
            .await
            .unwrap();
        let on_disk = checkpoint::load(&dir.join("ipam.json")).unwrap().unwrap();
        assert_eq!(on_disk.lookup(&key("c1")), Some(a.ip));
        assert_eq!(ipam.release(&key("c1"), 5).await.unwrap(), Some(a.ip));
        let on_disk = checkpoint::load(&dir.join("ipam.json")).unwrap().unwrap();
        assert_eq!(on_disk.lookup(&key("c1")), None);
        assert_eq!(ipam.release(&key("c1"), 5).await.unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_change_that_cannot_be_saved_is_not_made() {
        let (ipam, dir) = ipam("unsaved", 2);
        ipam.set_ready();
        // The checkpoint's directory is a file: every save fails.
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        std::fs::write(&dir, b"not a directory").unwrap();
        let soon = tokio::time::Instant::now() + Duration::from_millis(10);
        let e = ipam
            .assign(&key("c1"), &PodMeta::default(), || 0, soon)
            .await
            .unwrap_err();
        assert!(matches!(e, AssignError::Checkpoint(_)), "{e}");
        assert_eq!(ipam.lookup(&key("c1")).await, None);
        std::fs::remove_file(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_empty_pool_waits_for_a_refill_then_explains() {
        let (ipam, dir) = ipam("refill", 1);
        ipam.set_ready();
        let deadline = || tokio::time::Instant::now() + Duration::from_millis(300);
        ipam.assign(&key("c1"), &PodMeta::default(), || 0, deadline())
            .await
            .unwrap();
        let (k2, pod) = (key("c2"), PodMeta::default());
        let waiting = ipam.assign(&k2, &pod, || 0, deadline());
        let refill = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            ipam.update(|s| s.add_ips("eni-0", &[Ipv4Addr::new(10, 0, 0, 99)]))
                .await
                .unwrap()
                .unwrap();
            ipam.pool_grown().notify_waiters();
        };
        let (got, ()) = tokio::join!(waiting, refill);
        assert_eq!(got.unwrap().ip, Ipv4Addr::new(10, 0, 0, 99));
        ipam.set_blocked(Some(GrowthBlock::Pool(Blocked::EniLimit)))
            .await;
        let e = ipam
            .assign(&key("c3"), &PodMeta::default(), || 0, deadline())
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("every ENI this instance type allows"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn eni_changes_are_published() {
        let (ipam, dir) = ipam("enis", 1);
        let mut rx = ipam.enis();
        assert_eq!(rx.borrow_and_update().len(), 1);
        ipam.update(|s| {
            s.upsert_eni(
                "eni-1",
                1,
                MacAddr([2, 0, 0, 0, 0, 2]),
                Ipv4Addr::new(10, 0, 0, 40),
            );
        })
        .await
        .unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().len(), 2);
        ipam.update(|s| s.add_ips("eni-1", &[Ipv4Addr::new(10, 0, 0, 41)]))
            .await
            .unwrap()
            .unwrap();
        assert!(
            !rx.has_changed().unwrap(),
            "addresses alone are not an ENI change"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
