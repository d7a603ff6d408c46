//! The lab workload's servers and clients, for the cluster checks (std only, statically
//! linked into a small image).
//!
//! Server: `vpc-ebpf-testsrv serve` answers
//! - TCP :8080 and UDP :8081 with `hello from <client address>` (who the pod saw: SNAT
//!   and DNAT are visible in it);
//! - TCP :8082 by echoing every byte back (request/response loops and long streams);
//! - HTTP :8090 `GET /healthz` with 200 (readiness probes).
//!
//! Clients (JSON on stdout, exit 1 on failure):
//! - `tcp ADDR:PORT` and `udp ADDR:PORT`: one exchange with `serve`, the answer printed;
//! - `rr ADDR:PORT SECS`: one-byte request/response on one connection for SECS seconds:
//!   transactions, errors, the longest stall;
//! - `stream ADDR:PORT SECS`: a continuous stream through the echo port: bytes, the
//!   longest gap, whether the connection was reset, the rate of its second half;
//! - `probe tcp|udp TIMEOUT_MS ADDR:PORT...`: every target at once, which answered (the
//!   NetworkPolicy truth tables).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

const HELLO_TCP: u16 = 8080;
const HELLO_UDP: u16 = 8081;
const ECHO_TCP: u16 = 8082;
const HTTP: u16 = 8090;
const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve"] => serve(),
        ["tcp", addr] => addr_of(addr).and_then(tcp_hello),
        ["udp", addr] => addr_of(addr).and_then(udp_hello),
        ["rr", addr, secs] => addr_of(addr).and_then(|a| rr(a, secs_of(secs)?)),
        ["stream", addr, secs] => addr_of(addr).and_then(|a| stream(a, secs_of(secs)?)),
        ["probe", proto, timeout_ms, targets @ ..] => probe(proto, timeout_ms, targets),
        _ => Err("usage: vpc-ebpf-testsrv serve | tcp ADDR:PORT | udp ADDR:PORT | rr ADDR:PORT SECS | stream ADDR:PORT SECS | probe tcp|udp TIMEOUT_MS ADDR:PORT...".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{{\"ok\":false,\"error\":{e:?}}}");
            ExitCode::FAILURE
        }
    }
}

fn addr_of(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

fn secs_of(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s}: {e}"))
}

fn serve() -> Result<(), String> {
    let bind = |p: u16| TcpListener::bind(("0.0.0.0", p)).map_err(|e| format!(":{p}: {e}"));
    let hello = bind(HELLO_TCP)?;
    let echo = bind(ECHO_TCP)?;
    let http = bind(HTTP)?;
    let udp = UdpSocket::bind(("0.0.0.0", HELLO_UDP)).map_err(|e| format!(":{HELLO_UDP}: {e}"))?;
    std::thread::spawn(move || {
        for s in hello.incoming().flatten() {
            let peer = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let mut s = s;
            let _ = writeln!(s, "hello from {peer}");
        }
    });
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || echo_conn(s));
        }
    });
    std::thread::spawn(move || {
        for s in http.incoming().flatten() {
            let mut s = s;
            let mut buf = [0u8; 1024];
            let _ = s.set_read_timeout(Some(TIMEOUT));
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
        }
    });
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("hello from {}\n", peer.ip()).as_bytes(), peer);
        }
    }
}

fn echo_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn tcp_hello(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("{addr}: {e}"))?;
    println!("{{\"ok\":true,\"answer\":{:?}}}", answer.trim());
    Ok(())
}

fn udp_hello(addr: SocketAddr) -> Result<(), String> {
    let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    // UDP may lose the first datagram while a neighbour entry resolves: ask a few times.
    for _ in 0..6 {
        s.send_to(b"hi", addr).map_err(|e| format!("{addr}: {e}"))?;
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            let answer = String::from_utf8_lossy(&buf[..n]);
            println!("{{\"ok\":true,\"answer\":{:?}}}", answer.trim());
            return Ok(());
        }
    }
    Err(format!("{addr}: no answer"))
}

fn rr(addr: SocketAddr, secs: Duration) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let (t0, mut last) = (Instant::now(), Instant::now());
    let (mut n, mut stall) = (0u64, Duration::ZERO);
    let mut b = [0u8; 1];
    while t0.elapsed() < secs {
        let r = s.write_all(b"x").and_then(|()| s.read_exact(&mut b));
        if let Err(e) = r {
            println!(
                "{{\"ok\":false,\"transactions\":{n},\"max_stall_ms\":{},\"error\":{:?}}}",
                stall.as_millis(),
                e.to_string()
            );
            return Err(format!("{addr}: {e}"));
        }
        n += 1;
        stall = stall.max(last.elapsed());
        last = Instant::now();
    }
    println!(
        "{{\"ok\":true,\"transactions\":{n},\"max_stall_ms\":{}}}",
        stall.as_millis()
    );
    Ok(())
}

fn stream(addr: SocketAddr, secs: Duration) -> Result<(), String> {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut reader = s.try_clone().map_err(|e| e.to_string())?;
    let mut writer = s;
    let writing = std::thread::spawn(move || {
        let chunk = [7u8; 16384];
        let t0 = Instant::now();
        let mut sent = 0u64;
        while t0.elapsed() < secs {
            if writer.write_all(&chunk).is_err() {
                return (sent, true);
            }
            sent += chunk.len() as u64;
        }
        let _ = writer.shutdown(std::net::Shutdown::Write);
        (sent, false)
    });
    let mut buf = vec![0u8; 65536];
    let (mut got, mut gap, mut last, mut reset) = (0u64, Duration::ZERO, Instant::now(), false);
    // The second half's rate: past a rate limit's initial bucket.
    let (t0, mut mid) = (Instant::now(), None::<(Instant, u64)>);
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got += n as u64;
                gap = gap.max(last.elapsed());
                last = Instant::now();
                if mid.is_none() && t0.elapsed() >= secs / 2 {
                    mid = Some((last, got));
                }
            }
            Err(_) => {
                reset = true;
                break;
            }
        }
    }
    let (sent, write_failed) = writing.join().unwrap_or((0, true));
    let ok = !reset && !write_failed && got == sent;
    #[expect(clippy::cast_precision_loss, reason = "a rate for a report")]
    let tail_mbps = mid.map_or(0.0, |(t, at)| {
        (got - at) as f64 * 8.0 / last.duration_since(t).as_secs_f64().max(1e-3) / 1e6
    });
    println!(
        "{{\"ok\":{ok},\"sent\":{sent},\"received\":{got},\"max_gap_ms\":{},\"reset\":{},\"tail_mbps\":{tail_mbps:.2}}}",
        gap.as_millis(),
        reset || write_failed
    );
    if ok {
        Ok(())
    } else {
        Err(format!("{addr}: the stream broke"))
    }
}

/// `probe tcp|udp TIMEOUT_MS ADDR:PORT...`: tries every target at once (a TCP connect, or
/// a UDP hello), and prints which answered; exits 0 either way (the answer is the data).
fn probe(proto: &str, timeout_ms: &str, targets: &[&str]) -> Result<(), String> {
    let timeout = Duration::from_millis(timeout_ms.parse::<u64>().map_err(|e| e.to_string())?);
    let addrs = targets
        .iter()
        .map(|t| addr_of(t))
        .collect::<Result<Vec<_>, _>>()?;
    let udp = match proto {
        "tcp" => false,
        "udp" => true,
        other => return Err(format!("{other}: not tcp or udp")),
    };
    let handles: Vec<_> = addrs
        .into_iter()
        .map(|a| {
            std::thread::spawn(move || {
                let ok = if udp {
                    udp_answers(a, timeout)
                } else {
                    TcpStream::connect_timeout(&a, timeout).is_ok()
                };
                (a, ok)
            })
        })
        .collect();
    let results: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().ok())
        .map(|(a, ok)| format!("{:?}:{ok}", a.to_string()))
        .collect();
    println!("{{\"ok\":true,\"results\":{{{}}}}}", results.join(","));
    Ok(())
}

fn udp_answers(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(s) = UdpSocket::bind(("0.0.0.0", 0)) else {
        return false;
    };
    let tries = 3u32;
    if s.set_read_timeout(Some(timeout / tries)).is_err() {
        return false;
    }
    let mut buf = [0u8; 256];
    (0..tries).any(|_| s.send_to(b"hi", addr).is_ok() && s.recv_from(&mut buf).is_ok())
}
