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
    if matches!(loss, Loss::PinRoot) {
        assert!(
            !vpc_ebpf_tests::lab_pods::reaches(p[0].ns.name(), &internet),
            "the internet answered a pod with the programs detached: the test proves nothing"
        );
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
    assert!(
        back <= Duration::from_secs(1),
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
