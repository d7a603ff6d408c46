//! `vpc-ebpf-agent probe live|ready`: the kubelet's liveness and readiness checks, through
//! the agent's gRPC health service on its unix socket (Kubernetes before 1.24 has no gRPC
//! probe). Live: the agent answers. Ready: it serves the plugin (state restored, dataplane
//! up).

use std::{path::Path, time::Duration};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The service name readiness asks about.
pub const CNI_SERVICE: &str = "vpc_ebpf.cni.v1.CniBackend";

/// Exit status for the kubelet: 0 healthy, 1 not.
pub async fn run(socket: &Path, ready: bool) -> u8 {
    let channel = match vpc_ebpf_rpc::client::channel(socket, Duration::from_secs(2)).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("probe: {}", vpc_ebpf_rpc::report::Chain(&e));
            return 1;
        }
    };
    let service = if ready { CNI_SERVICE } else { "" };
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await;
    match r.map(|r| r.into_inner().status()) {
        Ok(ServingStatus::Serving) => 0,
        Ok(s) => {
            eprintln!(
                "probe: {} is {s:?}",
                if ready {
                    "the agent"
                } else {
                    "the agent's health service"
                }
            );
            1
        }
        Err(s) => {
            eprintln!("probe: {}", s.message());
            1
        }
    }
}
