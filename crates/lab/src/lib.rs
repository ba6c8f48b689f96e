//! kvmha-lab: a real multi-host KVM HA cluster on one Linux machine (ARCHITECTURE.md §9).
//!
//! Hosts are namespaces with their own init, BMCs are `ipmi_sim` processes (or
//! `sushy-emulator` for hosts in [`LabConfig::redfish_hosts`]) on an
//! out-of-band network, shared storage is sshfs over a storage network, and faults
//! are signals and nftables rules. The checker reads what the lab VMs wrote.
//!
//! # Using it (root only)
//!
//! ```no_run
//! use kvmha_lab::{Lab, LabConfig, NetSelector};
//! use kvmha_lab::topology::Network;
//!
//! let lab = Lab::build(LabConfig {
//!     hosts: 3,
//!     // Runs inside every host after each power-on: start the agent here. It
//!     // gets KVMHA_LAB_HOST, KVMHA_LAB_STORAGE_DIR, KVMHA_LAB_WATCHDOG, ...
//!     boot_script: "kvmha agent --config ... &\n".to_string(),
//!     ..LabConfig::default()
//! })?;
//! // The manager runs in the manager namespace (mgmt 10.77.1.2, oob 10.77.3.2).
//! let _manager = lab.manager_command("kvmha").arg("manager").spawn();
//! lab.ensure_bmcs_alive()?; // before each scenario
//! lab.power_off("host1")?; // or through its BMC: lab.bmc("host1")? / lab.ipmitool(...)
//! lab.partition("host2", NetSelector::One(Network::Mgmt))?;
//! lab.heal("host2", None)?;
//! let logs = kvmha_lab::checker::read_disk_logs(&lab.storage_dir())?;
//! assert!(kvmha_lab::checker::no_double_run(&logs).passed());
//! lab.teardown()?; // Drop does the same
//! # Ok::<(), kvmha_lab::LabError>(())
//! ```
//!
//! - [`lab`]: build, power, hang, partitions, loss, BMC failure, teardown, and the
//!   cleanup of labs left by crashed runs. [`lab::LabHandle`] drives a running lab
//!   from another process (`kvmha lab fault`).
//! - [`topology`]: names and the address plan.
//! - [`watchdog`]: the lab watchdog behind a /dev/watchdog-like file.
//! - the lab VM (`kvmha lab vm-writer`) is `kvmha_hypervisor::lab::writer`, the
//!   writer the hypervisor crate's lab driver runs; one disk line every 100 ms.
//! - [`guest`]: `vm_driver = "libvirt"`: a real QEMU guest (TCG) per VM through a
//!   libvirtd per host; the guest image, domain XML, disks and the host-fed clock.
//! - [`checker`]: `no_double_run`, `recovery_ms`, where VMs run, from disk logs.
//! - [`scenario`]: scenario files and the JSON result of SCENARIOS.md.
//! - [`cluster`]: the kvmha cluster inside a lab (manager, agents, VMs through the
//!   operator API); [`api`]: reaching that API inside the manager namespace.
//! - [`runner`]: `kvmha lab run FILE`, one scenario from build to result.
//! - [`bench`]: `kvmha bench failover`.
//! - [`cli`]: `kvmha lab up | status | fault | down | run`.

pub mod api;
pub mod bench;
pub mod checker;
pub mod cli;
pub mod cluster;
mod error;
pub mod guest;
pub mod lab;
pub mod process;
pub mod runner;
pub mod scenario;
mod scripts;
pub mod topology;
pub mod watchdog;

pub use error::{LabError, Result};
pub use lab::{Lab, LabConfig, NetSelector, PowerState};
