//! The VM-activity investigator (ARCHITECTURE.md §4): are a host's VM leases still
//! being renewed? Reads every lease record on the pools the manager mounts,
//! continuously, so that "unchanged for" is measured on the manager's own monotonic
//! clock from reads made long before a host went silent.
//!
//! For the host under investigation, the leases it holds (owner = host, state held):
//! - one seen changing after the investigation's `evidence_after` → `Alive` (its agent
//!   renews: the host runs, whatever its pings say);
//! - every one unchanged for the lease expiry or longer → `Dead` (the core counts this as
//!   evidence only, never as proof: only the BMC or the safety rule proves a death);
//! - otherwise, or when a pool cannot be read → `Unknown`.
//!
//! A change counts for an investigation only if the read *before* it started after
//! `evidence_after` (the write that changed it is newer), as for heartbeats.

use crate::config::ManagerConfig;
use kvmha_core::event::Finding;
use kvmha_core::{HostName, PoolName};
use kvmha_storage::{layout, LeaseRecord, LeaseState, Name, Pool, StorageError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One lease record as this manager has been reading it.
#[derive(Clone, Debug)]
struct LeaseWatch {
    record: LeaseRecord,
    /// First read (its end) that saw the current record: unchanged since at most then.
    unchanged_since: Instant,
    /// The latest change seen: the start of the read before it.
    change_after: Option<Instant>,
}

/// One mounted pool's leases.
#[derive(Debug, Default)]
struct PoolLeases {
    leases: BTreeMap<String, LeaseWatch>,
    /// Start of the latest successful listing.
    last_read_started: Option<Instant>,
    /// Why the latest listing failed, if it did.
    error: Option<String>,
}

#[derive(Debug)]
struct Watched {
    name: PoolName,
    pool: Pool,
    leases: Mutex<PoolLeases>,
}

/// Reads the lease records of every pool the manager mounts, twice per renewal interval.
#[derive(Debug, Default)]
pub struct VmActivityReader {
    pools: Vec<Arc<Watched>>,
    cluster: Option<Name>,
    io_timeout: Duration,
    lease_expiry: Duration,
}

impl VmActivityReader {
    /// Starts one reader task per mounted pool. Must be called inside the runtime.
    pub fn start(config: &ManagerConfig) -> Result<VmActivityReader, String> {
        if config.pools.is_empty() {
            return Ok(VmActivityReader::default());
        }
        let cluster = Name::new(&config.cluster_id).map_err(|error| error.to_string())?;
        let mut reader = VmActivityReader {
            pools: Vec::new(),
            cluster: Some(cluster.clone()),
            io_timeout: config.lease.io_timeout,
            lease_expiry: config.lease.lease_expiry,
        };
        let every = (config.lease.renewal_interval / 2).max(Duration::from_millis(10));
        for (name, path) in &config.pools {
            // Its own worker: lease listings never queue behind heartbeat reads.
            let pool = Pool::open(&format!("{name}-leases"), path).map_err(|error| error.to_string())?;
            let watched = Arc::new(Watched { name: name.clone(), pool, leases: Mutex::new(PoolLeases::default()) });
            let polled = Arc::downgrade(&watched);
            let (cluster, io_timeout) = (cluster.clone(), reader.io_timeout);
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(every);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    let Some(watched) = polled.upgrade() else { return };
                    watched.poll(&cluster, io_timeout).await;
                }
            });
            reader.pools.push(watched);
        }
        Ok(reader)
    }

    /// Reads every pool once more and judges `host`'s leases.
    pub async fn investigate(&self, host: &HostName, evidence_after: Instant) -> (Finding, String) {
        let Some(cluster) = &self.cluster else {
            return (Finding::Unknown, "no pool mounted on the manager: leases not read".to_owned());
        };
        let mut reads = tokio::task::JoinSet::new();
        for watched in &self.pools {
            let (watched, cluster, io_timeout) = (watched.clone(), cluster.clone(), self.io_timeout);
            reads.spawn(async move { watched.poll(&cluster, io_timeout).await });
        }
        reads.join_all().await;
        let now = Instant::now();
        let mut advancing = Vec::new();
        let mut unchanged = Vec::new();
        let mut errors = Vec::new();
        for watched in &self.pools {
            let leases = watched.leases.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(error) = &leases.error {
                errors.push(format!("{}: unreadable ({error})", watched.name));
            }
            for (vm, watch) in &leases.leases {
                if watch.record.state != LeaseState::Held || watch.record.owner_host.as_str() != host.as_str() {
                    continue;
                }
                if watch.change_after.is_some_and(|after| after >= evidence_after) {
                    advancing.push(format!("{vm} ({})", watched.name));
                } else {
                    unchanged.push((
                        format!("{vm} ({})", watched.name),
                        now.saturating_duration_since(watch.unchanged_since),
                    ));
                }
            }
        }
        judge(advancing, unchanged, errors, self.lease_expiry)
    }
}

/// The verdict from what was read: names with pools, how long each unchanged lease has
/// been seen unchanged, and the pools that could not be read.
fn judge(
    advancing: Vec<String>,
    unchanged: Vec<(String, Duration)>,
    errors: Vec<String>,
    lease_expiry: Duration,
) -> (Finding, String) {
    let unchanged_text = || {
        unchanged
            .iter()
            .map(|(vm, for_)| format!("{vm} unchanged for {}ms", for_.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let with_errors = |text: String| {
        if errors.is_empty() {
            text
        } else {
            format!("{text}; {}", errors.join("; "))
        }
    };
    if !advancing.is_empty() {
        return (Finding::Alive, format!("leases advancing: {}", advancing.join(", ")));
    }
    if unchanged.is_empty() {
        return (Finding::Unknown, with_errors("no lease held by the host on the pools read".to_owned()));
    }
    if errors.is_empty() && unchanged.iter().all(|(_, for_)| *for_ >= lease_expiry) {
        return (
            Finding::Dead,
            format!(
                "every lease unchanged for the lease expiry ({}ms) or longer: {}",
                lease_expiry.as_millis(),
                unchanged_text()
            ),
        );
    }
    (Finding::Unknown, with_errors(format!("leases not seen advancing: {}", unchanged_text())))
}

impl Watched {
    /// Lists the pool's lease records and reads each; updates what was seen.
    async fn poll(&self, cluster: &Name, io_timeout: Duration) {
        let started = Instant::now();
        let listing_cluster = cluster.clone();
        let listed = self
            .pool
            .run("list leases", io_timeout, move |root| {
                let directory = layout::leases_directory(root, &listing_cluster);
                let entries = match std::fs::read_dir(&directory) {
                    Ok(entries) => entries,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(source) => return Err(StorageError::Io { op: "list leases", path: directory, source }),
                };
                let mut records = Vec::new();
                for entry in entries.flatten() {
                    let file_name = entry.file_name();
                    let Some(vm) = file_name.to_str().and_then(|name| name.strip_suffix(".lease")) else {
                        continue;
                    };
                    // Temporary files start with a dot, which no name may.
                    if vm.starts_with('.') {
                        continue;
                    }
                    let bytes = std::fs::read(entry.path()).ok();
                    records.push((vm.to_owned(), bytes));
                }
                Ok(records)
            })
            .await;
        let finished = Instant::now();
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        let records = match listed {
            Ok(records) => records,
            Err(error) => {
                leases.error = Some(error.to_string());
                return;
            }
        };
        leases.error = None;
        let previous_read_started = leases.last_read_started;
        for (vm, bytes) in records {
            // A torn or foreign record is no observation: the last good one stands.
            let Some(record) = bytes.and_then(|bytes| LeaseRecord::decode(&bytes, cluster).ok()) else {
                continue;
            };
            match leases.leases.get_mut(&vm) {
                Some(watch) if watch.record.encode() == record.encode() => {}
                Some(watch) => {
                    watch.record = record;
                    watch.unchanged_since = finished;
                    watch.change_after = previous_read_started;
                }
                None => {
                    leases.leases.insert(vm, LeaseWatch { record, unchanged_since: finished, change_after: None });
                }
            }
        }
        leases.last_read_started = Some(started);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPIRY: Duration = Duration::from_secs(14);

    #[test]
    fn one_advancing_lease_is_alive_all_expired_is_dead_anything_else_unknown() {
        let ms = Duration::from_millis;
        let (finding, evidence) = judge(vec!["vm1 (a)".into()], vec![("vm2 (a)".into(), ms(20_000))], vec![], EXPIRY);
        assert_eq!(finding, Finding::Alive, "{evidence}");
        assert!(evidence.contains("vm1 (a)"), "{evidence}");

        let (finding, evidence) =
            judge(vec![], vec![("vm1 (a)".into(), ms(14_000)), ("vm2 (b)".into(), ms(30_000))], vec![], EXPIRY);
        assert_eq!(finding, Finding::Dead, "{evidence}");
        assert!(evidence.contains("vm2 (b) unchanged for 30000ms"), "{evidence}");

        let (finding, _) =
            judge(vec![], vec![("vm1 (a)".into(), ms(13_999)), ("vm2 (b)".into(), ms(30_000))], vec![], EXPIRY);
        assert_eq!(finding, Finding::Unknown);

        // A pool that cannot be read may hold a lease that advances: never dead then.
        let (finding, evidence) =
            judge(vec![], vec![("vm1 (a)".into(), ms(30_000))], vec!["b: unreadable (gone)".into()], EXPIRY);
        assert_eq!(finding, Finding::Unknown);
        assert!(evidence.contains("b: unreadable"), "{evidence}");

        let (finding, evidence) = judge(vec![], vec![], vec![], EXPIRY);
        assert_eq!(finding, Finding::Unknown);
        assert!(evidence.contains("no lease"), "{evidence}");
    }
}
