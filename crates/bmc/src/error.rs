//! The crate's one error type.

use crate::PowerState;

/// Everything that can go wrong talking to a BMC. Variants are split so the
/// manager can tell "retry later" (`Unreachable`, `Timeout`) from "a human must
/// act" (`Authentication`, `Refused`, `Config`); see [`BmcError::is_retryable`].
///
/// No variant ever carries the password: configs hold it as a
/// [`crate::Secret`], and errors are built from codes and addresses only.
#[derive(Debug, thiserror::Error)]
pub enum BmcError {
    #[error("authentication failed: {reason}")]
    Authentication { reason: String },

    #[error("bmc {address} unreachable: {reason}")]
    Unreachable { address: String, reason: String },

    /// The BMC answered and said no. For IPMI `code` is the completion code
    /// (or RMCP+ status code during session set-up); for Redfish the HTTP status.
    #[error("{operation} refused by bmc: code {} ({meaning})", display_code(*code))]
    Refused { operation: String, code: u16, meaning: String },

    #[error("{operation} timed out after {after_ms} ms")]
    Timeout { operation: String, after_ms: u64 },

    #[error("power state never read back {wanted} within {after_ms} ms (last read: {last})")]
    StateNeverReached { wanted: PowerState, last: String, after_ms: u64 },

    /// Malformed or unverifiable bytes from the peer (bad checksum, bad
    /// integrity code, unexpected payload).
    #[error("protocol error: {reason}")]
    Protocol { reason: String },

    /// No cipher suite both sides accept, or only one we refuse (suite 0).
    #[error("no acceptable cipher suite: {reason}")]
    Negotiation { reason: String },

    #[error("invalid configuration: {reason}")]
    Config { reason: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl BmcError {
    /// True when trying again later may succeed without anyone changing
    /// anything: the network or the BMC may come back.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BmcError::Unreachable { .. } | BmcError::Timeout { .. } | BmcError::Io { .. })
    }

    pub(crate) fn protocol(reason: impl Into<String>) -> Self {
        BmcError::Protocol { reason: reason.into() }
    }
}

/// IPMI codes are a byte and read best in hex (the spec's "D4h"); HTTP
/// statuses (all above FFh when they are errors) read best in decimal.
fn display_code(code: u16) -> String {
    if code <= 0xff {
        format!("{code:#04x}")
    } else {
        format!("http {code}")
    }
}

pub type Result<T, E = BmcError> = std::result::Result<T, E>;
