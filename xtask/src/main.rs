//! `cargo xtask`: the project's development commands.

mod bench;
mod deps;
mod ebpf;
mod image;
mod lab;
mod lab_pods;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "vpc-ebpf development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the eBPF object (nightly + build-std + bpf-linker) and print where it is.
    BuildEbpf {
        /// Optimised release profile with BTF (what the agent ships).
        #[arg(long)]
        release: bool,
    },
    /// Install everything the project needs (apt packages, rust-src, bpf-linker); idempotent.
    Setup,
    /// fmt check, clippy -D warnings, the eBPF build, unit and root integration tests.
    Test {
        /// Extra arguments for the test runner (a test name filter, for instance).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The OCI images (agent + plugin, pause, test workload), built without a container
    /// engine into `<target-dir>/images/<name>/`: `image [--tag T] [--profile release|dev]`.
    Image {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks against the anchors: `bench cni [--pods N] [--rounds N] [--json FILE]`,
    /// `bench dataplane [--rounds N] [--secs S] [--json FILE] [--plot FILE]`,
    /// `bench pods [--pods N] [--rounds N] [--json FILE]`, `bench ipam ...`, `bench progcost ...`.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The local VPC lab as a Kubernetes cluster: no arguments = lab up, the cluster up,
    /// vpc-ebpf installed with Helm, a workload deployed, every packet path checked.
    /// `lab direct`: agents run directly and pods made by the plugin (no Kubernetes).
    /// Subcommands of the lab itself: up [--nodes N] [--instance-type T] [--imds-lag S],
    /// down, status [--json], check, fault, clear-faults, cluster up|push|install|check.
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::BuildEbpf { release } => {
            deps::ensure_ebpf_toolchain()?;
            let object = ebpf::build(release)?;
            println!("eBPF object: {}", object.display());
            Ok(())
        }
        Command::Image { args } => image::run_cli(&args),
        Command::Setup => {
            deps::ensure_system_packages(deps::TEST_PACKAGES)?;
            deps::ensure_lab_python()?;
            deps::ensure_ebpf_toolchain()
        }
        Command::Test { args } => test::all(&args),
        Command::Lab { args } => lab::run(&args),
        Command::Bench { args } => bench::run_bench(&args),
    }
}
