//! Rule sets: pods whose rules compile the same share one set in the maps. New content
//! gets a new set, written before any pod points to it, and a set is removed only once no
//! pod points to it. One exception keeps big sets cheap to change: a set whose pods all
//! move to the same new content (one peer more in a 600-peer set, typically) is amended
//! in place, entries added and changed first and removed last. Every lookup then sees
//! either the old answer or the new one for its peer (the longest prefix present is the
//! old or the new set's own longest match), never one neither admits; peers switch over
//! one by one instead of all at once, as they would on a restarted agent.
//! Pure: the plan of what to write, which [`super::apply`] carries out.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use vpc_ebpf_common::policy::{PolicedPod, SET_NONE, direction};

use super::compile::{PodRules, RuleSet};

/// A rule set, shared (see [`PodRules`]).
type Set = std::sync::Arc<RuleSet>;

/// Direction, peer count, first and last peer: equal sets share it, and different sets
/// seldom do.
type Fingerprint = (u32, usize, Option<Ipv4Net>, Option<Ipv4Net>);

fn fingerprint(dir: u32, set: &RuleSet) -> Fingerprint {
    (
        dir,
        set.len(),
        set.first_key_value().map(|(k, _)| *k),
        set.last_key_value().map(|(k, _)| *k),
    )
}

/// What the maps hold (or will once a plan is applied).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Set id → (direction, rules).
    pub sets: BTreeMap<u32, (u32, Set)>,
    /// Pod → its sets; pods isolated in neither direction are absent.
    pub pods: BTreeMap<Ipv4Addr, PolicedPod>,
}

/// The changes that take the maps from one [`Applied`] to the next, in the order they
/// must be made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// 1. Sets to write.
    pub new_sets: Vec<(u32, u32, Set)>,
    /// 2. Pods to point at (other) sets.
    pub pods_set: Vec<(Ipv4Addr, PolicedPod)>,
    /// 3. Pods no longer isolated.
    pub pods_removed: Vec<Ipv4Addr>,
    /// 4. Sets no pod points to any more.
    pub dead_sets: Vec<(u32, u32, Set)>,
    /// Sets amended in place: (id, direction, old, new); their new and changed entries
    /// are written with step 1, the entries gone with step 4.
    pub amended: Vec<(u32, u32, Set, Set)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.new_sets.is_empty()
            && self.pods_set.is_empty()
            && self.pods_removed.is_empty()
            && self.dead_sets.is_empty()
            && self.amended.is_empty()
    }
}

impl Applied {
    /// The plan that makes the maps enforce `desired` (every local pod's rules), and the
    /// state once it is applied.
    pub fn plan(&self, desired: &BTreeMap<Ipv4Addr, PodRules>) -> (Plan, Applied) {
        // Sets by content, indexed only when a pod's set is not the very one it had. The
        // index is by a fingerprint (direction, size, first and last peer), not by
        // content: ordering hundreds of sets of hundreds of peers by content (a sorted
        // map) was most of a re-plan's time and its tail. Sets that share a fingerprint
        // are then compared whole, rarely more than one.
        let mut by_content: Option<HashMap<Fingerprint, Vec<(u32, &Set)>>> = None;
        let mut next = Applied::default();
        let mut plan = Plan::default();
        let mut used: BTreeSet<u32> = self.sets.keys().copied().collect();
        for (ip, rules) in desired {
            let mut pod = PolicedPod::default();
            let before = self.pods.get(ip);
            for (dir, set, slot, had) in [
                (
                    direction::INGRESS,
                    &rules.ingress,
                    &mut pod.ingress_set,
                    before.map(|p| p.ingress_set),
                ),
                (
                    direction::EGRESS,
                    &rules.egress,
                    &mut pod.egress_set,
                    before.map(|p| p.egress_set),
                ),
            ] {
                let Some(set) = set else { continue };
                // The engine hands an unchanged pod the same shared set it had.
                let same = had.filter(|id| {
                    self.sets
                        .get(id)
                        .is_some_and(|(d, s)| *d == dir && std::sync::Arc::ptr_eq(s, set))
                });
                if let Some(id) = same {
                    next.sets.insert(id, (dir, set.clone()));
                    *slot = id;
                    continue;
                }
                let by_content = by_content.get_or_insert_with(|| {
                    let mut index: HashMap<Fingerprint, Vec<(u32, &Set)>> = HashMap::new();
                    for (id, (dir, rules)) in &self.sets {
                        index
                            .entry(fingerprint(*dir, rules))
                            .or_default()
                            .push((*id, rules));
                    }
                    index
                });
                let same_content = by_content.entry(fingerprint(dir, set)).or_default();
                let found = same_content
                    .iter()
                    .find(|(_, s)| std::sync::Arc::ptr_eq(s, set) || **s == *set)
                    .map(|(id, _)| *id);
                let id = found.unwrap_or_else(|| {
                    let id = (1..=u32::MAX)
                        .find(|i| !used.contains(i))
                        .expect("fewer sets than ids");
                    used.insert(id);
                    plan.new_sets.push((id, dir, set.clone()));
                    same_content.push((id, set));
                    id
                });
                next.sets.insert(id, (dir, set.clone()));
                *slot = id;
            }
            if pod.ingress_set == SET_NONE && pod.egress_set == SET_NONE {
                continue;
            }
            if self.pods.get(ip) != Some(&pod) {
                plan.pods_set.push((*ip, pod));
            }
            next.pods.insert(*ip, pod);
        }
        plan.pods_removed = self
            .pods
            .keys()
            .filter(|ip| !next.pods.contains_key(ip))
            .copied()
            .collect();
        plan.dead_sets = self
            .sets
            .iter()
            .filter(|(id, _)| !next.sets.contains_key(id))
            .map(|(id, (dir, rules))| (*id, *dir, rules.clone()))
            .collect();
        self.amend_in_place(&mut plan, &mut next);
        (plan, next)
    }

    /// Turns "write set N, point its pods at it, remove set O" into "amend O" where O's
    /// pods are exactly N's.
    fn amend_in_place(&self, plan: &mut Plan, next: &mut Applied) {
        if plan.new_sets.is_empty() || plan.dead_sets.is_empty() {
            return;
        }
        let users = |a: &Applied| {
            let mut u: BTreeMap<u32, BTreeSet<Ipv4Addr>> = BTreeMap::new();
            for (ip, p) in &a.pods {
                for id in [p.ingress_set, p.egress_set] {
                    if id != SET_NONE {
                        u.entry(id).or_default().insert(*ip);
                    }
                }
            }
            u
        };
        let (old_users, new_users) = (users(self), users(next));
        let mut dead: BTreeMap<u32, (u32, Set)> = plan
            .dead_sets
            .drain(..)
            .map(|(id, dir, set)| (id, (dir, set)))
            .collect();
        let mut kept_new = Vec::new();
        for (new_id, dir, set) in plan.new_sets.drain(..) {
            let pods = new_users.get(&new_id);
            let old_id = pods
                .and_then(|p| p.first())
                .and_then(|ip| self.pods.get(ip))
                .map(|p| {
                    if dir == direction::INGRESS {
                        p.ingress_set
                    } else {
                        p.egress_set
                    }
                });
            let Some(old_id) = old_id.filter(|o| {
                dead.get(o).is_some_and(|(d, _)| *d == dir) && old_users.get(o) == pods
            }) else {
                kept_new.push((new_id, dir, set));
                continue;
            };
            let (_, old_set) = dead.remove(&old_id).expect("checked above");
            next.sets.remove(&new_id);
            next.sets.insert(old_id, (dir, set.clone()));
            for ip in pods.into_iter().flatten() {
                if let Some(p) = next.pods.get_mut(ip) {
                    for slot in [&mut p.ingress_set, &mut p.egress_set] {
                        if *slot == new_id {
                            *slot = old_id;
                        }
                    }
                }
            }
            plan.amended.push((old_id, dir, old_set, set));
        }
        plan.new_sets = kept_new;
        plan.dead_sets = dead
            .into_iter()
            .map(|(id, (dir, set))| (id, dir, set))
            .collect();
        // Pods whose sets kept their ids need no new pointer.
        plan.pods_set = plan
            .pods_set
            .iter()
            .filter_map(|(ip, _)| {
                let p = *next.pods.get(ip)?;
                (self.pods.get(ip) != Some(&p)).then_some((*ip, p))
            })
            .collect();
    }
}

impl Applied {
    /// What every pod enforces now, as compiled rules: the start of an amendment.
    pub fn current(&self) -> BTreeMap<Ipv4Addr, PodRules> {
        self.pods
            .iter()
            .map(|(ip, p)| {
                let set = |id: u32| {
                    (id != SET_NONE)
                        .then(|| self.sets.get(&id).map(|s| s.1.clone()).unwrap_or_default())
                };
                (
                    *ip,
                    PodRules {
                        ingress: set(p.ingress_set),
                        egress: set(p.egress_set),
                        policies: Vec::new(),
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use ipnet::Ipv4Net;
    use vpc_ebpf_common::policy::PortRange;

    use super::*;

    fn rules(peer: &str) -> RuleSet {
        BTreeMap::from([(
            peer.parse::<Ipv4Net>().unwrap(),
            vec![PortRange {
                proto: 6,
                pad: 0,
                first: 80,
                last: 80,
            }],
        )])
    }

    fn pod(ingress: Option<&str>, egress: Option<&str>) -> PodRules {
        PodRules {
            ingress: ingress.map(rules).map(Set::new),
            egress: egress.map(rules).map(Set::new),
            policies: Vec::new(),
        }
    }

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn pods_with_the_same_rules_share_a_set() {
        let desired = BTreeMap::from([
            (A, pod(Some("10.0.0.0/8"), None)),
            (B, pod(Some("10.0.0.0/8"), None)),
        ]);
        let (plan, next) = Applied::default().plan(&desired);
        assert_eq!(plan.new_sets.len(), 1);
        assert_eq!(next.pods[&A], next.pods[&B]);
        assert_eq!(next.pods[&A].egress_set, SET_NONE);
        // Nothing to do the second time.
        let (again, same) = next.plan(&desired);
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(same, next);
    }

    #[test]
    fn a_change_writes_a_new_set_before_the_old_one_goes() {
        let (_, before) = Applied::default().plan(&BTreeMap::from([
            (A, pod(Some("10.0.0.0/8"), None)),
            (B, pod(Some("10.0.0.0/8"), None)),
        ]));
        let old = before.pods[&A].ingress_set;
        let (plan, after) = before.plan(&BTreeMap::from([
            (A, pod(Some("10.1.0.0/16"), None)),
            (B, pod(Some("10.0.0.0/8"), None)),
        ]));
        assert_eq!(plan.new_sets.len(), 1);
        assert_ne!(plan.new_sets[0].0, old);
        assert_eq!(plan.pods_set, vec![(A, after.pods[&A])]);
        assert!(plan.dead_sets.is_empty(), "B still uses the old set");
        // B leaves policy: its pointer goes and the set with it.
        let (plan, _) = after.plan(&BTreeMap::from([
            (A, pod(Some("10.1.0.0/16"), None)),
            (B, pod(None, None)),
        ]));
        assert_eq!(plan.pods_removed, vec![B]);
        assert_eq!(
            plan.dead_sets.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![old]
        );
    }

    #[test]
    fn a_set_whose_pods_all_move_to_new_content_is_amended_in_place() {
        let (_, before) = Applied::default().plan(&BTreeMap::from([
            (A, pod(Some("10.0.0.0/8"), None)),
            (B, pod(Some("10.0.0.0/8"), Some("10.2.0.0/16"))),
        ]));
        let (old_in, old_out) = (before.pods[&A].ingress_set, before.pods[&B].egress_set);
        let (plan, after) = before.plan(&BTreeMap::from([
            (A, pod(Some("10.1.0.0/16"), None)),
            (B, pod(Some("10.1.0.0/16"), Some("10.3.0.0/16"))),
        ]));
        assert!(
            plan.new_sets.is_empty() && plan.dead_sets.is_empty(),
            "{plan:?}"
        );
        assert!(plan.pods_set.is_empty(), "no pointer moves: {plan:?}");
        let amended: Vec<u32> = plan.amended.iter().map(|a| a.0).collect();
        assert_eq!(amended, vec![old_in, old_out]);
        assert_eq!(after.pods, before.pods);
        assert_eq!(*after.sets[&old_in].1, rules("10.1.0.0/16"));
        // Applying the same again is nothing.
        let (again, _) = after.plan(&BTreeMap::from([
            (A, pod(Some("10.1.0.0/16"), None)),
            (B, pod(Some("10.1.0.0/16"), Some("10.3.0.0/16"))),
        ]));
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn a_shared_set_left_by_some_of_its_pods_is_not_amended() {
        let (_, before) = Applied::default().plan(&BTreeMap::from([
            (A, pod(Some("10.0.0.0/8"), None)),
            (B, pod(Some("10.0.0.0/8"), None)),
        ]));
        // A moves to new content; B stays on the old set, which must stay as it is.
        let (plan, _) = before.plan(&BTreeMap::from([
            (A, pod(Some("10.1.0.0/16"), None)),
            (B, pod(Some("10.0.0.0/8"), None)),
        ]));
        assert!(plan.amended.is_empty());
        assert_eq!(plan.new_sets.len(), 1);
    }

    #[test]
    fn an_amendment_keeps_the_other_pods_as_they_are() {
        let (_, before) = Applied::default().plan(&BTreeMap::from([(
            A,
            pod(Some("10.0.0.0/8"), Some("10.1.0.0/16")),
        )]));
        let mut desired = before.current();
        desired.insert(B, pod(Some("0.0.0.0/0"), None));
        let (plan, after) = before.plan(&desired);
        assert_eq!(plan.pods_set.len(), 1, "{plan:?}");
        assert!(plan.pods_removed.is_empty() && plan.dead_sets.is_empty());
        assert_eq!(after.pods[&A], before.pods[&A]);
    }

    #[test]
    fn the_same_rules_in_two_directions_are_two_sets() {
        let (plan, next) = Applied::default().plan(&BTreeMap::from([(
            A,
            pod(Some("10.0.0.0/8"), Some("10.0.0.0/8")),
        )]));
        assert_eq!(plan.new_sets.len(), 2);
        assert_ne!(next.pods[&A].ingress_set, next.pods[&A].egress_set);
    }
}
