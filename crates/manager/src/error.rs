//! The one error type of the manager crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{}: cannot read", file.display())]
    ConfigRead { file: PathBuf, source: std::io::Error },
    #[error("{}: field `{field}`: {problem}", file.display())]
    Config { file: PathBuf, field: String, problem: String },
    #[error("database {}", path.display())]
    Store { path: PathBuf, source: rusqlite::Error },
    #[error("stored engine state is unreadable: {reason}")]
    Snapshot { reason: String },
    #[error(transparent)]
    Proto(#[from] kvmha_proto::ProtoError),
    #[error("{what}")]
    Io { what: String, source: std::io::Error },
    #[error("etcd: {reason}")]
    Etcd { reason: String },
    /// A write fenced by an epoch that is no longer the leader's.
    #[error("not the leader: {reason}")]
    NotLeader { reason: String },
    #[error("the engine thread stopped")]
    EngineGone,
}
