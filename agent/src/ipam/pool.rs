//! Warm-pool arithmetic with Amazon VPC CNI's variables and semantics. Pure: given the
//! targets, the instance type's limits and what the node holds, say what to add or
//! release. Everything is counted in *units*: secondary IPs, or /28 prefixes in prefix
//! mode. Each ENI has `slots_per_eni` slots (EC2's Ipv4AddressesPerInterface); its primary
//! address takes one, so `slots_per_eni - 1` units are usable for pods on every ENI.
//!
//! - `WARM_IP_TARGET` / `MINIMUM_IP_TARGET` (either set): keep at least `warm_ip` free
//!   addresses and at least `minimum_ip` addresses in all; release what is above both.
//!   In prefix mode they are counted in addresses and met with whole prefixes.
//! - Otherwise, secondary-IP mode: `WARM_ENI_TARGET` ENIs' worth of free addresses; grow by
//!   filling attached ENIs, then attaching full ENIs; release one unused ENI only when a
//!   whole extra ENI's worth is free (one ENI of hysteresis, so no thrashing).
//! - Otherwise, prefix mode: `WARM_PREFIX_TARGET` (default 1) wholly free prefixes.
//! - `MAX_ENI` and the instance type cap ENIs; max pods caps the addresses held.

/// Addresses in a delegated /28 prefix.
pub const PREFIX_SIZE: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    SecondaryIp,
    Prefix,
}

/// The warm-pool variables, already validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets {
    pub warm_eni: u32,
    pub warm_ip: Option<u32>,
    pub minimum_ip: Option<u32>,
    pub warm_prefix: Option<u32>,
    pub max_eni: Option<u32>,
    pub max_pods: Option<u32>,
}

impl Default for Targets {
    fn default() -> Self {
        Self {
            warm_eni: 1,
            warm_ip: None,
            minimum_ip: None,
            warm_prefix: None,
            max_eni: None,
            max_pods: None,
        }
    }
}

/// From DescribeInstanceTypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceLimits {
    pub max_enis: u32,
    pub slots_per_eni: u32,
}

/// One attached ENI as the datastore sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EniUsage {
    pub device_index: u32,
    /// Units held for pods (secondary IPs or prefixes; never the primary address).
    pub units: u32,
    /// Units not wholly free: holding an assigned or cooling address.
    pub busy_units: u32,
    /// Pod addresses assigned on this ENI.
    pub assigned: u32,
    /// Addresses released by pods and not reusable before their cooldown ends.
    pub cooling: u32,
    /// Holds no pod addresses (custom networking's primary ENI, an excluded subnet):
    /// never grown, its free units released, but it takes an ENI slot.
    pub excluded: bool,
    /// Its subnet refused more addresses lately (InsufficientFreeAddressesInSubnet):
    /// growth goes elsewhere for a while.
    pub subnet_full: bool,
    /// Attached less than [`ENI_MIN_LIFE_MS`] ago: not detached yet, whatever the plan.
    pub young: bool,
}

/// ipamd's minimum ENI lifetime: an ENI is not removed in its first minute, so a burst
/// that ends right after an attach does not detach what it just paid for.
pub const ENI_MIN_LIFE_MS: u64 = 60_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Add units to an attached ENI.
    Assign { device_index: u32, units: u32 },
    /// Create and attach a new ENI (at the lowest free device index) holding `units`.
    AttachEni { units: u32 },
}

/// Why the pool cannot grow as far as its targets ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// Every ENI the instance type (or MAX_ENI) allows is attached and full.
    EniLimit,
    /// Holding more would exceed max pods.
    MaxPods,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub grow: Vec<Step>,
    /// Free units to release (IP mode: addresses; prefix mode: wholly free prefixes).
    pub release_units: u32,
    /// An unused, non-primary ENI to detach and delete.
    pub release_eni: Option<u32>,
    /// Units the targets want that no step provides.
    pub shortfall: u32,
    pub blocked: Option<Blocked>,
}

/// Totals of a node's pool, in addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Totals {
    pub total: u32,
    pub assigned: u32,
    pub cooling: u32,
    pub available: u32,
}

pub fn totals(mode: Mode, enis: &[EniUsage]) -> Totals {
    let per_unit = if mode == Mode::Prefix { PREFIX_SIZE } else { 1 };
    let usable = || enis.iter().filter(|e| !e.excluded);
    let total = usable().map(|e| e.units * per_unit).sum::<u32>();
    let busy = usable().map(|e| e.assigned + e.cooling).sum::<u32>();
    Totals {
        total,
        assigned: enis.iter().map(|e| e.assigned).sum(),
        cooling: enis.iter().map(|e| e.cooling).sum(),
        available: total.saturating_sub(busy),
    }
}

/// What growth counts as warm. Cooling addresses are free again within the cooldown, so
/// they count: a pod deleted and another created costs no assign now and no unassign
/// when the cooldown ends. But a pod waiting for an address is never told to wait for a
/// cooldown (VPC CNI's #2896, where cooling addresses counted as available and pods
/// starved until cooldowns ended): while any pod waits, cooling addresses do not count,
/// and the pool grows at once for the waiting pods and its whole warm target.
fn warm_for_growth(sums: Totals, waiting: u32) -> u32 {
    if waiting > 0 {
        sums.available
    } else {
        sums.available + sums.cooling
    }
}

/// The plan with no pod waiting for an address.
pub fn plan(mode: Mode, t: &Targets, limits: InstanceLimits, all: &[EniUsage]) -> Plan {
    plan_with_waiting(mode, t, limits, all, 0)
}

/// The plan when `waiting` pods found no free address and wait for the pool to grow.
pub fn plan_with_waiting(
    mode: Mode,
    t: &Targets,
    limits: InstanceLimits,
    all: &[EniUsage],
    waiting: u32,
) -> Plan {
    let attached = u32::try_from(all.len()).unwrap_or(u32::MAX);
    let (usable, excluded_free) = split_excluded(all);
    let enis = usable.as_slice();
    let cap = limits.slots_per_eni.saturating_sub(1);
    let max_enis = t
        .max_eni
        .map_or(limits.max_enis, |m| m.min(limits.max_enis));
    let sums = totals(mode, enis);
    let held_units = enis.iter().map(|e| e.units).sum::<u32>();
    let by_ip_targets = t.warm_ip.is_some() || t.minimum_ip.is_some();

    let (mut grow_units, mut release_units, warm_eni_mode) = if by_ip_targets {
        let warm = t.warm_ip.unwrap_or(0);
        let min = t.minimum_ip.unwrap_or(0);
        let short = (warm + waiting)
            .saturating_sub(warm_for_growth(sums, waiting))
            .max(min.saturating_sub(sums.total));
        let excess = if short == 0 {
            sums.available
                .saturating_sub(warm + waiting)
                .min(sums.total.saturating_sub(min))
        } else {
            0
        };
        match mode {
            Mode::SecondaryIp => (short, excess, false),
            Mode::Prefix => {
                let free_prefixes = enis.iter().map(|e| e.units - e.busy_units).sum::<u32>();
                (
                    short.div_ceil(PREFIX_SIZE),
                    (excess / PREFIX_SIZE).min(free_prefixes),
                    false,
                )
            }
        }
    } else if mode == Mode::Prefix {
        let warm = t.warm_prefix.unwrap_or(1);
        let free = enis.iter().map(|e| e.units - e.busy_units).sum::<u32>();
        if warm == 0 {
            // As in ipamd, a target of 0 still grows when no address is left: one
            // prefix at a time, and the last free one is kept.
            let grow = u32::from(sums.available == 0);
            let keep = u32::from(sums.available <= free * PREFIX_SIZE);
            (grow, free.saturating_sub(keep), false)
        } else {
            (warm.saturating_sub(free), free.saturating_sub(warm), false)
        }
    } else {
        let want = t.warm_eni * cap + waiting;
        let warm = warm_for_growth(sums, waiting);
        if warm < want {
            (want - warm, 0, true)
        } else if want == 0 && sums.available == 0 && sums.cooling == 0 {
            // WARM_ENI_TARGET=0: no warm ENI, but as in ipamd a pod with nothing free
            // still gets one (the ENI is filled, as warm-ENI mode always fills).
            (1, 0, true)
        } else {
            (0, 0, true)
        }
    };

    // Max pods: never hold more addresses than pods can use.
    let mut blocked = None;
    if let Some(max_pods) = t.max_pods {
        let max_units = match mode {
            Mode::SecondaryIp => max_pods,
            Mode::Prefix => max_pods.div_ceil(PREFIX_SIZE),
        };
        let room = max_units.saturating_sub(held_units);
        if grow_units > room {
            grow_units = room;
            blocked = Some(Blocked::MaxPods);
        }
        if held_units > max_units {
            release_units = release_units.max(held_units - max_units);
        }
    }

    let mut out = Plan {
        release_units: if grow_units > 0 { 0 } else { release_units },
        blocked,
        ..Plan::default()
    };
    let room = Room {
        cap,
        max_enis,
        attached,
    };
    if grow_units > 0 {
        place(&mut out, enis, room, grow_units, warm_eni_mode);
    } else if warm_eni_mode {
        out.release_eni = surplus_eni(enis, t.warm_eni * cap + waiting, cap, sums.available);
    } else if out.release_units == 0 {
        // Address and prefix targets release units one by one; an ENI they emptied is
        // then of no use and goes too.
        // No consolidation: moving an idle ENI's units down costs an assign, an
        // unassign and a detach to save nothing, and an idle node must make no calls.
        out.release_eni = enis
            .iter()
            .filter(|e| {
                e.device_index != 0 && !e.young && e.units == 0 && e.assigned == 0 && e.cooling == 0
            })
            .max_by_key(|e| e.device_index)
            .map(|e| e.device_index);
    }
    if grow_units == 0 {
        // Free addresses on ENIs that serve no pod go back first (the store releases
        // from them first).
        out.release_units += excluded_free;
    }
    out
}

/// The ENIs that may hold pod addresses, and the free units on those that may not.
fn split_excluded(all: &[EniUsage]) -> (Vec<EniUsage>, u32) {
    let free = all
        .iter()
        .filter(|e| e.excluded)
        .map(|e| e.units.saturating_sub(e.busy_units))
        .sum();
    (all.iter().filter(|e| !e.excluded).copied().collect(), free)
}

/// What bounds growth: units per ENI, ENIs allowed, ENIs attached (excluded ones too).
#[derive(Clone, Copy)]
struct Room {
    cap: u32,
    max_enis: u32,
    attached: u32,
}

/// Fills attached ENIs (lowest device index first), then attaches new ones. In warm-ENI
/// mode every ENI touched is filled completely, as VPC CNI does.
fn place(out: &mut Plan, enis: &[EniUsage], room_: Room, need: u32, fill: bool) {
    let Room {
        cap,
        max_enis,
        mut attached,
    } = room_;
    let mut left = need;
    let mut sorted: Vec<&EniUsage> = enis.iter().collect();
    sorted.sort_by_key(|e| e.device_index);
    for e in sorted {
        let room = if e.subnet_full {
            0
        } else {
            cap.saturating_sub(e.units)
        };
        if room == 0 {
            continue;
        }
        let units = if fill { room } else { room.min(left) };
        out.grow.push(Step::Assign {
            device_index: e.device_index,
            units,
        });
        left = left.saturating_sub(units);
        if left == 0 {
            return;
        }
    }
    while left > 0 && cap > 0 {
        if attached >= max_enis {
            out.shortfall = left;
            out.blocked = Some(Blocked::EniLimit);
            return;
        }
        let units = if fill { cap } else { cap.min(left) };
        out.grow.push(Step::AttachEni { units });
        attached += 1;
        left = left.saturating_sub(units);
    }
}

/// In warm-ENI mode, the highest unused secondary ENI once a whole extra ENI's worth of
/// addresses is free and releasing it keeps the target.
fn surplus_eni(enis: &[EniUsage], want: u32, cap: u32, available: u32) -> Option<u32> {
    if available < want + cap {
        return None;
    }
    // With WARM_ENI_TARGET=0 an ENI goes only if an address stays free: the pool grows
    // whenever none is, so releasing the last free ones would attach again at once.
    enis.iter()
        .filter(|e| e.device_index != 0 && !e.young && e.assigned == 0 && e.cooling == 0)
        .filter(|e| available - e.units >= want.max(1))
        .max_by_key(|e| e.device_index)
        .map(|e| e.device_index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_pool_spread_over_enis_stays_as_it_is() {
        let t = Targets {
            warm_ip: Some(3),
            minimum_ip: Some(8),
            ..Targets::default()
        };
        // 8 free addresses as 3 + 3 + 2 after uneven cooldowns: on target, so no call
        // (moving them down would cost an assign, an unassign and a detach).
        let spread = [eni(0, 3, 0), eni(1, 3, 0), eni(2, 2, 0)];
        let p = plan(Mode::SecondaryIp, &t, M5, &spread);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn a_young_eni_is_not_released() {
        let t = ip_targets(Some(3), Some(8));
        let mut young = eni(1, 0, 0);
        young.young = true;
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 8, 0), young]);
        assert_eq!(p.release_eni, None);
        // Warm-ENI mode too.
        let mut young = eni(1, 9, 0);
        young.young = true;
        let p = plan(
            Mode::SecondaryIp,
            &Targets::default(),
            M5,
            &[eni(0, 9, 0), young],
        );
        assert_eq!(p.release_eni, None);
    }

    #[test]
    fn an_eni_emptied_by_ip_targets_is_released() {
        let t = Targets {
            warm_ip: Some(3),
            minimum_ip: Some(8),
            ..Targets::default()
        };
        // Primary holds the 8 the targets want; device 1 was emptied address by address.
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 8, 0), eni(1, 0, 0)]);
        assert_eq!((p.release_units, p.release_eni), (0, Some(1)));
        // Not while it still holds addresses (those go first) ...
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 8, 0), eni(1, 2, 0)]);
        assert_eq!((p.release_units, p.release_eni), (2, None));
        // ... and never the primary.
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 0, 0)]);
        assert_eq!(p.release_eni, None);
        // Prefix targets too.
        let p = plan(Mode::Prefix, &t, M5, &[eni(0, 1, 0), eni(1, 0, 0)]);
        assert_eq!(p.release_eni, Some(1));
    }

    /// m5.large: 3 ENIs, 10 addresses each (9 usable units).
    const M5: InstanceLimits = InstanceLimits {
        max_enis: 3,
        slots_per_eni: 10,
    };

    fn eni(device_index: u32, units: u32, assigned: u32) -> EniUsage {
        EniUsage {
            device_index,
            units,
            busy_units: assigned.min(units),
            assigned,
            cooling: 0,
            excluded: false,
            subnet_full: false,
            young: false,
        }
    }

    fn ip_targets(warm: Option<u32>, min: Option<u32>) -> Targets {
        Targets {
            warm_ip: warm,
            minimum_ip: min,
            ..Targets::default()
        }
    }

    #[test]
    fn ip_targets_table() {
        use Step::{Assign, AttachEni};
        // (warm, min, enis, expected grow, expected release)
        type Case = (Option<u32>, Option<u32>, Vec<EniUsage>, Vec<Step>, u32);
        let cases: Vec<Case> = vec![
            // Fresh node, MINIMUM_IP_TARGET=8, WARM_IP_TARGET=3: 8 addresses on the primary.
            (
                Some(3),
                Some(8),
                vec![eni(0, 0, 0)],
                vec![Assign {
                    device_index: 0,
                    units: 8,
                }],
                0,
            ),
            // 6 of 8 used: only 2 free, warm wants 3: one more, primary has room.
            (
                Some(3),
                Some(8),
                vec![eni(0, 8, 6)],
                vec![Assign {
                    device_index: 0,
                    units: 1,
                }],
                0,
            ),
            // Primary full (9 units, 7 used): 2 free, 1 short: a new ENI with 1 address.
            (
                Some(3),
                Some(8),
                vec![eni(0, 9, 7)],
                vec![AttachEni { units: 1 }],
                0,
            ),
            // Pods gone: 12 free across two ENIs; keep 8 in all (min) and >= 3 free.
            (
                Some(3),
                Some(8),
                vec![eni(0, 9, 0), eni(1, 3, 0)],
                vec![],
                4,
            ),
            // Only MINIMUM set: warm counts as 0.
            (
                None,
                Some(5),
                vec![eni(0, 2, 2)],
                vec![Assign {
                    device_index: 0,
                    units: 3,
                }],
                0,
            ),
            // Only WARM set: minimum counts as 0; 5 free, want 2: release 3.
            (Some(2), None, vec![eni(0, 5, 0)], vec![], 3),
            // Exactly on target: steady.
            (Some(3), Some(8), vec![eni(0, 8, 5)], vec![], 0),
        ];
        for (i, (w, m, enis, grow, release)) in cases.into_iter().enumerate() {
            let p = plan(Mode::SecondaryIp, &ip_targets(w, m), M5, &enis);
            assert_eq!(p.grow, grow, "case {i}");
            assert_eq!(p.release_units, release, "case {i}");
            assert_eq!(p.blocked, None, "case {i}");
        }
    }

    fn cooling(mut e: EniUsage, n: u32) -> EniUsage {
        e.cooling = n;
        e.busy_units = (e.assigned + n).min(e.units);
        e
    }

    #[test]
    fn cooling_addresses_count_toward_warm_unless_a_pod_waits() {
        let t = ip_targets(Some(3), Some(8));
        // 8 held, 5 assigned, 2 cooling, 1 free: the cooling ones are free within the
        // cooldown, so nothing is asked of EC2; nor when none is free and no pod waits.
        let p = plan(Mode::SecondaryIp, &t, M5, &[cooling(eni(0, 8, 5), 2)]);
        assert_eq!(p, Plan::default());
        let p = plan(Mode::SecondaryIp, &t, M5, &[cooling(eni(0, 8, 5), 3)]);
        assert_eq!(p, Plan::default());
        // A pod waits: they do not count; the pool grows for it and 3 free addresses.
        let p = plan_with_waiting(Mode::SecondaryIp, &t, M5, &[cooling(eni(0, 8, 5), 3)], 1);
        let primary = Step::Assign {
            device_index: 0,
            units: 1,
        };
        assert_eq!(p.grow, [primary, Step::AttachEni { units: 3 }]);
        // Warm-ENI mode: the same rule (8 free + 1 cooling is the ENI's worth).
        let p = plan(
            Mode::SecondaryIp,
            &Targets::default(),
            M5,
            &[cooling(eni(0, 9, 0), 1)],
        );
        assert_eq!(p, Plan::default());
        let p = plan_with_waiting(
            Mode::SecondaryIp,
            &Targets::default(),
            M5,
            &[cooling(eni(0, 9, 8), 1)],
            1,
        );
        // One address for the pod and a whole ENI's worth free: two ENIs, as the pod's
        // address would otherwise leave less than an ENI's worth.
        assert_eq!(p.grow, [Step::AttachEni { units: 9 }; 2]);
    }

    #[test]
    fn warm_eni_fills_whole_enis_and_releases_with_hysteresis() {
        let t = Targets::default();
        // Fresh node: the primary is filled (9 free = one ENI's worth).
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 0, 0)]);
        assert_eq!(
            p.grow,
            vec![Step::Assign {
                device_index: 0,
                units: 9
            }]
        );
        // One pod: 8 free < 9: a whole new ENI.
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 9, 1)]);
        assert_eq!(p.grow, vec![Step::AttachEni { units: 9 }]);
        // 17 free: not yet two ENIs' worth (18): keep everything.
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 9, 1), eni(1, 9, 0)]);
        assert_eq!((p.grow.len(), p.release_eni), (0, None));
        // 18 free: release the unused secondary ENI.
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 9, 0), eni(1, 9, 0)]);
        assert_eq!(p.release_eni, Some(1));
        // Never an ENI with a cooling address.
        let mut cooling = eni(1, 9, 0);
        cooling.cooling = 1;
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 9, 0), cooling]);
        assert_eq!(p.release_eni, None);
    }

    #[test]
    fn eni_limit_and_max_eni_stop_growth_with_a_reason() {
        let t = ip_targets(Some(5), None);
        let full = [eni(0, 9, 9), eni(1, 9, 9), eni(2, 9, 9)];
        let p = plan(Mode::SecondaryIp, &t, M5, &full);
        assert_eq!((p.shortfall, p.blocked), (5, Some(Blocked::EniLimit)));
        let t = Targets {
            max_eni: Some(1),
            ..ip_targets(Some(5), None)
        };
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 9, 7)]);
        assert_eq!(p.grow, vec![]);
        assert_eq!((p.shortfall, p.blocked), (3, Some(Blocked::EniLimit)));
    }

    #[test]
    fn max_pods_caps_what_is_held() {
        let t = Targets {
            max_pods: Some(10),
            ..ip_targets(Some(5), None)
        };
        let p = plan(Mode::SecondaryIp, &t, M5, &[eni(0, 9, 8)]);
        // 1 free, warm wants 5, but 9 held of at most 10: one more address, on a new ENI.
        assert_eq!(p.grow, vec![Step::AttachEni { units: 1 }]);
        assert_eq!(p.blocked, Some(Blocked::MaxPods));
    }

    #[test]
    fn prefix_mode_in_whole_prefixes() {
        let pfx = |device_index, units, busy, assigned| EniUsage {
            device_index,
            units,
            busy_units: busy,
            assigned,
            cooling: 0,
            excluded: false,
            subnet_full: false,
            young: false,
        };
        // Default WARM_PREFIX_TARGET=1 on a fresh node: one prefix.
        let p = plan(Mode::Prefix, &Targets::default(), M5, &[pfx(0, 0, 0, 0)]);
        assert_eq!(
            p.grow,
            vec![Step::Assign {
                device_index: 0,
                units: 1
            }]
        );
        // The only prefix has a pod: not free any more: another.
        let p = plan(Mode::Prefix, &Targets::default(), M5, &[pfx(0, 1, 1, 1)]);
        assert_eq!(
            p.grow,
            vec![Step::Assign {
                device_index: 0,
                units: 1
            }]
        );
        // Three wholly free, target 1: release 2.
        let p = plan(Mode::Prefix, &Targets::default(), M5, &[pfx(0, 4, 1, 3)]);
        assert_eq!(p.release_units, 2);
        // IP targets in addresses, met in prefixes: min 20 addresses = 2 prefixes.
        let p = plan(
            Mode::Prefix,
            &ip_targets(Some(3), Some(20)),
            M5,
            &[pfx(0, 0, 0, 0)],
        );
        assert_eq!(
            p.grow,
            vec![Step::Assign {
                device_index: 0,
                units: 2
            }]
        );
        // 30 addresses free of 32 (2 used): above both targets by 27 -> one whole prefix back
        // at most, and only a wholly free one.
        let p = plan(
            Mode::Prefix,
            &ip_targets(Some(3), Some(0)),
            M5,
            &[pfx(0, 2, 1, 2)],
        );
        assert_eq!(p.release_units, 1);
        // Max pods 17 -> at most 2 prefixes.
        let t = Targets {
            max_pods: Some(17),
            warm_prefix: Some(5),
            ..Targets::default()
        };
        let p = plan(Mode::Prefix, &t, M5, &[pfx(0, 1, 1, 1)]);
        assert_eq!(
            p.grow,
            vec![Step::Assign {
                device_index: 0,
                units: 1
            }]
        );
        assert_eq!(p.blocked, Some(Blocked::MaxPods));
    }

    /// A node following its plans until they are empty, with pods placed on the lowest
    /// ENI that has a free address (units are addresses; secondary-IP mode).
    struct Node {
        limits: InstanceLimits,
        targets: Targets,
        enis: Vec<EniUsage>,
        /// EC2 calls the plans have asked for.
        calls: u32,
    }

    impl Node {
        fn new(limits: InstanceLimits, targets: Targets) -> Self {
            Self {
                limits,
                targets,
                enis: vec![eni(0, 0, 0)],
                calls: 0,
            }
        }

        fn settle(&mut self) {
            self.settle_for(0);
        }

        /// Follows the plans with `waiting` pods waiting for an address.
        fn settle_for(&mut self, waiting: u32) {
            for _ in 0..50 {
                let p = plan_with_waiting(
                    Mode::SecondaryIp,
                    &self.targets,
                    self.limits,
                    &self.enis,
                    waiting,
                );
                if p.grow.is_empty() && p.release_units == 0 && p.release_eni.is_none() {
                    return;
                }
                self.calls += u32::try_from(p.grow.len()).expect("few steps")
                    + u32::from(p.release_units > 0)
                    + u32::from(p.release_eni.is_some());
                for step in p.grow {
                    match step {
                        Step::Assign {
                            device_index,
                            units,
                        } => self.enis[device_index as usize].units += units,
                        Step::AttachEni { units } => {
                            let index = u32::try_from(self.enis.len()).expect("few ENIs");
                            self.enis.push(eni(index, units, 0));
                        }
                    }
                }
                let mut left = p.release_units;
                for e in self.enis.iter_mut().rev() {
                    let free = (e.units - e.assigned - e.cooling).min(left);
                    e.units -= free;
                    left -= free;
                }
                if let Some(i) = p.release_eni {
                    self.enis.retain(|e| e.device_index != i);
                }
            }
            panic!("the plans did not settle: {:?}", self.enis);
        }

        /// A pod arrives (the pool may first have to grow for it), as ipamd serves one.
        fn add_pod(&mut self) {
            if !self.enis.iter().any(|e| e.assigned + e.cooling < e.units) {
                self.settle_for(1);
            }
            let e = self
                .enis
                .iter_mut()
                .find(|e| e.assigned + e.cooling < e.units)
                .expect("no free address for a pod");
            e.assigned += 1;
            e.busy_units = e.assigned + e.cooling;
            self.settle();
        }

        /// A pod goes: its address cools down.
        fn remove_pod(&mut self) {
            let e = self
                .enis
                .iter_mut()
                .rev()
                .find(|e| e.assigned > 0)
                .expect("a pod to remove");
            e.assigned -= 1;
            e.cooling += 1;
            self.settle();
        }

        /// Every cooldown ends.
        fn cool_down(&mut self) {
            for e in &mut self.enis {
                e.cooling = 0;
                e.busy_units = e.assigned;
            }
            self.settle();
        }

        /// (attached ENIs, secondary IPs, unused IPs)
        fn shape(&self) -> (usize, u32, u32) {
            let t = totals(Mode::SecondaryIp, &self.enis);
            (self.enis.len(), t.total, t.available)
        }
    }

    /// The example table of amazon-vpc-cni-k8s' docs/eni-and-ip-target.md: instance
    /// type, WARM_ENI_TARGET, WARM_IP_TARGET, MINIMUM_IP_TARGET, pods → attached ENIs,
    /// attached secondary IPs, unused IPs. (ipamd spreads the "2, 5" row's five addresses
    /// as 2+3; vpc-ebpf fills the primary ENI first, 3+2: same ENIs, same addresses.)
    #[test]
    fn vpc_cni_documented_examples() {
        type Row = (
            InstanceLimits,
            u32,
            Option<u32>,
            Option<u32>,
            u32,
            (usize, u32, u32),
        );
        let t3_small = InstanceLimits {
            max_enis: 3,
            slots_per_eni: 4,
        };
        let p3dn = InstanceLimits {
            max_enis: 15,
            slots_per_eni: 50,
        };
        let rows: [Row; 16] = [
            (t3_small, 1, None, None, 0, (1, 3, 3)),
            (t3_small, 1, None, None, 5, (3, 9, 4)),
            (t3_small, 1, None, None, 9, (3, 9, 0)),
            (t3_small, 1, Some(1), Some(1), 0, (1, 1, 1)),
            (t3_small, 1, Some(1), Some(1), 5, (2, 6, 1)),
            (t3_small, 1, Some(1), Some(1), 9, (3, 9, 0)),
            (t3_small, 1, Some(2), Some(5), 0, (2, 5, 5)),
            (t3_small, 1, Some(2), Some(5), 5, (3, 7, 2)),
            (t3_small, 1, Some(2), Some(5), 9, (3, 9, 0)),
            (p3dn, 1, None, None, 0, (1, 49, 49)),
            (p3dn, 1, None, None, 3, (2, 98, 95)),
            (p3dn, 1, None, None, 95, (3, 147, 52)),
            (p3dn, 1, Some(5), Some(10), 0, (1, 10, 10)),
            (p3dn, 1, Some(5), Some(10), 7, (1, 12, 5)),
            (p3dn, 1, Some(5), Some(10), 15, (1, 20, 5)),
            (p3dn, 1, Some(5), Some(10), 45, (2, 50, 5)),
        ];
        for (limits, warm_eni, warm_ip, min_ip, pods, want) in rows {
            let targets = Targets {
                warm_eni,
                warm_ip,
                minimum_ip: min_ip,
                ..Targets::default()
            };
            let mut node = Node::new(limits, targets.clone());
            node.settle();
            for _ in 0..pods {
                node.add_pod();
            }
            assert_eq!(
                node.shape(),
                want,
                "{targets:?} with {pods} pods: {:?}",
                node.enis
            );
        }
    }

    /// A pod deleted and another created (a rollout, a job) costs no EC2 call under any
    /// target: not an assign now and an unassign once the cooldown ends.
    #[test]
    fn pod_churn_makes_no_ec2_calls() {
        for targets in [
            ip_targets(Some(2), None),
            ip_targets(Some(1), Some(4)),
            ip_targets(Some(3), Some(8)),
            Targets::default(),
        ] {
            let mut node = Node::new(M5, targets.clone());
            node.settle();
            for _ in 0..5 {
                node.add_pod();
            }
            let before = (node.calls, node.shape());
            for _ in 0..3 {
                node.remove_pod();
                node.add_pod();
                node.cool_down();
            }
            assert_eq!(
                (node.calls, node.shape()),
                before,
                "{targets:?}: {:?}",
                node.enis
            );
            // A burst of churn beyond the warm target grows (pods are served), and the
            // pool comes back to its shape once the cooldowns end.
            for _ in 0..4 {
                node.remove_pod();
            }
            for _ in 0..4 {
                node.add_pod();
            }
            node.cool_down();
            assert_eq!(node.shape(), before.1, "{targets:?}: {:?}", node.enis);
        }
    }

    /// WARM_ENI_TARGET=0 (with no IP targets) asks for no warm ENI, yet the pool grows
    /// whenever no address is free, as ipamd's "pool too low" does whatever the target:
    /// pods are always served, and no extra ENI is attached ahead of need.
    #[test]
    fn warm_eni_target_zero_still_serves_pods() {
        let targets = Targets {
            warm_eni: 0,
            ..Targets::default()
        };
        let mut node = Node::new(M5, targets);
        node.settle();
        assert_eq!(
            node.shape(),
            (1, 9, 9),
            "the primary ENI filled, nothing more"
        );
        for _ in 0..9 {
            node.add_pod();
        }
        assert_eq!(
            node.shape(),
            (2, 18, 9),
            "the next ENI only once the first is used up"
        );
        for _ in 0..3 {
            node.add_pod();
        }
        // Whole ENIs, as warm-ENI mode fills them: 9 + 9 for 12 pods.
        assert_eq!(node.shape(), (2, 18, 6));
    }

    /// WARM_PREFIX_TARGET=0 in prefix mode: nothing warm, a prefix when no address is
    /// left, and the last free prefix kept so a pod's next neighbour does not churn EC2.
    #[test]
    fn warm_prefix_target_zero_grows_when_nothing_is_free() {
        let t = Targets {
            warm_prefix: Some(0),
            ..Targets::default()
        };
        let p = plan(Mode::Prefix, &t, M5, &[eni(0, 0, 0)]);
        assert_eq!(
            p.grow,
            [Step::Assign {
                device_index: 0,
                units: 1
            }]
        );
        // One prefix, wholly free: kept (releasing it would leave no address).
        let p = plan(Mode::Prefix, &t, M5, &[eni(0, 1, 0)]);
        assert_eq!((p.grow.len(), p.release_units), (0, 0));
        // Two wholly free: one goes.
        let p = plan(Mode::Prefix, &t, M5, &[eni(0, 2, 0)]);
        assert_eq!(p.release_units, 1);
        // A pod in the first prefix leaves 15 addresses: the free prefix goes.
        let e = EniUsage {
            device_index: 0,
            units: 2,
            busy_units: 1,
            assigned: 1,
            cooling: 0,
            excluded: false,
            subnet_full: false,
            young: false,
        };
        let p = plan(Mode::Prefix, &t, M5, &[e]);
        assert_eq!(p.release_units, 1);
    }

    fn excluded(mut e: EniUsage) -> EniUsage {
        e.excluded = true;
        e
    }

    #[test]
    fn an_excluded_primary_is_never_filled_but_takes_its_eni_slot() {
        // Custom networking on a fresh m5.large: the warm ENI is a new one, not eth0.
        let p = plan(
            Mode::SecondaryIp,
            &Targets::default(),
            M5,
            &[excluded(eni(0, 0, 0))],
        );
        assert_eq!(p.grow, vec![Step::AttachEni { units: 9 }]);
        // Full: two secondary ENIs are all pods get (3 ENIs, one of them excluded).
        let p = plan(
            Mode::SecondaryIp,
            &Targets::default(),
            M5,
            &[excluded(eni(0, 0, 0)), eni(1, 9, 9), eni(2, 9, 9)],
        );
        assert_eq!((p.grow.len(), p.blocked), (0, Some(Blocked::EniLimit)));
        // Under IP targets too.
        let t = ip_targets(Some(2), None);
        let p = plan(Mode::SecondaryIp, &t, M5, &[excluded(eni(0, 0, 0))]);
        assert_eq!(p.grow, vec![Step::AttachEni { units: 2 }]);
    }

    #[test]
    fn free_addresses_on_an_excluded_eni_go_back_and_are_not_counted() {
        // eth0 still holds 5 addresses from before custom networking, 2 in use.
        let p = plan(
            Mode::SecondaryIp,
            &Targets::default(),
            M5,
            &[excluded(eni(0, 5, 2)), eni(1, 9, 0)],
        );
        assert_eq!((p.grow.len(), p.release_units), (0, 3));
        let t = totals(Mode::SecondaryIp, &[excluded(eni(0, 5, 2)), eni(1, 9, 1)]);
        assert_eq!((t.total, t.assigned, t.available), (9, 3, 8));
    }
}
