//! The cluster model: hosts, VMs and shared pools, as configured by the operator.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(name: impl Into<String>) -> Self {
                Self(name.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(name: &str) -> Self {
                Self(name.to_owned())
            }
        }
    };
}

name_type!(
    /// A hypervisor host's name, unique in the cluster.
    HostName
);
name_type!(
    /// A VM's name, unique in the cluster.
    VmName
);
name_type!(
    /// A shared storage pool's name.
    PoolName
);

/// One boot of a host: changes on every (re)boot, so "same boot id" means "never rebooted".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BootId(pub String);

impl fmt::Display for BootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// CPU and memory, as capacity of a host or demand of a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: u32,
    pub memory_mb: u64,
}

impl Resources {
    pub fn fits_in(self, free: Resources) -> bool {
        self.cpus <= free.cpus && self.memory_mb <= free.memory_mb
    }

    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpus: self.cpus.saturating_sub(other.cpus),
            memory_mb: self.memory_mb.saturating_sub(other.memory_mb),
        }
    }

    pub fn plus(self, other: Resources) -> Resources {
        Resources { cpus: self.cpus + other.cpus, memory_mb: self.memory_mb + other.memory_mb }
    }
}

/// A hypervisor host as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    pub name: HostName,
    /// Networks the host is on (management, storage, ...), for neighbour pings.
    pub networks: Vec<String>,
    pub capacity: Resources,
    /// Whether an out-of-band controller (IPMI or Redfish) is configured.
    pub has_bmc: bool,
    /// Whether the host runs a hardware (or lab) watchdog that resets it when the agent
    /// stops petting it. Without one, lease expiry proves nothing.
    pub has_watchdog: bool,
    /// Shared pools the host writes its heartbeat to.
    pub pools: Vec<PoolName>,
}

/// A VM's restart budget: how often it may be started again before it is given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartBudget {
    /// Start attempts on one host within `window` before trying another host.
    pub max_restarts: u32,
    /// Moves to another host within `window` before the VM ends in `Error`.
    pub max_relocations: u32,
    pub window: Duration,
}

impl Default for RestartBudget {
    fn default() -> Self {
        RestartBudget { max_restarts: 3, max_relocations: 3, window: Duration::from_secs(3600) }
    }
}

/// A VM as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: VmName,
    /// Whether kvmha restarts this VM when it or its host fails.
    pub ha: bool,
    /// Higher restarts first.
    pub priority: i32,
    pub demand: Resources,
    /// Anti-affinity group: members prefer different hosts.
    pub group: Option<String>,
    /// Hosts the VM may run on; empty means any.
    pub affinity: BTreeSet<HostName>,
    pub budget: RestartBudget,
}

impl VmSpec {
    pub fn allows_host(&self, host: &HostName) -> bool {
        self.affinity.is_empty() || self.affinity.contains(host)
    }
}

/// What a planned agent stop does to the host's VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownPolicy {
    /// Leave the VMs where they are: a planned reboot brings them back on the same host.
    #[default]
    Freeze,
    /// The agent stops its HA VMs (releasing their leases) before a planned stop, reports
    /// them, and they restart on other hosts at once: no waiting for the host to return.
    Failover,
}
