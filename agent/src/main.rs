//! `vpc-ebpf-agent`: the per-node daemon.
//!
//! Today it loads the dataplane and counts packets on the interfaces it is given; IPAM,
//! the plugin's gRPC API and the Kubernetes watchers arrive with their issues.

use std::{thread, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use tracing::info;
use tracing_subscriber::EnvFilter;
use vpc_ebpf_agent::dataplane::{AttachMode, Dataplane, DataplaneConfig};
use vpc_ebpf_common::counters::{direction, reason};

#[derive(Debug, Parser)]
#[command(name = "vpc-ebpf-agent", version, about)]
struct Args {
    /// Interfaces to attach the packet counters to (repeatable).
    #[arg(long = "count-interface", value_name = "IFACE")]
    count_interfaces: Vec<String>,
    /// bpffs directory for pinned maps.
    #[arg(long, env = "VPC_EBPF_PIN_ROOT", default_value = vpc_ebpf_agent::dataplane::DEFAULT_PIN_ROOT)]
    pin_root: std::path::PathBuf,
    /// Force the clsact attach mode even where tcx is available.
    #[arg(long)]
    clsact: bool,
    /// Print the counters every this many seconds (0: once, after attaching, then exit).
    #[arg(long, default_value_t = 10)]
    report_interval: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("VPC_EBPF_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = DataplaneConfig {
        pin_root: args.pin_root,
        attach_mode: args.clsact.then_some(AttachMode::Clsact),
    };
    let mut dataplane = Dataplane::load(&config).context("starting the dataplane")?;
    for iface in &args.count_interfaces {
        dataplane
            .attach_counters(iface)
            .with_context(|| format!("attaching counters to {iface}"))?;
        info!(iface, "counting packets");
    }
    loop {
        for row in dataplane.counters()? {
            info!(
                ifindex = row.key.ifindex,
                direction = direction::name(row.key.direction),
                reason = reason::name(row.key.reason),
                packets = row.value.packets,
                bytes = row.value.bytes,
                "counter"
            );
        }
        if args.report_interval == 0 {
            return Ok(());
        }
        thread::sleep(Duration::from_secs(args.report_interval));
    }
}
