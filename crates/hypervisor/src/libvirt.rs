//! The libvirt driver, on the `virt` crate.
//!
//! libvirt's API blocks (an RPC to libvirtd, or the test driver's in-process work), so
//! every call runs on tokio's blocking pool and the async caller waits with a deadline.
//! A call that misses its deadline keeps its blocking thread until libvirt returns; at
//! most [`CALLS_IN_FLIGHT_MAX`] such threads exist per driver, after which new calls wait
//! for a slot within their own deadline, so a hung libvirtd cannot pile up threads.
//!
//! One connection is opened at [`LibvirtDriver::connect`] and reused by every call (the
//! `test:///` driver keeps its state per connection). When a call fails and libvirt says
//! the connection is dead, the connection is dropped and the next call opens a new one.
//!
//! No `unsafe` here: the `virt` crate's safe API covers every call we make.

use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use crate::{
    CrashReason, DomainInfo, DomainState, Error, Hypervisor, MigrateRequest, Result, ShutOffReason, ShutdownOutcome,
    ShutdownRequest,
};

/// Bound on blocking threads one driver may occupy (calls running or stuck in libvirt).
pub const CALLS_IN_FLIGHT_MAX: usize = 8;

/// How often a graceful shutdown re-reads the domain's state.
const SHUTDOWN_POLL_INTERVAL: Duration = Duration::from_millis(200);

const DRIVER: &str = "libvirt";

/// A [`Hypervisor`] on one libvirt connection.
#[derive(Debug)]
pub struct LibvirtDriver {
    uri: String,
    call_timeout: Duration,
    /// The libvirt driver behind the URI (`QEMU`, `Test`, ...), read at connect time.
    driver_type: String,
    connection: Arc<Mutex<Option<Connect>>>,
    calls_in_flight: Arc<Semaphore>,
}

impl LibvirtDriver {
    /// Opens `uri` (for example `qemu:///system` or `test:///default`), with
    /// `call_timeout` as the deadline of every later call, this one included.
    pub async fn connect(uri: &str, call_timeout: Duration) -> Result<Self> {
        static SILENCE_DEFAULT_ERROR_PRINTER: Once = Once::new();
        // libvirt prints every error to stderr by default; ours are returned instead.
        SILENCE_DEFAULT_ERROR_PRINTER.call_once(virt::error::clear_error_callback);

        let connection = Arc::new(Mutex::new(None));
        let calls_in_flight = Arc::new(Semaphore::new(CALLS_IN_FLIGHT_MAX));
        let mut driver = LibvirtDriver {
            uri: uri.to_string(),
            call_timeout,
            driver_type: String::new(),
            connection,
            calls_in_flight,
        };
        driver.driver_type = driver
            .call("connect", None, call_timeout, |connection| {
                connection.driver_type().map_err(|error| map_error("connect", None, error))
            })
            .await?;
        tracing::debug!(uri, driver_type = %driver.driver_type, "libvirt connection open");
        Ok(driver)
    }

    /// The URI this driver was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Runs `work` on a blocking thread with this driver's connection, within `timeout`.
    async fn call<T, F>(&self, operation: &'static str, domain: Option<&str>, timeout: Duration, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T> + Send + 'static,
    {
        let deadline = Instant::now() + timeout;
        let timed_out =
            || Error::Timeout { operation, timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX) };
        let permit = tokio::time::timeout_at(deadline, self.calls_in_flight.clone().acquire_owned())
            .await
            .map_err(|_| timed_out())?
            .expect("the driver never closes its semaphore");

        let slot = Arc::clone(&self.connection);
        let uri = self.uri.clone();
        let domain_name = domain.map(str::to_string);
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let connection = connection_from_slot(&slot, &uri)?;
            let result = work(&connection);
            if matches!(result, Err(Error::Unavailable { .. })) && !connection.is_alive().unwrap_or(false) {
                tracing::warn!(uri, operation, domain = ?domain_name, "libvirt connection lost; reopening on the next call");
                let mut guard = slot.lock().unwrap_or_else(|poison| poison.into_inner());
                *guard = None;
            }
            result
        });
        match tokio::time::timeout_at(deadline, task).await {
            Err(_) => {
                tracing::warn!(uri = self.uri, operation, domain, "libvirt call missed its deadline");
                Err(timed_out())
            }
            Ok(Err(join_error)) => std::panic::resume_unwind(join_error.into_panic()),
            Ok(Ok(result)) => result,
        }
    }

    /// Runs `work` on the named domain.
    async fn with_domain<T, F>(&self, operation: &'static str, name: &str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Domain) -> std::result::Result<T, Failure> + Send + 'static,
    {
        let owned_name = name.to_string();
        self.call(operation, Some(name), self.call_timeout, move |connection| {
            let domain = connection
                .lookup_domain_by_name(&owned_name)
                .map_err(|error| map_error(operation, Some(&owned_name), error))?;
            work(&domain).map_err(|failure| match failure {
                Failure::Libvirt(error) => map_error(operation, Some(&owned_name), error),
                Failure::Refused(message) => {
                    Error::InvalidState { domain: owned_name.clone(), message: message.to_string() }
                }
            })
        })
        .await
    }
}

/// How a domain operation failed: in libvirt, or in our own state check before it.
///
/// Drivers disagree on the error for "already running" (QEMU: operation invalid; the test
/// driver: internal error), so start and destroy check the state first themselves.
#[derive(Debug)]
enum Failure {
    Libvirt(virt::error::Error),
    Refused(&'static str),
}

impl From<virt::error::Error> for Failure {
    fn from(error: virt::error::Error) -> Self {
        Failure::Libvirt(error)
    }
}

fn connection_from_slot(slot: &Mutex<Option<Connect>>, uri: &str) -> Result<Connect> {
    let mut guard = slot.lock().unwrap_or_else(|poison| poison.into_inner());
    if let Some(connection) = guard.as_ref() {
        return Ok(connection.clone());
    }
    let connection = Connect::open(Some(uri)).map_err(|error| map_error("connect", None, error))?;
    *guard = Some(connection.clone());
    Ok(connection)
}

#[async_trait::async_trait]
impl Hypervisor for LibvirtDriver {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn supports_migration(&self) -> bool {
        // The test driver has no migration; the real ones (QEMU, Xen, ...) do.
        !self.driver_type.eq_ignore_ascii_case("test")
    }

    async fn list(&self) -> Result<Vec<DomainInfo>> {
        self.call("list", None, self.call_timeout, |connection| {
            let domains = connection.list_all_domains(0).map_err(|error| map_error("list", None, error))?;
            let mut infos = Vec::with_capacity(domains.len());
            for domain in &domains {
                match domain_info(domain) {
                    Ok(info) => infos.push(info),
                    // A transient domain may vanish between the listing and the lookup.
                    Err(error) if error.code() == Enum::Known(ErrorNumber::NoDomain) => {}
                    Err(error) => return Err(map_error("list", None, error)),
                }
            }
            infos.sort_by(|left, right| left.name.cmp(&right.name));
            Ok(infos)
        })
        .await
    }

    async fn domain(&self, name: &str) -> Result<DomainInfo> {
        self.with_domain("domain info", name, |domain| Ok(domain_info(domain)?)).await
    }

    async fn define(&self, xml: &str) -> Result<String> {
        let xml = xml.to_string();
        self.call("define", None, self.call_timeout, move |connection| {
            let domain = connection.define_domain_xml(&xml).map_err(|error| map_error("define", None, error))?;
            domain.name().map_err(|error| map_error("define", None, error))
        })
        .await
    }

    async fn start(&self, name: &str) -> Result<()> {
        self.with_domain("start", name, |domain| {
            if domain.is_active()? {
                return Err(Failure::Refused("already running"));
            }
            Ok(domain.create()?)
        })
        .await
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        self.with_domain("destroy", name, |domain| {
            if !domain.is_active()? {
                return Err(Failure::Refused("not running"));
            }
            Ok(domain.destroy()?)
        })
        .await
    }

    async fn shutdown(&self, name: &str, request: ShutdownRequest) -> Result<ShutdownOutcome> {
        let started = Instant::now();
        self.with_domain("shutdown", name, |domain| {
            if !domain.is_active()? {
                return Err(Failure::Refused("not running"));
            }
            Ok(domain.shutdown()?)
        })
        .await?;
        loop {
            let info = self.domain(name).await?;
            if !info.active {
                return Ok(ShutdownOutcome::Graceful);
            }
            if started.elapsed() >= request.timeout {
                break;
            }
            tokio::time::sleep(SHUTDOWN_POLL_INTERVAL.min(request.timeout)).await;
        }
        let timeout_ms = u64::try_from(request.timeout.as_millis()).unwrap_or(u64::MAX);
        if !request.destroy_on_timeout {
            return Err(Error::ShutdownTimedOut { domain: name.to_string(), timeout_ms });
        }
        tracing::warn!(domain = name, timeout_ms, "graceful shutdown timed out; destroying");
        match self.destroy(name).await {
            Ok(()) => Ok(ShutdownOutcome::Destroyed),
            // It stopped by itself between the last poll and the destroy.
            Err(Error::InvalidState { .. }) if !self.domain(name).await?.active => Ok(ShutdownOutcome::Graceful),
            Err(error) => Err(error),
        }
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        self.with_domain("undefine", name, |domain| Ok(domain.undefine()?)).await
    }

    async fn migrate(&self, name: &str, request: &MigrateRequest) -> Result<()> {
        if !self.supports_migration() {
            return Err(Error::Unsupported { operation: "migrate", driver: DRIVER });
        }
        let owned_name = name.to_string();
        let destination_uri = request.destination_uri.clone();
        let mut flags = virt::sys::VIR_MIGRATE_PERSIST_DEST | virt::sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        if request.live {
            flags |= virt::sys::VIR_MIGRATE_LIVE;
        }
        self.call("migrate", Some(name), request.timeout, move |connection| {
            let domain = connection
                .lookup_domain_by_name(&owned_name)
                .map_err(|error| map_error("migrate", Some(&owned_name), error))?;
            let destination =
                Connect::open(Some(&destination_uri)).map_err(|error| map_error("migrate", None, error))?;
            domain
                .migrate(&destination, flags, None, None, 0)
                .map_err(|error| map_error("migrate", Some(&owned_name), error))?;
            Ok(())
        })
        .await
    }

    async fn domain_xml(&self, name: &str) -> Result<String> {
        // INACTIVE: the persistent definition, what another host needs to define it.
        // SECURE: include secrets (VNC passwords ...), or the copy would not be faithful.
        let flags = virt::sys::VIR_DOMAIN_XML_INACTIVE | virt::sys::VIR_DOMAIN_XML_SECURE;
        self.with_domain("domain xml", name, move |domain| Ok(domain.xml_desc(flags)?)).await
    }
}

fn domain_info(domain: &Domain) -> std::result::Result<DomainInfo, virt::error::Error> {
    let name = domain.name()?;
    let uuid = domain.uuid_string().ok();
    let (state, reason) = domain.state()?;
    let active = domain.is_active()?;
    let persistent = domain.is_persistent()?;
    let info = domain.info()?;
    Ok(DomainInfo {
        name,
        uuid,
        state: map_state(state, reason),
        active,
        persistent,
        vcpus: info.nr_virt_cpu,
        memory_kib: info.memory,
        max_memory_kib: info.max_mem,
    })
}

/// Folds libvirt's state and reason into [`DomainState`].
pub fn map_state(state: virt::domain::DomainStateEnum, reason: virt::domain::DomainStateReasonEnum) -> DomainState {
    use virt::domain::{DomainCrashedReason, DomainShutoffReason, DomainState as Libvirt, DomainStateReason};
    let Enum::Known(state) = state else {
        return DomainState::NoState;
    };
    match state {
        Libvirt::NoState => DomainState::NoState,
        Libvirt::Running | Libvirt::Blocked => DomainState::Running,
        Libvirt::Paused => DomainState::Paused,
        Libvirt::Shutdown => DomainState::ShuttingDown,
        Libvirt::PMSuspended => DomainState::Suspended,
        Libvirt::Crashed => match reason {
            Enum::Known(DomainStateReason::Crashed(Enum::Known(DomainCrashedReason::Panicked))) => {
                DomainState::Crashed(CrashReason::Panicked)
            }
            _ => DomainState::Crashed(CrashReason::Unknown),
        },
        Libvirt::Shutoff => {
            let Enum::Known(DomainStateReason::Shutoff(Enum::Known(reason))) = reason else {
                return DomainState::ShutOff(ShutOffReason::Unknown);
            };
            match reason {
                DomainShutoffReason::Crashed => DomainState::Crashed(CrashReason::ProcessExited),
                DomainShutoffReason::Unknown => DomainState::ShutOff(ShutOffReason::Unknown),
                DomainShutoffReason::Shutdown => DomainState::ShutOff(ShutOffReason::Shutdown),
                DomainShutoffReason::Destroyed => DomainState::ShutOff(ShutOffReason::Destroyed),
                DomainShutoffReason::Migrated => DomainState::ShutOff(ShutOffReason::Migrated),
                DomainShutoffReason::Saved => DomainState::ShutOff(ShutOffReason::Saved),
                DomainShutoffReason::Failed => DomainState::ShutOff(ShutOffReason::Failed),
                DomainShutoffReason::FromSnapshot => DomainState::ShutOff(ShutOffReason::FromSnapshot),
                DomainShutoffReason::Daemon => DomainState::ShutOff(ShutOffReason::Daemon),
            }
        }
    }
}

/// Turns a libvirt error into ours, deciding retryable versus fatal.
fn map_error(operation: &'static str, domain: Option<&str>, error: virt::error::Error) -> Error {
    let message = error.message().to_string();
    let domain_name = || domain.unwrap_or_default().to_string();
    let Enum::Known(code) = error.code() else {
        return Error::Rejected { operation, message };
    };
    match code {
        ErrorNumber::NoDomain => Error::NoSuchDomain { domain: domain_name() },
        ErrorNumber::OperationInvalid => Error::InvalidState { domain: domain_name(), message },
        ErrorNumber::NoSupport | ErrorNumber::OperationUnsupported | ErrorNumber::ArgumentUnsupported => {
            tracing::debug!(operation, message, "libvirt does not support the operation");
            Error::Unsupported { operation, driver: DRIVER }
        }
        ErrorNumber::XmlError
        | ErrorNumber::XmlDetail
        | ErrorNumber::DomExist
        | ErrorNumber::InvalidArg
        | ErrorNumber::ConfigUnsupported => Error::InvalidDefinition { message },
        ErrorNumber::OperationTimeout
        | ErrorNumber::Rpc
        | ErrorNumber::NoConnect
        | ErrorNumber::SystemError
        | ErrorNumber::InternalError
        | ErrorNumber::OperationFailed
        | ErrorNumber::OperationAborted
        | ErrorNumber::AgentUnresponsive
        | ErrorNumber::ResourceBusy => Error::Unavailable { operation, message },
        _ => Error::Rejected { operation, message },
    }
}

#[cfg(test)]
mod tests {
    use virt::domain::{
        DomainCrashedReason, DomainRunningReason, DomainShutoffReason, DomainState as Libvirt, DomainStateReason,
    };

    use super::*;

    fn shutoff(reason: DomainShutoffReason) -> DomainState {
        map_state(Enum::Known(Libvirt::Shutoff), Enum::Known(DomainStateReason::Shutoff(Enum::Known(reason))))
    }

    #[test]
    fn a_dead_emulator_is_a_crash_and_a_requested_stop_is_not() {
        assert_eq!(shutoff(DomainShutoffReason::Crashed), DomainState::Crashed(CrashReason::ProcessExited));
        assert_eq!(shutoff(DomainShutoffReason::Destroyed), DomainState::ShutOff(ShutOffReason::Destroyed));
        assert_eq!(shutoff(DomainShutoffReason::Shutdown), DomainState::ShutOff(ShutOffReason::Shutdown));
        assert_eq!(shutoff(DomainShutoffReason::Migrated), DomainState::ShutOff(ShutOffReason::Migrated));
        assert_eq!(shutoff(DomainShutoffReason::Failed), DomainState::ShutOff(ShutOffReason::Failed));
        let panicked = map_state(
            Enum::Known(Libvirt::Crashed),
            Enum::Known(DomainStateReason::Crashed(Enum::Known(DomainCrashedReason::Panicked))),
        );
        assert_eq!(panicked, DomainState::Crashed(CrashReason::Panicked));
    }

    #[test]
    fn blocked_counts_as_running_and_unknown_values_do_not_panic() {
        let blocked = map_state(
            Enum::Known(Libvirt::Blocked),
            Enum::Known(DomainStateReason::Running(Enum::Known(DomainRunningReason::Booted))),
        );
        assert_eq!(blocked, DomainState::Running);
        assert_eq!(map_state(Enum::Unknown(99), Enum::Unknown(7)), DomainState::NoState);
        assert_eq!(
            map_state(Enum::Known(Libvirt::Shutoff), Enum::Unknown(42)),
            DomainState::ShutOff(ShutOffReason::Unknown)
        );
    }
}
