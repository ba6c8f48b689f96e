//! kvmha-storage: heartbeat records and VM leases on shared storage (file backend).
//!
//! Layers, from pure to I/O:
//! - [`record`]: fixed-size, checksummed record formats (no I/O);
//! - [`liveness`]: "is this record advancing on my clock?" (no I/O, time as argument);
//! - [`timing`]: the timing rule that makes lease expiry safe (no I/O);
//! - [`pool`]: one worker thread per pool, every operation with a deadline;
//! - [`heartbeat`] and [`lease`]: the agent's and the manager's async API.
//!
//! The file layout on a pool and what operators may do with it: `docs/storage.md`.

pub mod crc32c;
pub mod error;
pub mod heartbeat;
pub mod layout;
pub mod lease;
pub mod liveness;
pub mod pool;
pub mod record;
pub mod timing;

pub use error::{Result, StorageError};
pub use heartbeat::{read_heartbeat, HeartbeatMonitor, HeartbeatObservation, HeartbeatWriter, HostIdentity};
pub use lease::{read_lease, HeldLease, LeaseClient};
pub use liveness::{Liveness, LivenessTracker};
pub use pool::{Pool, PoolHealth};
pub use record::{AgentState, AnyRecord, BootId, HeartbeatRecord, LeaseRecord, LeaseState, Name, RECORD_LEN};
pub use timing::LeaseTimings;
