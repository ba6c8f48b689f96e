//! The restart planner (ARCHITECTURE.md §8): which VM goes where, in what order.
//!
//! Pure and deterministic: HA priority first (higher first, then name), then for each VM
//! the hosts it may use (node affinity) with room for it, preferring hosts without a
//! member of its anti-affinity group, then the least loaded. Anti-affinity is a
//! preference: a VM is never left down only because its group is crowded.

use crate::model::{HostName, Resources, VmName, VmSpec};
use std::collections::BTreeSet;

/// A host that may receive VMs, with what it has left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub host: HostName,
    pub capacity: Resources,
    pub used: Resources,
    /// Anti-affinity groups already present on the host.
    pub groups: BTreeSet<String>,
}

impl Candidate {
    fn free(&self) -> Resources {
        self.capacity.saturating_sub(self.used)
    }

    /// Load after placing `demand`, as the larger of memory and CPU shares, in parts per
    /// million so that ordering is exact.
    fn load_with(&self, demand: Resources) -> u64 {
        let used = self.used.plus(demand);
        let share = |used: u64, capacity: u64| used.saturating_mul(1_000_000).checked_div(capacity).unwrap_or(u64::MAX);
        share(used.memory_mb, self.capacity.memory_mb).max(share(u64::from(used.cpus), u64::from(self.capacity.cpus)))
    }
}

/// One VM to place, with the hosts it must avoid (where it already failed).
#[derive(Clone, Debug)]
pub struct PlacementRequest<'a> {
    pub spec: &'a VmSpec,
    pub avoid: &'a BTreeSet<HostName>,
    /// Taken first when it has room: a VM that crashed on a healthy host, or whose host
    /// rebooted, comes back where it was.
    pub prefer: Option<&'a HostName>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In start order.
    pub placements: Vec<(VmName, HostName)>,
    /// VMs no host has room for.
    pub pending: Vec<VmName>,
}

pub fn plan(requests: &[PlacementRequest<'_>], mut candidates: Vec<Candidate>) -> Plan {
    let mut order: Vec<&PlacementRequest<'_>> = requests.iter().collect();
    order.sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then_with(|| a.spec.name.cmp(&b.spec.name)));
    candidates.sort_by(|a, b| a.host.cmp(&b.host));

    // A rack of hosts failing at once releases thousands of VMs onto thousands of hosts:
    // one scan of every host per VM is seconds. Most VMs ask nothing but the least
    // loaded host with room (no preferred host, no group, no affinity, nothing to avoid),
    // so the hosts are also kept ordered by load with that VM's demand, and the first one
    // is the scan's answer whenever it has room (the scan takes the first least loaded of
    // the hosts with room; the least loaded of all, ties to the first, is it if it fits).
    // Anything else, and a first host without room, falls back to the scan.
    let mut by_load: Option<(Resources, BTreeSet<(u64, usize)>)> = None;
    let mut result = Plan::default();
    for request in order {
        let spec = request.spec;
        let plain =
            request.prefer.is_none() && spec.group.is_none() && spec.affinity.is_empty() && request.avoid.is_empty();
        let mut chosen = None;
        if plain {
            if by_load.as_ref().is_none_or(|(demand, _)| *demand != spec.demand) {
                let ordered =
                    candidates.iter().enumerate().map(|(index, candidate)| (candidate.load_with(spec.demand), index));
                by_load = Some((spec.demand, ordered.collect()));
            }
            let (_, ordered) = by_load.as_ref().expect("just built");
            chosen =
                ordered.first().map(|(_, index)| *index).filter(|index| spec.demand.fits_in(candidates[*index].free()));
        }
        if chosen.is_none() {
            chosen = candidates
                .iter()
                .enumerate()
                .filter(|(_, candidate)| spec.allows_host(&candidate.host))
                .filter(|(_, candidate)| !request.avoid.contains(&candidate.host))
                .filter(|(_, candidate)| spec.demand.fits_in(candidate.free()))
                .min_by_key(|(_, candidate)| {
                    let preferred = request.prefer == Some(&candidate.host);
                    let crowded = spec.group.as_ref().is_some_and(|group| candidate.groups.contains(group));
                    (!preferred, crowded, candidate.load_with(spec.demand))
                })
                .map(|(index, _)| index);
        }
        match chosen {
            Some(index) => {
                let candidate = &mut candidates[index];
                if let Some((demand, ordered)) = by_load.as_mut() {
                    ordered.remove(&(candidate.load_with(*demand), index));
                }
                candidate.used = candidate.used.plus(spec.demand);
                if let Some(group) = &spec.group {
                    candidate.groups.insert(group.clone());
                }
                if let Some((demand, ordered)) = by_load.as_mut() {
                    ordered.insert((candidate.load_with(*demand), index));
                }
                result.placements.push((spec.name.clone(), candidate.host.clone()));
            }
            None => result.pending.push(spec.name.clone()),
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RestartBudget;

    fn vm(name: &str, priority: i32, memory_mb: u64, group: Option<&str>) -> VmSpec {
        VmSpec {
            name: VmName::from(name),
            ha: true,
            priority,
            demand: Resources { cpus: 1, memory_mb },
            group: group.map(str::to_owned),
            affinity: BTreeSet::new(),
            budget: RestartBudget::default(),
        }
    }

    fn host(name: &str, memory_mb: u64, used_mb: u64) -> Candidate {
        Candidate {
            host: HostName::from(name),
            capacity: Resources { cpus: 8, memory_mb },
            used: Resources { cpus: 0, memory_mb: used_mb },
            groups: BTreeSet::new(),
        }
    }

    fn requests<'a>(vms: &'a [VmSpec], avoid: &'a BTreeSet<HostName>) -> Vec<PlacementRequest<'a>> {
        vms.iter().map(|spec| PlacementRequest { spec, avoid, prefer: None }).collect()
    }

    #[test]
    fn higher_priority_gets_the_scarce_room() {
        let vms = [vm("low", 0, 1024, None), vm("high", 10, 1024, None)];
        let none = BTreeSet::new();
        let plan = plan(&requests(&vms, &none), vec![host("h2", 1024, 0)]);
        assert_eq!(plan.placements, vec![(VmName::from("high"), HostName::from("h2"))]);
        assert_eq!(plan.pending, vec![VmName::from("low")]);
    }

    #[test]
    fn least_loaded_host_wins() {
        let vms = [vm("a", 0, 256, None)];
        let none = BTreeSet::new();
        let plan = plan(&requests(&vms, &none), vec![host("h2", 4096, 2048), host("h3", 4096, 512)]);
        assert_eq!(plan.placements, vec![(VmName::from("a"), HostName::from("h3"))]);
    }

    #[test]
    fn anti_affinity_spreads_a_group_but_never_blocks_it() {
        let vms = [vm("db1", 5, 256, Some("db")), vm("db2", 5, 256, Some("db")), vm("db3", 5, 256, Some("db"))];
        let none = BTreeSet::new();
        let plan = plan(&requests(&vms, &none), vec![host("h2", 4096, 0), host("h3", 4096, 0)]);
        let targets: Vec<_> = plan.placements.iter().map(|(_, host)| host.as_str()).collect();
        assert_eq!(targets, vec!["h2", "h3", "h2"], "third member must still be placed");
        assert!(plan.pending.is_empty());
    }

    #[test]
    fn group_already_on_a_host_pushes_members_elsewhere() {
        let vms = [vm("db2", 0, 256, Some("db"))];
        let none = BTreeSet::new();
        let mut crowded = host("h2", 4096, 0);
        crowded.groups.insert("db".to_owned());
        let plan = plan(&requests(&vms, &none), vec![crowded, host("h3", 4096, 3000)]);
        assert_eq!(plan.placements[0].1, HostName::from("h3"));
    }

    #[test]
    fn node_affinity_and_avoid_list_are_honoured() {
        let mut pinned = vm("pinned", 0, 256, None);
        pinned.affinity.insert(HostName::from("h3"));
        let vms = [pinned, vm("free", 0, 256, None)];
        let avoid: BTreeSet<HostName> = [HostName::from("h2")].into();
        let plan = plan(&requests(&vms, &avoid), vec![host("h2", 4096, 0), host("h3", 4096, 0), host("h4", 4096, 0)]);
        assert_eq!(
            plan.placements,
            vec![(VmName::from("free"), HostName::from("h3")), (VmName::from("pinned"), HostName::from("h3"))]
        );
    }

    #[test]
    fn a_preferred_host_with_room_wins_over_a_lighter_one() {
        let vms = [vm("a", 0, 256, None)];
        let none = BTreeSet::new();
        let home = HostName::from("h2");
        let request = [PlacementRequest { spec: &vms[0], avoid: &none, prefer: Some(&home) }];
        let placed = plan(&request, vec![host("h2", 4096, 3000), host("h3", 4096, 0)]);
        assert_eq!(placed.placements, vec![(VmName::from("a"), home.clone())]);
        // Without room at home it goes elsewhere.
        let placed = plan(&request, vec![host("h2", 4096, 4000), host("h3", 4096, 0)]);
        assert_eq!(placed.placements, vec![(VmName::from("a"), HostName::from("h3"))]);
    }

    #[test]
    fn nothing_fits_means_pending() {
        let vms = [vm("big", 0, 8192, None)];
        let none = BTreeSet::new();
        let plan = plan(&requests(&vms, &none), vec![host("h2", 4096, 0)]);
        assert!(plan.placements.is_empty());
        assert_eq!(plan.pending, vec![VmName::from("big")]);
    }

    /// The planner before hosts were kept ordered by load: one scan of every host per VM.
    fn plan_by_scanning(requests: &[PlacementRequest<'_>], mut candidates: Vec<Candidate>) -> Plan {
        let mut order: Vec<&PlacementRequest<'_>> = requests.iter().collect();
        order.sort_by(|a, b| b.spec.priority.cmp(&a.spec.priority).then_with(|| a.spec.name.cmp(&b.spec.name)));
        candidates.sort_by(|a, b| a.host.cmp(&b.host));
        let mut result = Plan::default();
        for request in order {
            let spec = request.spec;
            let best = candidates
                .iter_mut()
                .filter(|candidate| spec.allows_host(&candidate.host))
                .filter(|candidate| !request.avoid.contains(&candidate.host))
                .filter(|candidate| spec.demand.fits_in(candidate.free()))
                .min_by_key(|candidate| {
                    let preferred = request.prefer == Some(&candidate.host);
                    let crowded = spec.group.as_ref().is_some_and(|group| candidate.groups.contains(group));
                    (!preferred, crowded, candidate.load_with(spec.demand))
                });
            match best {
                Some(candidate) => {
                    candidate.used = candidate.used.plus(spec.demand);
                    if let Some(group) = &spec.group {
                        candidate.groups.insert(group.clone());
                    }
                    result.placements.push((spec.name.clone(), candidate.host.clone()));
                }
                None => result.pending.push(spec.name.clone()),
            }
        }
        result
    }

    proptest::proptest! {
        #[test]
        fn hosts_ordered_by_load_place_exactly_as_scanning_every_host(
            hosts in proptest::collection::vec((1u32..16, 0u64..8192, 0u64..8192, 0u32..4), 0..12),
            vms in proptest::collection::vec((0i32..3, 0u32..3, 0u64..2048, 0u8..8), 0..40),
        ) {
            let candidates: Vec<Candidate> = hosts
                .iter()
                .enumerate()
                .map(|(index, (cpus, memory_mb, used_mb, used_cpus))| Candidate {
                    host: HostName::new(format!("h{index}")),
                    capacity: Resources { cpus: *cpus, memory_mb: *memory_mb },
                    used: Resources { cpus: *used_cpus, memory_mb: *used_mb },
                    groups: BTreeSet::new(),
                })
                .collect();
            // Kind 0-3: plain; 4: in a group; 5: affinity to h0; 6: avoids h1; 7: prefers h2.
            let specs: Vec<VmSpec> = vms
                .iter()
                .enumerate()
                .map(|(index, (priority, cpus, memory_mb, kind))| {
                    let mut spec = vm(&format!("vm{index}"), *priority, *memory_mb, (*kind == 4).then_some("g"));
                    spec.demand.cpus = *cpus;
                    if *kind == 5 {
                        spec.affinity.insert(HostName::from("h0"));
                    }
                    spec
                })
                .collect();
            let none = BTreeSet::new();
            let avoid_h1: BTreeSet<HostName> = [HostName::from("h1")].into();
            let h2 = HostName::from("h2");
            let requests: Vec<PlacementRequest<'_>> = specs
                .iter()
                .zip(&vms)
                .map(|(spec, (_, _, _, kind))| PlacementRequest {
                    spec,
                    avoid: if *kind == 6 { &avoid_h1 } else { &none },
                    prefer: (*kind == 7).then_some(&h2),
                })
                .collect();
            proptest::prop_assert_eq!(plan(&requests, candidates.clone()), plan_by_scanning(&requests, candidates));
        }
    }
}
