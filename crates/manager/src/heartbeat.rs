//! The storage-heartbeat investigator: reads each configured host's record on every
//! pool the manager mounts, continuously, so that "unchanged for" is measured on the
//! manager's own monotonic clock from reads made long before a host went silent.
//!
//! A record is `Advancing` only if a read saw it change after the investigation's
//! `evidence_after`: the read *before* the change started after that instant, so the
//! write that changed it is known to be newer.

use crate::config::ManagerConfig;
use kvmha_core::event::{Finding, HeartbeatObservation, PoolObservation, RecordState};
use kvmha_core::model::BootId;
use kvmha_core::{HostName, PoolName};
use kvmha_storage::{AgentState, HeartbeatMonitor, Liveness, Name, Pool};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One host's record on one pool, as this manager has been reading it.
#[derive(Debug)]
struct Watch {
    monitor: HeartbeatMonitor,
    /// (boot id, counter) of the latest record read.
    last_progress: Option<(kvmha_storage::BootId, u64)>,
    /// Start of the latest successful read.
    last_read_started: Option<Instant>,
    /// The latest change seen: the start of the read before it (the write is newer).
    change_after: Option<Instant>,
    latest: Option<RecordState>,
}

impl Watch {
    async fn poll(&mut self) {
        let started = Instant::now();
        let observation = self.monitor.poll().await;
        if let Some(error) = observation.read_error {
            self.latest = Some(RecordState::Unreadable { reason: error.to_string() });
            return;
        }
        let Some(record) = observation.record else {
            self.latest = Some(RecordState::Unreadable { reason: "no record written yet".to_owned() });
            return;
        };
        let progress = record.progress();
        if self.last_progress.is_some_and(|last| last != progress) {
            self.change_after = self.last_read_started;
        }
        self.last_progress = Some(progress);
        self.last_read_started = Some(started);
        let unchanged_for = match observation.liveness {
            Liveness::NeverSeen => Duration::ZERO,
            Liveness::Undetermined { unchanged_for }
            | Liveness::Alive { unchanged_for }
            | Liveness::Stale { unchanged_for } => unchanged_for,
        };
        self.latest = Some(RecordState::Unchanged {
            unchanged_for,
            boot_id: BootId(record.boot_id.to_string()),
            watchdog_armed: record.watchdog_armed,
            stopped_cleanly: record.agent_state == AgentState::StoppedCleanly,
        });
    }

    /// The boot that wrote the latest record read.
    fn boot_id(&self) -> Option<BootId> {
        match &self.latest {
            Some(RecordState::Unchanged { boot_id, .. }) => Some(boot_id.clone()),
            _ => None,
        }
    }

    /// The record's state for an investigation that counts only evidence newer than
    /// `evidence_after`.
    fn state(&self, evidence_after: Instant) -> RecordState {
        if self.change_after.is_some_and(|after| after >= evidence_after)
            && matches!(self.latest, Some(RecordState::Unchanged { .. }))
        {
            return RecordState::Advancing;
        }
        self.latest.clone().unwrap_or(RecordState::Unreadable { reason: "not read yet".to_owned() })
    }
}

/// Every watched (host, pool): the configured hosts' pools that this manager mounts.
#[derive(Debug, Default)]
pub struct HeartbeatReader {
    watches: BTreeMap<(HostName, PoolName), Arc<tokio::sync::Mutex<Watch>>>,
    /// Pools a host writes to that the manager does not mount: reported unreadable.
    not_mounted: BTreeMap<HostName, Vec<PoolName>>,
}

impl HeartbeatReader {
    /// Starts reading every configured host's record on every mounted pool, twice per
    /// renewal interval. Must be called inside the runtime.
    pub fn start(config: &ManagerConfig) -> Result<HeartbeatReader, String> {
        let mut reader = HeartbeatReader::default();
        if config.pools.is_empty() {
            return Ok(reader);
        }
        let cluster = Name::new(&config.cluster_id).map_err(|error| error.to_string())?;
        let mut pools = BTreeMap::new();
        for (name, path) in &config.pools {
            let pool = Pool::open(name.as_str(), path).map_err(|error| error.to_string())?;
            pools.insert(name.clone(), pool);
        }
        let every = (config.lease.renewal_interval / 2).max(Duration::from_millis(10));
        for (host, host_config) in &config.hosts {
            let Ok(host_name) = Name::new(host.as_str()) else {
                tracing::warn!(%host, "host name is not a storage name: its heartbeat cannot be read");
                continue;
            };
            for pool_name in &host_config.pools {
                let Some(pool) = pools.get(pool_name) else {
                    reader.not_mounted.entry(host.clone()).or_default().push(pool_name.clone());
                    continue;
                };
                let monitor = HeartbeatMonitor::new(
                    pool.clone(),
                    cluster.clone(),
                    host_name.clone(),
                    config.lease.io_timeout,
                    config.lease.lease_expiry,
                );
                let watch = Arc::new(tokio::sync::Mutex::new(Watch {
                    monitor,
                    last_progress: None,
                    last_read_started: None,
                    change_after: None,
                    latest: None,
                }));
                let polled = Arc::downgrade(&watch);
                tokio::spawn(async move {
                    let mut interval = tokio::time::interval(every);
                    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        interval.tick().await;
                        let Some(watch) = polled.upgrade() else { return };
                        watch.lock().await.poll().await;
                    }
                });
                reader.watches.insert((host.clone(), pool_name.clone()), watch);
            }
        }
        Ok(reader)
    }

    /// Reads `host`'s record on every pool once more and judges it. `None` when the host
    /// has no pool configured (nothing to report).
    pub async fn investigate(
        &self,
        host: &HostName,
        evidence_after: Instant,
    ) -> Option<(Finding, String, HeartbeatObservation)> {
        let watched: Vec<_> =
            self.watches.iter().filter(|((watched, _), _)| watched == host).map(|((_, pool), w)| (pool, w)).collect();
        let not_mounted = self.not_mounted.get(host).cloned().unwrap_or_default();
        if watched.is_empty() && not_mounted.is_empty() {
            return None;
        }
        let mut reads = tokio::task::JoinSet::new();
        for (pool, watch) in watched {
            let (pool, watch) = (pool.clone(), watch.clone());
            reads.spawn(async move {
                let mut watch = watch.lock().await;
                watch.poll().await;
                PoolObservation { pool, record: watch.state(evidence_after), boot_id: watch.boot_id() }
            });
        }
        let mut pools = reads.join_all().await;
        for pool in not_mounted {
            pools.push(PoolObservation {
                pool,
                record: RecordState::Unreadable { reason: "pool not mounted on the manager".to_owned() },
                boot_id: None,
            });
        }
        pools.sort_by(|a, b| a.pool.cmp(&b.pool));
        let advancing = pools.iter().any(|pool| pool.record == RecordState::Advancing);
        let evidence = pools.iter().map(describe).collect::<Vec<_>>().join("; ");
        let finding = if advancing { Finding::Alive } else { Finding::Unknown };
        Some((finding, evidence, HeartbeatObservation { pools }))
    }
}

fn describe(pool: &PoolObservation) -> String {
    match &pool.record {
        RecordState::Advancing => format!("{}: heartbeat advancing", pool.pool),
        RecordState::Unchanged { unchanged_for, boot_id, watchdog_armed, stopped_cleanly } => format!(
            "{}: unchanged for {}ms (boot {boot_id}, watchdog {}, {})",
            pool.pool,
            unchanged_for.as_millis(),
            if *watchdog_armed { "armed" } else { "not armed" },
            if *stopped_cleanly { "stopped cleanly" } else { "running" },
        ),
        RecordState::Unreadable { reason } => format!("{}: unreadable ({reason})", pool.pool),
    }
}
