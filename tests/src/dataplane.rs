//! Shared by the dataplane test files: private pin roots, counters, a TCP exchange.

use std::{net::Ipv4Addr, path::PathBuf};

use vpc_ebpf_agent::dataplane::{AttachMode, CounterRow, DataplaneConfig};
use vpc_ebpf_common::counters::{ALL_INTERFACES, Counter, CounterKey, direction, reason};
use vpc_ebpf_rpc::types::{HostPort, MacAddr, Protocol};

use crate::require_root;

/// A private pin root per test so parallel tests never share maps or links; removed on
/// drop, even when the test fails.
pub struct PinRoot(pub PathBuf);

impl PinRoot {
    pub fn new(tag: &str) -> Self {
        require_root();
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/vpc-ebpf-test-{tag}-{}",
            std::process::id()
        )))
    }

    pub fn config(&self, attach_mode: Option<AttachMode>) -> DataplaneConfig {
        DataplaneConfig {
            pin_root: self.0.clone(),
            attach_mode,
            nat_max_entries: Some(4096),
        }
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The ingress counter of a verdict counted per interface (see [`forwarded`] for the
/// others).
pub fn counter(rows: &[CounterRow], ifindex: u32, reason: u16) -> Counter {
    assert!(
        !reason::is_forward(reason),
        "{} is not counted per interface: use forwarded()",
        reason::name(reason)
    );
    rows.iter()
        .find(|r| r.key == CounterKey::new(ifindex, reason, direction::INGRESS))
        .map(|r| r.value)
        .unwrap_or_default()
}

pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(idx, 0, "no interface {name}");
    idx
}

/// The MAC of `name` in the calling thread's namespace (sysfs shows the mounter's
/// namespace, so ask netlink through `ip`, which inherits the thread's).
pub fn mac_of(name: &str) -> MacAddr {
    let out = crate::netns::run(
        std::process::Command::new("ip").args(["-o", "link", "show", "dev", name]),
    );
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {out}"));
    mac.parse().unwrap()
}

pub const fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// The pod addresses in the endpoints map pinned under `pin_root`: what the kernel
/// forwards to, read without loading anything.
pub fn pinned_endpoints(pin_root: &std::path::Path) -> std::collections::BTreeSet<Ipv4Addr> {
    let path = pin_root
        .join(vpc_ebpf_common::PIN_VERSION)
        .join(vpc_ebpf_common::maps::ENDPOINTS);
    let data = aya::maps::MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("opening the pinned map {}: {e}", path.display()));
    let map: aya::maps::HashMap<_, u32, vpc_ebpf_common::node::Endpoint> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    map.keys()
        .map(|k| Ipv4Addr::from(k.unwrap().to_ne_bytes()))
        .collect()
}

/// `10.0.0.0/16` and the like.
pub fn net(s: &str) -> ipnet::Ipv4Net {
    s.parse().unwrap()
}

/// A TCP hostPort on every node address.
pub const fn tcp_port(host: u16, container: u16) -> HostPort {
    HostPort {
        protocol: Protocol::Tcp,
        host_port: host,
        container_port: container,
        host_ip: None,
    }
}

/// A UDP hostPort on every node address.
pub const fn udp_port(host: u16, container: u16) -> HostPort {
    HostPort {
        protocol: Protocol::Udp,
        ..tcp_port(host, container)
    }
}

/// The counter of a forwarding verdict (ingress), kept for all interfaces together.
pub fn forwarded(rows: &[CounterRow], reason: u16) -> Counter {
    assert!(reason::is_forward(reason), "{}", reason::name(reason));
    rows.iter()
        .find(|r| r.key == CounterKey::new(ALL_INTERFACES, reason, direction::INGRESS))
        .map(|r| r.value)
        .unwrap_or_default()
}

/// The ingress counter of `reason` wherever it is kept: on `ifindex`, or for all
/// interfaces when it is a forwarding verdict.
pub fn counted(rows: &[CounterRow], ifindex: u32, reason: u16) -> Counter {
    if reason::is_forward(reason) {
        forwarded(rows, reason)
    } else {
        counter(rows, ifindex, reason)
    }
}

pub fn counter_dir(rows: &[CounterRow], ifindex: u32, reason: u16, dir: u8) -> Counter {
    rows.iter()
        .find(|r| r.key == CounterKey::new(ifindex, reason, dir))
        .map(|r| r.value)
        .unwrap_or_default()
}

/// A TCP server on `addr` in namespace `ns` that answers each of `n` connections with
/// the address it saw the client at, then closes it. Returns once it listens; joining
/// gives the addresses seen (fewer than `n` if clients stopped coming for 30 s).
pub fn tcp_server(ns: &str, addr: &str, n: usize) -> std::thread::JoinHandle<Vec<String>> {
    use std::io::Write as _;
    let (tx, rx) = std::sync::mpsc::channel();
    let (ns, addr) = (ns.to_owned(), addr.to_owned());
    let h = std::thread::spawn(move || {
        crate::netns::run_in(&ns, || {
            let l = std::net::TcpListener::bind(&addr).expect("bind the server");
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let mut seen = Vec::new();
            while seen.len() < n && std::time::Instant::now() < deadline {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        s.set_nonblocking(false).unwrap();
                        let _ = s.write_all(peer.to_string().as_bytes());
                        seen.push(peer.to_string());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(e) => panic!("accept on {addr}: {e}"),
                }
            }
            seen
        })
    });
    rx.recv().expect("server listening");
    h
}

/// What a TCP client saw of one exchange with [`tcp_server`].
#[derive(Debug)]
pub struct Exchange {
    /// What the server said: the client address as the server saw it.
    pub reply: String,
    pub local: std::net::SocketAddr,
    /// The address the connection is established with, as the client's kernel sees it.
    pub peer: std::net::SocketAddr,
}

/// Connects (from `bind`, when given) to `to` in the calling thread's namespace and reads
/// the server's answer; connect and read each give up after 3 s.
pub fn tcp_exchange(
    bind: Option<Ipv4Addr>,
    to: std::net::SocketAddrV4,
) -> std::io::Result<Exchange> {
    use std::{io::Read as _, os::fd::FromRawFd as _};
    fn sockaddr(a: std::net::SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap(),
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        }
    }
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap();
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own; the stream closes it.
    let mut stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 3,
        tv_usec: 0,
    };
    // A blocking connect() gives up after SO_SNDTIMEO.
    // SAFETY: valid fd, option value of the stated size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap(),
        );
    }
    if let Some(b) = bind {
        let sa = sockaddr(std::net::SocketAddrV4::new(b, 0));
        // SAFETY: valid fd and address.
        if unsafe { libc::bind(fd, (&raw const sa).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let sa = sockaddr(to);
    // SAFETY: valid fd and address.
    if unsafe { libc::connect(fd, (&raw const sa).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(Exchange {
        reply,
        local: stream.local_addr()?,
        peer: stream.peer_addr()?,
    })
}

/// One test per attach mode, same topology: `attach_modes!(name, body)` makes the cases
/// `name::tcx` and `name::clsact`, each calling `body(mode)`.
#[macro_export]
macro_rules! attach_modes {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn tcx() {
                super::$body(vpc_ebpf_agent::dataplane::AttachMode::Tcx);
            }

            #[test]
            fn clsact() {
                super::$body(vpc_ebpf_agent::dataplane::AttachMode::Clsact);
            }
        }
    };
}
