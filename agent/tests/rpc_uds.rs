//! The CNI backend over a real unix socket: assignment, idempotency, checkpoint before
//! reply, specific status codes with reasons, GC, socket hygiene.

use std::{os::unix::fs::PermissionsExt as _, path::PathBuf, sync::Arc, time::Duration};

use tonic::Code;
use vpc_ebpf_agent::{
    ipam::{
        checkpoint,
        pool::{Blocked, Mode},
        store::{AttachmentKey, Store},
    },
    rpc::{Backend, GrowthBlock, Shared, State},
};
use vpc_ebpf_rpc::{client, reason, reason_of, server, v1};

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vpc-ebpf-rpc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn att(c: &str) -> v1::Attachment {
    v1::Attachment {
        network: "aws-cni".into(),
        container_id: c.into(),
        ifname: "eth0".into(),
    }
}

fn add(c: &str) -> v1::AddNetworkRequest {
    v1::AddNetworkRequest {
        attachment: Some(att(c)),
        pod: Some(v1::Pod {
            namespace: "default".into(),
            name: format!("pod-{c}"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn start(tag: &str) -> (Shared, PathBuf, PathBuf) {
    let d = dir(tag);
    let mut store = Store::new(Mode::SecondaryIp, 30_000);
    store.upsert_eni(
        "eni-0",
        0,
        "02:00:00:00:00:01",
        "10.0.0.10".parse().unwrap(),
    );
    store
        .add_ips(
            "eni-0",
            &["10.0.0.20".parse().unwrap(), "10.0.0.21".parse().unwrap()],
        )
        .unwrap();
    let shared = Shared::new(
        State::new(store, d.join("ipam.json")),
        Arc::new(vpc_ebpf_agent::metrics::Metrics::new()),
    );
    let sock = d.join("agent.sock");
    let incoming = server::bind(&sock).await.unwrap();
    let svc = v1::cni_backend_server::CniBackendServer::new(Backend {
        shared: shared.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    (shared, sock, d)
}

#[tokio::test]
async fn assigns_persists_releases_and_explains_exhaustion() {
    let (shared, sock, d) = start("main").await;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut c = client::connect(&sock, Duration::from_secs(6))
        .await
        .unwrap();

    let a = c.add_network(add("c1")).await.unwrap().into_inner();
    assert!(!a.existing);
    let again = c.add_network(add("c1")).await.unwrap().into_inner();
    assert_eq!(
        (again.ipv4.as_str(), again.existing),
        (a.ipv4.as_str(), true)
    );
    // On disk before the reply came back.
    let saved = checkpoint::load(&d.join("ipam.json")).unwrap().unwrap();
    let k1 = AttachmentKey {
        network: "aws-cni".into(),
        container_id: "c1".into(),
        ifname: "eth0".into(),
    };
    assert_eq!(saved.lookup(&k1).unwrap().to_string(), a.ipv4);

    c.add_network(add("c2")).await.unwrap();
    // Pool empty while refilling: the ADD waits for the refill instead of failing.
    let refill = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut st = refill.state.lock().await;
        st.store
            .add_ips("eni-0", &["10.0.0.22".parse().unwrap()])
            .unwrap();
        drop(st);
        refill.pool_grown.notify_waiters();
    });
    let waited = std::time::Instant::now();
    let r = c.add_network(add("c2b")).await.unwrap().into_inner();
    assert_eq!(r.ipv4, "10.0.0.22");
    assert!(waited.elapsed() >= Duration::from_millis(250));
    // No refill comes: after REFILL_WAIT the answer is "try again later", with why.
    let err = c.add_network(add("c3")).await.unwrap_err();
    assert!(waited.elapsed() >= vpc_ebpf_agent::rpc::REFILL_WAIT);
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason_of(&err), Some(reason::POOL_REFILLING));
    shared.state.lock().await.blocked = Some(GrowthBlock::Pool(Blocked::EniLimit));
    let err = c.add_network(add("c3")).await.unwrap_err();
    assert_eq!(reason_of(&err), Some(reason::ENI_LIMIT));
    assert!(err.message().contains("ENI"), "{}", err.message());

    let del = v1::DelNetworkRequest {
        attachment: Some(att("c1")),
        pod: None,
    };
    let r = c.del_network(del.clone()).await.unwrap().into_inner();
    assert_eq!(r.released_ipv4, a.ipv4);
    let r = c.del_network(del).await.unwrap().into_inner();
    assert_eq!(r.released_ipv4, "", "DEL is idempotent");
    // The released address cools down: still no address for a new pod.
    assert_eq!(
        c.add_network(add("c4")).await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    // GC keeps what the runtime still has and releases the rest.
    let gc = c
        .garbage_collect(v1::GarbageCollectRequest {
            network: "aws-cni".into(),
            keep: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut gone: Vec<&str> = gc
        .released
        .iter()
        .map(|a| a.container_id.as_str())
        .collect();
    gone.sort_unstable();
    assert_eq!(gone, ["c2", "c2b"]);

    shared.state.lock().await.ready = false;
    let err = c.add_network(add("c5")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let st = c.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert!(!st.ready && st.detail.contains("not ready"));

    let bad = c
        .add_network(v1::AddNetworkRequest::default())
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    std::fs::remove_dir_all(d).unwrap();
}

#[tokio::test]
async fn stale_sockets_are_replaced_and_live_ones_refused() {
    let d = dir("stale");
    let sock = d.join("agent.sock");
    // A socket file left by a crashed agent: bound, never served.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let _live = server::bind(&sock).await.expect("stale socket replaced");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The live socket answers at its final path, and binding left nothing else behind.
    std::os::unix::net::UnixStream::connect(&sock).expect("connect to the moved socket");
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["agent.sock"], "{names:?}");
    let err = server::bind(&sock).await.unwrap_err();
    assert!(err.to_string().contains("another agent"), "{err}");
    std::fs::remove_dir_all(d).unwrap();
}
