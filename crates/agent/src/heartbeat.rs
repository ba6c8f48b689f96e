//! The agent's heartbeat: one writer per configured pool, each in its own task with its
//! own deadline (a hung pool delays only its own record), independent of the manager
//! session. Every `lease_renew_interval` each writer writes this host's record: boot id,
//! counter, agent state `Running`, and whether the watchdog is armed.

use crate::config::{AgentConfig, PoolConfig};
use crate::AgentError;
use kvmha_core::event::StorageHealth;
use kvmha_core::PoolName;
use kvmha_storage::{AgentState, BootId, HeartbeatWriter, HostIdentity, Name, Pool};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What one pool's writer last achieved.
#[derive(Clone, Debug, Default)]
struct PoolStatus {
    /// Start of the latest write that landed (the self-fence clock runs from the start
    /// of a successful write: it landed at or after that instant).
    last_success: Option<Instant>,
    /// Whether the latest finished attempt failed.
    last_failed: bool,
}

#[derive(Debug)]
struct Writer {
    name: String,
    writer: tokio::sync::Mutex<HeartbeatWriter>,
    status: Mutex<PoolStatus>,
}

/// The running heartbeat writers of this agent.
#[derive(Debug)]
pub struct Heartbeats {
    writers: Vec<Arc<Writer>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// What the records say about the watchdog.
    armed_in_record: Arc<AtomicBool>,
    renew_interval: Duration,
    started: Instant,
}

/// The kernel's boot id in the storage crate's form.
pub fn storage_boot_id(text: &str) -> BootId {
    BootId::parse(text).unwrap_or(BootId([0; 16]))
}

impl Heartbeats {
    /// Starts one writer task per pool. No pool I/O happens before the tasks run.
    /// `origin`: where the self-fence clock starts before any write lands (the last
    /// renewal of an earlier run in this boot, if remembered); now otherwise.
    pub fn start(
        config: &AgentConfig,
        boot_id: BootId,
        armed: bool,
        origin: Option<Instant>,
    ) -> Result<Heartbeats, AgentError> {
        let io = |what: String| {
            move |error: kvmha_storage::StorageError| AgentError::Io {
                what,
                source: std::io::Error::other(error.to_string()),
            }
        };
        let identity = HostIdentity {
            cluster: Name::new(&config.cluster_id).map_err(io("cluster id as a storage name".into()))?,
            host: Name::new(config.name.as_str()).map_err(io("host name as a storage name".into()))?,
            boot_id,
        };
        let renew_interval = config.lease.renewal_interval;
        let io_timeout = config.lease.io_timeout;
        let armed_in_record = Arc::new(AtomicBool::new(armed));
        let mut writers = Vec::new();
        let mut tasks = Vec::new();
        for PoolConfig { name, path } in &config.pools {
            let pool = Pool::open(name, path).map_err(io(format!("opening pool {name}")))?;
            // Counters continue after the previous record: the first write resumes it
            // (bounded by the i/o deadline, inside the task, so a hung pool cannot stall
            // start-up).
            let writer = Arc::new(Writer {
                name: name.clone(),
                writer: tokio::sync::Mutex::new(HeartbeatWriter::new(pool.clone(), identity.clone(), io_timeout)),
                status: Mutex::new(PoolStatus::default()),
            });
            let (task_writer, armed) = (writer.clone(), armed_in_record.clone());
            let identity = identity.clone();
            tasks.push(tokio::spawn(async move {
                {
                    let resumed = HeartbeatWriter::resume(pool, identity, io_timeout).await;
                    *task_writer.writer.lock().await = resumed;
                }
                let mut interval = tokio::time::interval(renew_interval);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    task_writer.beat(AgentState::Running, armed.load(Ordering::SeqCst)).await;
                }
            }));
            writers.push(writer);
        }
        let started = origin.unwrap_or_else(Instant::now);
        Ok(Heartbeats { writers, tasks: Mutex::new(tasks), armed_in_record, renew_interval, started })
    }

    /// Storage health for the ping: a pool fails if its latest attempt failed or no
    /// write landed in the last two renewal intervals (a write still hanging).
    pub fn health(&self, now: Instant) -> StorageHealth {
        let failing: Vec<PoolName> = self
            .writers
            .iter()
            .filter(|writer| {
                let status = writer.status.lock().unwrap_or_else(PoisonError::into_inner);
                let since = status.last_success.unwrap_or(self.started);
                status.last_failed || now.saturating_duration_since(since) > self.renew_interval * 2
            })
            .map(|writer| PoolName::from(writer.name.as_str()))
            .collect();
        if failing.is_empty() {
            StorageHealth::Ok
        } else if failing.len() == self.writers.len() {
            StorageHealth::AllFailing
        } else {
            StorageHealth::Degraded { failing }
        }
    }

    /// The self-fence clock's origin before any write lands.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Start of the latest write that landed on any pool.
    pub fn last_success(&self) -> Option<Instant> {
        self.writers
            .iter()
            .filter_map(|writer| writer.status.lock().unwrap_or_else(PoisonError::into_inner).last_success)
            .max()
    }

    pub fn is_empty(&self) -> bool {
        self.writers.is_empty()
    }

    /// Changes what the records say about the watchdog and writes it to every pool now.
    /// True if the write landed on every pool.
    pub async fn write_armed(&self, armed: bool) -> bool {
        self.armed_in_record.store(armed, Ordering::SeqCst);
        self.write_all(AgentState::Running, armed).await
    }

    /// A clean stop: ends the periodic writes and writes "stopped cleanly, watchdog
    /// disarmed" to every pool. True if it landed on every pool.
    pub async fn stop_cleanly(&self) -> bool {
        let tasks: Vec<_> = self.tasks.lock().unwrap_or_else(PoisonError::into_inner).drain(..).collect();
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        self.armed_in_record.store(false, Ordering::SeqCst);
        self.write_all(AgentState::StoppedCleanly, false).await
    }

    async fn write_all(&self, state: AgentState, armed: bool) -> bool {
        let writes = self.writers.iter().map(|writer| writer.beat(state, armed));
        let landed = futures_join_all(writes).await;
        landed.into_iter().all(|ok| ok)
    }
}

/// Runs the futures concurrently (one per pool: a hung pool must not delay the others).
async fn futures_join_all<F: std::future::Future<Output = bool>>(futures: impl Iterator<Item = F>) -> Vec<bool> {
    let mut results = Vec::new();
    let pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut pending: Vec<_> = pinned.into_iter().map(Some).collect();
    results.resize(pending.len(), false);
    std::future::poll_fn(|context| {
        let mut all_done = true;
        for (index, slot) in pending.iter_mut().enumerate() {
            if let Some(future) = slot {
                match future.as_mut().poll(context) {
                    std::task::Poll::Ready(ok) => {
                        results[index] = ok;
                        *slot = None;
                    }
                    std::task::Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results
}

impl Writer {
    async fn beat(&self, state: AgentState, armed: bool) -> bool {
        let started = Instant::now();
        let result = self.writer.lock().await.beat(state, armed).await;
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(_) => {
                status.last_success = Some(status.last_success.map_or(started, |last| last.max(started)));
                status.last_failed = false;
                true
            }
            Err(error) => {
                if !status.last_failed {
                    tracing::warn!(pool = %self.name, %error, "heartbeat write failed");
                }
                status.last_failed = true;
                false
            }
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            task.abort();
        }
    }
}
