//! Merging EC2's view of the instance into the datastore. Pure: the caller fetches EC2's
//! view; this decides what the store keeps.
//!
//! EC2 is the truth for which ENIs, addresses and prefixes exist; the store (restored
//! from the checkpoint) is the truth for who holds which address. So addresses EC2 has
//! and the store lacks come in as free, addresses the store has and EC2 lacks go away,
//! and an assignment survives exactly when its address still exists in EC2.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use tracing::warn;
use vpc_ebpf_rpc::types::MacAddr;

use crate::aws::{ec2::EniInfo, imds::EniMetadata};

use super::{
    pool::Mode,
    store::{AttachmentKey, Store},
};

/// One attached ENI as EC2 describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniView {
    pub id: String,
    pub device_index: u32,
    pub mac: MacAddr,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Addr>,
    pub subnet_id: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    pub enis_added: Vec<String>,
    pub enis_removed: Vec<String>,
    pub addrs_added: u32,
    pub addrs_removed: u32,
    /// Attachments whose address EC2 no longer has: their pods need a new sandbox.
    pub lost: Vec<(AttachmentKey, Ipv4Addr)>,
}

impl MergeReport {
    pub fn changed(&self) -> bool {
        !(self.enis_added.is_empty()
            && self.enis_removed.is_empty()
            && self.addrs_added == 0
            && self.addrs_removed == 0
            && self.lost.is_empty())
    }
}

/// Pod units per ENI id: secondary addresses, or prefix bases in prefix mode. The
/// reconcile compares IMDS's and the datastore's in this form.
pub type Units = BTreeMap<String, BTreeSet<Ipv4Addr>>;

/// What IMDS shows, less the ENIs that are not ours (by device index).
pub fn imds_units(enis: &[EniMetadata], theirs: &BTreeSet<u32>, prefixes: bool) -> Units {
    enis.iter()
        .filter(|e| !theirs.contains(&e.device_index))
        .map(|e| {
            let units = if prefixes {
                e.prefixes
                    .iter()
                    .filter_map(|p| p.split('/').next()?.parse().ok())
                    .collect()
            } else {
                // IMDS lists the primary address first.
                e.ipv4s.iter().skip(1).copied().collect()
            };
            (e.eni_id.clone(), units)
        })
        .collect()
}

/// What the datastore holds, in the form of [`imds_units`].
pub fn store_units(s: &Store, prefixes: bool) -> Units {
    s.enis()
        .map(|e| {
            let units = if prefixes {
                e.prefixes.iter().copied().collect()
            } else {
                e.addrs.keys().copied().collect()
            };
            (e.id.clone(), units)
        })
        .collect()
}

/// ENIs tagged with this (as in Amazon VPC CNI) are left alone.
pub const TAG_NO_MANAGE: &str = "node.k8s.amazonaws.com/no_manage";

/// Converts EC2's view of the instance's attached ENIs for the datastore, leaving out ENIs
/// we must not manage; returns those too, so their device indexes are never reused.
pub fn views(enis: &[EniInfo], instance_id: &str) -> (Vec<EniView>, BTreeSet<u32>) {
    let mut managed = Vec::new();
    let mut unmanaged = BTreeSet::new();
    for e in enis {
        let Some(att) = e
            .attachment
            .as_ref()
            .filter(|a| a.instance_id == instance_id)
        else {
            continue;
        };
        // ENIs of other software (security groups for pods' trunk, EFA) are not ours to
        // fill or empty, as for aws-node; they still take an ENI slot.
        let foreign = matches!(e.interface_type.as_str(), "trunk" | "efa" | "efa-only");
        if foreign || e.tags.get(TAG_NO_MANAGE).is_some_and(|v| v == "true") {
            unmanaged.insert(att.device_index);
            continue;
        }
        let Ok(mac) = e.mac.parse() else {
            warn!(eni = %e.id, mac = %e.mac, "EC2 gave an ENI a MAC that does not parse; left out");
            unmanaged.insert(att.device_index);
            continue;
        };
        managed.push(EniView {
            id: e.id.clone(),
            device_index: att.device_index,
            mac,
            primary_ip: e.primary_ip,
            secondary_ips: e.secondary_ips.clone(),
            prefixes: e.prefixes.clone(),
            subnet_id: e.subnet_id.clone(),
        });
    }
    (managed, unmanaged)
}

pub fn merge(store: &mut Store, ec2: &[EniView]) -> MergeReport {
    let mut r = MergeReport::default();
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
        store.upsert_eni(&v.id, v.device_index, v.mac, v.primary_ip);
        merge_eni(store, v, &mut r);
    }
    r
}

fn merge_eni(store: &mut Store, v: &EniView, r: &mut MergeReport) {
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
    use std::collections::BTreeSet;

    use super::*;
    use crate::{aws::ec2::EniAttachment, ipam::store::PodMeta};

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
            mac: MacAddr([2, 0, 0, 0, 0, u8::try_from(dev).unwrap()]),
            primary_ip: ip(primary),
            secondary_ips: ips.iter().map(|s| ip(s)).collect(),
            prefixes: prefixes.iter().map(|s| ip(s)).collect(),
            subnet_id: "subnet-1".into(),
        }
    }

    fn meta(id: &str, dev: u32, ips: &[&str], prefixes: &[&str]) -> EniMetadata {
        EniMetadata {
            mac: String::new(),
            eni_id: id.into(),
            device_index: dev,
            subnet_id: String::new(),
            subnet_cidr: String::new(),
            vpc_id: String::new(),
            vpc_cidrs: Vec::new(),
            ipv4s: ips.iter().map(|s| ip(s)).collect(),
            prefixes: prefixes.iter().map(|s| (*s).to_owned()).collect(),
            security_groups: Vec::new(),
        }
    }

    #[test]
    fn the_reconcile_sees_imds_and_the_store_agree_or_not() {
        let mut s = Store::new(Mode::SecondaryIp, 30_000);
        merge(
            &mut s,
            &[view(
                "eni-a",
                0,
                "10.0.0.11",
                &["10.0.0.20", "10.0.0.21"],
                &[],
            )],
        );
        let none = BTreeSet::new();
        let agree = [meta(
            "eni-a",
            0,
            &["10.0.0.11", "10.0.0.21", "10.0.0.20"],
            &[],
        )];
        assert_eq!(imds_units(&agree, &none, false), store_units(&s, false));
        // An address EC2 took away, an ENI attached behind our back: both differ.
        let fewer = [meta("eni-a", 0, &["10.0.0.11", "10.0.0.20"], &[])];
        assert_ne!(imds_units(&fewer, &none, false), store_units(&s, false));
        let more = [agree[0].clone(), meta("eni-x", 1, &["10.0.0.50"], &[])];
        assert_ne!(imds_units(&more, &none, false), store_units(&s, false));
        // ... unless that ENI is one we do not manage.
        assert_eq!(
            imds_units(&more, &BTreeSet::from([1]), false),
            store_units(&s, false)
        );
        // Prefix mode compares prefix bases.
        let mut p = Store::new(Mode::Prefix, 30_000);
        merge(
            &mut p,
            &[view("eni-a", 0, "10.0.0.11", &[], &["10.0.1.16"])],
        );
        let m = [meta("eni-a", 0, &["10.0.0.11"], &["10.0.1.16/28"])];
        assert_eq!(imds_units(&m, &none, true), store_units(&p, true));
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
    fn eni(id: &str, dev: u32, instance: &str, tags: &[(&str, &str)]) -> EniInfo {
        EniInfo {
            id: id.into(),
            mac: "02:00:00:00:00:01".into(),
            subnet_id: "subnet-1".into(),
            primary_ip: "10.0.0.10".parse().unwrap(),
            secondary_ips: vec![],
            prefixes: vec![],
            attachment: Some(EniAttachment {
                id: format!("att-{id}"),
                instance_id: instance.into(),
                device_index: dev,
                status: "attached".into(),
            }),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            security_groups: vec![],
            status: "in-use".into(),
            interface_type: "interface".into(),
        }
    }

    #[test]
    fn no_manage_enis_are_left_out_but_keep_their_index() {
        let (v, unmanaged) = views(
            &[
                eni("eni-0", 0, "i-1", &[]),
                eni("eni-efa", 1, "i-1", &[(TAG_NO_MANAGE, "true")]),
                eni("eni-2", 2, "i-1", &[]),
                EniInfo {
                    interface_type: "trunk".into(),
                    ..eni("eni-trunk", 4, "i-1", &[])
                },
                eni("eni-other", 0, "i-2", &[]),
            ],
            "i-1",
        );
        assert_eq!(
            v.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["eni-0", "eni-2"]
        );
        assert_eq!(unmanaged, BTreeSet::from([1, 4]));
        assert_eq!(
            crate::ipam::reconciler::lowest_free_index(
                v.iter().map(|e| e.device_index).chain(unmanaged)
            ),
            3
        );
    }
}
