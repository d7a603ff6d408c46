//! `cargo xtask bench <what>`: measurements against the anchors, same machine, same run,
//! alternating A/B rounds, medians and tails.

mod cni;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = if args.first().map(String::as_str) == Some("cni") {
        cni::main(&args[1..])
    } else {
        eprintln!("usage: vpc-ebpf-bench cni --plugin PATH [--pods N] [--rounds N] [--json FILE]");
        2
    };
    std::process::exit(code);
}
