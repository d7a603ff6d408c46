//! The network configuration on stdin, decoded (code 6 when it cannot be) and validated
//! (code 7, naming the field and what it accepts).

use std::collections::HashMap;

use serde::Deserialize;

use super::{CniError, ErrorCode, version::Version};

pub const DEFAULT_AGENT_SOCKET: &str = "/run/vpc-ebpf/agent.sock";
pub const DEFAULT_VETH_PREFIX: &str = "eni";
pub const DEFAULT_MTU: u32 = 9001;
pub const DEFAULT_LOG_FILE: &str = "/var/log/vpc-ebpf/plugin.log";
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    agent_socket: Option<String>,
    veth_prefix: Option<String>,
    mtu: Option<u32>,
    log_file: Option<String>,
    log_level: Option<String>,
    #[serde(default)]
    runtime_config: RuntimeConfig,
    prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "cni.dev/attachments")]
    legacy_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuntimeConfig {
    #[serde(default)]
    port_mappings: Vec<RawPortMapping>,
    #[serde(default)]
    bandwidth: Option<RawBandwidth>,
}

/// The `bandwidth` capability: bits per second and bucket sizes in bits, as the
/// `bandwidth` plugin reads them (containerd's CRI spells them `IngressRate`...).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBandwidth {
    #[serde(default, alias = "IngressRate")]
    ingress_rate: i64,
    #[serde(default, alias = "IngressBurst")]
    ingress_burst: i64,
    #[serde(default, alias = "EgressRate")]
    egress_rate: i64,
    #[serde(default, alias = "EgressBurst")]
    egress_burst: i64,
}

/// A rate limit in one direction: bits per second, and the bucket in bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub rate_bps: u64,
    pub burst_bits: u64,
}

/// The pod's limits from the `bandwidth` capability (what kubelet derives from the
/// `kubernetes.io/ingress-bandwidth` and `egress-bandwidth` annotations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bandwidth {
    /// On what the pod receives: enforced by the chained `bandwidth` plugin's tbf on
    /// the host veth, which the dataplane then sends the pod's traffic through.
    pub ingress: Option<Limit>,
    /// On what the pod sends: enforced by vpc-ebpf (a tbf on the pod's interface),
    /// since the dataplane redirects the pod's packets before `bandwidth`'s ifb
    /// redirect would see them.
    pub egress: Option<Limit>,
}

/// The CNI convention spells the fields `hostPort`..., containerd's CRI (go-cni, whose
/// struct has no JSON tags) `HostPort`...; Go plugins read both, as Go's JSON decoding
/// ignores case, and so does this one.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPortMapping {
    #[serde(alias = "HostPort")]
    host_port: i64,
    #[serde(alias = "ContainerPort")]
    container_port: i64,
    #[serde(default, alias = "Protocol")]
    protocol: Option<String>,
    #[serde(rename = "hostIP", default, alias = "HostIP", alias = "hostIp")]
    host_ip: Option<String>,
}

/// One attachment the runtime still uses (GC keeps these).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// A hostPort from the `portMappings` capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    /// Empty: every node address.
    pub host_ip: String,
}

/// A validated network configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: Version,
    pub name: String,
    pub agent_socket: String,
    pub veth_prefix: String,
    pub mtu: u32,
    pub log_file: String,
    pub log_level: String,
    pub port_mappings: Vec<PortMapping>,
    pub bandwidth: Bandwidth,
    pub prev_result: Option<serde_json::Value>,
    /// GC: attachments to keep (`cni.dev/valid-attachments`, or the legacy key).
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn invalid(field: &str, detail: impl Into<String>) -> CniError {
    CniError::new(
        ErrorCode::InvalidConfig,
        format!("invalid network config field {field:?}"),
        detail,
    )
}

/// Decodes only `cniVersion`, which is all VERSION gets.
pub fn requested_version(stdin: &[u8]) -> Result<Option<String>, CniError> {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: V = serde_json::from_slice(stdin).map_err(|e| decode_error(&e))?;
    Ok(v.cni_version)
}

fn decode_error(e: &serde_json::Error) -> CniError {
    CniError::new(
        ErrorCode::Decode,
        "cannot decode the network config on stdin",
        format!("{e}; the runtime must pass the network config as a JSON object"),
    )
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let raw: Raw = serde_json::from_slice(stdin).map_err(|e| decode_error(&e))?;
        let cni_version = Version::parse(
            raw.cni_version
                .as_deref()
                .ok_or_else(|| invalid("cniVersion", "it is required"))?,
        )?;
        let name = raw.name.unwrap_or_default();
        if name.is_empty() {
            return Err(invalid("name", "the network name is required"));
        }
        if raw.plugin_type.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("type", "must name the plugin (vpc-ebpf-cni)"));
        }
        let veth_prefix = raw
            .veth_prefix
            .unwrap_or_else(|| DEFAULT_VETH_PREFIX.into());
        if veth_prefix.is_empty()
            || veth_prefix.len() > 4
            || !veth_prefix.chars().all(|c| c.is_ascii_alphanumeric())
            || ["eth", "lo", "vlan"].contains(&veth_prefix.as_str())
        {
            return Err(invalid(
                "vethPrefix",
                format!(
                    "{veth_prefix:?}: 1 to 4 letters or digits (host veth names are the prefix \
                     plus 11 hex digits, at most 15), not eth, lo or vlan; default {DEFAULT_VETH_PREFIX}"
                ),
            ));
        }
        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        if !(576..=9001).contains(&mtu) {
            return Err(invalid(
                "mtu",
                format!(
                    "{mtu}: between 576 and 9001 (the VPC's jumbo frames); default {DEFAULT_MTU}"
                ),
            ));
        }
        let agent_socket = raw
            .agent_socket
            .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.into());
        if !agent_socket.starts_with('/') {
            return Err(invalid(
                "agentSocket",
                format!("{agent_socket:?}: an absolute path to the agent's unix socket"),
            ));
        }
        let log_level = raw
            .log_level
            .unwrap_or_else(|| "info".into())
            .to_lowercase();
        if !LOG_LEVELS.contains(&log_level.as_str()) {
            return Err(invalid(
                "logLevel",
                format!("{log_level:?}: one of {}", LOG_LEVELS.join(", ")),
            ));
        }
        let port_mappings = raw
            .runtime_config
            .port_mappings
            .into_iter()
            .map(port_mapping)
            .collect::<Result<Vec<_>, _>>()?;
        let bandwidth = raw
            .runtime_config
            .bandwidth
            .map(bandwidth)
            .transpose()?
            .unwrap_or_default();
        Ok(Self {
            cni_version,
            name,
            agent_socket,
            veth_prefix,
            mtu,
            log_file: raw.log_file.unwrap_or_else(|| DEFAULT_LOG_FILE.into()),
            log_level,
            port_mappings,
            bandwidth,
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments.or(raw.legacy_attachments),
        })
    }
}

fn port_mapping(raw: RawPortMapping) -> Result<PortMapping, CniError> {
    let port = |field: &str, v: i64| {
        u16::try_from(v).ok().filter(|p| *p != 0).ok_or_else(|| {
            invalid(
                "runtimeConfig.portMappings",
                format!("{field} {v}: a port between 1 and 65535"),
            )
        })
    };
    let protocol = match raw
        .protocol
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some(other) => {
            return Err(invalid(
                "runtimeConfig.portMappings",
                format!("protocol {other:?}: tcp or udp"),
            ));
        }
    };
    let host_ip = raw.host_ip.unwrap_or_default();
    if !host_ip.is_empty() && host_ip.parse::<std::net::Ipv4Addr>().is_err() {
        return Err(invalid(
            "runtimeConfig.portMappings",
            format!("hostIP {host_ip:?}: an IPv4 address or empty"),
        ));
    }
    Ok(PortMapping {
        host_port: port("hostPort", raw.host_port)?,
        container_port: port("containerPort", raw.container_port)?,
        protocol,
        host_ip,
    })
}

/// The bandwidth plugin's rules: a rate needs a bucket and a bucket a rate, neither
/// negative, and the bucket below 4 GiB (in bytes, what its tbf takes).
fn bandwidth(raw: RawBandwidth) -> Result<Bandwidth, CniError> {
    let limit = |dir: &str, rate: i64, burst: i64| -> Result<Option<Limit>, CniError> {
        let field = "runtimeConfig.bandwidth";
        let (Ok(rate_bps), Ok(burst_bits)) = (u64::try_from(rate), u64::try_from(burst)) else {
            return Err(invalid(
                field,
                format!("{dir}Rate {rate}, {dir}Burst {burst}: neither may be negative"),
            ));
        };
        match (rate_bps, burst_bits) {
            (0, 0) => Ok(None),
            (0, _) | (_, 0) => Err(invalid(
                field,
                format!(
                    "{dir}Rate {rate_bps}, {dir}Burst {burst_bits}: a rate needs a burst and a \
                     burst a rate (bits per second, bits)"
                ),
            )),
            _ if burst_bits / 8 >= u64::from(u32::MAX) => Err(invalid(
                field,
                format!("{dir}Burst {burst_bits}: at most 4 GiB (32 Gibit)"),
            )),
            _ => Ok(Some(Limit {
                rate_bps,
                burst_bits,
            })),
        }
    };
    Ok(Bandwidth {
        ingress: limit("ingress", raw.ingress_rate, raw.ingress_burst)?,
        egress: limit("egress", raw.egress_rate, raw.egress_burst)?,
    })
}

/// Unused capability names are fine; this only documents what the plugin reads.
pub fn capabilities() -> HashMap<&'static str, bool> {
    HashMap::from([("portMappings", true), ("bandwidth", true)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_limits_are_read_as_the_bandwidth_plugin_reads_them() {
        let c = NetConf::parse(
            conf(r#","runtimeConfig":{"bandwidth":{"ingressRate":10000000,"ingressBurst":4294967295}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            c.bandwidth,
            Bandwidth {
                ingress: Some(Limit {
                    rate_bps: 10_000_000,
                    burst_bits: 4_294_967_295
                }),
                egress: None
            }
        );
        // containerd's CRI spells the fields as Go names them.
        let c = NetConf::parse(
            conf(r#","runtimeConfig":{"bandwidth":{"EgressRate":1000000,"EgressBurst":800000,"IngressRate":0,"IngressBurst":0}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.bandwidth.ingress, None);
        assert_eq!(
            c.bandwidth.egress,
            Some(Limit {
                rate_bps: 1_000_000,
                burst_bits: 800_000
            })
        );
        assert_eq!(
            NetConf::parse(conf("").as_bytes()).unwrap().bandwidth,
            Bandwidth::default()
        );
        for (bad, says) in [
            (r#"{"ingressRate":1000}"#, "a rate needs a burst"),
            (r#"{"egressBurst":1000}"#, "a rate needs a burst"),
            (r#"{"egressRate":-1,"egressBurst":8}"#, "negative"),
            (
                r#"{"ingressRate":1,"ingressBurst":40000000000}"#,
                "at most 4 GiB",
            ),
        ] {
            let e = NetConf::parse(
                conf(&format!(r#","runtimeConfig":{{"bandwidth":{bad}}}"#)).as_bytes(),
            )
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidConfig, "{bad}");
            assert!(e.details.contains(says), "{bad}: {}", e.details);
            assert!(
                e.msg.contains("runtimeConfig.bandwidth"),
                "{bad}: {}",
                e.msg
            );
        }
    }

    fn conf(extra: &str) -> String {
        format!(r#"{{"cniVersion":"1.0.0","name":"aws-cni","type":"vpc-ebpf-cni"{extra}}}"#)
    }

    #[test]
    fn defaults_are_vpc_cni_compatible() {
        let c = NetConf::parse(conf("").as_bytes()).unwrap();
        assert_eq!(c.veth_prefix, "eni");
        assert_eq!(c.mtu, 9001);
        assert_eq!(c.agent_socket, DEFAULT_AGENT_SOCKET);
        assert_eq!(c.cni_version, Version::V1_0_0);
    }

    #[test]
    fn port_mappings_and_attachments() {
        let c = NetConf::parse(
            conf(
                r#","runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"},{"hostPort":53,"containerPort":5353,"protocol":"UDP","hostIP":"10.0.0.5"}]},
                "cni.dev/attachments":[{"containerID":"a","ifname":"eth0"}]"#,
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.port_mappings.len(), 2);
        assert_eq!(c.port_mappings[1].protocol, Protocol::Udp);
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "a");
    }

    #[test]
    fn containerds_spelling_of_port_mappings() {
        let c = NetConf::parse(
            conf(r#","runtimeConfig":{"portMappings":[{"HostPort":30080,"ContainerPort":8080,"Protocol":"tcp","HostIP":""}]}"#)
                .as_bytes(),
        )
        .unwrap_or_else(|e| panic!("containerd's spelling refused: {e}"));
        assert_eq!(
            c.port_mappings,
            vec![PortMapping {
                host_port: 30080,
                container_port: 8080,
                protocol: Protocol::Tcp,
                host_ip: String::new()
            }]
        );
    }

    #[test]
    fn undecodable_is_6_and_invalid_is_7_naming_the_field() {
        for bad in ["", "{", "[]", r#"{"cniVersion":1}"#, r#"{"mtu":"big"}"#] {
            assert_eq!(
                NetConf::parse(bad.as_bytes()).unwrap_err().code,
                ErrorCode::Decode,
                "{bad}"
            );
        }
        for (extra, field) in [
            (r#","vethPrefix":"toolong""#, "vethPrefix"),
            (r#","vethPrefix":"eth""#, "vethPrefix"),
            (r#","mtu":100"#, "mtu"),
            (r#","agentSocket":"rel/path""#, "agentSocket"),
            (r#","logLevel":"loud""#, "logLevel"),
            (
                r#","runtimeConfig":{"portMappings":[{"hostPort":0,"containerPort":80}]}"#,
                "portMappings",
            ),
            (
                r#","runtimeConfig":{"portMappings":[{"hostPort":1,"containerPort":80,"protocol":"sctp"}]}"#,
                "portMappings",
            ),
        ] {
            let e = NetConf::parse(conf(extra).as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidConfig, "{extra}");
            assert!(e.msg.contains(field), "{e}");
        }
        let e = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::IncompatibleVersion);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
    }
}
