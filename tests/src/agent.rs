//! The agent's CNI backend (the real service code over the real state owners) on a unix
//! socket, seeded with addresses as discovery would seed it; stoppable and restartable to
//! test the plugin without it. No dataplane: the plugin then writes the gateway's
//! neighbour entry itself.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use tokio::sync::oneshot;
use vpc_ebpf_agent::{
    clock::now_ms,
    endpoints::{Registry, registry_path},
    ipam::{
        GrowthBlock, Ipam, checkpoint,
        pool::Mode,
        store::{AttachmentKey, Store},
    },
    metrics::Metrics,
    restart,
    rpc::{Backend, Services},
};
use vpc_ebpf_rpc::{
    server,
    types::{MacAddr, pending_dir},
    v1::cni_backend_server::CniBackendServer,
};

pub struct TestAgent {
    pub socket: PathBuf,
    pub checkpoint: PathBuf,
    pub services: Services,
    rt: Arc<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl TestAgent {
    /// An agent whose primary ENI holds `ips` secondary addresses from 10.0.0.20 on.
    pub fn start(dir: &std::path::Path, ips: u8) -> Self {
        let addrs: Vec<Ipv4Addr> = (0..ips).map(|i| Ipv4Addr::new(10, 0, 0, 20 + i)).collect();
        Self::start_with(dir, &addrs)
    }

    /// An agent whose primary ENI holds exactly `addrs`.
    pub fn start_with(dir: &std::path::Path, addrs: &[Ipv4Addr]) -> Self {
        let mut store = Store::new(Mode::SecondaryIp, 30_000);
        store.upsert_eni(
            "eni-0",
            0,
            MacAddr([2, 0, 0, 0, 0, 1]),
            Ipv4Addr::new(10, 0, 0, 10),
        );
        store.add_ips("eni-0", addrs).unwrap();
        Self::serve(dir, store)
    }

    /// An agent restored from the checkpoint in `dir`, as after a restart, applying the
    /// releases the plugin recorded while it was down (as the agent's start does).
    pub fn restart(dir: &std::path::Path) -> Self {
        let mut store = checkpoint::load(&dir.join("ipam.json"))
            .unwrap()
            .expect("checkpoint");
        let applied =
            restart::apply_pending(&pending_dir(&dir.join("agent.sock")), &mut store, now_ms());
        checkpoint::save(&dir.join("ipam.json"), &store).unwrap();
        applied.remove();
        Self::serve(dir, store)
    }

    fn serve(dir: &std::path::Path, store: Store) -> Self {
        let socket = dir.join("agent.sock");
        let checkpoint = dir.join("ipam.json");
        let ipam = Arc::new(Ipam::new(store, checkpoint.clone()));
        ipam.set_ready();
        let services = Services {
            ipam,
            endpoints: Arc::new(Registry::new(Vec::new(), registry_path(&checkpoint))),
            dataplane: Arc::new(OnceLock::new()),
            metrics: Arc::new(Metrics::new()),
            pending_dir: pending_dir(&socket),
            pods: vpc_ebpf_agent::k8s::pods::PodCache::default(),
            annotate: None,
            policy: Arc::new(OnceLock::new()),
            placement: Arc::default(),
        };
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming = rt.block_on(server::bind(&socket)).unwrap();
        let svc = services.clone();
        let server = rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(CniBackendServer::new(Backend { services: svc }))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            socket,
            checkpoint,
            services,
            rt,
            stop: Some(stop),
            server: Some(server),
        }
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(server) = self.server.take() {
            // A graceful stop waits for open connections; a test's client may hold one.
            let abort = server.abort_handle();
            if self
                .rt
                .block_on(async {
                    tokio::time::timeout(std::time::Duration::from_secs(2), server).await
                })
                .is_err()
            {
                abort.abort();
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Every assignment: (attachment, address).
    pub fn assigned(&self) -> Vec<(AttachmentKey, Ipv4Addr)> {
        self.rt.block_on(self.services.ipam.read(|s, _| {
            s.assignments()
                .map(|(k, _, ip, _)| (k.clone(), ip))
                .collect()
        }))
    }

    pub fn assignments(&self) -> usize {
        self.assigned().len()
    }

    /// The runtime the agent's service runs on, for driving its owners from a test.
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.rt.handle().clone()
    }

    /// As the reconciler reports a pool that cannot grow.
    pub fn set_blocked(&self, b: Option<GrowthBlock>) {
        self.rt.block_on(self.services.ipam.set_blocked(b));
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown();
    }
}
