//! The crate's one error type.
//!
//! Callers (the agent's command handlers, the manager's recovery worker) need one
//! question answered above all: may I try again? [`Error::is_retryable`] answers it.
//! A retryable error means the hypervisor or the storage under it may recover on its
//! own (a lost connection, a timeout, an I/O error); a fatal one means the same request
//! will fail the same way (no such domain, a bad definition, an unsupported operation).
//!
//! A [`Error::Timeout`] never means "did not happen": the call may still complete in the
//! background, so a caller must re-read the domain's state before acting on it.

use std::path::PathBuf;

/// Every error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver knows no domain of that name.
    #[error("no such domain {domain:?}")]
    NoSuchDomain { domain: String },

    /// The request does not fit the domain's current state (start a running domain,
    /// destroy a shut off one, undefine a running lab VM).
    #[error("domain {domain:?}: {message}")]
    InvalidState { domain: String, message: String },

    /// The domain definition (XML) was rejected.
    #[error("invalid domain definition: {message}")]
    InvalidDefinition { message: String },

    /// The driver cannot do this at all (live migration on the lab or test driver).
    #[error("{operation} is not supported by the {driver} driver")]
    Unsupported { operation: &'static str, driver: &'static str },

    /// The hypervisor URI could not be parsed into a driver configuration.
    #[error("invalid hypervisor uri {uri:?}: {message}")]
    InvalidUri { uri: String, message: String },

    /// A call did not return within its deadline. Its outcome is unknown.
    #[error("{operation} timed out after {timeout_ms} ms; its outcome is unknown")]
    Timeout { operation: &'static str, timeout_ms: u64 },

    /// A graceful shutdown was requested, the guest did not stop within the timeout and
    /// the caller did not ask for the destroy fallback. The domain is still running.
    #[error("domain {domain:?} did not shut down within {timeout_ms} ms")]
    ShutdownTimedOut { domain: String, timeout_ms: u64 },

    /// The hypervisor could not be reached or failed in a way that may pass (libvirtd
    /// restarting, a broken RPC connection, an internal operation failure).
    #[error("hypervisor unavailable during {operation}: {message}")]
    Unavailable { operation: &'static str, message: String },

    /// libvirt refused the request for a reason that retrying will not fix.
    #[error("libvirt rejected {operation}: {message}")]
    Rejected { operation: &'static str, message: String },

    /// A file operation of the lab driver failed (state directory, shared storage).
    #[error("{operation} failed on {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// True when the same request may succeed later without anyone changing it.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::ShutdownTimedOut { .. } | Error::Unavailable { .. } | Error::Io { .. } => {
                true
            }
            Error::NoSuchDomain { .. }
            | Error::InvalidState { .. }
            | Error::InvalidDefinition { .. }
            | Error::Unsupported { .. }
            | Error::InvalidUri { .. }
            | Error::Rejected { .. } => false,
        }
    }

    /// The opposite of [`Error::is_retryable`], for readable call sites.
    pub fn is_fatal(&self) -> bool {
        !self.is_retryable()
    }

    pub(crate) fn io(operation: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { operation, path: path.into(), source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
