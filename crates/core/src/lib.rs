//! kvmha-core: every HA decision of kvmha, and nothing else.
//!
//! Pure: no I/O, no async runtime, no clock reads. The manager feeds the [`Engine`] events
//! with the current time and executes the commands it returns; the [`sim`] module does the
//! same against a simulated cluster, so every decision can be replayed from a seed.

pub mod engine;
pub mod event;
pub mod model;
pub mod planner;
pub mod safety;
pub mod sim;
pub mod state;
pub mod time;
pub mod timing;
pub mod verdict;

pub use engine::{Engine, EngineConfig, HostRecord, VmRecord};
pub use event::{Command, Event};
pub use model::{BootId, HostName, HostSpec, PoolName, Resources, VmName, VmSpec};
pub use state::{HostState, VmState};
pub use time::Instant;
pub use timing::{Profile, Timing, TimingError, TimingSettings};
