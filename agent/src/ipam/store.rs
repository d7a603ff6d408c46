//! The node's address datastore: ENIs with their addresses (and /28 prefixes), which pod
//! holds which address, and addresses cooling down after release. Pure and serialisable:
//! the checkpoint is this structure; time is passed in (unix milliseconds) so cooldown
//! survives restarts and tests control the clock.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};
use vpc_ebpf_rpc::types::MacAddr;

use super::{
    EniDesc, EniRef,
    pool::{ENI_MIN_LIFE_MS, EniUsage, Mode, PREFIX_SIZE},
};

/// What identifies an attachment, as the CNI spec keys it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AddrState {
    Free,
    Assigned {
        key: AttachmentKey,
        pod: PodMeta,
        since_ms: u64,
    },
    /// Released by a pod; reusable from `until_ms` on. Kept apart so a new pod never gets
    /// an address that peers may still associate with the old one.
    Cooling {
        until_ms: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eni {
    pub id: String,
    pub device_index: u32,
    pub mac: MacAddr,
    pub primary_ip: Ipv4Addr,
    /// Base addresses of delegated /28 prefixes.
    pub prefixes: Vec<Ipv4Addr>,
    /// Pod-usable addresses: secondary IPs, or every address of every prefix.
    pub addrs: BTreeMap<Ipv4Addr, AddrState>,
    /// The ENI's subnet when it is not the node's (custom networking, subnet discovery):
    /// its gateway is the next hop out of this ENI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_cidr: Option<ipnet::Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// Holds no pod addresses: the primary ENI under custom networking, or an ENI in a
    /// subnet tagged `kubernetes.io/role/cni=0`. Its free addresses go back to EC2.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub excluded: bool,
    /// When this agent attached it (unix ms); `None` for ENIs it found attached, which
    /// are old enough to go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_ms: Option<u64>,
}

impl Eni {
    fn prefix_of(ip: Ipv4Addr) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(ip) & !(PREFIX_SIZE - 1))
    }

    fn prefix_addrs(base: Ipv4Addr) -> impl Iterator<Item = Ipv4Addr> + Clone {
        (0..PREFIX_SIZE).map(move |i| Ipv4Addr::from(u32::from(base) + i))
    }

    /// What the dataplane needs to know of the ENI.
    pub fn desc(&self) -> EniDesc {
        EniDesc {
            id: self.id.clone(),
            device_index: self.device_index,
            mac: self.mac,
            primary_ip: self.primary_ip,
            gateway: self
                .subnet_cidr
                .map(|c| Ipv4Addr::from(u32::from(c.network()) + 1)),
        }
    }

    pub fn reference(&self) -> EniRef {
        EniRef {
            id: self.id.clone(),
            device_index: self.device_index,
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("no free address: {cooling} cooling down, {total} held in all")]
    NoFreeAddress { cooling: u32, total: u32 },
    #[error("ENI {0} is not in the datastore")]
    UnknownEni(String),
    #[error("address {ip} is already held by ENI {eni}")]
    Duplicate { ip: Ipv4Addr, eni: String },
    #[error("{what} on ENI {eni} is in use or cooling down")]
    InUse { what: String, eni: String },
    #[error("{0} is not an aligned /28 prefix base")]
    Unaligned(Ipv4Addr),
}

/// The result of assigning an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assigned {
    pub ip: Ipv4Addr,
    pub eni_id: String,
    pub device_index: u32,
    /// The key already had this address (a repeated ADD).
    pub existing: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    pub mode: Mode,
    pub cooldown_ms: u64,
    enis: BTreeMap<String, Eni>,
    #[serde(skip)]
    by_key: HashMap<AttachmentKey, Ipv4Addr>,
}

impl Store {
    pub fn new(mode: Mode, cooldown_ms: u64) -> Self {
        Self {
            mode,
            cooldown_ms,
            enis: BTreeMap::new(),
            by_key: HashMap::new(),
        }
    }

    /// Rebuilds indexes after deserialising.
    pub fn reindex(&mut self) {
        self.by_key = self
            .enis
            .values()
            .flat_map(|e| e.addrs.iter())
            .filter_map(|(ip, s)| match s {
                AddrState::Assigned { key, .. } => Some((key.clone(), *ip)),
                _ => None,
            })
            .collect();
    }

    pub fn enis(&self) -> impl Iterator<Item = &Eni> {
        self.enis.values()
    }

    pub fn eni(&self, id: &str) -> Option<&Eni> {
        self.enis.get(id)
    }

    fn owner(&self, ip: Ipv4Addr) -> Option<&str> {
        self.enis
            .values()
            .find(|e| e.primary_ip == ip || e.addrs.contains_key(&ip))
            .map(|e| e.id.as_str())
    }

    pub fn upsert_eni(&mut self, id: &str, device_index: u32, mac: MacAddr, primary_ip: Ipv4Addr) {
        let e = self.enis.entry(id.to_owned()).or_insert_with(|| Eni {
            id: id.to_owned(),
            device_index,
            mac,
            primary_ip,
            prefixes: Vec::new(),
            addrs: BTreeMap::new(),
            subnet_cidr: None,
            subnet_id: None,
            excluded: false,
            attached_ms: None,
        });
        e.device_index = device_index;
        e.mac = mac;
    }

    /// Records that the agent attached `eni` at `now_ms` (it is kept a minute at least).
    pub fn mark_attached(&mut self, eni: &str, now_ms: u64) {
        if let Some(e) = self.enis.get_mut(eni) {
            e.attached_ms = Some(now_ms);
        }
    }

    /// Records an ENI's subnet (`None`: the node's) and whether it may hold pod
    /// addresses. Returns whether anything changed.
    pub fn set_placement(
        &mut self,
        eni: &str,
        subnet: Option<(String, ipnet::Ipv4Net)>,
        excluded: bool,
    ) -> bool {
        let Some(e) = self.enis.get_mut(eni) else {
            return false;
        };
        let (id, cidr) = subnet.unzip();
        let changed = e.subnet_cidr != cidr || e.subnet_id != id || e.excluded != excluded;
        e.subnet_cidr = cidr;
        e.subnet_id = id;
        e.excluded = excluded;
        changed
    }

    /// Adds secondary addresses to an ENI; ones it already has are left as they are.
    pub fn add_ips(&mut self, eni: &str, ips: &[Ipv4Addr]) -> Result<(), StoreError> {
        for ip in ips {
            if let Some(owner) = self.owner(*ip)
                && owner != eni
            {
                return Err(StoreError::Duplicate {
                    ip: *ip,
                    eni: owner.to_owned(),
                });
            }
        }
        let e = self
            .enis
            .get_mut(eni)
            .ok_or_else(|| StoreError::UnknownEni(eni.into()))?;
        for ip in ips {
            e.addrs.entry(*ip).or_insert(AddrState::Free);
        }
        Ok(())
    }

    pub fn add_prefix(&mut self, eni: &str, base: Ipv4Addr) -> Result<(), StoreError> {
        if Eni::prefix_of(base) != base {
            return Err(StoreError::Unaligned(base));
        }
        if let Some(owner) = Eni::prefix_addrs(base).find_map(|ip| self.owner(ip))
            && owner != eni
        {
            return Err(StoreError::Duplicate {
                ip: base,
                eni: owner.to_owned(),
            });
        }
        let e = self
            .enis
            .get_mut(eni)
            .ok_or_else(|| StoreError::UnknownEni(eni.into()))?;
        if !e.prefixes.contains(&base) {
            e.prefixes.push(base);
            e.prefixes.sort();
            for ip in Eni::prefix_addrs(base) {
                e.addrs.entry(ip).or_insert(AddrState::Free);
            }
        }
        Ok(())
    }

    fn reusable(state: &AddrState, now_ms: u64) -> bool {
        match state {
            AddrState::Free => true,
            AddrState::Cooling { until_ms } => *until_ms <= now_ms,
            AddrState::Assigned { .. } => false,
        }
    }

    pub fn remove_ip(&mut self, eni: &str, ip: Ipv4Addr, now_ms: u64) -> Result<(), StoreError> {
        let e = self
            .enis
            .get_mut(eni)
            .ok_or_else(|| StoreError::UnknownEni(eni.into()))?;
        match e.addrs.get(&ip) {
            None => Ok(()),
            Some(s) if Self::reusable(s, now_ms) => {
                e.addrs.remove(&ip);
                Ok(())
            }
            Some(_) => Err(StoreError::InUse {
                what: ip.to_string(),
                eni: eni.into(),
            }),
        }
    }

    pub fn remove_prefix(
        &mut self,
        eni: &str,
        base: Ipv4Addr,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let e = self
            .enis
            .get_mut(eni)
            .ok_or_else(|| StoreError::UnknownEni(eni.into()))?;
        if !Eni::prefix_addrs(base)
            .all(|ip| e.addrs.get(&ip).is_none_or(|s| Self::reusable(s, now_ms)))
        {
            return Err(StoreError::InUse {
                what: format!("{base}/28"),
                eni: eni.into(),
            });
        }
        for ip in Eni::prefix_addrs(base) {
            e.addrs.remove(&ip);
        }
        e.prefixes.retain(|p| *p != base);
        Ok(())
    }

    pub fn remove_eni(&mut self, eni: &str, now_ms: u64) -> Result<(), StoreError> {
        let Some(e) = self.enis.get(eni) else {
            return Ok(());
        };
        if !e.addrs.values().all(|s| Self::reusable(s, now_ms)) {
            return Err(StoreError::InUse {
                what: "an address".into(),
                eni: eni.into(),
            });
        }
        self.enis.remove(eni);
        Ok(())
    }

    /// Marks a specific address as held by `key`, for addresses found in use on the host
    /// (a pod veth routes to it) that the checkpoint did not know. Cooling or free
    /// addresses can be claimed; one held by another attachment cannot.
    pub fn claim(
        &mut self,
        ip: Ipv4Addr,
        key: &AttachmentKey,
        pod: &PodMeta,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let eni = self
            .owner(ip)
            .ok_or_else(|| StoreError::UnknownEni(format!("(none holds {ip})")))?
            .to_owned();
        let e = self
            .enis
            .get_mut(&eni)
            .ok_or_else(|| StoreError::UnknownEni(eni.clone()))?;
        if e.primary_ip == ip {
            return Err(StoreError::InUse {
                what: format!("{ip} (the ENI's primary address)"),
                eni,
            });
        }
        if let Some(AddrState::Assigned { key: k, .. }) = e.addrs.get(&ip) {
            if k == key {
                return Ok(());
            }
            return Err(StoreError::InUse {
                what: ip.to_string(),
                eni,
            });
        }
        e.addrs.insert(
            ip,
            AddrState::Assigned {
                key: key.clone(),
                pod: pod.clone(),
                since_ms: now_ms,
            },
        );
        self.by_key.insert(key.clone(), ip);
        Ok(())
    }

    /// Drops an address whatever its state, because EC2 no longer has it; returns the
    /// attachment that held it, which has lost its address.
    pub fn forget_ip(&mut self, eni: &str, ip: Ipv4Addr) -> Option<AttachmentKey> {
        let e = self.enis.get_mut(eni)?;
        match e.addrs.remove(&ip)? {
            AddrState::Assigned { key, .. } => {
                self.by_key.remove(&key);
                Some(key)
            }
            _ => None,
        }
    }

    /// Drops a prefix and its addresses whatever their state; returns the attachments that
    /// lost their address.
    pub fn forget_prefix(&mut self, eni: &str, base: Ipv4Addr) -> Vec<(AttachmentKey, Ipv4Addr)> {
        let lost = Eni::prefix_addrs(base)
            .filter_map(|ip| self.forget_ip(eni, ip).map(|k| (k, ip)))
            .collect();
        if let Some(e) = self.enis.get_mut(eni) {
            e.prefixes.retain(|p| *p != base);
        }
        lost
    }

    /// Drops an ENI whatever its addresses' states; returns the attachments that lost
    /// their address.
    pub fn forget_eni(&mut self, eni: &str) -> Vec<(AttachmentKey, Ipv4Addr)> {
        let Some(e) = self.enis.remove(eni) else {
            return Vec::new();
        };
        let mut lost = Vec::new();
        for (ip, s) in e.addrs {
            if let AddrState::Assigned { key, .. } = s {
                self.by_key.remove(&key);
                lost.push((key, ip));
            }
        }
        lost
    }

    /// Gives `key` an address; a key that has one gets the same one again.
    pub fn assign(
        &mut self,
        key: &AttachmentKey,
        pod: &PodMeta,
        now_ms: u64,
    ) -> Result<Assigned, StoreError> {
        if let Some(ip) = self.by_key.get(key).copied() {
            if let Some(e) = self.enis.values().find(|e| e.addrs.contains_key(&ip)) {
                return Ok(Assigned {
                    ip,
                    eni_id: e.id.clone(),
                    device_index: e.device_index,
                    existing: true,
                });
            }
            // Its address left the store (the ENI went away): the key gets a new one.
            self.by_key.remove(key);
        }
        let Some((eni_id, ip)) = self.pick(now_ms) else {
            let (total, cooling) =
                self.enis
                    .values()
                    .flat_map(|e| e.addrs.values())
                    .fold((0, 0), |(t, c), s| {
                        (
                            t + 1,
                            c + u32::from(
                                matches!(s, AddrState::Cooling { until_ms } if *until_ms > now_ms),
                            ),
                        )
                    });
            return Err(StoreError::NoFreeAddress { cooling, total });
        };
        let e = self
            .enis
            .get_mut(&eni_id)
            .ok_or_else(|| StoreError::UnknownEni(eni_id.clone()))?;
        e.addrs.insert(
            ip,
            AddrState::Assigned {
                key: key.clone(),
                pod: pod.clone(),
                since_ms: now_ms,
            },
        );
        self.by_key.insert(key.clone(), ip);
        Ok(Assigned {
            ip,
            eni_id,
            device_index: e.device_index,
            existing: false,
        })
    }

    /// Lowest device index first. In prefix mode, prefixes already in use are filled before
    /// wholly free ones, so free prefixes stay whole and releasable.
    fn pick(&self, now_ms: u64) -> Option<(String, Ipv4Addr)> {
        let mut enis: Vec<&Eni> = self.enis.values().filter(|e| !e.excluded).collect();
        enis.sort_by_key(|e| e.device_index);
        let free = |e: &Eni, ip: &Ipv4Addr| Self::reusable(&e.addrs[ip], now_ms);
        if self.mode == Mode::Prefix {
            for e in &enis {
                for base in &e.prefixes {
                    let mut addrs = Eni::prefix_addrs(*base);
                    let busy = addrs.clone().any(|ip| !free(e, &ip));
                    if busy && let Some(ip) = addrs.find(|ip| free(e, ip)) {
                        return Some((e.id.clone(), ip));
                    }
                }
            }
        }
        enis.iter().find_map(|e| {
            e.addrs
                .keys()
                .find(|ip| free(e, ip))
                .map(|ip| (e.id.clone(), *ip))
        })
    }

    /// Frees `key`'s address into cooldown. Unknown keys are not an error (DEL is
    /// idempotent); returns the address released, if any.
    pub fn release(&mut self, key: &AttachmentKey, now_ms: u64) -> Option<Ipv4Addr> {
        let ip = self.by_key.remove(key)?;
        let until_ms = now_ms + self.cooldown_ms;
        for e in self.enis.values_mut() {
            if let Some(s) = e.addrs.get_mut(&ip) {
                *s = AddrState::Cooling { until_ms };
            }
        }
        Some(ip)
    }

    /// When `key` got its current address.
    pub fn assigned_since(&self, key: &AttachmentKey) -> Option<u64> {
        let ip = self.by_key.get(key)?;
        self.enis.values().find_map(|e| match e.addrs.get(ip) {
            Some(AddrState::Assigned { since_ms, .. }) => Some(*since_ms),
            _ => None,
        })
    }

    pub fn lookup(&self, key: &AttachmentKey) -> Option<Ipv4Addr> {
        self.by_key.get(key).copied()
    }

    /// The ENI that holds `ip` (as a pod address).
    pub fn eni_of(&self, ip: Ipv4Addr) -> Option<&Eni> {
        self.enis.values().find(|e| e.addrs.contains_key(&ip))
    }

    /// Who holds `ip`, if it is assigned.
    pub fn holder(&self, ip: Ipv4Addr) -> Option<(&AttachmentKey, &PodMeta, u64)> {
        match self.eni_of(ip)?.addrs.get(&ip)? {
            AddrState::Assigned { key, pod, since_ms } => Some((key, pod, *since_ms)),
            _ => None,
        }
    }

    /// Moves the assignment of `ip` from `from` to `to` (an address held under a
    /// placeholder key, taken over by the attachment the runtime knows). False when `ip`
    /// is not held by `from` or `to` already holds another address.
    pub fn rekey(&mut self, ip: Ipv4Addr, from: &AttachmentKey, to: &AttachmentKey) -> bool {
        if self.by_key.get(from) != Some(&ip) || self.by_key.contains_key(to) {
            return false;
        }
        let Some(e) = self.enis.values_mut().find(|e| e.addrs.contains_key(&ip)) else {
            return false;
        };
        if let Some(AddrState::Assigned { key, .. }) = e.addrs.get_mut(&ip) {
            key.clone_from(to);
        }
        self.by_key.remove(from);
        self.by_key.insert(to.clone(), ip);
        true
    }

    pub fn assignments(&self) -> impl Iterator<Item = (&AttachmentKey, &PodMeta, Ipv4Addr, &Eni)> {
        self.enis.values().flat_map(|e| {
            e.addrs.iter().filter_map(move |(ip, s)| match s {
                AddrState::Assigned { key, pod, .. } => Some((key, pod, *ip, e)),
                _ => None,
            })
        })
    }

    /// What the pool planner needs to know.
    pub fn usage(&self, now_ms: u64) -> Vec<EniUsage> {
        self.enis
            .values()
            .map(|e| {
                let busy = |ip: &Ipv4Addr| !Self::reusable(&e.addrs[ip], now_ms);
                let assigned = e
                    .addrs
                    .values()
                    .filter(|s| matches!(s, AddrState::Assigned { .. }))
                    .count();
                let cooling = e
                    .addrs
                    .iter()
                    .filter(|(ip, s)| matches!(s, AddrState::Cooling { .. }) && busy(ip))
                    .count();
                let (units, busy_units) = match self.mode {
                    Mode::SecondaryIp => (e.addrs.len(), assigned + cooling),
                    Mode::Prefix => (
                        e.prefixes.len(),
                        e.prefixes
                            .iter()
                            .filter(|b| Eni::prefix_addrs(**b).any(|ip| busy(&ip)))
                            .count(),
                    ),
                };
                let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
                EniUsage {
                    device_index: e.device_index,
                    units: n(units),
                    busy_units: n(busy_units),
                    assigned: n(assigned),
                    cooling: n(cooling),
                    excluded: e.excluded,
                    subnet_full: false,
                    young: e
                        .attached_ms
                        .is_some_and(|t| now_ms < t.saturating_add(ENI_MIN_LIFE_MS)),
                }
            })
            .collect()
    }

    /// Excluded ENIs first (their addresses serve no pod), then from the highest down.
    fn release_order(&self) -> Vec<&Eni> {
        let mut enis: Vec<&Eni> = self.enis.values().collect();
        enis.sort_by_key(|e| (!e.excluded, std::cmp::Reverse(e.device_index)));
        enis
    }

    fn serves_no_pod(e: &Eni) -> bool {
        !e.addrs
            .values()
            .any(|s| matches!(s, AddrState::Assigned { .. }))
    }

    fn still_cooling(state: &AddrState, now_ms: u64) -> bool {
        matches!(state, AddrState::Cooling { until_ms } if *until_ms > now_ms)
    }

    /// Up to `n` free secondary addresses to give back, from the highest ENI down so the
    /// primary ENI stays full and secondary ENIs empty out.
    ///
    /// Stops below an ENI that serves no pod and whose addresses are still cooling: it
    /// empties in a moment, and taking a lower ENI's addresses instead would reach the
    /// target with a secondary ENI kept for a few addresses, which nothing empties
    /// later. An ENI still serving pods cannot empty, so it holds nothing up.
    pub fn releasable_ips(&self, n: u32, now_ms: u64) -> Vec<(String, Ipv4Addr)> {
        let mut out = Vec::new();
        for e in self.release_order() {
            let emptying = Self::serves_no_pod(e);
            let mut cooling = false;
            for (ip, state) in e.addrs.iter().rev() {
                if out.len() == n as usize {
                    return out;
                }
                if Self::reusable(state, now_ms) {
                    out.push((e.id.clone(), *ip));
                }
                cooling |= Self::still_cooling(state, now_ms);
            }
            if cooling && emptying {
                break;
            }
        }
        out
    }

    /// Up to `n` wholly free prefixes, highest ENI first, stopping below an ENI that
    /// serves no pod and has a prefix only waiting for its cooldown (as for addresses).
    pub fn releasable_prefixes(&self, n: u32, now_ms: u64) -> Vec<(String, Ipv4Addr)> {
        let mut out = Vec::new();
        for e in self.release_order() {
            let emptying = Self::serves_no_pod(e);
            let mut cooling = false;
            for base in e.prefixes.iter().rev() {
                if out.len() == n as usize {
                    return out;
                }
                let states: Vec<&AddrState> =
                    Eni::prefix_addrs(*base).map(|ip| &e.addrs[&ip]).collect();
                if states.iter().all(|s| Self::reusable(s, now_ms)) {
                    out.push((e.id.clone(), *base));
                } else if states
                    .iter()
                    .all(|s| Self::reusable(s, now_ms) || Self::still_cooling(s, now_ms))
                {
                    cooling = true;
                }
            }
            if cooling && emptying {
                break;
            }
        }
        out
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

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    fn store() -> Store {
        let mut s = Store::new(Mode::SecondaryIp, 30_000);
        s.upsert_eni("eni-0", 0, mac(1), ip("10.0.0.10"));
        s.add_ips("eni-0", &[ip("10.0.0.20"), ip("10.0.0.21")])
            .unwrap();
        s
    }

    #[test]
    fn repeated_add_returns_the_same_address_and_del_is_idempotent() {
        let mut s = store();
        let a = s.assign(&key("c1"), &PodMeta::default(), 0).unwrap();
        let again = s.assign(&key("c1"), &PodMeta::default(), 5).unwrap();
        assert_eq!((a.ip, again.existing), (again.ip, true));
        assert_eq!(s.release(&key("c1"), 10), Some(a.ip));
        assert_eq!(s.release(&key("c1"), 10), None);
        assert_eq!(s.release(&key("never"), 10), None);
    }

    #[test]
    fn released_addresses_cool_down_before_reuse() {
        let mut s = store();
        let a = s.assign(&key("c1"), &PodMeta::default(), 0).unwrap();
        let b = s.assign(&key("c2"), &PodMeta::default(), 0).unwrap();
        assert_ne!(a.ip, b.ip);
        s.release(&key("c1"), 1_000);
        let err = s
            .assign(&key("c3"), &PodMeta::default(), 1_001)
            .unwrap_err();
        assert_eq!(
            err,
            StoreError::NoFreeAddress {
                cooling: 1,
                total: 2
            }
        );
        assert!(
            s.remove_ip("eni-0", a.ip, 1_001).is_err(),
            "cooling address removed"
        );
        let c = s.assign(&key("c3"), &PodMeta::default(), 31_000).unwrap();
        assert_eq!(c.ip, a.ip);
    }

    #[test]
    fn an_address_is_never_held_twice() {
        let mut s = store();
        s.upsert_eni("eni-1", 1, mac(2), ip("10.0.0.30"));
        assert!(matches!(
            s.add_ips("eni-1", &[ip("10.0.0.20")]),
            Err(StoreError::Duplicate { .. })
        ));
        assert!(matches!(
            s.add_ips("eni-1", &[ip("10.0.0.10")]),
            Err(StoreError::Duplicate { .. })
        ));
        let mut seen = std::collections::HashSet::new();
        for i in 0..2 {
            assert!(
                seen.insert(
                    s.assign(&key(&format!("c{i}")), &PodMeta::default(), 0)
                        .unwrap()
                        .ip
                )
            );
        }
    }

    #[test]
    fn in_use_enis_and_addresses_are_not_removed() {
        let mut s = store();
        s.assign(&key("c1"), &PodMeta::default(), 0).unwrap();
        assert!(s.remove_eni("eni-0", 0).is_err());
        assert_eq!(s.releasable_ips(5, 0).len(), 1);
        s.release(&key("c1"), 0);
        assert!(s.remove_eni("eni-0", 0).is_err(), "cooling");
        assert!(s.remove_eni("eni-0", 30_000).is_ok());
    }

    #[test]
    fn release_waits_for_a_higher_enis_cooling_addresses() {
        // Pods on the secondary ENI went last: their addresses cool while the primary's
        // are free. Releasing the primary's would strand the secondary ENI.
        let mut s = store();
        s.upsert_eni("eni-1", 1, mac(2), ip("10.0.1.10"));
        s.add_ips("eni-1", &[ip("10.0.1.20"), ip("10.0.1.21")])
            .unwrap();
        let mut on_eni1 = Vec::new();
        for i in 0..4 {
            let a = s
                .assign(&key(&format!("c{i}")), &PodMeta::default(), 0)
                .unwrap();
            if a.eni_id == "eni-1" {
                on_eni1.push(i);
            }
        }
        assert_eq!(on_eni1, [2, 3], "the primary fills first");
        for i in 0..4 {
            s.release(&key(&format!("c{i}")), if i < 2 { 0 } else { 20_000 });
        }
        let got = |s: &Store, now| -> Vec<String> {
            s.releasable_ips(3, now)
                .into_iter()
                .map(|(e, a)| format!("{e}/{a}"))
                .collect()
        };
        assert!(got(&s, 40_000).is_empty(), "{:?}", got(&s, 40_000));
        assert_eq!(
            got(&s, 50_000),
            ["eni-1/10.0.1.21", "eni-1/10.0.1.20", "eni-0/10.0.0.21"]
        );
        // Pods on both ENIs again; the secondary keeps one and cools another. It cannot
        // empty, so it holds nothing up: the primary's free address goes.
        for c in ["c9", "c8", "c7", "c6"] {
            s.assign(&key(c), &PodMeta::default(), 50_000).unwrap();
        }
        s.release(&key("c9"), 0);
        s.release(&key("c6"), 50_000);
        assert_eq!(got(&s, 60_000), ["eni-0/10.0.0.20"]);
    }

    #[test]
    fn usage_feeds_the_planner() {
        let mut s = store();
        s.assign(&key("c1"), &PodMeta::default(), 0).unwrap();
        s.assign(&key("c2"), &PodMeta::default(), 0).unwrap();
        s.release(&key("c2"), 0);
        let u = s.usage(1);
        assert_eq!(
            (u[0].units, u[0].assigned, u[0].cooling, u[0].busy_units),
            (2, 1, 1, 2)
        );
        assert_eq!(s.usage(30_000)[0].cooling, 0);
    }

    #[test]
    fn prefix_mode_fills_used_prefixes_first_and_releases_whole_ones() {
        let mut s = Store::new(Mode::Prefix, 30_000);
        s.upsert_eni("eni-0", 0, mac(1), ip("10.0.0.10"));
        assert_eq!(
            s.add_prefix("eni-0", ip("10.0.1.17")),
            Err(StoreError::Unaligned(ip("10.0.1.17")))
        );
        s.add_prefix("eni-0", ip("10.0.1.16")).unwrap();
        s.add_prefix("eni-0", ip("10.0.1.32")).unwrap();
        let first = s.assign(&key("c0"), &PodMeta::default(), 0).unwrap().ip;
        for i in 1..16 {
            let got = s
                .assign(&key(&format!("c{i}")), &PodMeta::default(), 0)
                .unwrap()
                .ip;
            assert_eq!(
                Eni::prefix_of(got),
                Eni::prefix_of(first),
                "spilled into a free prefix"
            );
        }
        let u = s.usage(0);
        assert_eq!((u[0].units, u[0].busy_units, u[0].assigned), (2, 1, 16));
        assert_eq!(
            s.releasable_prefixes(5, 0),
            vec![("eni-0".into(), ip("10.0.1.32"))]
        );
        assert!(s.remove_prefix("eni-0", Eni::prefix_of(first), 0).is_err());
    }

    #[test]
    fn rekey_moves_an_assignment_to_the_runtimes_key() {
        let mut s = store();
        let a = s
            .assign(&key("placeholder"), &PodMeta::default(), 0)
            .unwrap();
        s.assign(&key("other"), &PodMeta::default(), 0).unwrap();
        assert!(!s.rekey(a.ip, &key("nobody"), &key("c1")));
        assert!(
            !s.rekey(a.ip, &key("placeholder"), &key("other")),
            "other has one"
        );
        assert!(s.rekey(a.ip, &key("placeholder"), &key("c1")));
        assert_eq!(s.lookup(&key("c1")), Some(a.ip));
        assert_eq!(s.lookup(&key("placeholder")), None);
        assert_eq!(s.holder(a.ip).map(|(k, ..)| k.clone()), Some(key("c1")));
        let mut back: Store = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        back.reindex();
        assert_eq!(back.lookup(&key("c1")), Some(a.ip));
    }

    #[test]
    fn survives_serialisation() {
        let mut s = store();
        s.assign(
            &key("c1"),
            &PodMeta {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
            },
            7,
        )
        .unwrap();
        let json = serde_json::to_string(&s).unwrap();
        let mut back: Store = serde_json::from_str(&json).unwrap();
        back.reindex();
        assert_eq!(back, s);
        assert_eq!(back.lookup(&key("c1")), s.lookup(&key("c1")));
    }
}
