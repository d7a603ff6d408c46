//! The CNI backend over a real unix socket: assignment, idempotency, checkpoint before
//! reply, specific status codes with reasons, GC, readiness, socket hygiene.

use std::{net::Ipv4Addr, os::unix::fs::PermissionsExt as _, path::PathBuf, time::Duration};

use tonic::Code;
use vpc_ebpf_agent::ipam::{GrowthBlock, checkpoint, pool::Blocked, store::AttachmentKey};
use vpc_ebpf_rpc::{client, reason, reason_of, server, v1};
use vpc_ebpf_tests::agent::TestAgent;

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

#[test]
fn assigns_persists_releases_and_explains_exhaustion() {
    let d = dir("main");
    let agent = TestAgent::start_with(
        &d,
        &[Ipv4Addr::new(10, 0, 0, 20), Ipv4Addr::new(10, 0, 0, 21)],
    );
    let sock = agent.socket.clone();
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = rt
        .block_on(client::connect(&sock, Duration::from_secs(6)))
        .unwrap();

    let a = rt.block_on(c.add_network(add("c1"))).unwrap().into_inner();
    assert!(!a.existing);
    let again = rt.block_on(c.add_network(add("c1"))).unwrap().into_inner();
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

    rt.block_on(c.add_network(add("c2"))).unwrap();
    // Pool empty while refilling: the ADD waits for the refill instead of failing.
    let refill = std::thread::spawn({
        let (services, handle) = (agent.services.clone(), agent.runtime());
        move || {
            std::thread::sleep(Duration::from_millis(300));
            handle
                .block_on(
                    services
                        .ipam
                        .update(|s| s.add_ips("eni-0", &["10.0.0.22".parse().unwrap()])),
                )
                .unwrap()
                .unwrap();
            services.ipam.pool_grown().notify_waiters();
        }
    });
    let waited = std::time::Instant::now();
    let r = rt.block_on(c.add_network(add("c2b"))).unwrap().into_inner();
    refill.join().unwrap();
    assert_eq!(r.ipv4, "10.0.0.22");
    assert!(waited.elapsed() >= Duration::from_millis(250));
    // No refill comes: after REFILL_WAIT the answer is "try again later", with why.
    let err = rt.block_on(c.add_network(add("c3"))).unwrap_err();
    assert!(waited.elapsed() >= vpc_ebpf_agent::rpc::REFILL_WAIT);
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason_of(&err), Some(reason::POOL_REFILLING));
    agent.set_blocked(Some(GrowthBlock::Pool(Blocked::EniLimit)));
    let err = rt.block_on(c.add_network(add("c3"))).unwrap_err();
    assert_eq!(reason_of(&err), Some(reason::ENI_LIMIT));
    assert!(err.message().contains("ENI"), "{}", err.message());

    let del = v1::DelNetworkRequest {
        attachment: Some(att("c1")),
        pod: None,
    };
    let r = rt
        .block_on(c.del_network(del.clone()))
        .unwrap()
        .into_inner();
    assert_eq!(r.released_ipv4, a.ipv4);
    let r = rt.block_on(c.del_network(del)).unwrap().into_inner();
    assert_eq!(r.released_ipv4, "", "DEL is idempotent");
    // The released address cools down: still no address for a new pod.
    assert_eq!(
        rt.block_on(c.add_network(add("c4"))).unwrap_err().code(),
        Code::ResourceExhausted
    );

    // GC keeps what the runtime still has and releases the rest.
    let gc = rt
        .block_on(c.garbage_collect(v1::GarbageCollectRequest {
            network: "aws-cni".into(),
            keep: vec![],
        }))
        .unwrap()
        .into_inner();
    let mut gone: Vec<&str> = gc
        .released
        .iter()
        .map(|a| a.container_id.as_str())
        .collect();
    gone.sort_unstable();
    assert_eq!(gone, ["c2", "c2b"]);
    // The server stops gracefully only once its connections are closed.
    drop(c);
    drop(agent);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn nothing_is_served_before_the_state_is_the_nodes() {
    let d = dir("notready");
    let agent = TestAgent::start(&d, 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = rt
        .block_on(client::connect(&agent.socket, Duration::from_secs(6)))
        .unwrap();
    rt.block_on(c.add_network(add("c2"))).unwrap();
    // Not ready (restoring): neither ADD nor DEL is served from a state that is not the
    // node's; both say UNAVAILABLE, which the plugin turns into "try again" (ADD) or a
    // recorded release (DEL).
    agent.services.ipam.set_not_ready("restoring");
    let started = std::time::Instant::now();
    let err = rt.block_on(c.add_network(add("c5"))).unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(reason_of(&err), Some(reason::NOT_READY));
    assert!(started.elapsed() >= vpc_ebpf_agent::rpc::READY_WAIT);
    let err = rt
        .block_on(c.del_network(v1::DelNetworkRequest {
            attachment: Some(att("c2")),
            pod: None,
        }))
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let st = rt
        .block_on(c.status(v1::StatusRequest {}))
        .unwrap()
        .into_inner();
    assert!(!st.ready && st.detail.contains("not ready"));

    let bad = rt
        .block_on(c.add_network(v1::AddNetworkRequest::default()))
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    // The server stops gracefully only once its connections are closed.
    drop(c);
    drop(agent);
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
