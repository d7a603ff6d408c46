//! Reconciling the datastore with what EC2 says the instance holds. Pure: the caller
//! fetches EC2's view; this decides what the store keeps.
//!
//! EC2 is the truth for which ENIs, addresses and prefixes exist; the store (restored
//! from the checkpoint) is the truth for who holds which address. So addresses EC2 has
//! and the store lacks come in as free, addresses the store has and EC2 lacks go away,
//! and an assignment survives exactly when its address still exists in EC2.

use std::{collections::BTreeSet, net::Ipv4Addr};

use super::{
    pool::Mode,
    store::{AttachmentKey, Store},
};

/// One attached ENI as EC2 describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniView {
    pub id: String,
    pub device_index: u32,
    pub mac: String,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Addr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub enis_added: Vec<String>,
    pub enis_removed: Vec<String>,
    pub addrs_added: u32,
    pub addrs_removed: u32,
    /// Attachments whose address EC2 no longer has: their pods need a new sandbox.
    pub lost: Vec<(AttachmentKey, Ipv4Addr)>,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        !(self.enis_added.is_empty()
            && self.enis_removed.is_empty()
            && self.addrs_added == 0
            && self.addrs_removed == 0
            && self.lost.is_empty())
    }
}

pub fn merge(store: &mut Store, ec2: &[EniView]) -> SyncReport {
    let mut r = SyncReport::default();
    let known: BTreeSet<String> = store.enis().map(|e| e.id.clone()).collect();
    let seen: BTreeSet<&str> = ec2.iter().map(|e| e.id.as_str()).collect();
    for id in known.iter().filter(|id| !seen.contains(id.as_str())) {
        r.lost.extend(store.forget_eni(id));
        r.enis_removed.push(id.clone());
    }
    for v in ec2 {
        if !known.contains(&v.id) {
            r.enis_added.push(v.id.clone());
        }
        store.upsert_eni(&v.id, v.device_index, &v.mac, v.primary_ip);
        merge_eni(store, v, &mut r);
    }
    r
}

fn merge_eni(store: &mut Store, v: &EniView, r: &mut SyncReport) {
    let Some(have) = store.eni(&v.id).cloned() else {
        return;
    };
    let ec2_ips: BTreeSet<Ipv4Addr> = v.secondary_ips.iter().copied().collect();
    let ec2_prefixes: BTreeSet<Ipv4Addr> = v.prefixes.iter().copied().collect();

    for base in have.prefixes.iter().filter(|b| !ec2_prefixes.contains(b)) {
        let lost = store.forget_prefix(&v.id, *base);
        r.addrs_removed += 16;
        r.lost.extend(lost);
    }
    // Look again: the prefixes just dropped took their addresses with them.
    let Some(have) = store.eni(&v.id).cloned() else {
        return;
    };
    let in_prefix = |ip: &Ipv4Addr| {
        ec2_prefixes.contains(&Ipv4Addr::from(u32::from(*ip) & !15))
            && have
                .prefixes
                .contains(&Ipv4Addr::from(u32::from(*ip) & !15))
    };
    for ip in have.addrs.keys() {
        if !ec2_ips.contains(ip) && !in_prefix(ip) {
            if let Some(k) = store.forget_ip(&v.id, *ip) {
                r.lost.push((k, *ip));
            }
            r.addrs_removed += 1;
        }
    }
    // Only the mode's kind of unit enters the pool; the other kind is kept where a pod
    // still holds one of its addresses (a node whose mode was switched).
    match store.mode {
        Mode::SecondaryIp => {
            let new: Vec<Ipv4Addr> = ec2_ips
                .iter()
                .filter(|ip| !have.addrs.contains_key(ip))
                .copied()
                .collect();
            r.addrs_added += u32::try_from(new.len()).unwrap_or(u32::MAX);
            // An address EC2 put on this ENI cannot be on another one of ours.
            let _ = store.add_ips(&v.id, &new);
        }
        Mode::Prefix => {
            for base in ec2_prefixes.iter().filter(|b| !have.prefixes.contains(b)) {
                if store.add_prefix(&v.id, *base).is_ok() {
                    r.addrs_added += 16;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::store::PodMeta;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn key(c: &str) -> AttachmentKey {
        AttachmentKey {
            network: "aws-cni".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn view(id: &str, dev: u32, primary: &str, ips: &[&str], prefixes: &[&str]) -> EniView {
        EniView {
            id: id.into(),
            device_index: dev,
            mac: format!("02:00:00:00:00:0{dev}"),
            primary_ip: ip(primary),
            secondary_ips: ips.iter().map(|s| ip(s)).collect(),
            prefixes: prefixes.iter().map(|s| ip(s)).collect(),
        }
    }

    #[test]
    fn fresh_store_takes_everything_ec2_has() {
        let mut s = Store::new(Mode::SecondaryIp, 30_000);
        let r = merge(
            &mut s,
            &[
                view("eni-a", 0, "10.0.0.11", &["10.0.0.20", "10.0.0.21"], &[]),
                view("eni-b", 1, "10.0.0.40", &["10.0.0.41"], &[]),
            ],
        );
        assert_eq!(r.enis_added, ["eni-a", "eni-b"]);
        assert_eq!(r.addrs_added, 3);
        assert!(r.lost.is_empty());
        assert_eq!(s.eni("eni-a").unwrap().addrs.len(), 2);
    }

    #[test]
    fn assignments_survive_when_ec2_still_has_the_address() {
        let mut s = Store::new(Mode::SecondaryIp, 30_000);
        merge(
            &mut s,
            &[view(
                "eni-a",
                0,
                "10.0.0.11",
                &["10.0.0.20", "10.0.0.21", "10.0.0.22"],
                &[],
            )],
        );
        let a = s.assign(&key("p1"), &PodMeta::default(), 0).unwrap();
        let b = s.assign(&key("p2"), &PodMeta::default(), 0).unwrap();
        // EC2 lost p2's address (unassigned behind our back) and gained one.
        let ec2_ips: Vec<String> = ["10.0.0.20", "10.0.0.21", "10.0.0.22", "10.0.0.23"]
            .iter()
            .filter(|s| **s != b.ip.to_string())
            .map(|s| (*s).to_owned())
            .collect();
        let refs: Vec<&str> = ec2_ips.iter().map(String::as_str).collect();
        let r = merge(&mut s, &[view("eni-a", 0, "10.0.0.11", &refs, &[])]);
        assert_eq!(r.lost, vec![(key("p2"), b.ip)]);
        assert_eq!(r.addrs_added, 1);
        assert_eq!(r.addrs_removed, 1);
        assert_eq!(s.lookup(&key("p1")), Some(a.ip));
        assert_eq!(s.lookup(&key("p2")), None);
        // A repeated merge of the same view changes nothing.
        let again = merge(&mut s, &[view("eni-a", 0, "10.0.0.11", &refs, &[])]);
        assert!(!again.changed(), "{again:?}");
    }

    #[test]
    fn an_eni_gone_from_ec2_takes_its_assignments() {
        let mut s = Store::new(Mode::SecondaryIp, 30_000);
        merge(
            &mut s,
            &[
                view("eni-a", 0, "10.0.0.11", &[], &[]),
                view("eni-b", 1, "10.0.0.40", &["10.0.0.41"], &[]),
            ],
        );
        s.assign(&key("p1"), &PodMeta::default(), 0).unwrap();
        let r = merge(&mut s, &[view("eni-a", 0, "10.0.0.11", &[], &[])]);
        assert_eq!(r.enis_removed, ["eni-b"]);
        assert_eq!(r.lost, vec![(key("p1"), ip("10.0.0.41"))]);
        assert!(s.eni("eni-b").is_none());
    }

    #[test]
    fn prefix_mode_counts_prefixes_and_ignores_stray_secondaries() {
        let mut s = Store::new(Mode::Prefix, 30_000);
        let r = merge(
            &mut s,
            &[view(
                "eni-a",
                0,
                "10.0.0.11",
                &["10.0.0.5"],
                &["10.0.1.0", "10.0.1.16"],
            )],
        );
        assert_eq!(r.addrs_added, 32);
        assert_eq!(s.eni("eni-a").unwrap().prefixes.len(), 2);
        assert!(!s.eni("eni-a").unwrap().addrs.contains_key(&ip("10.0.0.5")));
        let a = s.assign(&key("p1"), &PodMeta::default(), 0).unwrap();
        let base = Ipv4Addr::from(u32::from(a.ip) & !15).to_string();
        // EC2 dropped the other prefix: only its addresses go.
        let r = merge(&mut s, &[view("eni-a", 0, "10.0.0.11", &[], &[&base])]);
        assert_eq!(r.addrs_removed, 16);
        assert!(r.lost.is_empty());
        assert_eq!(s.lookup(&key("p1")), Some(a.ip));
    }
}
