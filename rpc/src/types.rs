//! Values both ends of the contract handle: a MAC address, a hostPort mapping, and the
//! record of a release the plugin could not hand to the agent. One parser and one
//! formatter for each, so the plugin and the agent never disagree on a spelling.

use std::{
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

/// An Ethernet address. Parsed from and printed as six colon-separated hex bytes,
/// lower-case, as the kernel and EC2 print them.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex bytes separated by colons)")]
pub struct MacParseError(pub String);

impl MacAddr {
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }

    /// A random locally administered unicast address, as the kernel picks for a veth.
    pub fn random() -> Self {
        let mut b = [0u8; 6];
        // SAFETY: getrandom writes at most b.len() bytes into b.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != 6 {
            // No entropy source: fall back to the clock and pid, still unique enough for
            // a link-local pair.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let seed = t ^ u128::from(std::process::id()) << 64;
            b.copy_from_slice(&seed.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & 0xfe) | 0x02;
        Self(b)
    }

    /// From a netlink address attribute: `None` unless it is six bytes.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(b).ok().map(Self)
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(|| MacParseError(s.to_owned()))?;
            if p.is_empty() || p.len() > 2 {
                return Err(MacParseError(s.to_owned()));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| MacParseError(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.to_owned()));
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The transport of a hostPort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as packets and the dataplane's maps carry it.
    pub const fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }
}

/// One hostPort of a pod, from the CNI `portMappings` capability: traffic to
/// `host_ip` (every node address when `None`) on `host_port` goes to the pod's
/// `container_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HostPort {
    pub protocol: Protocol,
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    #[error("portMapping {0}: protocol must be tcp or udp")]
    Protocol(u32),
    #[error("portMapping {what} {value} is not a port (1-65535)")]
    Port { what: &'static str, value: u32 },
    #[error("portMapping {port}: hostIP {value:?} is not an IPv4 address")]
    HostIp { port: u32, value: String },
}

impl HostPort {
    /// From the wire form the plugin sends.
    pub fn from_wire(m: &crate::v1::PortMapping) -> Result<Self, HostPortError> {
        let protocol = match crate::v1::Protocol::try_from(m.protocol) {
            Ok(crate::v1::Protocol::Tcp) => Protocol::Tcp,
            Ok(crate::v1::Protocol::Udp) => Protocol::Udp,
            _ => return Err(HostPortError::Protocol(m.host_port)),
        };
        let port = |what: &'static str, value: u32| {
            u16::try_from(value)
                .ok()
                .filter(|p| *p != 0)
                .ok_or(HostPortError::Port { what, value })
        };
        let host_ip = match m.host_ip.trim() {
            "" | "0.0.0.0" => None,
            s => Some(s.parse().map_err(|_| HostPortError::HostIp {
                port: m.host_port,
                value: s.to_owned(),
            })?),
        };
        Ok(Self {
            protocol,
            host_port: port("hostPort", m.host_port)?,
            container_port: port("containerPort", m.container_port)?,
            host_ip,
        })
    }

    pub fn to_wire(self) -> crate::v1::PortMapping {
        crate::v1::PortMapping {
            host_port: u32::from(self.host_port),
            container_port: u32::from(self.container_port),
            protocol: match self.protocol {
                Protocol::Tcp => crate::v1::Protocol::Tcp,
                Protocol::Udp => crate::v1::Protocol::Udp,
            }
            .into(),
            host_ip: self.host_ip.map(|i| i.to_string()).unwrap_or_default(),
        }
    }
}

/// A DEL the plugin could not hand to the agent (it was down or restarting): written by
/// the plugin next to the agent's socket, applied and removed by the agent. The file name
/// is derived from the attachment, so a repeated DEL rewrites the same file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRelease {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    /// Wall-clock time of the record (unix ms): a record older than the attachment's
    /// current address is stale and must not release it. Absent in records of the first
    /// plugins.
    #[serde(default)]
    pub recorded_ms: Option<u64>,
}

/// Directory of the pending releases for the agent serving `agent_socket`.
pub fn pending_dir(agent_socket: &Path) -> PathBuf {
    agent_socket
        .parent()
        .unwrap_or(Path::new("/run/vpc-ebpf"))
        .join("pending-release")
}

impl PendingRelease {
    pub fn new(network: &str, container_id: &str, ifname: &str, recorded_ms: u64) -> Self {
        Self {
            network: network.to_owned(),
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
            recorded_ms: Some(recorded_ms),
        }
    }

    /// The record's file name: the attachment key with anything but `[A-Za-z0-9._-]`
    /// replaced, so no key can name a path outside the directory.
    pub fn file_name(network: &str, container_id: &str, ifname: &str) -> String {
        let key: String = format!("{network}_{container_id}_{ifname}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-._".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{key}.json")
    }

    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(Self::file_name(
            &self.network,
            &self.container_id,
            &self.ifname,
        ))
    }

    /// Writes the record atomically (temporary file, then rename).
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = self.path_in(dir);
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let body = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(tmp, &path)?;
        Ok(path)
    }

    /// Every readable record in `dir` with its path; unreadable ones are returned apart
    /// so the caller can report them (they are never guessed at).
    pub fn read_dir(dir: &Path) -> (Vec<(PathBuf, Self)>, Vec<PathBuf>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return (ok, bad);
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Self>(&b).ok())
            {
                Some(p) => ok.push((path, p)),
                None => bad.push(path),
            }
        }
        ok.sort_by(|a, b| a.0.cmp(&b.0));
        (ok, bad)
    }

    /// The record for one attachment, if there is one.
    pub fn read_one(
        dir: &Path,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Option<(PathBuf, Self)> {
        let path = dir.join(Self::file_name(network, container_id, ifname));
        let p = serde_json::from_slice::<Self>(&std::fs::read(&path).ok()?).ok()?;
        (p.network == network && p.container_id == container_id && p.ifname == ifname)
            .then_some((path, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_one_way_and_print_one_way() {
        let m: MacAddr = "02:00:0a:FF:00:01".parse().unwrap();
        assert_eq!(m.octets(), [2, 0, 10, 255, 0, 1]);
        assert_eq!(m.to_string(), "02:00:0a:ff:00:01");
        for bad in [
            "02:00:0a:ff:00",
            "02:00:0a:ff:00:01:02",
            "zz:00:0a:ff:00:01",
            "",
            "02::0a:ff:00:01",
            "002:00:0a:ff:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "\"02:00:0a:ff:00:01\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), m);
        let r = MacAddr::random();
        assert_eq!(r.0[0] & 0x03, 0x02, "locally administered unicast");
        assert_eq!(MacAddr::from_slice(&[1, 2, 3]), None);
    }

    #[test]
    fn host_ports_from_the_wire() {
        let wire = |proto: crate::v1::Protocol, h: u32, c: u32, ip: &str| crate::v1::PortMapping {
            host_port: h,
            container_port: c,
            protocol: proto.into(),
            host_ip: ip.into(),
        };
        let hp = HostPort::from_wire(&wire(crate::v1::Protocol::Tcp, 8080, 80, "")).unwrap();
        assert_eq!(
            hp,
            HostPort {
                protocol: Protocol::Tcp,
                host_port: 8080,
                container_port: 80,
                host_ip: None
            }
        );
        assert_eq!(HostPort::from_wire(&hp.to_wire()).unwrap(), hp);
        let with_ip =
            HostPort::from_wire(&wire(crate::v1::Protocol::Udp, 53, 53, "10.0.0.5")).unwrap();
        assert_eq!(with_ip.host_ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(with_ip.protocol.ip_proto(), 17);
        assert!(matches!(
            HostPort::from_wire(&wire(crate::v1::Protocol::Unspecified, 1, 1, "")),
            Err(HostPortError::Protocol(1))
        ));
        assert!(matches!(
            HostPort::from_wire(&wire(crate::v1::Protocol::Tcp, 70_000, 1, "")),
            Err(HostPortError::Port {
                what: "hostPort",
                ..
            })
        ));
        assert!(matches!(
            HostPort::from_wire(&wire(crate::v1::Protocol::Tcp, 1, 0, "")),
            Err(HostPortError::Port {
                what: "containerPort",
                ..
            })
        ));
        assert!(HostPort::from_wire(&wire(crate::v1::Protocol::Tcp, 1, 1, "::1")).is_err());
    }

    #[test]
    fn pending_releases_round_trip_through_their_directory() {
        let dir =
            std::env::temp_dir().join(format!("vpc-ebpf-pending-types-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let r = PendingRelease::new("aws-cni", "abc/../x", "eth0", 7);
        let path = r.write(&dir).unwrap();
        assert_eq!(
            path.parent(),
            Some(dir.as_path()),
            "no key escapes the directory"
        );
        assert_eq!(
            path.file_name().unwrap(),
            PendingRelease::file_name("aws-cni", "abc/../x", "eth0").as_str()
        );
        std::fs::write(dir.join("broken.json"), b"{").unwrap();
        let (ok, bad) = PendingRelease::read_dir(&dir);
        assert_eq!(ok, vec![(path.clone(), r.clone())]);
        assert_eq!(bad, vec![dir.join("broken.json")]);
        assert_eq!(
            PendingRelease::read_one(&dir, "aws-cni", "abc/../x", "eth0"),
            Some((path, r))
        );
        assert_eq!(
            PendingRelease::read_one(&dir, "aws-cni", "other", "eth0"),
            None
        );
        // Records of the first plugins had no time.
        let old: PendingRelease =
            serde_json::from_str(r#"{"network":"n","container_id":"c","ifname":"eth0"}"#).unwrap();
        assert_eq!(old.recorded_ms, None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
