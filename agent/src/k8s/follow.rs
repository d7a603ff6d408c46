//! One watch loop for every watch the agent keeps: a full list first, then changes, with
//! kube's (client-go's) backoff on errors, forever, until the agent stops. A failure is
//! said once, and so is the recovery.

use std::fmt::Debug;

use futures_util::StreamExt as _;
use kube::{
    Api, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use vpc_ebpf_rpc::report::Chain;

/// What a watch reports.
pub trait Sink<K>: Send + 'static {
    /// What a (re)list keeps of each object until the list is complete: a big cluster's
    /// pods are reduced as they arrive, never all held whole at once.
    type Kept: Send;
    fn keep(&self, k: K) -> Self::Kept;
    /// Everything that exists, after a (re)list.
    fn listed(&mut self, all: Vec<Self::Kept>);
    fn applied(&mut self, k: K);
    fn deleted(&mut self, k: &K);
}

/// How a watch names itself in the log: "watching {what} failed; retrying with backoff,
/// {meanwhile}", then "watching {what} again".
pub struct Names {
    pub what: &'static str,
    pub meanwhile: &'static str,
}

/// Follows `api` (narrowed by `config`) into `sink` until `stop`.
pub async fn follow<K, S>(
    api: Api<K>,
    config: watcher::Config,
    names: Names,
    mut sink: S,
    mut stop: watch::Receiver<bool>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    S: Sink<K>,
{
    let Names { what, meanwhile } = names;
    let stream = watcher(api, config).default_backoff();
    tokio::pin!(stream);
    let mut buffer: Vec<S::Kept> = Vec::new();
    let mut failing_since: Option<tokio::time::Instant> = None;
    loop {
        let next = tokio::select! {
            _ = stop.changed() => return,
            n = stream.next() => n,
        };
        let Some(event) = next else {
            // kube's backoff never gives up, so the stream does not end; if it ever
            // did, polling it again would spin on `None`.
            warn!("watching {what} ended; {meanwhile}");
            let _ = stop.changed().await;
            return;
        };
        match event {
            Ok(ev) => {
                if let Some(since) = failing_since.take() {
                    info!(after = ?since.elapsed(), "watching {what} again");
                }
                match ev {
                    watcher::Event::Init => buffer.clear(),
                    watcher::Event::InitApply(k) => buffer.push(sink.keep(k)),
                    watcher::Event::InitDone => {
                        let n = buffer.len();
                        sink.listed(std::mem::take(&mut buffer));
                        debug!(n, "{what} listed");
                    }
                    watcher::Event::Apply(k) => sink.applied(k),
                    watcher::Event::Delete(k) => sink.deleted(&k),
                }
            }
            Err(e) => {
                if failing_since.is_none() {
                    warn!(error = %Chain(&e), "watching {what} failed; retrying with backoff, {meanwhile}");
                    failing_since = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}
