//! `CheckHeartbeat`: this agent reads a neighbour's heartbeat record on its own pools for
//! the manager (which may not mount them). Every host with a record on a pool is watched
//! (twice per renewal interval, each pool on its own worker; the pools are listed for new
//! hosts every few seconds), and so is a host asked about, so that a question is answered
//! at once from reads spread over time; a host not watched yet is read twice.
//!
//! `Advancing` means this agent saw the record change and the read before that change
//! started at most two renewal intervals (plus the watch gap) ago: the host wrote it
//! just now. `Unchanged` says for how long this agent has seen it unchanged, which may
//! be a short watch: it is evidence for people, never proof of a death.

use kvmha_core::event::{PoolObservation, RecordState};
use kvmha_core::{HostName, PoolName};
use kvmha_storage::{read_heartbeat, AgentState, HeartbeatRecord, Name, Pool};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a host is watched after the last question about it (or the last listing
/// that found its record).
const WATCH_FOR: Duration = Duration::from_secs(60);
/// How often the pools are listed for hosts to watch.
const DISCOVER_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Watch {
    progress: Option<(kvmha_storage::BootId, u64)>,
    record: Option<HeartbeatRecord>,
    error: Option<String>,
    last_read_started: Option<Instant>,
    /// Start of the read before the latest change seen.
    change_after: Option<Instant>,
    /// End of the first read that saw the current record.
    unchanged_since: Option<Instant>,
    last_asked: Instant,
}

impl Watch {
    async fn poll(&mut self, pool: &Pool, cluster: &Name, host: &Name, io_timeout: Duration) {
        let started = Instant::now();
        match read_heartbeat(pool, cluster, host, io_timeout).await {
            Ok(Some(record)) => {
                let progress = record.progress();
                if self.progress != Some(progress) {
                    if self.progress.is_some() {
                        self.change_after = self.last_read_started;
                    }
                    self.unchanged_since = Some(Instant::now());
                }
                self.progress = Some(progress);
                self.record = Some(record);
                self.error = None;
                self.last_read_started = Some(started);
            }
            Ok(None) => self.error = Some("no record written".into()),
            Err(error) => self.error = Some(error.to_string()),
        }
    }

    /// The boot that wrote the record, when the latest read succeeded.
    fn boot_id(&self) -> Option<kvmha_core::BootId> {
        let record = self.record.as_ref().filter(|_| self.error.is_none())?;
        Some(kvmha_core::BootId(record.boot_id.to_string()))
    }

    fn state(&self, now: Instant, fresh: Duration) -> RecordState {
        if let Some(error) = &self.error {
            return RecordState::Unreadable { reason: error.clone() };
        }
        if self.change_after.is_some_and(|after| now.saturating_duration_since(after) <= fresh) {
            return RecordState::Advancing;
        }
        match &self.record {
            Some(record) => RecordState::Unchanged {
                unchanged_for: self
                    .unchanged_since
                    .map_or(Duration::ZERO, |since| now.saturating_duration_since(since)),
                boot_id: kvmha_core::BootId(record.boot_id.to_string()),
                watchdog_armed: record.watchdog_armed,
                stopped_cleanly: record.agent_state == AgentState::StoppedCleanly,
            },
            None => RecordState::Unreadable { reason: "not read yet".into() },
        }
    }
}

type Shared = Arc<tokio::sync::Mutex<Watch>>;

#[derive(Debug)]
pub struct NeighbourWatch {
    cluster: String,
    pools: Vec<(PoolName, Pool)>,
    renewal_interval: Duration,
    io_timeout: Duration,
    watches: Mutex<BTreeMap<(String, usize), Shared>>,
}

impl NeighbourWatch {
    pub fn new(cluster: &str, pools: Vec<(PoolName, Pool)>, renewal_interval: Duration, io_timeout: Duration) -> Self {
        NeighbourWatch {
            cluster: cluster.to_owned(),
            pools,
            renewal_interval,
            io_timeout,
            watches: Mutex::new(BTreeMap::new()),
        }
    }

    /// Lists every pool's host records every few seconds and watches each host found
    /// except `me`. Must be called inside the runtime; ends when the watch is dropped.
    pub fn discover(self: &Arc<Self>, me: &str) {
        let (watch, me) = (Arc::downgrade(self), me.to_owned());
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(DISCOVER_EVERY);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(watch) = watch.upgrade() else { return };
                watch.discover_once(&me).await;
            }
        });
    }

    async fn discover_once(&self, me: &str) {
        let Ok(cluster) = Name::new(&self.cluster) else { return };
        for (index, (_, pool)) in self.pools.iter().enumerate() {
            let listing_cluster = cluster.clone();
            let listed = pool
                .run("list hosts", self.io_timeout, move |root| {
                    let directory = kvmha_storage::layout::hosts_directory(root, &listing_cluster);
                    let names = match std::fs::read_dir(&directory) {
                        Ok(entries) => entries
                            .flatten()
                            .filter_map(|entry| {
                                let name = entry.file_name().to_str()?.strip_suffix(".hb")?.to_owned();
                                (!name.starts_with('.')).then_some(name)
                            })
                            .collect(),
                        Err(_) => Vec::new(),
                    };
                    Ok(names)
                })
                .await;
            for host in listed.unwrap_or_default() {
                let Ok(watched) = Name::new(&host) else { continue };
                if host == me {
                    continue;
                }
                let (shared, _) = self.watch(&HostName::from(host.as_str()), index, pool, &cluster, &watched);
                shared.lock().await.last_asked = Instant::now();
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// `host`'s record on every pool, read now (all pools at once) and judged with what
    /// earlier reads saw; a host not watched yet is read twice, `gap` apart.
    pub async fn check(&self, host: &HostName, budget: Duration) -> Result<Vec<PoolObservation>, String> {
        let cluster = Name::new(&self.cluster).map_err(|error| error.to_string())?;
        let watched = Name::new(host.as_str()).map_err(|error| error.to_string())?;
        let io_timeout = self.io_timeout.min(budget / 4);
        let gap = (self.renewal_interval * 3 / 2).min(budget / 2);
        let fresh = self.renewal_interval * 2 + gap;
        let mut reads = tokio::task::JoinSet::new();
        for (index, (name, pool)) in self.pools.iter().enumerate() {
            let (watch, new) = self.watch(host, index, pool, &cluster, &watched);
            let (name, pool, cluster, watched) = (name.clone(), pool.clone(), cluster.clone(), watched.clone());
            reads.spawn(async move {
                let mut guard = watch.lock().await;
                guard.last_asked = Instant::now();
                guard.poll(&pool, &cluster, &watched, io_timeout).await;
                if new {
                    drop(guard);
                    tokio::time::sleep(gap).await;
                    guard = watch.lock().await;
                    guard.poll(&pool, &cluster, &watched, io_timeout).await;
                }
                let boot_id = guard.boot_id();
                PoolObservation { pool: name, record: guard.state(Instant::now(), fresh), boot_id }
            });
        }
        let mut pools = reads.join_all().await;
        pools.sort_by(|a, b| a.pool.cmp(&b.pool));
        Ok(pools)
    }

    /// The watch of `host` on pool `index`, started (with its poller) if new.
    fn watch(&self, host: &HostName, index: usize, pool: &Pool, cluster: &Name, watched: &Name) -> (Shared, bool) {
        let mut watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (host.to_string(), index);
        if let Some(watch) = watches.get(&key) {
            return (watch.clone(), false);
        }
        let watch = Arc::new(tokio::sync::Mutex::new(Watch {
            progress: None,
            record: None,
            error: None,
            last_read_started: None,
            change_after: None,
            unchanged_since: None,
            last_asked: Instant::now(),
        }));
        watches.insert(key, watch.clone());
        let (polled, pool, cluster, watched) = (watch.clone(), pool.clone(), cluster.clone(), watched.clone());
        let (every, io_timeout) = ((self.renewal_interval / 2).max(Duration::from_millis(10)), self.io_timeout);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let mut watch = polled.lock().await;
                if watch.last_asked.elapsed() > WATCH_FOR {
                    // Forgotten: the next question starts a fresh watch.
                    watch.error = Some("watch ended".into());
                    return;
                }
                watch.poll(&pool, &cluster, &watched, io_timeout).await;
            }
        });
        (watch, true)
    }
}
