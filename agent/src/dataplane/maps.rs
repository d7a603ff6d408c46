//! Typed access to the dataplane's maps.

use std::{collections::HashSet, net::Ipv4Addr};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapError, lpm_trie::Key},
};
use vpc_ebpf_common::{
    maps,
    nat::{HostPortKey, HostPortTarget},
    node::{Endpoint, Eni, NodeConfig},
};

use ipnet::Ipv4Net;
use vpc_ebpf_rpc::types::HostPort;

use super::{DataplaneError, spec::be};

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn data<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, DataplaneError> {
    ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))
}

pub fn set_config(ebpf: &mut Ebpf, cfg: &NodeConfig) -> Result<(), DataplaneError> {
    let mut m: Array<_, NodeConfig> =
        Array::try_from(data(ebpf, maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
    m.set(0, cfg, 0).map_err(map_err(maps::CONFIG))
}

/// Makes the LPM trie `name` hold exactly `cidrs` (host bits are masked off).
pub fn sync_cidrs(
    ebpf: &mut Ebpf,
    name: &'static str,
    cidrs: &[Ipv4Net],
) -> Result<(), DataplaneError> {
    let want_of = |c: &Ipv4Net| (u32::from(c.prefix_len()), be(c.network()));
    let mut want: HashSet<(u32, u32)> = cidrs.iter().map(want_of).collect();
    let mut m: LpmTrie<_, u32, u32> =
        LpmTrie::try_from(data(ebpf, name)?).map_err(map_err(name))?;
    let have: Vec<Key<u32>> = m.keys().collect::<Result<_, _>>().map_err(map_err(name))?;
    for k in have {
        if !want.remove(&(k.prefix_len(), k.data())) {
            m.remove(&k).map_err(map_err(name))?;
        }
    }
    for (len, addr) in want {
        m.insert(&Key::new(len, addr), 1, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

macro_rules! hash_map {
    ($ebpf:expr, $name:expr, $k:ty, $v:ty) => {
        HashMap::<_, $k, $v>::try_from(data($ebpf, $name)?).map_err(map_err($name))
    };
}

pub fn put_endpoint(ebpf: &mut Ebpf, ip: Ipv4Addr, ep: &Endpoint) -> Result<(), DataplaneError> {
    let mut m = hash_map!(ebpf, maps::ENDPOINTS, u32, Endpoint)?;
    m.insert(be(ip), ep, 0).map_err(map_err(maps::ENDPOINTS))
}

pub fn endpoint(ebpf: &mut Ebpf, ip: Ipv4Addr) -> Result<Option<Endpoint>, DataplaneError> {
    let m = hash_map!(ebpf, maps::ENDPOINTS, u32, Endpoint)?;
    absent_is_none(m.get(&be(ip), 0), maps::ENDPOINTS)
}

pub fn endpoints(ebpf: &mut Ebpf) -> Result<Vec<(Ipv4Addr, Endpoint)>, DataplaneError> {
    let m = hash_map!(ebpf, maps::ENDPOINTS, u32, Endpoint)?;
    m.iter()
        .map(|r| r.map(|(k, v)| (super::spec::from_be(k), v)))
        .collect::<Result<_, _>>()
        .map_err(map_err(maps::ENDPOINTS))
}

/// Removes the endpoint; returns what was there.
pub fn remove_endpoint(ebpf: &mut Ebpf, ip: Ipv4Addr) -> Result<Option<Endpoint>, DataplaneError> {
    let old = endpoint(ebpf, ip)?;
    let mut m = hash_map!(ebpf, maps::ENDPOINTS, u32, Endpoint)?;
    absent_is_none(m.remove(&be(ip)), maps::ENDPOINTS)?;
    Ok(old)
}

/// Records the ENI, and its primary address as a node address that leaves by it.
pub fn put_eni(ebpf: &mut Ebpf, ifindex: u32, eni: &Eni) -> Result<(), DataplaneError> {
    let mut m = hash_map!(ebpf, maps::ENIS, u32, Eni)?;
    let old = absent_is_none(m.get(&ifindex, 0), maps::ENIS)?;
    m.insert(ifindex, eni, 0).map_err(map_err(maps::ENIS))?;
    let mut addrs = hash_map!(ebpf, maps::NODE_ADDRESSES, u32, u32)?;
    if let Some(old) = old.filter(|o| o.primary_ip != eni.primary_ip) {
        absent_is_none(addrs.remove(&old.primary_ip), maps::NODE_ADDRESSES)?;
    }
    addrs
        .insert(eni.primary_ip, ifindex, 0)
        .map_err(map_err(maps::NODE_ADDRESSES))
}

pub fn remove_eni(ebpf: &mut Ebpf, ifindex: u32) -> Result<(), DataplaneError> {
    let mut m = hash_map!(ebpf, maps::ENIS, u32, Eni)?;
    let old = absent_is_none(m.get(&ifindex, 0), maps::ENIS)?;
    absent_is_none(m.remove(&ifindex), maps::ENIS)?;
    if let Some(old) = old {
        let mut addrs = hash_map!(ebpf, maps::NODE_ADDRESSES, u32, u32)?;
        if absent_is_none(addrs.get(&old.primary_ip, 0), maps::NODE_ADDRESSES)? == Some(ifindex) {
            absent_is_none(addrs.remove(&old.primary_ip), maps::NODE_ADDRESSES)?;
        }
    }
    Ok(())
}

/// Makes the hostports of `pod` exactly `ports`, leaving other pods' ports alone.
pub fn sync_hostports(
    ebpf: &mut Ebpf,
    pod: Ipv4Addr,
    ports: &[HostPort],
) -> Result<(), DataplaneError> {
    let mut m = hash_map!(ebpf, maps::HOSTPORTS, HostPortKey, HostPortTarget)?;
    let pod = be(pod);
    let mine: Vec<HostPortKey> = m
        .iter()
        .filter_map(|r| match r {
            Ok((k, v)) if v.pod_ip == pod => Some(Ok(k)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_, _>>()
        .map_err(map_err(maps::HOSTPORTS))?;
    let key =
        |p: &HostPort| HostPortKey::at(p.protocol.ip_proto(), p.host_port, p.host_ip.map_or(0, be));
    let want: Vec<HostPortKey> = ports.iter().map(key).collect();
    for k in mine.iter().filter(|k| !want.contains(k)) {
        absent_is_none(m.remove(k), maps::HOSTPORTS)?;
    }
    for p in ports {
        let target = HostPortTarget {
            pod_ip: pod,
            container_port: p.container_port,
            pad: 0,
        };
        m.insert(key(p), target, 0)
            .map_err(map_err(maps::HOSTPORTS))?;
    }
    Ok(())
}

/// Every hostPort of every pod: ((protocol, host port, address), (pod, container port)).
pub fn hostports(ebpf: &Ebpf) -> Result<Vec<(HostPortKey, HostPortTarget)>, DataplaneError> {
    let map = ebpf
        .map(maps::HOSTPORTS)
        .ok_or(DataplaneError::MissingMap(maps::HOSTPORTS))?;
    let m: HashMap<_, HostPortKey, HostPortTarget> =
        HashMap::try_from(map).map_err(map_err(maps::HOSTPORTS))?;
    m.iter()
        .collect::<Result<_, _>>()
        .map_err(map_err(maps::HOSTPORTS))
}

fn absent_is_none<T>(
    r: Result<T, MapError>,
    name: &'static str,
) -> Result<Option<T>, DataplaneError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(None)
        }
        Err(source) => Err(DataplaneError::Map { name, source }),
    }
}

/// Read-only lookup for `&self` callers; any failure reads as absent.
pub fn endpoint_ro(ebpf: &Ebpf, ip: Ipv4Addr) -> Option<Endpoint> {
    let m: HashMap<_, u32, Endpoint> = HashMap::try_from(ebpf.map(maps::ENDPOINTS)?).ok()?;
    m.get(&be(ip), 0).ok()
}
