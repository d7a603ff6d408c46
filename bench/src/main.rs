//! `cargo xtask bench <what>`: measurements against the anchors, same machine, same run,
//! alternating A/B rounds, medians and tails.

mod args;
mod cni;
mod dataplane;
mod ipam;
mod policy_scale;
mod policy_sweep;
mod progcost;

const USAGE: &str = "usage: vpc-ebpf-bench cni --plugin PATH [--pods N] [--rounds N] [--json FILE]\n       \
                     vpc-ebpf-bench dataplane [--rounds N] [--secs S] [--json FILE] [--plot FILE] ...\n       \
                     vpc-ebpf-bench ipam [--modes secondary|prefix|both] [--pods N] [--restarts N] [--json FILE]\n       \
                     vpc-ebpf-bench progcost [--runs N] [--json FILE]\n       \
                     vpc-ebpf-bench policy-scale [--pods N] [--namespaces N] [--local N] [--changes N] [--json FILE]\n       \
                     vpc-ebpf-bench policy --floor-object FILE [--rules 0,100,1000,10000] [--rounds N] [--secs S] [--json FILE] [--plot FILE]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("cni") => cni::main(&args[1..]),
        Some("dataplane") => dataplane::main(&args[1..]),
        Some("ipam") => ipam::main(&args[1..]),
        Some("progcost") => progcost::main(&args[1..]),
        Some("policy-scale") => policy_scale::main(&args[1..]),
        Some("policy") => policy_sweep::main(&args[1..]),
        _ => {
            eprintln!("{USAGE}");
            2
        }
    };
    std::process::exit(code);
}
