//! The one error type of the agent crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{}: cannot read", file.display())]
    ConfigRead { file: PathBuf, source: std::io::Error },
    #[error("{}: field `{field}`: {problem}", file.display())]
    Config { file: PathBuf, field: String, problem: String },
    #[error("join token: {reason}")]
    JoinToken { reason: String },
    #[error("join refused by the manager: {reason}")]
    JoinRefused { reason: String },
    #[error("manager {url}: {reason}")]
    Manager { url: String, reason: String },
    #[error(transparent)]
    Proto(#[from] kvmha_proto::ProtoError),
    #[error("{what}")]
    Io { what: String, source: std::io::Error },
}
