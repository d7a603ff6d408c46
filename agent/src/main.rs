//! `vpc-ebpf-agent`: the per-node daemon. Wiring only: configuration, then the
//! endpoints that must answer early (gRPC for the plugin, metrics, introspection), then
//! discovery and restore, then the reconciler; SIGTERM stops it without touching pods.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use vpc_ebpf_agent::{
    aws::{ec2::Ec2, imds::Imds},
    bootstrap::{self, StartError},
    config::ipnet_lite::Cidr,
    config::{Config, MIN_SNAT_PORTS},
    datapath::{self, Datapath},
    dataplane::{Dataplane, DataplaneConfig, NodeSpec},
    host::Host,
    http,
    ipam::{checkpoint, store::Store},
    metrics::Metrics,
    reconcile::{Reconciler, Settings},
    rpc::{Backend, Shared, State, now_ms},
};
use vpc_ebpf_common::nat::SnatPorts;
use vpc_ebpf_rpc::{server, v1::cni_backend_server::CniBackendServer};

fn main() -> std::process::ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vpc-ebpf-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VPC_EBPF_LOG")
                .unwrap_or_else(|_| EnvFilter::new(&config.log_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    info!(config = %config.to_json(), "starting");
    let metrics = Arc::new(Metrics::new());
    let mut initial = State::new(
        Store::new(
            config.mode,
            u64::try_from(config.ip_cooldown.as_millis()).unwrap_or(u64::MAX),
        ),
        config.checkpoint.clone(),
    );
    initial.ready = false;
    "discovering the instance (IMDS, EC2)".clone_into(&mut initial.not_ready_reason);
    let shared = Shared::new(initial, metrics.clone());
    let (stop_tx, stop) = watch::channel(false);
    let (node_tx, node_rx) = watch::channel(None);

    let (health, tasks) = serve_early(&config, &shared, node_rx, &stop).await?;

    let started = tokio::select! {
        r = start(&config, &shared) => r?,
        () = shutdown_signal() => {
            info!("stopping before discovery finished");
            let _ = stop_tx.send(true);
            return Ok(());
        }
    };
    let (node, ec2, unmanaged, host) = started;
    let settings = Settings {
        mode: config.mode,
        targets: config.targets.clone(),
        cluster_name: config.cluster_name.clone(),
        additional_tags: config.additional_eni_tags.clone(),
        leaked_eni_cleanup: !config.disable_leaked_eni_cleanup,
        leaked_eni_age: config.leaked_eni_age,
        subnet_full_pause: config.subnet_full_pause,
    };
    let _ = node_tx.send(Some((node.clone(), settings.clone())));
    let datapath_task = if config.dataplane {
        let dp = start_dataplane(&config, &node, &shared).await?;
        Some(tokio::spawn(datapath::run(
            dp,
            shared.clone(),
            stop.clone(),
        )))
    } else {
        warn!(
            "VPC_EBPF_DATAPLANE=false: IPAM only; pods get a static gateway ARP entry and the kernel routes their traffic"
        );
        None
    };
    {
        let mut st = shared.state.lock().await;
        st.ready = true;
        st.not_ready_reason.clear();
    }
    shared.pool_changed.notify_one();
    health.set_serving::<CniBackendServer<Backend>>().await;
    info!("ready");

    let reconciler = tokio::spawn(
        Reconciler::new(
            ec2,
            shared.clone(),
            node,
            settings,
            unmanaged,
            metrics.clone(),
        )
        .with_host(Host::open().context("opening netlink")?)
        .run(stop.clone()),
    );
    let sweeper = tokio::spawn(sweep_recovered(
        host,
        config.veth_prefix.clone(),
        bootstrap::pending_dir(&config.agent_socket),
        shared.clone(),
        stop.clone(),
    ));

    shutdown_signal().await;
    info!("stopping; pods and their addresses stay as they are");
    let _ = stop_tx.send(true);
    for t in [reconciler, sweeper]
        .into_iter()
        .chain(datapath_task)
        .chain(tasks)
    {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let st = shared.state.lock().await;
    checkpoint::save(&st.checkpoint, &st.store).context("saving the checkpoint at exit")?;
    Ok(())
}

/// Starts what must answer before discovery: the plugin gets a clear "not ready" instead
/// of a connection error, and probes see the agent alive while EC2 is slow.
async fn serve_early(
    config: &Config,
    shared: &Shared,
    node_rx: watch::Receiver<Option<(vpc_ebpf_agent::reconcile::Node, Settings)>>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<(
    tonic_health::server::HealthReporter,
    Vec<tokio::task::JoinHandle<()>>,
)> {
    let http_ctx = http::Context {
        shared: shared.clone(),
        config: Arc::new(config.to_json()),
        node: node_rx,
    };
    let metrics_task = http::serve(config.metrics_addr, http_ctx.clone(), true, stop.clone())
        .await
        .with_context(|| format!("binding METRICS_BIND_ADDRESS={}", config.metrics_addr))?;
    let intro_task = http::serve(config.introspection_addr, http_ctx, false, stop.clone())
        .await
        .with_context(|| {
            format!(
                "binding INTROSPECTION_BIND_ADDRESS={}",
                config.introspection_addr
            )
        })?;
    let incoming = server::bind(&config.agent_socket)
        .await
        .with_context(|| format!("VPC_EBPF_AGENT_SOCKET={}", config.agent_socket.display()))?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_not_serving::<CniBackendServer<Backend>>().await;
    let grpc = {
        let shared = shared.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(health_svc)
                .add_service(CniBackendServer::new(Backend { shared }))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.changed().await;
                })
                .await;
            if let Err(e) = r {
                error!(error = %e, "the gRPC server stopped");
            }
        })
    };
    info!(socket = %config.agent_socket.display(), metrics = %config.metrics_addr, introspection = %config.introspection_addr, "serving");

    Ok((health, vec![grpc, metrics_task, intro_task]))
}

fn node_gateway(node: &vpc_ebpf_agent::reconcile::Node) -> anyhow::Result<std::net::Ipv4Addr> {
    let subnet: Cidr = node.subnet_cidr.parse().map_err(|()| {
        anyhow::anyhow!(
            "IMDS gave the subnet CIDR {:?}, not an IPv4 CIDR",
            node.subnet_cidr
        )
    })?;
    Ok(datapath::gateway_of(subnet))
}

/// Loads (or re-opens) the dataplane, programs the node and its ENIs, and takes over the
/// endpoints a previous run programmed: pods that still exist keep flowing, pods deleted
/// while the agent was down are removed.
async fn start_dataplane(
    config: &Config,
    node: &vpc_ebpf_agent::reconcile::Node,
    shared: &Shared,
) -> anyhow::Result<Arc<Datapath>> {
    let dp = Dataplane::load(&DataplaneConfig {
        pin_root: config.pin_root.clone(),
        attach_mode: None,
        nat_max_entries: config.nat_max_entries,
    })
    .context("loading the eBPF dataplane (VPC_EBPF_PIN_ROOT, bpffs, kernel BPF support)")?;
    // What the programs hand to the kernel (Service traffic kube-proxy DNATs to another
    // node, pod traffic to the node's other addresses) is forwarded by it.
    match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        Ok(v) if v.trim() == "1" => {}
        _ => {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .context("enabling net.ipv4.ip_forward (the agent needs CAP_NET_ADMIN and a writable /proc/sys)")?;
            info!("enabled net.ipv4.ip_forward");
        }
    }
    let host = Host::open().context("opening netlink")?;
    let dp = Arc::new(Datapath::new(
        dp,
        Host::open().context("opening netlink")?,
        node_gateway(node)?,
    ));
    let links = host.links_by_mac().await.context("listing links")?;
    let primary = links
        .get(&node.primary_mac.to_ascii_lowercase())
        .with_context(|| {
            format!(
                "no interface has the primary ENI's MAC {}",
                node.primary_mac
            )
        })?;
    let vpc: Vec<Cidr> = node
        .vpc_cidrs
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    let services = config
        .service_cidrs
        .clone()
        .unwrap_or_else(|| vec![datapath::default_service_cidr(&vpc)]);
    let pairs = |v: &[Cidr]| v.iter().map(|c| (c.addr, c.len)).collect::<Vec<_>>();
    let snat_skip = datapath::host_ephemeral_ports();
    let (lo, hi) = config.snat_ports;
    let usable = SnatPorts::new(lo, hi, snat_skip.0, snat_skip.1).usable();
    if !config.external_snat && usable < MIN_SNAT_PORTS {
        anyhow::bail!(
            "VPC_EBPF_SNAT_PORT_RANGE={lo}-{hi} leaves {usable} ports once the node's \
             ephemeral range {}-{} (net.ipv4.ip_local_port_range) is skipped; at least \
             {MIN_SNAT_PORTS} are needed: widen the range or narrow ip_local_port_range",
            snat_skip.0,
            snat_skip.1
        );
    }
    dp.set_node(&NodeSpec {
        node_ip: node.primary_ip,
        primary_eni_ifindex: primary.index,
        vpc_cidrs: pairs(&vpc),
        snat_exclusions: pairs(&config.exclude_snat_cidrs),
        passthrough_cidrs: pairs(&services),
        external_snat: config.external_snat,
        snat_ports: config.snat_ports,
        snat_skip: Some(snat_skip),
    })
    .context("programming the node")?;
    let enis = datapath::store_enis(shared).await;
    let programmed = dp.sync_enis(&enis).await.context("programming the ENIs")?;

    let (kept, dropped) = adopt_endpoints(&dp, &host, config, shared).await?;
    info!(
        enis = programmed,
        endpoints_kept = kept,
        endpoints_removed = dropped,
        "dataplane ready"
    );
    let _ = shared.datapath.set(dp.clone());
    Ok(dp)
}

/// Endpoints from the previous run: keeps those whose pod still has its address and veth
/// (re-attaching, which clsact needs), drops the rest. Returns (kept, dropped).
async fn adopt_endpoints(
    dp: &Datapath,
    host: &Host,
    config: &Config,
    shared: &Shared,
) -> anyhow::Result<(usize, usize)> {
    let routes = host
        .pod_routes(&config.veth_prefix)
        .await
        .context("listing pod routes")?;
    let links = host.links_by_mac().await.context("listing links")?;
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let mut st = shared.state.lock().await;
    let assigned: std::collections::HashMap<_, _> = st
        .store
        .assignments()
        .map(|(k, _, ip, _)| (ip, k.clone()))
        .collect();
    let (mut kept, mut dropped) = (0, 0);
    for ep in dp.endpoints().context("reading the endpoints map")? {
        let route = routes
            .iter()
            .find(|r| r.ip == ep.ipv4 && r.ifindex == ep.host_ifindex);
        let (Some(key), Some(route)) = (assigned.get(&ep.ipv4), route) else {
            if let Err(e) = dp.remove_endpoint(ep.ipv4).await {
                warn!(ip = %ep.ipv4, error = %e, "could not remove a stale endpoint");
            }
            dropped += 1;
            continue;
        };
        if let Err(e) = dp.reprogram(&ep).await {
            warn!(ip = %ep.ipv4, error = %e, "could not re-attach a pod");
            continue;
        }
        st.endpoints.insert(
            key.clone(),
            vpc_ebpf_agent::rpc::Endpoint {
                ipv4: ep.ipv4,
                host_ifname: route.ifname.clone(),
                host_ifindex: ep.host_ifindex,
                host_mac: datapath::link_mac(&links, ep.host_ifindex)
                    .unwrap_or_else(|| mac(ep.host_mac)),
                pod_mac: mac(ep.pod_mac),
            },
        );
        kept += 1;
    }
    let live: std::collections::HashSet<_> = assigned.keys().copied().collect();
    drop(st);
    let rules = dp.sweep_rules(&live).await;
    if rules > 0 {
        info!(
            rules,
            "removed ip rules of pods deleted while the agent was down"
        );
    }
    Ok((kept, dropped))
}

type Started = (
    vpc_ebpf_agent::reconcile::Node,
    Ec2,
    std::collections::BTreeSet<u32>,
    Host,
);

/// Discovery and restore, retried until they work: EC2 or IMDS being down at start is
/// reported (not ready, with the reason) and waited out, not a crash loop.
async fn start(config: &Config, shared: &Shared) -> anyhow::Result<Started> {
    let host = Host::open().context("opening netlink")?;
    let mut imds = Imds::new(&config.imds_endpoint);
    let mut attempt = 0;
    let mut ec2: Option<Ec2> = None;
    loop {
        let r: Result<_, StartError> = async {
            let meta = imds.discover_primary().await?;
            let client = if let Some(c) = &ec2 {
                c.clone()
            } else {
                let c = Ec2::new(
                    &meta.region,
                    config.ec2_endpoint.as_deref(),
                    shared.metrics.clone(),
                )
                .await;
                ec2 = Some(c.clone());
                c
            };
            let (node, enis) = bootstrap::discover(&meta, &client).await?;
            let routes = host.pod_routes(&config.veth_prefix).await?;
            Ok((node, enis, routes, client))
        }
        .await;
        match r {
            Ok((node, enis, routes, client)) => {
                let restored = bootstrap::restore(config, &node, &enis, &routes, now_ms());
                info!(
                    instance = %node.instance_id,
                    instance_type = %node.instance_type,
                    enis = restored.store.enis().count(),
                    assignments = restored.store.assignments().count(),
                    released_pending = restored.released_pending,
                    recovered = restored.recovered.len(),
                    lost = restored.sync.lost.len(),
                    "ready"
                );
                let mut st = shared.state.lock().await;
                st.store = restored.store;
                "loading the eBPF dataplane".clone_into(&mut st.not_ready_reason);
                drop(st);
                return Ok((node, client, restored.unmanaged_indexes, host));
            }
            Err(e) if e.retryable() => {
                let wait = bootstrap::retry_delay(attempt);
                attempt += 1;
                warn!(error = %e, retry_in = ?wait, "discovery failed; retrying");
                shared.state.lock().await.not_ready_reason = format!("discovery failed: {e}");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e).context("discovering the node"),
        }
    }
}

/// Every 30 s: releases addresses held for pods found only by their host route once
/// those pods go, and applies releases the plugin recorded.
async fn sweep_recovered(
    host: Host,
    veth_prefix: String,
    pending_dir: std::path::PathBuf,
    shared: Shared,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        let routes = match host.pod_routes(&veth_prefix).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "listing pod routes failed");
                continue;
            }
        };
        let mut st = shared.state.lock().await;
        let now = now_ms();
        let swept = bootstrap::sweep_recovered(&mut st.store, &routes, now);
        // Releases recorded by a plugin that could not reach us (a restart raced it).
        let applied = vpc_ebpf_agent::pending::apply(&pending_dir, &mut st.store, now);
        if swept + applied.freed > 0 || !applied.records.is_empty() {
            match vpc_ebpf_agent::rpc::persist(&st) {
                Ok(()) => applied.remove(),
                Err(e) => warn!(error = %e, "checkpoint after sweep failed"),
            }
            shared.pool_changed.notify_one();
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
