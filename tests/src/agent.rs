//! The agent's CNI backend (the real service code) on a unix socket, seeded with addresses
//! as discovery would seed it; stoppable and restartable to test the plugin without it.

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc};

use tokio::sync::oneshot;
use vpc_ebpf_agent::{
    ipam::{checkpoint, pool::Mode, store::Store},
    rpc::{Backend, Shared, State},
};
use vpc_ebpf_rpc::{server, v1::cni_backend_server::CniBackendServer};

pub struct TestAgent {
    pub socket: PathBuf,
    pub checkpoint: PathBuf,
    pub shared: Shared,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
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
        store.upsert_eni("eni-0", 0, "02:00:00:00:00:01", Ipv4Addr::new(10, 0, 0, 10));
        store.add_ips("eni-0", addrs).unwrap();
        Self::serve(dir, store)
    }

    /// An agent restored from the checkpoint in `dir`, as after a restart, applying the
    /// releases the plugin recorded while it was down (as the agent's start does).
    pub fn restart(dir: &std::path::Path) -> Self {
        let mut store = checkpoint::load(&dir.join("ipam.json"))
            .unwrap()
            .expect("checkpoint");
        let applied = vpc_ebpf_agent::pending::apply(
            &dir.join("pending-release"),
            &mut store,
            vpc_ebpf_agent::rpc::now_ms(),
        );
        checkpoint::save(&dir.join("ipam.json"), &store).unwrap();
        applied.remove();
        Self::serve(dir, store)
    }

    fn serve(dir: &std::path::Path, store: Store) -> Self {
        let socket = dir.join("agent.sock");
        let checkpoint = dir.join("ipam.json");
        let shared = Shared::new(
            State::new(store, checkpoint.clone()),
            Arc::new(vpc_ebpf_agent::metrics::Metrics::new()),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let (up_tx, up_rx) = std::sync::mpsc::channel();
        let svc_shared = shared.clone();
        let sock = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let incoming = server::bind(&sock).await.unwrap();
                up_tx.send(()).unwrap();
                tonic::transport::Server::builder()
                    .add_service(CniBackendServer::new(Backend { shared: svc_shared }))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        up_rx.recv().unwrap();
        Self {
            socket,
            checkpoint,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    pub fn assignments(&self) -> usize {
        let st = self.shared.state.blocking_lock();
        st.store.assignments().count()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown();
    }
}
