//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while building, breaking or checking a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (effective uid is {uid})")]
    NotRoot { uid: u32 },
    #[error("command `{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("command `{command}` timed out after {timeout_ms} ms")]
    CommandTimeout { command: String, timeout_ms: u64 },
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signal {signal} to pid {pid}: {source}")]
    Signal {
        pid: i32,
        signal: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("no host named `{0}` in this lab")]
    UnknownHost(String),
    #[error("{what} did not happen within {timeout_ms} ms")]
    NotReady { what: String, timeout_ms: u64 },
    #[error("invalid lab config: {0}")]
    Config(String),
    #[error("scenario field `{field}`: {message}")]
    Scenario { field: String, message: String },
}

impl LabError {
    /// Wraps an `std::io::Error` with the path it happened on, so messages say where.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LabError::Io { path: path.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, LabError>;
