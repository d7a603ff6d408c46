//! The ADD result, rendered in the schema of the requested CNI version.

use serde_json::{Value, json};

use super::version::Version;

/// The pod's gateway: a link-local address answered on the host veth, as in VPC CNI.
pub const GATEWAY: &str = "169.254.1.1";
pub const GATEWAY_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddResult {
    pub host_ifname: String,
    pub host_mac: String,
    pub container_ifname: String,
    pub container_mac: String,
    pub sandbox: String,
    /// The pod's IPv4 address.
    pub address: std::net::Ipv4Addr,
}

impl AddResult {
    pub fn to_json(&self, version: Version) -> Value {
        let mut ip = json!({
            "address": format!("{}/32", self.address),
            "gateway": GATEWAY,
            "interface": 1,
        });
        if version == Version::V0_4_0 {
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": version.as_str(),
            "interfaces": [
                {"name": self.host_ifname, "mac": self.host_mac},
                {"name": self.container_ifname, "mac": self.container_mac, "sandbox": self.sandbox},
            ],
            "ips": [ip],
            "routes": [{"dst": "0.0.0.0/0", "gw": GATEWAY}],
            "dns": {},
        })
    }

    /// Reads back the pod address from a prevResult (CHECK), whatever version wrote it.
    pub fn address_in(prev: &Value) -> Option<std::net::Ipv4Addr> {
        prev["ips"]
            .as_array()?
            .iter()
            .find_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            host_ifname: "eni0123456789a".into(),
            host_mac: "02:00:00:00:00:01".into(),
            container_ifname: "eth0".into(),
            container_mac: "02:00:00:00:00:02".into(),
            sandbox: "/var/run/netns/x".into(),
            address: "10.0.3.7".parse().unwrap(),
        }
    }

    #[test]
    fn version_specific_shapes() {
        let old = sample().to_json(Version::V0_4_0);
        assert_eq!(old["cniVersion"], "0.4.0");
        assert_eq!(old["ips"][0]["version"], "4");
        let new = sample().to_json(Version::V1_1_0);
        assert_eq!(new["cniVersion"], "1.1.0");
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(new["ips"][0]["address"], "10.0.3.7/32");
        assert_eq!(new["interfaces"][1]["sandbox"], "/var/run/netns/x");
        assert_eq!(
            AddResult::address_in(&new),
            Some("10.0.3.7".parse().unwrap())
        );
        assert_eq!(AddResult::address_in(&json!({})), None);
    }
}
