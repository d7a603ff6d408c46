//! `vpc-ebpf-agent`: the per-node daemon. Wiring only: configuration; the node's state
//! restored from local files; the endpoints that must answer early (gRPC for the plugin,
//! metrics, introspection); the node's identity; the dataplane adopted; then readiness and
//! the background tasks (EC2 reconciler, ENI follower, recovery sweep). SIGTERM stops it
//! without touching pods.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use vpc_ebpf_agent::{
    cni_config,
    config::Config,
    dataplane::{events::PolicyEvents, owner, settings},
    endpoints::{self, Registry},
    flows_client,
    host::Host,
    http, install,
    ipam::{Ipam, ec2_merge, reconciler},
    k8s,
    metrics::Metrics,
    node::{self, Node, Settings},
    policy::flow_log,
    probe, restart,
    rpc::{Backend, Services},
};
use vpc_ebpf_rpc::{report::Chain, server, v1::cni_backend_server::CniBackendServer};

const USAGE: &str = "usage: vpc-ebpf-agent                     run the agent (configured by its environment)
       vpc-ebpf-agent probe live|ready       the kubelet's health checks, through the agent's socket
       vpc-ebpf-agent install-cni PLUGIN BIN_DIR
                                             install the plugin and the kernel settings (init container)
       vpc-ebpf-agent flows [-f] [-n NS] [--pod NAME] [--verdict allow|deny|revoke]
                                             the node's NetworkPolicy verdicts (flows --help)";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("probe") => return probe(&args[1..]),
        Some("install-cni") => return install_cni(&args[1..]),
        Some("flows") => return flows(&args[1..]),
        Some(_) => {
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vpc-ebpf-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("VPC_EBPF_LOG").unwrap_or_else(|_| {
            // kube's client logs every failed connection at ERROR while the API
            // server is away; the watchers say it once, with what they keep doing.
            EnvFilter::new(format!(
                "{},kube_client::client::builder=off",
                config.log_level
            ))
        }))
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

fn probe(args: &[String]) -> std::process::ExitCode {
    let ready = match args.first().map(String::as_str) {
        Some("ready") => true,
        Some("live") => false,
        _ => {
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let socket = std::env::var("VPC_EBPF_AGENT_SOCKET")
        .unwrap_or_else(|_| vpc_ebpf_agent::config::DEFAULT_SOCKET.into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match rt {
        Ok(rt) => std::process::ExitCode::from(rt.block_on(probe::run(socket.as_ref(), ready))),
        Err(e) => {
            eprintln!("probe: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn flows(args: &[String]) -> std::process::ExitCode {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{}", flows_client::USAGE);
        return std::process::ExitCode::SUCCESS;
    }
    let args = match flows_client::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("flows: {e}\n{}", flows_client::USAGE);
            return std::process::ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match rt {
        Ok(rt) => std::process::ExitCode::from(rt.block_on(flows_client::run(&args))),
        Err(e) => {
            eprintln!("flows: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn install_cni(args: &[String]) -> std::process::ExitCode {
    let [plugin, bin_dir] = args else {
        eprintln!("{USAGE}");
        return std::process::ExitCode::from(2);
    };
    match install::install(plugin.as_ref(), bin_dir.as_ref()) {
        Ok(done) => {
            for d in done {
                eprintln!("install-cni: {d}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("install-cni: {}", Chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the start-up sequence, in the order it must happen, reads best in one place"
)]
async fn run(config: Config) -> anyhow::Result<()> {
    info!(config = %config.to_json(), "starting");
    let metrics = Arc::new(Metrics::new());
    let host = Host::open().context("opening netlink")?;
    let local = restart::restore_local(&config, &host).await;
    let ipam = Arc::new(Ipam::new(local.store, config.checkpoint.clone()));
    let registry = Arc::new(Registry::new(
        local.endpoints,
        endpoints::registry_path(&config.checkpoint),
    ));
    let dataplane = Arc::new(OnceLock::new());
    let (stop_tx, stop) = watch::channel(false);
    let k8s = k8s::start(&config, registry.clone(), &stop)
        .await
        .context("connecting to Kubernetes")?;
    // Settings aws-node would also have replaced: said once per start, on the Node too.
    (config.fallbacks.iter()).for_each(|f| k8s.notices.warning("ConfigFallback", f.clone()));
    let services = Services {
        ipam: ipam.clone(),
        endpoints: registry.clone(),
        dataplane: dataplane.clone(),
        metrics: metrics.clone(),
        pending_dir: restart::pending_dir(&config),
        pods: k8s.pods.clone(),
        annotate: k8s.annotate.clone(),
        policy: Arc::new(OnceLock::new()),
        placement: Arc::default(),
    };
    let (node_tx, node_rx) = watch::channel(None);
    let (health, mut tasks) = serve_early(&config, &services, node_rx, &stop).await?;

    let Some((node, discovered)) = identify(&config, &ipam, &metrics, local.node).await? else {
        info!("stopping before discovery finished");
        let _ = stop_tx.send(true);
        return Ok(());
    };
    if let Err(e) = node::save_cached(&node::cache_path(&config.checkpoint), &node) {
        warn!(error = %Chain(&e), "could not cache the node's identity");
    }
    let node_settings = Settings::from_config(&config);
    let _ = node_tx.send(Some((node.clone(), node_settings.clone())));

    let mut dataplane_thread = None;
    if config.dataplane {
        let (dp, thread, policy_events) =
            load_dataplane(&config, &node, &ipam, &registry, &host, &metrics).await?;
        tasks.push(tokio::spawn(owner::follow_enis(
            dp.clone(),
            ipam.enis(),
            stop.clone(),
        )));
        if config.network_policy {
            tasks.extend(start_policy(
                &config,
                k8s.kube.as_ref(),
                &services,
                (&dp, policy_events),
                &stop,
            ));
        }
        let _ = dataplane.set(dp);
        dataplane_thread = Some(thread);
    } else {
        warn!(
            "VPC_EBPF_DATAPLANE=false: IPAM only; pods get a static gateway ARP entry and the kernel routes their traffic"
        );
    }
    ipam.set_ready();
    health.set_serving::<CniBackendServer<Backend>>().await;
    info!("ready");
    tasks.extend(k8s.tasks);
    // The network config last: the kubelet reports the node's network ready from it.
    if let Some(dir) = &config.cni_conf_dir {
        let conflist = cni_config::render(&config, std::path::Path::new(PLUGIN_LOG));
        let path = cni_config::write(dir, &conflist).context("writing the CNI network config")?;
        info!(path = %path.display(), "CNI network config written");
    }

    tasks.push(tokio::spawn(restart::sweep_loop(
        services.clone(),
        Host::open().context("opening netlink")?,
        config.veth_prefix.clone(),
        stop.clone(),
    )));
    let on_node = {
        let (config, node_tx, dataplane) = (config.clone(), node_tx.clone(), dataplane.clone());
        move |n: Node| on_new_node(&config, &node_tx, dataplane.get(), n)
    };
    let ec2_side = reconciler::Ec2Side {
        config: config.clone(),
        ipam: ipam.clone(),
        metrics: metrics.clone(),
        notices: k8s.notices,
        on_node: Box::new(on_node),
        eniconfigs: k8s.kube.as_ref().map(|k| {
            k8s::eniconfig::EniConfigs::new(
                k.client.clone(),
                k.node_name.clone(),
                k8s::eniconfig::Keys {
                    label: config.eniconfig_label.clone(),
                    annotation: config.eniconfig_annotation.clone(),
                },
            )
        }),
        shown: services.placement.clone(),
        kube: k8s.kube.clone(),
        sweep_lease: k8s.kube.as_ref().map(|k| {
            k8s::lease::ChoreLease::new(
                k.client.clone(),
                &config.namespace,
                LEAKED_ENI_SWEEP_LEASE,
                &k.node_name,
                LEAKED_ENI_SWEEP_PERIOD,
            )
        }),
    };
    tasks.push(tokio::spawn(reconciler::run_with_discovery(
        ec2_side,
        node,
        discovered,
        stop.clone(),
    )));

    shutdown_signal().await;
    info!("stopping; pods and their addresses stay as they are");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    // Dropping the last handle stops the owner; its programs stay attached (pinned).
    drop(services);
    drop(dataplane);
    if let Some(t) = dataplane_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    ipam.save().await.context("saving the checkpoint at exit")?;
    Ok(())
}

/// The node's identity: cached by an earlier run (so EC2 being down now does not stop
/// pods), or discovered now and merged into the store. `None`: stopped meanwhile.
async fn identify(
    config: &Config,
    ipam: &Ipam,
    metrics: &Arc<Metrics>,
    cached: Option<Node>,
) -> anyhow::Result<Option<(Node, Option<node::Discovered>)>> {
    if let Some(n) = cached {
        return Ok(Some((n, None)));
    }
    ipam.set_not_ready("discovering the instance (IMDS, EC2)");
    let d = tokio::select! {
        d = node::discover_with_retry(config, metrics, |why| ipam.set_not_ready(why)) => {
            d.context("discovering the node")?
        }
        () = shutdown_signal() => return Ok(None),
    };
    let (views, _) = ec2_merge::views(&d.enis, &d.node.instance_id);
    let custom = config.custom_network;
    ipam.update(|s| {
        reconciler::log_report(&ec2_merge::merge(s, &views));
        // Custom networking: the primary ENI serves no pod, from the first ADD on (the
        // reconciler judges the other ENIs' subnets).
        if custom {
            let primary: Vec<String> = (s.enis())
                .filter(|e| e.device_index == 0)
                .map(|e| e.id.clone())
                .collect();
            for id in primary {
                s.set_placement(&id, None, true);
            }
        }
    })
    .await
    .context("saving the checkpoint after discovery")?;
    Ok(Some((d.node.clone(), Some(d))))
}

/// NetworkPolicy: the engine (set in `services` before the agent is ready, so no pod
/// starts without its policy) and its watches.
fn start_policy(
    config: &Config,
    kube: Option<&k8s::Kube>,
    services: &Services,
    (dp, events): (&owner::DataplaneHandle, PolicyEvents),
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let Some(kube) = kube else {
        warn!("ENABLE_NETWORK_POLICY=true off Kubernetes: there are no policies to enforce");
        return Vec::new();
    };
    let engine = vpc_ebpf_agent::policy::engine::Engine::new(
        services.endpoints.clone(),
        dp.clone(),
        config.policy_mode,
    );
    let mut tasks = k8s::policy_watch::start(&kube.watch_client, &engine, stop);
    tasks.push(tokio::spawn(flow_log::run(
        events,
        engine.clone(),
        services.metrics.clone(),
        config.policy_event_logs,
        stop.clone(),
    )));
    let _ = services.policy.set(engine);
    info!(
        mode = config.policy_mode.as_str(),
        event_logs = config.policy_event_logs,
        "NetworkPolicy is enforced; `vpc-ebpf-agent flows` shows its verdicts"
    );
    tasks
}

/// Loads (or re-opens) the dataplane and makes it hold exactly the node's pods.
async fn load_dataplane(
    config: &Config,
    node: &Node,
    ipam: &Ipam,
    registry: &Registry,
    host: &Host,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(
    owner::DataplaneHandle,
    std::thread::JoinHandle<()>,
    PolicyEvents,
)> {
    ipam.set_not_ready("loading the eBPF dataplane");
    let restart::Started {
        handle: dp,
        thread,
        policy_events,
    } = restart::start_dataplane(config, node, ipam, metrics.clone()).await?;
    let adopted = restart::adopt_dataplane(&dp, ipam, registry, host).await?;
    info!(
        programmed = adopted.programmed,
        removed = adopted.removed,
        failed = adopted.failed,
        unknown = adopted.unknown,
        "dataplane ready"
    );
    Ok((dp, thread, policy_events))
}

/// A node identity read from IMDS/EC2 after start (the first one, or one that changed: a
/// VPC CIDR added): cached, shown, and given to the dataplane.
/// The Lease under which one node at a time sweeps the cluster's leaked ENIs, and how
/// long a sweep keeps others off: about two sweeps an hour for the whole cluster.
const LEAKED_ENI_SWEEP_LEASE: &str = "vpc-ebpf-leaked-eni-sweep";
const LEAKED_ENI_SWEEP_PERIOD: Duration = Duration::from_mins(30);

fn on_new_node(
    config: &Config,
    node_tx: &watch::Sender<Option<(Node, Settings)>>,
    dp: Option<&owner::DataplaneHandle>,
    n: Node,
) {
    if let Err(e) = node::save_cached(&node::cache_path(&config.checkpoint), &n) {
        warn!(error = %Chain(&e), "could not cache the node's identity");
    }
    if let Some(dp) = dp {
        match settings::node_settings(config, &n, settings::host_ephemeral_ports()) {
            Ok(s) => {
                let dp = dp.clone();
                tokio::spawn(async move {
                    if let Err(e) = dp.set_node(s).await {
                        warn!(error = %Chain(&e), "re-programming the node's settings failed");
                    }
                });
            }
            Err(e) => warn!(error = %Chain(&e), "the node's new settings are not usable"),
        }
    }
    let _ = node_tx.send(Some((n, Settings::from_config(config))));
}

/// Starts what must answer before the node is known: the plugin gets a clear "not ready"
/// instead of a connection error, and probes see the agent alive while EC2 is slow.
async fn serve_early(
    config: &Config,
    services: &Services,
    node_rx: watch::Receiver<Option<(Node, Settings)>>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<(
    tonic_health::server::HealthReporter,
    Vec<tokio::task::JoinHandle<()>>,
)> {
    let http_ctx = http::Context {
        services: services.clone(),
        config: Arc::new(config.to_json()),
        node: node_rx,
    };
    let mut tasks = Vec::new();
    if !config.disable_metrics {
        tasks.push(
            http::serve(config.metrics_addr, http_ctx.clone(), true, stop.clone())
                .await
                .with_context(|| format!("binding METRICS_BIND_ADDRESS={}", config.metrics_addr))?,
        );
    }
    if !config.disable_introspection {
        tasks.push(
            http::serve(config.introspection_addr, http_ctx, false, stop.clone())
                .await
                .with_context(|| {
                    format!(
                        "binding INTROSPECTION_BIND_ADDRESS={}",
                        config.introspection_addr
                    )
                })?,
        );
    }
    let incoming = server::bind(&config.agent_socket)
        .await
        .with_context(|| format!("VPC_EBPF_AGENT_SOCKET={}", config.agent_socket.display()))?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_not_serving::<CniBackendServer<Backend>>().await;
    let grpc = {
        let services = services.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(health_svc)
                .add_service(CniBackendServer::new(Backend { services }))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.changed().await;
                })
                .await;
            if let Err(e) = r {
                error!(error = %Chain(&e), "the gRPC server stopped");
            }
        })
    };
    let off = |disabled: bool, addr: std::net::SocketAddr| {
        if disabled {
            "off (disabled)".to_owned()
        } else {
            addr.to_string()
        }
    };
    info!(
        socket = %config.agent_socket.display(),
        metrics = %off(config.disable_metrics, config.metrics_addr),
        introspection = %off(config.disable_introspection, config.introspection_addr),
        "serving"
    );
    tasks.push(grpc);
    Ok((health, tasks))
}

/// The plugin's log file as the host sees it (the chart mounts the host's
/// /var/log/vpc-ebpf).
const PLUGIN_LOG: &str = "/var/log/vpc-ebpf/plugin.log";

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
