//! `vpc-ebpf-cni`: the CNI plugin binary. Only the result JSON (or the spec's error JSON)
//! goes to stdout; diagnostics go to stderr.

use std::{collections::HashMap, io::Read as _, process::ExitCode};

use vpc_ebpf_cni::spec::{
    CniError, ErrorCode,
    config::{self, NetConf},
    env::{Command, Env},
    version::{self, Version},
};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return fail(
            &CniError::new(ErrorCode::Io, "cannot read stdin", e.to_string()),
            Version::LATEST.as_str(),
        );
    }
    let vars: HashMap<String, String> = std::env::vars().collect();
    match run(&vars, &stdin) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err((e, v)) => fail(&e, &v),
    }
}

fn fail(e: &CniError, version: &str) -> ExitCode {
    eprintln!("vpc-ebpf-cni: {e}");
    println!("{}", e.to_json(version));
    ExitCode::FAILURE
}

/// The requested version for error replies: the config's, when it is one we speak.
fn reply_version(stdin: &[u8]) -> String {
    config::requested_version(stdin)
        .ok()
        .flatten()
        .filter(|v| Version::parse(v).is_ok())
        .unwrap_or_else(|| Version::LATEST.as_str().to_owned())
}

fn run(vars: &HashMap<String, String>, stdin: &[u8]) -> Result<String, (CniError, String)> {
    let v = reply_version(stdin);
    let env = Env::from_map(vars).map_err(|e| (e, v.clone()))?;
    if env.command == Command::Version {
        // VERSION answers in the version it was asked in (or the latest when none).
        let asked = config::requested_version(stdin).map_err(|e| (e, v.clone()))?;
        let cni_version = asked.unwrap_or_else(|| Version::LATEST.as_str().to_owned());
        return Ok(serde_json::json!({
            "cniVersion": cni_version,
            "supportedVersions": version::SUPPORTED.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        })
        .to_string());
    }
    let conf = NetConf::parse(stdin).map_err(|e| (e, v.clone()))?;
    Err((
        CniError::new(
            ErrorCode::NotImplemented,
            format!(
                "{:?} is not implemented by this build of vpc-ebpf-cni",
                env.command
            ),
            "the agent interface (IP allocation) is not built yet; only VERSION works",
        ),
        conf.cni_version.as_str().to_owned(),
    ))
}
