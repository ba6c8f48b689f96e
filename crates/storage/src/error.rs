//! The crate's one error type.
//!
//! Callers need to tell three families apart (as openraft separates retry from fatal):
//! a record that must not be trusted (`is_corrupt_record`), storage that did not
//! answer in time or failed (`is_retryable`: try again next tick, count towards
//! self-fencing), and lease outcomes that are decisions, not faults.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in kvmha-storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    // ---- decoding: the bytes on storage are not a record we may trust ----
    /// Short (torn, truncated) or long (foreign, appended to) record.
    #[error("record has {actual} bytes, expected {expected}")]
    WrongLength { expected: usize, actual: usize },
    #[error("bad record magic {found:02x?}, expected {expected:02x?}")]
    BadMagic { expected: [u8; 4], found: [u8; 4] },
    #[error("unsupported record version {found}, this build reads {supported}")]
    UnsupportedVersion { found: u16, supported: u16 },
    /// Torn write or bit rot: the bytes are not what any writer wrote.
    #[error("record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { stored: u32, computed: u32 },
    #[error("malformed record field {field}: {reason}")]
    MalformedField { field: &'static str, reason: &'static str },
    /// A valid record of another cluster sharing the pool: never mistaken for ours.
    #[error("record belongs to cluster {found:?}, expected {expected:?}")]
    ForeignCluster { expected: String, found: String },
    /// A valid record stored under the wrong file name (copied or renamed by hand).
    #[error("record names {found:?} but was read from the file of {expected:?}")]
    WrongSubject { expected: String, found: String },

    // ---- names and configuration ----
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid boot id {text:?}: expected 32 hex digits (dashes allowed)")]
    InvalidBootId { text: String },
    /// Lease and self-fence timings that would let another host take a lease while
    /// this host may still run the VM.
    #[error("timing conflict ({rule}): {detail}")]
    TimingConflict { rule: &'static str, detail: String },

    // ---- storage I/O ----
    #[error("i/o error during {op} on {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The pool did not answer by the deadline. The operation may still complete
    /// later on the pool's worker: a timeout means "unknown", never "did not happen".
    #[error("pool {pool} did not complete {op} within {deadline:?}")]
    Timeout { pool: String, op: &'static str, deadline: Duration },
    /// The pool's worker is stuck and its bounded queue is full: refused at once
    /// instead of piling up work behind a hung mount.
    #[error("pool {pool} is hung: {queue_capacity} operations already queued")]
    PoolHung { pool: String, queue_capacity: usize },
    #[error("pool {pool} worker has stopped")]
    PoolStopped { pool: String },

    // ---- lease outcomes ----
    /// Another host's lease record kept changing while we watched it.
    #[error("lease {vm} is held by {owner} (boot {boot_id}) and seen renewed")]
    LeaseHeld { vm: String, owner: String, boot_id: String },
    /// We wrote our claim, but someone else's claim replaced it before we confirmed.
    #[error("lease {vm}: our claim was overwritten by a concurrent acquirer")]
    LeaseContended { vm: String },
    /// The acquirer was too slow between reading the record and writing its claim,
    /// so its read can no longer justify the claim.
    #[error("lease {vm}: {elapsed:?} between read and claim exceeds the i/o timeout {limit:?}")]
    AcquireTooSlow { vm: String, elapsed: Duration, limit: Duration },
    /// The lease is no longer ours (taken over, or not renewed in time): the VM must
    /// be stopped before anyone else may start it.
    #[error("lease {vm} lost: {reason}")]
    LeaseLost { vm: String, reason: &'static str },
}

impl StorageError {
    /// The bytes on storage cannot be trusted (torn, corrupt, foreign, misplaced).
    pub fn is_corrupt_record(&self) -> bool {
        matches!(
            self,
            Self::WrongLength { .. }
                | Self::BadMagic { .. }
                | Self::UnsupportedVersion { .. }
                | Self::ChecksumMismatch { .. }
                | Self::MalformedField { .. }
                | Self::ForeignCluster { .. }
                | Self::WrongSubject { .. }
        )
    }

    /// Worth trying again on the next tick: storage trouble or lost races, not bugs.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Io { .. }
                | Self::Timeout { .. }
                | Self::PoolHung { .. }
                | Self::LeaseHeld { .. }
                | Self::LeaseContended { .. }
                | Self::AcquireTooSlow { .. }
        ) || self.is_corrupt_record()
    }
}

/// Result alias for the crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
