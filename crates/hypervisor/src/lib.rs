//! kvmha-hypervisor: the [`Hypervisor`] trait and its two drivers (ARCHITECTURE.md §2, §9).
//!
//! - [`libvirt::LibvirtDriver`] drives libvirt through the `virt` crate (`qemu:///system`,
//!   `test:///default`, ...). Every libvirt call runs on a blocking thread with a deadline,
//!   never on the async runtime.
//! - [`lab::LabDriver`] runs lab "VMs": real child processes that append heartbeat lines to
//!   `<storage_root>/vms/<vm>/disk.log` every 100 ms, so that two writers on one disk are
//!   visible in the file.
//!
//! [`open`] picks the driver from a URI. docs/hypervisor.md is the user-facing reference.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub mod definition;
pub mod error;
pub mod lab;
pub mod libvirt;

pub use error::{Error, Result};

/// What a domain is doing, in the vocabulary the HA logic needs.
///
/// libvirt's states and reasons are folded into this; the lab driver produces the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainState {
    /// The guest runs (libvirt "running" or "blocked").
    Running,
    /// The guest is paused; it still holds its disks.
    Paused,
    /// A graceful shutdown is in progress.
    ShuttingDown,
    /// The domain is not running and was stopped for the given reason.
    ShutOff(ShutOffReason),
    /// The domain stopped (or hangs in a crash) without anyone asking it to stop.
    /// For HA this is the case that calls for a restart.
    Crashed(CrashReason),
    /// The guest suspended itself (power management).
    Suspended,
    /// The hypervisor reports no state.
    NoState,
}

impl DomainState {
    /// True for the states in which the guest may still write its disks.
    pub fn may_be_running(self) -> bool {
        matches!(
            self,
            DomainState::Running
                | DomainState::Paused
                | DomainState::ShuttingDown
                | DomainState::Suspended
                | DomainState::NoState
        )
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainState::Running => formatter.write_str("running"),
            DomainState::Paused => formatter.write_str("paused"),
            DomainState::ShuttingDown => formatter.write_str("shutting down"),
            DomainState::ShutOff(reason) => write!(formatter, "shut off ({reason:?})"),
            DomainState::Crashed(reason) => write!(formatter, "crashed ({reason:?})"),
            DomainState::Suspended => formatter.write_str("suspended"),
            DomainState::NoState => formatter.write_str("no state"),
        }
    }
}

/// Why a domain is shut off (libvirt's `virDomainShutoffReason`, minus "crashed", which
/// becomes [`DomainState::Crashed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShutOffReason {
    /// Never started, or the reason is not known.
    Unknown,
    /// The guest shut down (a graceful shutdown completed).
    Shutdown,
    /// Hard stop by the hypervisor's destroy.
    Destroyed,
    /// Migrated away.
    Migrated,
    /// State saved to a file.
    Saved,
    /// Failed to start.
    Failed,
    /// Restored from a snapshot of a shut off domain.
    FromSnapshot,
    /// Stopped by the management daemon (libvirtd) itself.
    Daemon,
}

/// Why a domain counts as crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrashReason {
    /// libvirt says crashed without a reason.
    Unknown,
    /// The guest kernel panicked (libvirt "crashed/panicked"; with `on_crash=preserve`
    /// the emulator may still be alive).
    Panicked,
    /// The emulator or lab VM process exited without the driver stopping it (libvirt
    /// "shut off/crashed", or a lab VM whose process is gone while its pid file remains).
    ProcessExited,
}

/// One domain as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    /// The domain's UUID when the driver knows one.
    pub uuid: Option<String>,
    pub state: DomainState,
    /// True while the hypervisor holds a running instance (libvirt `isActive`; for the
    /// lab driver: the VM process is alive).
    pub active: bool,
    /// True when the domain has a stored definition (can be started again).
    pub persistent: bool,
    pub vcpus: u32,
    /// Current memory, KiB.
    pub memory_kib: u64,
    /// Maximum memory, KiB.
    pub max_memory_kib: u64,
}

/// A graceful shutdown request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownRequest {
    /// How long the guest gets to stop by itself.
    pub timeout: Duration,
    /// Hard-stop the domain when the timeout passes instead of failing with
    /// [`Error::ShutdownTimedOut`].
    pub destroy_on_timeout: bool,
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The guest stopped by itself within the timeout.
    Graceful,
    /// The guest did not stop in time and was destroyed (only with `destroy_on_timeout`).
    Destroyed,
}

/// A migration request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateRequest {
    /// The destination hypervisor's URI, e.g. `qemu+ssh://node2/system`.
    pub destination_uri: String,
    /// Live migration (the guest keeps running) rather than pause-copy-resume.
    pub live: bool,
    /// Deadline for the whole migration.
    pub timeout: Duration,
}

/// A host's hypervisor: everything the agent does to VMs goes through this.
///
/// Every method is bounded in time: a driver returns [`Error::Timeout`] rather than block
/// past its call deadline. Methods take the domain's name.
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// A short driver name for logs and errors: `libvirt` or `lab`.
    fn driver_name(&self) -> &'static str;

    /// Whether [`Hypervisor::migrate`] can work at all with this driver.
    fn supports_migration(&self) -> bool;

    /// Every domain the hypervisor knows, running or only defined.
    async fn list(&self) -> Result<Vec<DomainInfo>>;

    /// One domain; [`Error::NoSuchDomain`] when it is unknown.
    async fn domain(&self, name: &str) -> Result<DomainInfo>;

    /// Stores a persistent definition from a libvirt domain XML; returns the domain name.
    /// Defining an existing domain again replaces its definition (libvirt semantics).
    async fn define(&self, xml: &str) -> Result<String>;

    /// Starts a defined, shut off (or crashed) domain.
    async fn start(&self, name: &str) -> Result<()>;

    /// Hard stop: the guest gets no chance to react.
    async fn destroy(&self, name: &str) -> Result<()>;

    /// Asks the guest to stop and waits up to `request.timeout` for it to be shut off.
    async fn shutdown(&self, name: &str, request: ShutdownRequest) -> Result<ShutdownOutcome>;

    /// Removes the stored definition.
    async fn undefine(&self, name: &str) -> Result<()>;

    /// Moves a running domain to another host; [`Error::Unsupported`] where the driver
    /// cannot.
    async fn migrate(&self, name: &str, request: &MigrateRequest) -> Result<()>;

    /// The domain's definition as XML, suitable for [`Hypervisor::define`] on another host.
    async fn domain_xml(&self, name: &str) -> Result<String>;
}

/// Options for [`open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Deadline of each single hypervisor call (libvirt RPC, lab file and process work).
    pub call_timeout: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { call_timeout: Duration::from_secs(30) }
    }
}

/// Opens the driver a URI names.
///
/// - `lab:<storage_root>?state=<dir>[&host=<name>][&vm_binary=<path>]`: the lab process
///   driver (see [`lab::LabConfig::from_uri`]);
/// - anything else (`qemu:///system`, `test:///default`, `qemu+ssh://...`): libvirt.
pub async fn open(uri: &str, options: OpenOptions) -> Result<Arc<dyn Hypervisor>> {
    if lab::LabConfig::is_lab_uri(uri) {
        let config = lab::LabConfig::from_uri(uri)?;
        let driver = lab::LabDriver::new(config, options.call_timeout)?;
        return Ok(Arc::new(driver));
    }
    let driver = libvirt::LibvirtDriver::connect(uri, options.call_timeout).await?;
    Ok(Arc::new(driver))
}
