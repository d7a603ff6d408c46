//! The traffic: TCP_RR and TCP_CRR clients and servers (our own, one thread each, each in
//! its namespace), and bulk throughput with iperf3.
//!
//! TCP_RR: one connection, a 1-byte request answered by a 1-byte response, back to back;
//! the rate is transactions per second. TCP_CRR: per transaction connect, 1-byte request,
//! 1-byte response, close. The server closes first (as netperf's does), so TIME_WAIT
//! lands on the server and the client never runs out of ephemeral ports.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU16, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::topo::Endpoints;

/// Every measurement gets a server port no earlier one used. Through SNAT, TCP_CRR
/// leaves translated tuples in the server's TIME_WAIT (60 s) and in the NAT tables; a
/// later measurement to the same port would inherit that history (collisions of reused
/// tuples with TIME_WAIT, ports still held), so rounds would not be independent.
static NEXT_PORT: AtomicU16 = AtomicU16::new(20_000);

fn fresh_port() -> u16 {
    NEXT_PORT.fetch_add(1, Ordering::Relaxed)
}
/// Unmeasured traffic first: ARP, route and socket caches, CPU frequency.
const WARMUP: Duration = Duration::from_millis(300);
/// A SYN lost by a dataplane is retransmitted after 1 s; one that takes longer than this
/// counts as a failed transaction instead of stalling the run.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Rr,
    Crr,
    Stream,
}

impl Metric {
    pub const ALL: [Self; 3] = [Self::Rr, Self::Crr, Self::Stream];

    pub fn key(self) -> &'static str {
        match self {
            Self::Rr => "tcp_rr",
            Self::Crr => "tcp_crr",
            Self::Stream => "tcp_stream",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Self::Rr | Self::Crr => "transactions/s",
            Self::Stream => "Gbit/s",
        }
    }

    pub fn from_key(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.key() == s || m.key().trim_start_matches("tcp_") == s)
    }
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Sample {
    /// In [`Metric::unit`].
    pub value: f64,
    /// Transactions that failed (timed out, refused, reset); for a stream, retransmits.
    pub errors: u64,
    /// SYNs the client had to send again (lost, or answered by a TIME_WAIT's ACK).
    pub syn_retrans: u64,
    /// Source addresses the server saw.
    pub peers: BTreeSet<Ipv4Addr>,
}

/// The CPU every client, server and iperf3 of the run is pinned to; `None`: unpinned.
static CPU: OnceLock<Option<usize>> = OnceLock::new();

/// Pins the traffic of the whole run to `cpu` (or not). Once, before any measurement.
pub fn set_cpu(cpu: Option<usize>) {
    let _ = CPU.set(cpu);
}

fn cpu() -> Option<usize> {
    CPU.get().copied().flatten()
}

/// Pins the calling thread to the run's CPU, if there is one.
fn pin_thread() {
    let Some(cpu) = cpu() else { return };
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays inside it for cpu < CPU_SETSIZE,
    // which the option parser checked; the call affects only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set);
        assert!(
            rc == 0,
            "sched_setaffinity(cpu {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs `f` on a new thread that has entered the named network namespace, so every
/// socket it opens lives there.
fn spawn_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        pin_thread();
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid open fd of a netns file; affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert!(
            rc == 0,
            "setns({path}): {}",
            std::io::Error::last_os_error()
        );
        f()
    })
}

/// TcpExt TCPSynRetrans of the calling thread's network namespace (`/proc/net` would
/// show the main thread's).
fn syn_retransmits() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Waits up to 100 ms for a connection so the accept loop can notice `stop`.
fn accept_ready(l: &TcpListener) -> bool {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&raw mut pfd, 1, 100) > 0 }
}

fn v4(a: SocketAddr) -> Option<Ipv4Addr> {
    match a {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(_) => None,
    }
}

/// Serves until `stop`: each connection answers every byte with one byte, until EOF
/// (`close_after_one`: after the first answer, closing first).
fn serve(l: &TcpListener, stop: &AtomicBool, close_after_one: bool) -> BTreeSet<Ipv4Addr> {
    let mut peers = BTreeSet::new();
    let mut buf = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        if !accept_ready(l) {
            continue;
        }
        let Ok((mut s, peer)) = l.accept() else {
            continue;
        };
        if let Some(p) = v4(peer) {
            peers.insert(p);
        }
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        while let Ok(1) = s.read(&mut buf) {
            if s.write_all(&buf).is_err() || close_after_one {
                break;
            }
        }
    }
    peers
}

struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<BTreeSet<Ipv4Addr>>>,
}

impl Server {
    fn start(ns: &str, ip: Ipv4Addr, port: u16, close_after_one: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let s = Arc::clone(&stop);
        let thread = spawn_in(ns, move || {
            let l =
                TcpListener::bind((ip, port)).unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
            ready_tx.send(()).unwrap();
            serve(&l, &s, close_after_one)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("server ready");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> BTreeSet<Ipv4Addr> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("server thread")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rr_client(to: SocketAddr, secs: Duration, stop: &AtomicBool) -> (f64, u64) {
    let Ok(mut s) = TcpStream::connect_timeout(&to, IO_TIMEOUT) else {
        return (0.0, 1);
    };
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut buf = [7u8; 1];
    let mut exchange =
        |s: &mut TcpStream| s.write_all(&buf).is_ok() && s.read_exact(&mut buf).is_ok();
    let warm_until = Instant::now() + WARMUP;
    while Instant::now() < warm_until {
        if !exchange(&mut s) {
            return (0.0, 1);
        }
    }
    let start = Instant::now();
    let mut n = 0u64;
    let mut errors = 0;
    // Checking the clock every 64 transactions keeps it out of the loop's cost.
    while !stop.load(Ordering::Relaxed) {
        if !exchange(&mut s) {
            errors += 1;
            break;
        }
        n += 1;
        if n.is_multiple_of(64) && start.elapsed() >= secs {
            break;
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "a count of transactions")]
    let rate = n as f64 / start.elapsed().as_secs_f64();
    (rate, errors)
}

fn crr_once(to: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&to, IO_TIMEOUT) else {
        return false;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let mut buf = [7u8; 1];
    if s.write_all(&buf).is_err() || s.read_exact(&mut buf).is_err() {
        return false;
    }
    // Wait for the server's FIN, so the server side closes first.
    matches!(s.read(&mut buf), Ok(0))
}

fn crr_client(to: SocketAddr, secs: Duration, stop: &AtomicBool) -> (f64, u64) {
    let warm_until = Instant::now() + WARMUP;
    while Instant::now() < warm_until && !stop.load(Ordering::Relaxed) {
        crr_once(to);
    }
    let start = Instant::now();
    let (mut n, mut errors) = (0u64, 0u64);
    while start.elapsed() < secs && !stop.load(Ordering::Relaxed) {
        if crr_once(to) {
            n += 1;
        } else {
            errors += 1;
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "a count of transactions")]
    let rate = n as f64 / start.elapsed().as_secs_f64();
    (rate, errors)
}

/// TCP_RR or TCP_CRR for `secs` from `e.client_ns` to the server in `e.server_ns`.
pub fn transactions(
    e: &Endpoints,
    metric: Metric,
    secs: Duration,
    stop: &'static AtomicBool,
) -> Sample {
    let crr = metric == Metric::Crr;
    let port = fresh_port();
    let server = Server::start(&e.server_ns, e.server_ip, port, crr);
    let to = SocketAddr::from((e.server_ip, port));
    let (value, errors, syn_retrans) = spawn_in(&e.client_ns, move || {
        let before = syn_retransmits();
        let (v, err) = if crr {
            crr_client(to, secs, stop)
        } else {
            rr_client(to, secs, stop)
        };
        (v, err, syn_retransmits().saturating_sub(before))
    })
    .join()
    .expect("client thread");
    Sample {
        value,
        errors,
        syn_retrans,
        peers: server.finish(),
    }
}

/// One connect + exchange from `e.client_ns` to `e.server_ip:port` (refused or timed
/// out after 2 s: `false`), to check what a policy admits.
pub fn one_transaction(e: &Endpoints, port: u16) -> bool {
    let server = Server::start(&e.server_ns, e.server_ip, port, true);
    let to = SocketAddr::from((e.server_ip, port));
    let ok = spawn_in(&e.client_ns, move || crr_once(to))
        .join()
        .expect("client thread");
    server.finish();
    ok
}

fn netns_cmd(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]);
    if let Some(cpu) = cpu() {
        c.args(["taskset", "-c", &cpu.to_string()]);
    }
    c.arg(program);
    c
}

/// Single-stream TCP throughput with iperf3 (receiver's count), `secs` after one omitted
/// second of slow start.
pub fn stream(e: &Endpoints, secs: Duration, stop: &AtomicBool) -> Sample {
    let port = fresh_port().to_string();
    let ip = e.server_ip.to_string();
    let mut server = netns_cmd(&e.server_ns, "iperf3")
        .args(["-s", "-1", "-J", "-B", &ip, "-p", &port])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting iperf3 (apt-get install iperf3)");
    let mut client = serde_json::Value::Null;
    // The server needs a moment to listen; the client says so in its JSON.
    for _ in 0..50 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let out = netns_cmd(&e.client_ns, "iperf3")
            .args(["-c", &ip, "-p", &port, "-J", "-O", "1", "-t"])
            .arg(secs.as_secs().max(1).to_string())
            .output()
            .expect("running iperf3");
        client = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let refused = client["error"]
            .as_str()
            .is_some_and(|m| m.contains("connect"));
        if !refused {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A one-off server exits after its test; one whose client never came is killed.
    let deadline = Instant::now() + Duration::from_secs(3);
    while server.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = server.kill();
    let mut out = String::new();
    if let Some(mut o) = server.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    let _ = server.wait();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    if let Some(msg) = client["error"].as_str() {
        eprintln!("warning: iperf3 client: {msg}");
    }
    let bps = client["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    let retransmits = client["end"]["sum_sent"]["retransmits"]
        .as_u64()
        .unwrap_or(0);
    Sample {
        value: bps / 1e9,
        errors: retransmits,
        syn_retrans: 0,
        peers: report["start"]["accepted_connection"]["host"]
            .as_str()
            .and_then(|h| h.parse().ok())
            .into_iter()
            .collect(),
    }
}
