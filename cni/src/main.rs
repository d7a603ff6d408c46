//! `vpc-ebpf-cni`: the CNI plugin binary. Only the result JSON (or the spec's error JSON)
//! goes to stdout; logs go to the log file and stderr.

use std::{collections::HashMap, io::Read as _, process::ExitCode};

use vpc_ebpf_cni::{
    commands, logging,
    spec::{
        CniError, ErrorCode,
        config::{self, NetConf},
        env::{Command, Env},
        version::{self, Version},
    },
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
    let reply_version = reply_version(&stdin);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return fail(
                &CniError::new(
                    ErrorCode::Io,
                    "cannot start the plugin's runtime",
                    e.to_string(),
                ),
                &reply_version,
            );
        }
    };
    match runtime.block_on(run(&vars, &stdin)) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => fail(&e, &reply_version),
    }
}

fn fail(e: &CniError, version: &str) -> ExitCode {
    tracing::error!(code = e.code.code(), "{e}");
    println!("{}", e.to_json(version));
    ExitCode::FAILURE
}

/// The version to answer errors in: the config's, when it is one this plugin speaks.
fn reply_version(stdin: &[u8]) -> String {
    config::requested_version(stdin)
        .ok()
        .flatten()
        .filter(|v| Version::parse(v).is_ok())
        .unwrap_or_else(|| Version::LATEST.as_str().to_owned())
}

async fn run(vars: &HashMap<String, String>, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let env = Env::from_map(vars)?;
    if env.command == Command::Version {
        let asked = config::requested_version(stdin)?;
        return Ok(Some(
            serde_json::json!({
                "cniVersion": asked.unwrap_or_else(|| Version::LATEST.as_str().to_owned()),
                "supportedVersions": version::SUPPORTED.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
            })
            .to_string(),
        ));
    }
    let conf = NetConf::parse(stdin)?;
    logging::init(&conf.log_file, &conf.log_level);
    tracing::info!(command = ?env.command, container = %env.container_id, "invoked");
    match env.command {
        Command::Add => commands::add(&env, &conf)
            .await
            .map(|v| Some(v.to_string())),
        Command::Del => commands::del(&env, &conf).await.map(|()| None),
        Command::Check => commands::check(&env, &conf).await.map(|()| None),
        Command::Status => commands::status(&conf).await.map(|()| None),
        Command::Gc => commands::gc(&conf).await.map(|()| None),
        Command::Version => unreachable!("handled above"),
    }
}
