//! `vpc-ebpf-agent flows`: the live view of the node's policy verdicts, read from the
//! agent's introspection endpoint (`/v1/flows`), as `hubble observe` shows Cilium's.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::policy::flows::FlowRecord;

pub const USAGE: &str = "usage: vpc-ebpf-agent flows [-f|--follow] [-n|--namespace NS] [--pod NAME]
                            [--verdict allow|deny|revoke] [--last N] [--count N]
                            [-o|--output text|json] [--address HOST:PORT]
  The node's NetworkPolicy verdicts: denied packets, revoked connections and new
  connections a policy admitted, with the pods at both ends and the policies that judged.
  --follow keeps printing new ones (until --count records, when given); --namespace
  and --pod match either end; --last N starts with the last N records (default 100). The agent's
  introspection address (INTROSPECTION_BIND_ADDRESS, default 127.0.0.1:61679) is read
  unless --address is given.";

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub follow: bool,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub verdict: Option<String>,
    pub last: Option<usize>,
    /// Stop after this many records.
    pub count: Option<usize>,
    pub json: bool,
    pub address: Option<String>,
}

/// Parses the arguments after `flows`; `Err` says what is wrong.
pub fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        follow: false,
        namespace: None,
        pod: None,
        verdict: None,
        last: None,
        count: None,
        json: false,
        address: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "-f" | "--follow" => a.follow = true,
            "-n" | "--namespace" => a.namespace = Some(value(arg)?),
            "--pod" => a.pod = Some(value(arg)?),
            "--verdict" => {
                let v = value(arg)?;
                if !matches!(v.as_str(), "allow" | "deny" | "revoke") {
                    return Err(format!("--verdict {v}: expected allow, deny or revoke"));
                }
                a.verdict = Some(v);
            }
            "--last" => {
                let v = value(arg)?;
                a.last = Some(
                    v.parse()
                        .map_err(|_| format!("--last {v}: expected a number"))?,
                );
            }
            "--count" => {
                let v = value(arg)?;
                a.count = Some(
                    v.parse()
                        .map_err(|_| format!("--count {v}: expected a number"))?,
                );
            }
            "-o" | "--output" => match value(arg)?.as_str() {
                "json" => a.json = true,
                "text" => a.json = false,
                other => return Err(format!("--output {other}: expected text or json")),
            },
            "--address" => a.address = Some(value(arg)?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

impl Args {
    /// The request path with its query.
    pub fn path(&self) -> String {
        let mut q = Vec::new();
        if self.follow {
            q.push("follow=true".to_owned());
        }
        for (k, v) in [
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("verdict", &self.verdict),
        ] {
            if let Some(v) = v {
                q.push(format!("{k}={v}"));
            }
        }
        if let Some(n) = self.last {
            q.push(format!("last={n}"));
        }
        format!("/v1/flows?{}", q.join("&"))
    }

    /// Where the agent listens: a wildcard bind is reached on loopback.
    fn target(&self) -> Result<SocketAddr, String> {
        let (raw, from) = match &self.address {
            Some(a) => (a.clone(), "--address"),
            None => match std::env::var("INTROSPECTION_BIND_ADDRESS") {
                Ok(v) if !v.is_empty() => (v, "INTROSPECTION_BIND_ADDRESS"),
                _ => ("127.0.0.1:61679".to_owned(), "the default"),
            },
        };
        let mut addr: SocketAddr = raw
            .parse()
            .map_err(|_| format!("{from} {raw:?} is not an address:port"))?;
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        Ok(addr)
    }
}

/// Runs the view; the exit code.
pub async fn run(args: &Args) -> u8 {
    match fetch(args).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("flows: {e}");
            1
        }
    }
}

async fn fetch(args: &Args) -> Result<(), String> {
    let addr = args.target()?;
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        format!("connecting to the agent at {addr}: {e} (is the agent running, with introspection enabled?)")
    })?;
    // HTTP/1.0: the body is the rest of the stream, with no chunked framing to undo.
    let request = format!("GET {} HTTP/1.0\r\nHost: {addr}\r\n\r\n", args.path());
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("writing to {addr}: {e}"))?;
    let mut lines = BufReader::new(stream).lines();
    let read = |e: std::io::Error| format!("reading from {addr}: {e}");
    let status = lines.next_line().await.map_err(read)?.unwrap_or_default();
    while let Some(h) = lines.next_line().await.map_err(read)? {
        if h.is_empty() {
            break;
        }
    }
    if status.split_whitespace().nth(1) != Some("200") {
        let mut body = Vec::new();
        while let Some(l) = lines.next_line().await.map_err(read)? {
            body.push(l);
        }
        return Err(format!("the agent answered {status:?}: {}", body.join(" ")));
    }
    let mut out = std::io::stdout();
    let mut printed = 0;
    while args.count.is_none_or(|n| printed < n)
        && let Some(l) = lines.next_line().await.map_err(read)?
    {
        printed += 1;
        let text = if args.json { l } else { render(&l) };
        if std::io::Write::write_all(&mut out, format!("{text}\n").as_bytes()).is_err() {
            // The reader went away (a pipe into `head`): done.
            return Ok(());
        }
    }
    Ok(())
}

/// One JSON line as text.
fn render(line: &str) -> String {
    if let Ok(r) = serde_json::from_str::<FlowRecord>(line) {
        return r.line();
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
        && let Some(n) = v.get("skipped")
    {
        return format!("... {n} records skipped: this view fell behind");
    }
    line.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Args, String> {
        parse(&a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn arguments_become_the_query() {
        let a = args(&["-f", "-n", "x", "--verdict", "deny", "--last", "5"]).unwrap();
        assert_eq!(
            a.path(),
            "/v1/flows?follow=true&namespace=x&verdict=deny&last=5"
        );
        assert_eq!(args(&[]).unwrap().path(), "/v1/flows?");
        assert!(
            args(&["--verdict", "drop"])
                .unwrap_err()
                .contains("allow, deny or revoke")
        );
        assert!(args(&["--last"]).unwrap_err().contains("needs a value"));
        assert!(args(&["--bogus"]).unwrap_err().contains("unknown argument"));
        assert!(args(&["-o", "yaml"]).unwrap_err().contains("text or json"));
    }

    #[test]
    fn a_wildcard_bind_is_reached_on_loopback() {
        let a = args(&["--address", "0.0.0.0:61679"]).unwrap();
        assert_eq!(a.target().unwrap(), "127.0.0.1:61679".parse().unwrap());
        let a = args(&["--address", "nonsense"]).unwrap();
        assert!(a.target().unwrap_err().contains("--address"));
    }

    #[test]
    fn skipped_lines_are_said() {
        assert!(render(r#"{"skipped":3}"#).contains("3 records skipped"));
    }
}
