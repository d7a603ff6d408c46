//! Which routable pods of a namespace carry a label, by address, for the label keys that
//! policies' pod selectors name. A pod selector with `matchLabels` then reads the
//! addresses of the pods it selects instead of testing every pod of every namespace it
//! looks at: a team-wide peer (100 namespaces of 30 pods) was 3000 label-map lookups per
//! compile, each a chain of cache misses through the pod's shared labels, and most of a
//! re-compile's time. Only keys some selector names are kept (`app`, rarely more): pods
//! carry many more (`pod-template-hash`, chart and version labels), and indexing those
//! would cost memory for lookups no one makes.
//!
//! Pure, kept by [`super::compile::World`] as its pods and policies change.

use std::{collections::HashMap, net::Ipv4Addr};

use super::model::{Labels, Peer, Policy};

/// Sorted addresses, one per pod holding it (two pods may hold one while one goes).
type Holders = Vec<Ipv4Addr>;

#[derive(Clone, Debug, Default)]
pub struct LabelIndex {
    /// Label key → how many policy selectors name it.
    wanted: HashMap<String, usize>,
    /// Label key → namespace → value → holders.
    by_key: HashMap<String, HashMap<String, HashMap<String, Holders>>>,
}

/// The label keys of `p`'s peer pod selectors' `matchLabels`.
pub fn selector_keys(p: &Policy) -> impl Iterator<Item = &String> {
    p.ingress
        .iter()
        .chain(p.egress.iter())
        .flatten()
        .flat_map(|r| &r.peers)
        .filter_map(|peer| match peer {
            Peer::Pods {
                pods: Some(sel), ..
            } => Some(sel.labels.keys()),
            _ => None,
        })
        .flatten()
}

impl LabelIndex {
    /// Forgets every pod (the wanted keys stay).
    pub fn clear_pods(&mut self) {
        for namespaces in self.by_key.values_mut() {
            namespaces.clear();
        }
    }

    /// One more selector names `key`; a key new to the index takes `pods` (every
    /// routable pod: namespace, labels, address).
    pub fn want<'a>(
        &mut self,
        key: &str,
        pods: impl Iterator<Item = (&'a str, &'a Labels, Ipv4Addr)>,
    ) {
        if let Some(n) = self.wanted.get_mut(key) {
            *n += 1;
            return;
        }
        self.wanted.insert(key.to_owned(), 1);
        let mut namespaces: HashMap<String, HashMap<String, Holders>> = HashMap::new();
        for (ns, labels, ip) in pods {
            if let Some(v) = labels.get(key) {
                insert(namespaces_entry(&mut namespaces, ns, v), ip);
            }
        }
        self.by_key.insert(key.to_owned(), namespaces);
    }

    /// One selector fewer names `key`; the last one takes its entries with it.
    pub fn unwant(&mut self, key: &str) {
        let Some(n) = self.wanted.get_mut(key) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.wanted.remove(key);
            self.by_key.remove(key);
        }
    }

    /// Records a routable pod of `ns` at `ip` with `labels`.
    pub fn add(&mut self, ns: &str, labels: &Labels, ip: Ipv4Addr) {
        for (k, v) in labels.iter() {
            if let Some(namespaces) = self.by_key.get_mut(k) {
                insert(namespaces_entry(namespaces, ns, v), ip);
            }
        }
    }

    /// Forgets what [`Self::add`] recorded with the same arguments.
    pub fn remove(&mut self, ns: &str, labels: &Labels, ip: Ipv4Addr) {
        for (k, v) in labels.iter() {
            let Some(namespaces) = self.by_key.get_mut(k) else {
                continue;
            };
            let Some(values) = namespaces.get_mut(ns) else {
                continue;
            };
            if let Some(holders) = values.get_mut(v) {
                if let Ok(i) = holders.binary_search(&ip) {
                    holders.remove(i);
                }
                if holders.is_empty() {
                    values.remove(v);
                }
            }
            if values.is_empty() {
                namespaces.remove(ns);
            }
        }
    }

    /// The addresses of the routable pods of `ns` that carry every label of `labels`,
    /// each once; `None` when a key is not indexed (or `labels` is empty), so the caller
    /// must look at the pods themselves.
    pub fn carrying<'a>(
        &'a self,
        ns: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Option<impl Iterator<Item = Ipv4Addr> + 'a> {
        let mut sets: Vec<&'a [Ipv4Addr]> = Vec::with_capacity(labels.len());
        for (k, v) in labels {
            let namespaces = self.by_key.get(k)?;
            sets.push(
                namespaces
                    .get(ns)
                    .and_then(|values| values.get(v))
                    .map_or(&[], Vec::as_slice),
            );
        }
        // Walk the smallest, test the others.
        let (smallest, walk) = sets
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|(_, s)| s.len())?;
        Some(
            walk.iter()
                .enumerate()
                .filter(move |(i, ip)| *i == 0 || walk[*i - 1] != **ip)
                .map(|(_, ip)| *ip)
                .filter(move |ip| {
                    sets.iter()
                        .enumerate()
                        .all(|(i, s)| i == smallest || s.binary_search(ip).is_ok())
                }),
        )
    }

    /// How many addresses are held, over every key (for tests and memory accounting).
    pub fn held(&self) -> usize {
        self.by_key
            .values()
            .flat_map(HashMap::values)
            .flat_map(HashMap::values)
            .map(Vec::len)
            .sum()
    }
}

fn namespaces_entry<'a>(
    namespaces: &'a mut HashMap<String, HashMap<String, Holders>>,
    ns: &str,
    v: &str,
) -> &'a mut Holders {
    // Looked up first: `entry` would allocate the key at every call.
    if !namespaces.contains_key(ns) {
        namespaces.insert(ns.to_owned(), HashMap::new());
    }
    let values = namespaces.get_mut(ns).expect("inserted above");
    if !values.contains_key(v) {
        values.insert(v.to_owned(), Vec::new());
    }
    values.get_mut(v).expect("inserted above")
}

fn insert(holders: &mut Holders, ip: Ipv4Addr) {
    let i = holders.partition_point(|h| *h < ip);
    holders.insert(i, ip);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>()
            .into()
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    fn got(x: &LabelIndex, ns: &str, l: &[(&str, &str)]) -> Option<Vec<Ipv4Addr>> {
        x.carrying(ns, &labels(l)).map(Iterator::collect)
    }

    #[test]
    fn pods_are_found_by_all_their_labels_and_only_in_their_namespace() {
        let mut x = LabelIndex::default();
        x.want("app", std::iter::empty());
        x.want("tier", std::iter::empty());
        x.add("a", &labels(&[("app", "web"), ("tier", "fe")]), ip(1));
        x.add("a", &labels(&[("app", "web")]), ip(2));
        x.add("a", &labels(&[("app", "db"), ("tier", "fe")]), ip(3));
        x.add("b", &labels(&[("app", "web"), ("tier", "fe")]), ip(4));
        assert_eq!(got(&x, "a", &[("app", "web")]), Some(vec![ip(1), ip(2)]));
        assert_eq!(
            got(&x, "a", &[("app", "web"), ("tier", "fe")]),
            Some(vec![ip(1)])
        );
        assert_eq!(got(&x, "a", &[("tier", "fe")]), Some(vec![ip(1), ip(3)]));
        assert_eq!(got(&x, "b", &[("app", "web")]), Some(vec![ip(4)]));
        assert_eq!(got(&x, "a", &[("app", "cache")]), Some(vec![]));
        assert_eq!(got(&x, "c", &[("app", "web")]), Some(vec![]));
        // A key no selector named is not indexed: the caller scans.
        assert_eq!(got(&x, "a", &[("app", "web"), ("nope", "x")]), None);
        assert_eq!(got(&x, "a", &[]), None);
    }

    #[test]
    fn only_wanted_keys_are_held_and_a_new_key_takes_the_pods_there_are() {
        let pods = [
            ("a", labels(&[("app", "web"), ("hash", "1")]), ip(1)),
            ("a", labels(&[("app", "db"), ("hash", "2")]), ip(2)),
        ];
        let mut x = LabelIndex::default();
        x.want("app", std::iter::empty());
        for (ns, l, ip) in &pods {
            x.add(ns, l, *ip);
        }
        assert_eq!(x.held(), 2, "`hash` is not held");
        x.want("hash", pods.iter().map(|(ns, l, ip)| (*ns, l, *ip)));
        assert_eq!(got(&x, "a", &[("hash", "2")]), Some(vec![ip(2)]));
        x.want("hash", std::iter::empty());
        x.unwant("hash");
        assert_eq!(x.held(), 4, "still named by one selector");
        x.unwant("hash");
        assert_eq!(x.held(), 2);
        assert_eq!(got(&x, "a", &[("hash", "2")]), None);
    }

    #[test]
    fn an_address_two_pods_hold_stays_until_both_are_gone() {
        let mut x = LabelIndex::default();
        x.want("app", std::iter::empty());
        let l = labels(&[("app", "web")]);
        x.add("a", &l, ip(1));
        x.add("a", &l, ip(1));
        assert_eq!(got(&x, "a", &[("app", "web")]), Some(vec![ip(1)]), "once");
        x.remove("a", &l, ip(1));
        assert_eq!(got(&x, "a", &[("app", "web")]), Some(vec![ip(1)]));
        x.remove("a", &l, ip(1));
        assert_eq!(got(&x, "a", &[("app", "web")]), Some(vec![]));
        assert!(x.by_key["app"].is_empty(), "nothing left behind");
        // Removing what is not there changes nothing.
        x.remove("a", &l, ip(1));
        assert_eq!(x.held(), 0);
    }
}
