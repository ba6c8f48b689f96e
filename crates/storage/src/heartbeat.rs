//! Heartbeat writer (agent side) and reader (manager and neighbour side).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Result, StorageError};
use crate::layout;
use crate::liveness::{Liveness, LivenessTracker};
use crate::pool::{read_bytes, write_replace, Pool};
use crate::record::{AgentState, BootId, HeartbeatRecord, Name};

/// Who writes: this cluster, this host, this boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIdentity {
    pub cluster: Name,
    pub host: Name,
    pub boot_id: BootId,
}

/// Writes one host's heartbeat record on one pool. The agent runs one writer per
/// pool, each in its own task, so a hung pool delays only its own heartbeat.
#[derive(Debug)]
pub struct HeartbeatWriter {
    pool: Pool,
    identity: HostIdentity,
    io_timeout: Duration,
    /// The counter of the last write attempted (landed or not).
    counter: u64,
}

impl HeartbeatWriter {
    /// A writer whose first write has counter 1. Readers compare counters for equality
    /// only, so starting low after an agent restart is harmless; [`Self::resume`]
    /// continues the old sequence anyway so that humans see it grow.
    pub fn new(pool: Pool, identity: HostIdentity, io_timeout: Duration) -> Self {
        Self::starting_after(pool, identity, io_timeout, 0)
    }

    /// A writer whose first write has counter `last_counter + 1` (wrapping).
    pub fn starting_after(pool: Pool, identity: HostIdentity, io_timeout: Duration, last_counter: u64) -> Self {
        Self { pool, identity, io_timeout, counter: last_counter }
    }

    /// Continues after this host's existing record on the pool, if it can be read in
    /// time; starts afresh otherwise (an unreadable pool must not stop the agent).
    pub async fn resume(pool: Pool, identity: HostIdentity, io_timeout: Duration) -> Self {
        let previous = read_heartbeat(&pool, &identity.cluster, &identity.host, io_timeout).await;
        let last_counter = match previous {
            Ok(Some(record)) => record.counter,
            _ => 0,
        };
        Self::starting_after(pool, identity, io_timeout, last_counter)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Writes the next record. The counter advances even when a write fails or times
    /// out, because a timed-out write may still land later and the next one must not
    /// repeat its counter.
    pub async fn beat(&mut self, agent_state: AgentState, watchdog_armed: bool) -> Result<HeartbeatRecord> {
        self.counter = self.counter.wrapping_add(1);
        let record = HeartbeatRecord {
            cluster: self.identity.cluster.clone(),
            host: self.identity.host.clone(),
            boot_id: self.identity.boot_id,
            counter: self.counter,
            writer_unix_ms: unix_now_ms(),
            agent_state,
            watchdog_armed,
        };
        let bytes = record.encode();
        let cluster = self.identity.cluster.clone();
        let host = self.identity.host.clone();
        self.pool
            .run("write heartbeat", self.io_timeout, move |root| {
                write_replace(
                    &layout::heartbeat_path(root, &cluster, &host),
                    &layout::heartbeat_temporary_path(root, &cluster, &host),
                    &bytes,
                )
            })
            .await?;
        Ok(record)
    }
}

/// Reads `host`'s heartbeat on `pool`: `Ok(None)` if it has never written one there;
/// a typed error for a torn, corrupt, foreign-cluster or misplaced record.
pub async fn read_heartbeat(
    pool: &Pool,
    cluster: &Name,
    host: &Name,
    io_timeout: Duration,
) -> Result<Option<HeartbeatRecord>> {
    let path_cluster = cluster.clone();
    let path_host = host.clone();
    let bytes = pool
        .run("read heartbeat", io_timeout, move |root| {
            read_bytes(&layout::heartbeat_path(root, &path_cluster, &path_host))
        })
        .await?;
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    let record = HeartbeatRecord::decode(&bytes, cluster)?;
    if &record.host != host {
        return Err(StorageError::WrongSubject { expected: host.to_string(), found: record.host.to_string() });
    }
    Ok(Some(record))
}

/// One poll of a [`HeartbeatMonitor`]: the verdict, the latest record read (whose
/// agent state and watchdog flag decide what a stale verdict proves), and this poll's
/// read error if it failed.
#[derive(Debug)]
pub struct HeartbeatObservation {
    pub liveness: Liveness,
    pub record: Option<HeartbeatRecord>,
    pub read_error: Option<StorageError>,
}

/// Watches one host's heartbeat on one pool for one reader (the manager's heartbeat
/// investigator, or an agent checking a neighbour). Keep one monitor per host and pool
/// for as long as the host is watched: the verdict needs the history of reads.
#[derive(Debug)]
pub struct HeartbeatMonitor {
    pool: Pool,
    cluster: Name,
    host: Name,
    io_timeout: Duration,
    tracker: LivenessTracker<(BootId, u64)>,
    record: Option<HeartbeatRecord>,
}

impl HeartbeatMonitor {
    /// `expiry`: how long the record must stay unchanged on our clock to be stale.
    pub fn new(pool: Pool, cluster: Name, host: Name, io_timeout: Duration, expiry: Duration) -> Self {
        Self { pool, cluster, host, io_timeout, tracker: LivenessTracker::new(expiry), record: None }
    }

    /// Reads once and judges. A failed or unreadable read is no observation: the verdict
    /// stays what earlier reads showed, and the error is reported alongside it.
    pub async fn poll(&mut self) -> HeartbeatObservation {
        let read = read_heartbeat(&self.pool, &self.cluster, &self.host, self.io_timeout).await;
        let read_finished_at = Instant::now();
        let read_error = match read {
            Ok(Some(record)) => {
                self.tracker.observe(record.progress(), read_finished_at);
                self.record = Some(record);
                None
            }
            Ok(None) => None,
            Err(error) => Some(error),
        };
        HeartbeatObservation { liveness: self.tracker.judge(), record: self.record.clone(), read_error }
    }
}

/// Wall-clock milliseconds for the informational timestamp. A clock before 1970
/// writes 0 rather than failing a heartbeat.
pub(crate) fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
