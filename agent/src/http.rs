//! The agent's two local HTTP endpoints: Prometheus metrics (`/metrics`, default
//! 127.0.0.1:61678) and read-only introspection JSON (default 127.0.0.1:61679: `/v1/enis`,
//! `/v1/assignments`, `/v1/endpoints`, `/v1/config`, and the policy flow log
//! `/v1/flows`). Both are GET-only and bound to loopback by default, as aws-node's are.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use futures_util::StreamExt as _;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, warn};

use crate::{
    clock::now_ms,
    ipam::{
        reconciler::{refresh_awscni, refresh_gauges},
        store::AddrState,
    },
    node::{Node, Settings},
    policy::flows::Filter,
    rpc::Services,
};

/// What the handlers read.
#[derive(Clone)]
pub struct Context {
    pub services: Services,
    /// The effective configuration, as `/v1/config` shows it.
    pub config: Arc<Value>,
    /// Known once discovery is done.
    pub node: watch::Receiver<Option<(Node, Settings)>>,
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json_reply(v: &Value) -> Response<Body> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(v).unwrap_or_default(),
    )
}

async fn metrics(ctx: &Context) -> Response<Body> {
    let s = &ctx.services;
    let node = ctx.node.borrow().clone();
    if let Some((node, settings)) = node {
        s.ipam
            .read(|store, blocked| {
                refresh_gauges(store, blocked, &s.metrics, node.limits, &settings);
                refresh_awscni(store, &s.metrics);
            })
            .await;
    }
    if let Some(dp) = s.dataplane()
        && let Err(e) = dp.export_counters().await
    {
        warn!(error = %vpc_ebpf_rpc::report::Chain(&e), "exporting the dataplane counters failed");
    }
    reply(
        StatusCode::OK,
        crate::metrics::CONTENT_TYPE,
        s.metrics.encode(),
    )
}

async fn enis(ctx: &Context) -> Value {
    let now = now_ms();
    let node = ctx.node.borrow().clone();
    let node_subnet = node
        .as_ref()
        .map(|(n, _)| (n.subnet_id.clone(), n.subnet_cidr));
    let (enis, mode, blocked) = ctx
        .services
        .ipam
        .read(|store, blocked| {
            (
                eni_rows(store, now, node_subnet.as_ref()),
                store.mode,
                blocked,
            )
        })
        .await;
    let placement = ctx
        .services
        .placement
        .lock()
        .map(|p| serde_json::to_value(&*p).unwrap_or_default())
        .unwrap_or_default();
    let (ready, not_ready_reason) = match ctx.services.ipam.readiness() {
        crate::ipam::Readiness::Ready => (true, String::new()),
        crate::ipam::Readiness::NotReady(why) => (false, why),
    };
    json!({
        "ready": ready,
        "not_ready_reason": not_ready_reason,
        "mode": mode,
        "growth_blocked": blocked.map(|b| format!("{b:?}")),
        "instance": node.as_ref().map(|(n, _)| json!({
            "id": n.instance_id,
            "type": n.instance_type,
            "subnet": n.subnet_id,
            "subnet_cidr": n.subnet_cidr,
            "vpc_cidrs": n.vpc_cidrs,
            "max_enis": n.limits.max_enis,
            "ipv4_per_eni": n.limits.slots_per_eni,
            "availability_zone": n.availability_zone,
        })),
        "placement": placement,
        "max_pods": ctx.services.metrics.max_pods.get(),
        "enis": enis,
    })
}

fn eni_rows(
    store: &crate::ipam::store::Store,
    now: u64,
    node_subnet: Option<&(String, ipnet::Ipv4Net)>,
) -> Vec<Value> {
    store
        .enis()
        .map(|e| {
            let mut free = 0;
            let mut cooling = Vec::new();
            let mut assigned = 0;
            for (ip, s) in &e.addrs {
                match s {
                    AddrState::Cooling { until_ms } if *until_ms > now => {
                        cooling.push(json!({"ip": ip, "reusable_in_ms": until_ms - now}));
                    }
                    AddrState::Free | AddrState::Cooling { .. } => free += 1,
                    AddrState::Assigned { .. } => assigned += 1,
                }
            }
            json!({
                "id": e.id,
                "device_index": e.device_index,
                "mac": e.mac,
                "primary_ip": e.primary_ip,
                "subnet_id": e.subnet_id.clone().or_else(|| node_subnet.map(|n| n.0.clone())),
                "subnet_cidr": e.subnet_cidr.or_else(|| node_subnet.map(|n| n.1)),
                "excluded": e.excluded,
                "prefixes": e.prefixes.iter().map(|p| format!("{p}/28")).collect::<Vec<_>>(),
                "addresses": e.addrs.keys().collect::<Vec<_>>(),
                "assigned": assigned,
                "free": free,
                "cooling": cooling,
            })
        })
        .collect()
}

async fn assignments(ctx: &Context) -> Value {
    let registry = &ctx.services.endpoints;
    let list: Vec<Value> = ctx
        .services
        .ipam
        .read(|store, _| {
            store
                .assignments()
                .map(|(k, pod, ip, eni)| {
                    let ep = registry.get(ip).filter(|e| e.key == *k);
                    json!({
                        "network": k.network,
                        "container_id": k.container_id,
                        "ifname": k.ifname,
                        "ip": ip,
                        "eni": eni.id,
                        "device_index": eni.device_index,
                        "pod": {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid},
                        "host_veth": ep.and_then(|e| e.wiring.map(|w| w.host_ifname)),
                    })
                })
                .collect()
        })
        .await;
    json!({ "assignments": list })
}

fn endpoints(ctx: &Context) -> Value {
    json!({ "endpoints": ctx.services.endpoints.all() })
}

/// `/v1/flows`: the policy flow log as JSON lines, the last `last` (default 100)
/// records matching `namespace`, `pod` and `verdict`; with `follow=true`, then every new
/// one as it comes, until the client goes. A viewer that falls behind gets a
/// `{"skipped": n}` line.
fn flows(ctx: &Context, query: &str) -> Response<Body> {
    let Some(engine) = ctx.services.policy.get() else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "NetworkPolicy is not enforced on this node (ENABLE_NETWORK_POLICY is not true, \
             or its policies are not watched yet): there is no flow log\n"
                .into(),
        );
    };
    let pairs = || query.split('&').filter_map(|kv| kv.split_once('='));
    let filter = match Filter::from_pairs(pairs()) {
        Ok(f) => f,
        Err(e) => return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
    };
    let mut last = 100;
    let mut follow = false;
    for (k, v) in pairs() {
        match k {
            "last" => match v.parse() {
                Ok(n) => last = n,
                Err(_) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("last={v:?}: expected a number of records\n"),
                    );
                }
            },
            "follow" => follow = matches!(v, "true" | "1"),
            _ => {}
        }
    }
    let hub = engine.flows();
    // Subscribed before the past is read, so that nothing falls between the two.
    let live = follow.then(|| hub.subscribe());
    let past: Vec<Bytes> = hub
        .recent(&filter, last)
        .iter()
        .map(|r| json_line(&**r))
        .collect();
    let past = futures_util::stream::iter(past);
    let body: Body = match live {
        None => BodyExt::boxed(StreamBody::new(past.map(|b| Ok(Frame::data(b))))),
        Some(rx) => {
            let live = futures_util::stream::unfold((rx, filter), |(mut rx, filter)| async move {
                loop {
                    match rx.recv().await {
                        Ok(r) if filter.matches(&r) => {
                            return Some((json_line(&*r), (rx, filter)));
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            return Some((json_line(&json!({ "skipped": n })), (rx, filter)));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
            BodyExt::boxed(StreamBody::new(
                past.chain(live).map(|b| Ok(Frame::data(b))),
            ))
        }
    };
    let mut r = Response::new(body);
    if let Ok(v) = "application/x-ndjson".parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json_line<T: serde::Serialize + ?Sized>(v: &T) -> Bytes {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn route(
    ctx: Context,
    req: Request<hyper::body::Incoming>,
    metrics_port: bool,
) -> Response<Body> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "read-only: GET only\n".into(),
        );
    }
    match (metrics_port, req.uri().path()) {
        (true, "/metrics") => metrics(&ctx).await,
        (false, "/v1/enis") => json_reply(&enis(&ctx).await),
        (false, "/v1/assignments") => json_reply(&assignments(&ctx).await),
        (false, "/v1/config") => json_reply(&ctx.config),
        (false, "/v1/endpoints") => json_reply(&endpoints(&ctx)),
        (false, "/v1/flows") => flows(&ctx, req.uri().query().unwrap_or("")),
        (_, path) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            if metrics_port {
                format!("{path}: not found; try /metrics\n")
            } else {
                format!(
                    "{path}: not found; try /v1/enis, /v1/assignments, /v1/endpoints, /v1/config or /v1/flows\n"
                )
            },
        ),
    }
}

/// Binds now (so a port conflict is reported at start) and serves until `stop`.
pub async fn serve(
    addr: SocketAddr,
    ctx: Context,
    metrics_port: bool,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.changed() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        continue;
                    }
                },
            };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let ctx = ctx.clone();
                    async move { Ok::<_, Infallible>(route(ctx, req, metrics_port).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
            });
        }
    }))
}
