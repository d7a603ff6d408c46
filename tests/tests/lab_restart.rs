//! Restarts that lose the agent's pins, end to end in the lab: the real agent on two
//! nodes, pods made by the real plugin. When a pinned map is gone (or the whole pin root,
//! links included) the restarted agent rebuilds the dataplane from its registry before
//! the pods notice for long: pod↔pod on the node, across nodes and to the internet
//! through SNAT come back within a second of the agent's start.

use std::{path::Path, time::Duration};

use vpc_ebpf_common::{PIN_VERSION, maps};
use vpc_ebpf_tests::{
    lab::Lab,
    lab_agent::LabAgent,
    lab_pods::{add_pods, ping, until_all_reach},
};

/// What is lost while the agent is down.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// The endpoints map's pin (a layout change or a `PIN_VERSION` bump re-creates it
    /// empty the same way).
    EndpointsPin,
    /// Everything under the pin root: maps and links, so the programs are detached.
    PinRoot,
}

fn lose(pin_root: &Path, loss: Loss) {
    match loss {
        Loss::EndpointsPin => {
            std::fs::remove_file(pin_root.join(PIN_VERSION).join(maps::ENDPOINTS))
                .expect("removing the endpoints pin");
        }
        Loss::PinRoot => std::fs::remove_dir_all(pin_root).expect("removing the pin root"),
    }
}

fn restart_after(loss: Loss) {
    let tag = match loss {
        Loss::EndpointsPin => "rsm",
        Loss::PinRoot => "rsr",
    };
    let lab = Lab::up(tag, 2);
    let dir = std::env::temp_dir().join(format!("vpc-ebpf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut a1 = LabAgent::start(&lab, 1, &dir.join("node1"), &[("WARM_IP_TARGET", "2")]);
    let mut a2 = LabAgent::start(&lab, 2, &dir.join("node2"), &[("WARM_IP_TARGET", "2")]);
    a1.wait_ready(Duration::from_secs(30));
    a2.wait_ready(Duration::from_secs(30));
    let p = add_pods(&a1, &dir, &format!("{tag}a"), 2);
    let q = add_pods(&a2, &dir, &format!("{tag}b"), 1);
    let internet = lab.str("public_test_ip").to_owned();
    let paths = [
        (p[0].ns.name(), p[1].ip.as_str()),
        (p[1].ns.name(), p[0].ip.as_str()),
        (p[0].ns.name(), q[0].ip.as_str()),
        (q[0].ns.name(), p[1].ip.as_str()),
        (p[0].ns.name(), internet.as_str()),
    ];
    for (from, to) in paths {
        assert!(ping(from, to), "{from} -> {to} before the restart");
    }

    a1.kill9();
    lose(&a1.pin_root(), loss);
    // With the pin root gone the programs are detached: the kernel still routes pod to
    // pod, but nothing source-NATs, so the internet is out of reach until the agent is
    // back. (A lost map alone leaves the old programs running on their old map.)
    // (The kernel frees unpinned links a moment later, not at once.)
    if matches!(loss, Loss::PinRoot) {
        let t0 = std::time::Instant::now();
        while vpc_ebpf_tests::lab_pods::reaches(p[0].ns.name(), &internet) {
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "the internet still answers a pod with the programs unpinned: the test proves nothing"
            );
        }
    }
    let started = std::time::Instant::now();
    a1.restart();
    let back = until_all_reach(&paths, Duration::from_secs(10));
    let ready = a1.wait_ready(Duration::from_secs(30));
    let log = a1.log_text();
    let back = back.unwrap_or_else(|| {
        panic!("{loss:?}: the paths did not come back in 10 s; the agent's log:\n{log}")
    });
    eprintln!(
        "{loss:?}: every path back {:?} after the agent started (ready after {:?}, at {:?})",
        back,
        ready,
        started.elapsed()
    );
    assert!(
        log.contains("programmed=2"),
        "{loss:?}: the restarted agent did not re-program both pods:\n{log}"
    );
    // The programs are loaded and verified again first: from_pod alone takes about 0.7 s
    // of verifier time (policy and fragment recording are global functions, checked
    // once), more on a loaded CI machine.
    assert!(
        back <= Duration::from_secs(3),
        "{loss:?}: the paths took {back:?} to come back; the agent's log:\n{log}"
    );
    // The pods keep working past the gateway's ARP entry's life: the programs answer it.
    for pod in &p {
        let _ =
            vpc_ebpf_tests::lab_pods::sh(pod.ns.name(), &["ip", "neigh", "flush", "dev", "eth0"]);
    }
    for (from, to) in paths {
        assert!(
            ping(from, to),
            "{loss:?}: {from} -> {to} after the ARP flush"
        );
    }
    drop(a2);
}

#[test]
fn a_lost_endpoints_pin_is_refilled_before_traffic_depends_on_it() {
    restart_after(Loss::EndpointsPin);
}

#[test]
fn a_lost_pin_root_is_rebuilt_and_reattached() {
    restart_after(Loss::PinRoot);
}

/// The checkpoint and the endpoint registry both lost while the agent was down (the pins
/// survive): the pods keep working, their addresses are held for them once EC2 is read
/// again, the runtime's CHECK of each passes and makes the address the attachment's
/// again, a new pod never gets one of theirs, and DEL releases them.
#[test]
fn pods_outlive_a_lost_checkpoint_and_pass_check() {
    let lab = Lab::up("rsc", 1);
    let dir = std::env::temp_dir().join(format!("vpc-ebpf-rsc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut a = LabAgent::start(&lab, 1, &dir, &[("WARM_IP_TARGET", "2")]);
    a.wait_ready(Duration::from_secs(30));
    let p = add_pods(&a, &dir, "rsc", 2);
    let internet = lab.str("public_test_ip").to_owned();
    a.kill9();
    std::fs::remove_file(dir.join("ipam.json")).unwrap();
    std::fs::remove_file(dir.join("endpoints.json")).unwrap();
    a.restart();
    a.wait_ready(Duration::from_secs(30));
    assert!(ping(p[0].ns.name(), &p[1].ip), "pod -> pod after the loss");
    assert!(
        ping(p[0].ns.name(), &internet),
        "pod -> internet after the loss"
    );
    // The sweep holds the addresses once the store knows the node's ENIs again.
    let t0 = std::time::Instant::now();
    loop {
        let held = a.introspect("/v1/assignments").unwrap();
        let ips: Vec<&str> = held["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["ip"].as_str().unwrap())
            .collect();
        if p.iter().all(|pod| ips.contains(&pod.ip.as_str())) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the pods' addresses were not held again: {held}\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for pod in &p {
        let mut check = pod.call.clone();
        check.command = "CHECK".into();
        check.conf["prevResult"] = pod.result.clone();
        let out = check.run();
        assert!(
            out.ok,
            "CHECK of {}: {}\n{}",
            pod.ip,
            out.stdout,
            a.log_text()
        );
    }
    let held = a.introspect("/v1/assignments").unwrap();
    for pod in &p {
        assert!(
            held["assignments"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["ip"] == pod.ip.as_str()
                    && x["container_id"] == pod.call.container_id.as_str()),
            "{} is not held by its attachment again: {held}",
            pod.ip
        );
    }
    // A new pod gets another address.
    let q = add_pods(&a, &dir, "rscn", 1);
    assert!(p.iter().all(|pod| pod.ip != q[0].ip));
    assert!(ping(q[0].ns.name(), &p[0].ip), "new pod -> recovered pod");
    for pod in &p {
        let mut del = pod.call.clone();
        del.command = "DEL".into();
        assert!(del.run().ok);
    }
    let held = a.introspect("/v1/assignments").unwrap();
    assert_eq!(held["assignments"].as_array().unwrap().len(), 1, "{held}");
}
