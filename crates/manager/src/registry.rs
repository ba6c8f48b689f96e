//! The VM registry: what the manager knows of every VM beyond the engine's state: its
//! definition (libvirt domain XML, so that another host can define and start it), its
//! resources and its HA settings. Persisted in the store's `vms` table; the engine's
//! `VmSpec` is derived from it ([`VmRow::spec`]) and fed as `Event::VmAdded` whenever a
//! row changes and at every manager start, so the two never disagree for long.
//!
//! Rows come from agents (a VM a host reports that the registry does not know is added
//! with HA off, its definition fetched with `GetVmDefinition`) and from operators
//! (`POST /v1/vms`, `/ha`).

use kvmha_core::model::{Resources, RestartBudget};
use kvmha_core::{HostName, VmName, VmSpec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

/// One VM of the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRow {
    pub name: VmName,
    /// The libvirt domain XML, when known.
    pub xml: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u64,
    pub ha: HaSettings,
    /// The host that last reported it or was last asked to start it.
    pub last_host: Option<HostName>,
}

/// The operator's HA settings of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaSettings {
    pub enabled: bool,
    /// Higher restarts first.
    pub priority: i32,
    /// Anti-affinity group: members prefer different hosts.
    pub group: Option<String>,
    /// Hosts the VM may run on; empty: any.
    pub hosts: BTreeSet<HostName>,
    pub max_restarts: u32,
    pub max_relocations: u32,
}

impl Default for HaSettings {
    fn default() -> Self {
        let budget = RestartBudget::default();
        HaSettings {
            enabled: false,
            priority: 0,
            group: None,
            hosts: BTreeSet::new(),
            max_restarts: budget.max_restarts,
            max_relocations: budget.max_relocations,
        }
    }
}

impl VmRow {
    pub fn new(name: VmName) -> VmRow {
        VmRow { name, xml: None, vcpus: 0, memory_mb: 0, ha: HaSettings::default(), last_host: None }
    }

    /// The engine's view of this row.
    pub fn spec(&self) -> VmSpec {
        VmSpec {
            name: self.name.clone(),
            ha: self.ha.enabled,
            priority: self.ha.priority,
            demand: Resources { cpus: self.vcpus, memory_mb: self.memory_mb },
            group: self.ha.group.clone(),
            affinity: self.ha.hosts.clone(),
            budget: RestartBudget {
                max_restarts: self.ha.max_restarts,
                max_relocations: self.ha.max_relocations,
                ..RestartBudget::default()
            },
        }
    }
}

/// The registry as the engine thread last wrote it, for readers (executor, API, agent
/// endpoints). Only the engine thread writes it, after the store.
pub type SharedRegistry = Arc<RwLock<BTreeMap<VmName, VmRow>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_carries_every_ha_setting() {
        let mut row = VmRow::new(VmName::from("db1"));
        row.vcpus = 2;
        row.memory_mb = 512;
        row.ha = HaSettings {
            enabled: true,
            priority: 10,
            group: Some("db-tier".into()),
            hosts: [HostName::from("host2")].into(),
            max_restarts: 1,
            max_relocations: 2,
        };
        let spec = row.spec();
        assert!(spec.ha);
        assert_eq!(spec.priority, 10);
        assert_eq!(spec.demand, Resources { cpus: 2, memory_mb: 512 });
        assert_eq!(spec.group.as_deref(), Some("db-tier"));
        assert!(spec.allows_host(&HostName::from("host2")) && !spec.allows_host(&HostName::from("host1")));
        assert_eq!((spec.budget.max_restarts, spec.budget.max_relocations), (1, 2));
        assert!(!VmRow::new(VmName::from("x")).spec().ha, "a VM found on a host starts with HA off");
    }
}
