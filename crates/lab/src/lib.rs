//! kvmha-lab: a real multi-host KVM HA cluster on one Linux machine (ARCHITECTURE.md §9).
//!
//! Hosts are namespaces with their own init, BMCs are `ipmi_sim` processes on an
//! out-of-band network, shared storage is sshfs over a storage network, and faults
//! are signals and nftables rules. The checker reads what the lab VMs wrote.

pub mod checker;
pub mod cli;
mod error;
pub mod lab;
pub mod process;
pub mod scenario;
mod scripts;
pub mod topology;
pub mod watchdog;
pub mod writer;

pub use error::{LabError, Result};
pub use lab::{Lab, LabConfig, NetSelector, PowerState};
