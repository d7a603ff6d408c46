//! The endpoint registry: pod IP → who the pod is and where it sits on the node. The
//! plugin's RPCs fill it, the dataplane is programmed from it, introspection shows it,
//! and the Kubernetes watchers add what policy needs (labels, named ports). Only its
//! methods change it.
//!
//! Endpoints are saved (through [`crate::persist`]) once wired, i.e. once the plugin has
//! built the pod's veth, so that a restarted agent can re-program the dataplane from it
//! even when the pinned maps are gone. An endpoint reserved by an ADD whose plugin has not
//! reported back is held in memory only: if the agent dies then, the plugin's ADD fails
//! and the runtime retries it.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::RwLock,
};

use serde::{Deserialize, Serialize};
use vpc_ebpf_rpc::types::{HostPort, MacAddr};

use crate::{
    ipam::{EniRef, store::AttachmentKey},
    persist::{self, PersistError},
};

/// Who the pod is, as the runtime told the plugin (CNI_ARGS).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The pod's veth, as the plugin built it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wiring {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: MacAddr,
    pub pod_mac: MacAddr,
}

/// A named container port (for NetworkPolicy's named ports).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub key: AttachmentKey,
    pub pod: PodRef,
    pub eni: EniRef,
    #[serde(default)]
    pub host_ports: Vec<HostPort>,
    /// `None` until the plugin reports the pod's interfaces built.
    pub wiring: Option<Wiring>,
    /// Policy inputs, from the Kubernetes watchers.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub named_ports: Vec<NamedPort>,
    /// The policy the dataplane enforces for this pod; 0 is none.
    #[serde(default)]
    pub policy_id: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("endpoint registry")]
    Io(#[from] PersistError),
    #[error("endpoint registry {path} is unreadable")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{ip} is not reserved for {key:?}")]
    NotReserved { ip: Ipv4Addr, key: AttachmentKey },
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    endpoints: Vec<Endpoint>,
}

const FORMAT_VERSION: u32 = 1;

pub struct Registry {
    inner: RwLock<BTreeMap<Ipv4Addr, Endpoint>>,
    path: PathBuf,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Where the registry is saved: next to the checkpoint.
pub fn registry_path(checkpoint: &Path) -> PathBuf {
    checkpoint.with_file_name("endpoints.json")
}

/// The saved endpoints, or none when there is no file yet.
pub fn load(path: &Path) -> Result<Vec<Endpoint>, RegistryError> {
    let Some(data) = persist::read(path)? else {
        return Ok(Vec::new());
    };
    serde_json::from_slice::<OnDisk>(&data)
        .map(|d| d.endpoints)
        .map_err(|source| RegistryError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

impl Registry {
    /// A registry holding `endpoints`, saved to `path`.
    pub fn new(endpoints: Vec<Endpoint>, path: PathBuf) -> Self {
        Self {
            inner: RwLock::new(endpoints.into_iter().map(|e| (e.ip, e)).collect()),
            path,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Ipv4Addr, Endpoint>> {
        // Every change is one map operation: a panic elsewhere cannot leave it half done.
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<Ipv4Addr, Endpoint>> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, map: &BTreeMap<Ipv4Addr, Endpoint>) -> Result<(), RegistryError> {
        let disk = OnDisk {
            version: FORMAT_VERSION,
            endpoints: map
                .values()
                .filter(|e| e.wiring.is_some())
                .cloned()
                .collect(),
        };
        let data = serde_json::to_vec(&disk).map_err(|source| RegistryError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        Ok(persist::write_atomic(&self.path, &data)?)
    }

    pub fn get(&self, ip: Ipv4Addr) -> Option<Endpoint> {
        self.read().get(&ip).cloned()
    }

    pub fn by_key(&self, key: &AttachmentKey) -> Option<Endpoint> {
        self.read().values().find(|e| e.key == *key).cloned()
    }

    pub fn all(&self) -> Vec<Endpoint> {
        self.read().values().cloned().collect()
    }

    /// Each endpoint's address and pod, without the rest of the entry (policy asks on
    /// every re-program, where whole copies were a good part of the time).
    pub fn pods(&self) -> Vec<(Ipv4Addr, PodRef)> {
        self.read()
            .values()
            .map(|e| (e.ip, e.pod.clone()))
            .collect()
    }

    /// Records what an ADD gave: the address is the pod's, its veth is not built yet. A
    /// repeated ADD keeps what an earlier one wired.
    pub fn reserve(
        &self,
        ip: Ipv4Addr,
        key: AttachmentKey,
        pod: PodRef,
        eni: EniRef,
        host_ports: Vec<HostPort>,
    ) {
        let mut map = self.write();
        let wiring = map
            .get(&ip)
            .filter(|e| e.key == key)
            .and_then(|e| e.wiring.clone());
        let (labels, named_ports) = map
            .get(&ip)
            .filter(|e| e.key == key)
            .map(|e| (e.labels.clone(), e.named_ports.clone()))
            .unwrap_or_default();
        map.insert(
            ip,
            Endpoint {
                ip,
                key,
                pod,
                eni,
                host_ports,
                wiring,
                labels,
                named_ports,
                policy_id: 0,
            },
        );
    }

    /// The plugin built the pod's veth: saved from now on.
    pub fn wire(
        &self,
        ip: Ipv4Addr,
        key: &AttachmentKey,
        wiring: Wiring,
    ) -> Result<Endpoint, RegistryError> {
        let mut map = self.write();
        let e = map.get_mut(&ip).filter(|e| e.key == *key).ok_or_else(|| {
            RegistryError::NotReserved {
                ip,
                key: key.clone(),
            }
        })?;
        e.wiring = Some(wiring);
        let out = e.clone();
        self.save(&map)?;
        Ok(out)
    }

    /// Adds or replaces a whole endpoint (a restart rebuilding one it found on the node).
    pub fn adopt(&self, e: Endpoint) -> Result<(), RegistryError> {
        let mut map = self.write();
        map.insert(e.ip, e);
        self.save(&map)
    }

    /// Forgets the endpoint of `ip` if `key` holds it; returns it. Another attachment's
    /// endpoint at the same address (a pod re-created since) is left alone.
    pub fn remove(
        &self,
        ip: Ipv4Addr,
        key: &AttachmentKey,
    ) -> Result<Option<Endpoint>, RegistryError> {
        let mut map = self.write();
        if map.get(&ip).is_none_or(|e| e.key != *key) {
            return Ok(None);
        }
        let e = map.remove(&ip);
        if e.as_ref().is_some_and(|e| e.wiring.is_some()) {
            self.save(&map)?;
        }
        Ok(e)
    }

    /// Keeps only the endpoints `keep` says yes to; returns those dropped.
    pub fn retain(
        &self,
        mut keep: impl FnMut(&Endpoint) -> bool,
    ) -> Result<Vec<Endpoint>, RegistryError> {
        let mut map = self.write();
        let gone: Vec<Ipv4Addr> = map.values().filter(|e| !keep(e)).map(|e| e.ip).collect();
        let dropped: Vec<Endpoint> = gone.iter().filter_map(|ip| map.remove(ip)).collect();
        if !dropped.is_empty() {
            self.save(&map)?;
        }
        Ok(dropped)
    }

    /// What the API server says of a pod (labels, named ports) for its endpoints on this
    /// node; in memory, as the watcher fills it again after a restart.
    pub fn set_pod_info(
        &self,
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        named_ports: &[NamedPort],
    ) {
        let mut map = self.write();
        for e in map
            .values_mut()
            .filter(|e| e.pod.namespace == namespace && e.pod.name == name)
        {
            labels.clone_into(&mut e.labels);
            named_ports.clone_into(&mut e.named_ports);
        }
    }

    /// [`Self::set_pod_info`] for the endpoint of `ip`.
    pub fn set_pod_info_of(
        &self,
        ip: Ipv4Addr,
        labels: &BTreeMap<String, String>,
        named_ports: &[NamedPort],
    ) {
        if let Some(e) = self.write().get_mut(&ip) {
            labels.clone_into(&mut e.labels);
            named_ports.clone_into(&mut e.named_ports);
        }
    }

    /// Saves what is there now (after a restart reconciled it).
    pub fn flush(&self) -> Result<(), RegistryError> {
        let map = self.read();
        self.save(&map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: &str) -> AttachmentKey {
        AttachmentKey {
            network: "aws-cni".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn wiring(n: u8) -> Wiring {
        Wiring {
            host_ifname: format!("eni{n}"),
            host_ifindex: u32::from(n),
            host_mac: MacAddr([2, 0, 0, 0, 1, n]),
            pod_mac: MacAddr([2, 0, 0, 0, 2, n]),
        }
    }

    #[test]
    fn wired_endpoints_are_saved_and_only_their_own_key_removes_them() {
        let dir = std::env::temp_dir().join(format!("vpc-ebpf-reg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = registry_path(&dir.join("ipam.json"));
        let r = Registry::new(Vec::new(), path.clone());
        let ip = Ipv4Addr::new(10, 0, 0, 20);
        r.reserve(ip, key("c1"), PodRef::default(), EniRef::default(), vec![]);
        assert!(
            load(&path).unwrap().is_empty(),
            "reservations are not saved"
        );
        assert!(matches!(
            r.wire(ip, &key("other"), wiring(1)),
            Err(RegistryError::NotReserved { .. })
        ));
        r.wire(ip, &key("c1"), wiring(1)).unwrap();
        assert_eq!(load(&path).unwrap(), r.all());
        // A repeated ADD keeps the wiring.
        r.reserve(ip, key("c1"), PodRef::default(), EniRef::default(), vec![]);
        assert_eq!(r.get(ip).unwrap().wiring, Some(wiring(1)));
        // The DEL of an older sandbox of the address does not take the new one's.
        assert_eq!(r.remove(ip, &key("old")).unwrap(), None);
        assert!(r.get(ip).is_some());
        assert_eq!(r.remove(ip, &key("c1")).unwrap().map(|e| e.ip), Some(ip));
        assert!(load(&path).unwrap().is_empty());
        std::fs::write(&path, b"[").unwrap();
        assert!(matches!(load(&path), Err(RegistryError::Corrupt { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
