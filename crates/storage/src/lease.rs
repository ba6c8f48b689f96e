//! VM leases on a shared file system: a delta lease (after sanlock's, itself after
//! Chockler and Malkhi's "light-weight leases"), without any lock the file system
//! would have to honour.
//!
//! # Algorithm
//!
//! One record per VM, replaced whole by write-temporary + fsync + rename, so every
//! read returns some complete record (or a detectably torn one). A lease is *held*
//! while its holder keeps changing the record (bumping the counter) and *expired* once
//! a reader has seen it unchanged for `lease_expiry` on the reader's monotonic clock.
//!
//! Acquire:
//! 1. Read the record (`R`, read started at `t_read`).
//! 2. If it is absent, released, or held by this very host and boot (an agent
//!    restarted within the expiry), go to 3. Otherwise watch it, reading every
//!    `poll_interval`: if it changes, the holder is alive → `LeaseHeld`; once it has
//!    been unchanged for `lease_expiry + io_timeout` (the extra i/o timeout covers the
//!    uncertainty of when within a read the value was sampled) it is expired; the
//!    last of these reads is `R`, `t_read` its start.
//! 3. If more than `io_timeout` has passed since `t_read`, give up (`AcquireTooSlow`):
//!    our read no longer justifies a claim. Otherwise write the claim (owner = us,
//!    counter = R's + 1) with a deadline of `t_read + 2 x io_timeout`.
//! 4. Wait `acquire_delay` (> 2 x io_timeout), re-read. Our exact bytes → acquired
//!    (and renewed at once, so the holder's self-fence clock restarts). Anything else
//!    → `LeaseContended`.
//!
//! Why only one of concurrent acquirers wins: every acquirer that read the record
//! before our claim landed has its own claim land within `2 x io_timeout` of its read
//! (step 3), hence before our re-read; so our re-read sees the last claim of the race,
//! which is exactly one acquirer's. An acquirer that read *after* our claim landed sees
//! a record held by us and must watch it for the expiry, during which we renew.
//!
//! Break ([`LeaseClient::acquire_from_dead_owner`]): as acquire, except that in step 2
//! a record held by the named dead owner (and boot, when given) is claimable at once,
//! like a released one. Only the wait is skipped; steps 3 and 4 are the same, so the
//! argument above still holds: a concurrent acquirer that read before our claim landed
//! races us through the same confirm step, and one that read after sees a record held
//! by us (not by the dead owner) and must wait for its expiry while we renew. Breaking
//! a lease is safe only if the dead owner can no longer write or run the VM: the
//! manager proves that (fence, or the owner's own leases expired under the safety
//! rule) before it asks. A lease held by anyone else is acquired as usual.
//!
//! Renew: check that our self-fence deadline has not passed since the start of our
//! last successful renewal; read; the record must be exactly what we last wrote (or
//! the write we are unsure about); write it with counter + 1. Anything else →
//! `LeaseLost`, and the agent must stop the VM.
//!
//! Release: as renew, but write state `Released`, which anyone may claim at once.
//!
//! # Assumption
//!
//! Like sanlock's, the algorithm trusts that a write either completes within its
//! deadline or never lands. A write that started in time but lands late (a hard NFS
//! mount that recovers) can overwrite a winner's claim; the winner then sees a foreign
//! record at its next renewal and reports `LeaseLost` — disruptive, but the late
//! writer never believed it held the lease, so no VM runs twice. Writes that are
//! still queued at their deadline are dropped unrun (see `pool`).

use std::time::{Duration, Instant};

use crate::error::{Result, StorageError};
use crate::heartbeat::{unix_now_ms, HostIdentity};
use crate::layout;
use crate::liveness::{Liveness, LivenessTracker};
use crate::pool::{read_bytes, write_replace, Pool};
use crate::record::{BootId, LeaseRecord, LeaseState, Name, RECORD_LEN};
use crate::timing::LeaseTimings;

/// Reads `vm`'s lease without being a lease client (the manager's VM-activity
/// investigator, operators' tools): `Ok(None)` if none exists; a typed error for a
/// torn, corrupt, foreign-cluster or misplaced record.
pub async fn read_lease(pool: &Pool, cluster: &Name, vm: &Name, io_timeout: Duration) -> Result<Option<LeaseRecord>> {
    let (path_cluster, path_vm) = (cluster.clone(), vm.clone());
    let bytes = pool
        .run("read lease", io_timeout, move |root| read_bytes(&layout::lease_path(root, &path_cluster, &path_vm)))
        .await?;
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    decode_lease(&bytes, cluster, vm).map(Some)
}

fn decode_lease(bytes: &[u8], cluster: &Name, vm: &Name) -> Result<LeaseRecord> {
    let record = LeaseRecord::decode(bytes, cluster)?;
    if &record.vm != vm {
        return Err(StorageError::WrongSubject { expected: vm.to_string(), found: record.vm.to_string() });
    }
    Ok(record)
}

/// A lease this host holds: what it last wrote and when its self-fence clock started.
#[derive(Clone, Debug)]
pub struct HeldLease {
    record: LeaseRecord,
    bytes: [u8; RECORD_LEN],
    /// A renewal whose write timed out: it may have landed, so seeing it on storage
    /// is not a theft.
    unconfirmed: Option<[u8; RECORD_LEN]>,
    last_renewal_started_at: Instant,
}

impl HeldLease {
    pub fn vm(&self) -> &Name {
        &self.record.vm
    }

    /// The last record this host confirmed on storage.
    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    /// Start of the last successful claim or renewal write, on this host's clock: the
    /// self-fence deadline counts from here.
    pub fn last_renewal_started_at(&self) -> Instant {
        self.last_renewal_started_at
    }

    /// When the agent must have stopped the VM if no renewal succeeds before.
    pub fn self_fence_due_at(&self, timings: &LeaseTimings) -> Instant {
        self.last_renewal_started_at + timings.self_fence_deadline
    }
}

/// One host's lease operations on one pool.
#[derive(Debug, Clone)]
pub struct LeaseClient {
    pool: Pool,
    identity: HostIdentity,
    timings: LeaseTimings,
    poll_interval: Duration,
}

/// What one read of a lease file showed.
struct Observation {
    bytes: Option<Vec<u8>>,
    read_started_at: Instant,
    read_finished_at: Instant,
}

impl LeaseClient {
    /// Refuses timings that break the safety rule (see [`LeaseTimings::check`]).
    pub fn new(pool: Pool, identity: HostIdentity, timings: LeaseTimings) -> Result<Self> {
        timings.check()?;
        // Watching a held lease, we must read often enough to see renewals well
        // within the expiry.
        let poll_interval = (timings.renewal_interval / 2).max(Duration::from_millis(10));
        Ok(Self { pool, identity, timings, poll_interval })
    }

    pub fn timings(&self) -> &LeaseTimings {
        &self.timings
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Reads `vm`'s lease (for investigators and operators): `None` if none exists.
    pub async fn read(&self, vm: &Name) -> Result<Option<LeaseRecord>> {
        read_lease(&self.pool, &self.identity.cluster, vm, self.timings.io_timeout).await
    }

    /// Acquires `vm`'s lease (see the module documentation for the algorithm). May
    /// take `lease_expiry` and more when the lease was held by a host that stopped.
    pub async fn acquire(&self, vm: &Name) -> Result<HeldLease> {
        self.acquire_breaking(vm, None).await
    }

    /// Acquires `vm`'s lease, taking it over at once if it is held by `dead_owner` (and
    /// by boot `dead_boot` when given), however fresh it looks. The caller must have
    /// proof that this owner can no longer run the VM (fenced, or its own leases
    /// expired under the safety rule): the lease's expiry is what this skips. A lease
    /// held by anyone else, or unreadable, is acquired as [`LeaseClient::acquire`]
    /// does. The claim itself is the same as acquire's, so among concurrent acquirers
    /// (breaking or not) at most one wins.
    pub async fn acquire_from_dead_owner(
        &self,
        vm: &Name,
        dead_owner: &Name,
        dead_boot: Option<BootId>,
    ) -> Result<HeldLease> {
        self.acquire_breaking(vm, Some((dead_owner, dead_boot))).await
    }

    async fn acquire_breaking(&self, vm: &Name, dead: Option<(&Name, Option<BootId>)>) -> Result<HeldLease> {
        let mut observation = self.observe(vm).await?;
        let current = observation.bytes.as_deref().map(|bytes| self.decode(vm, bytes));
        let held_by_the_dead = |record: &LeaseRecord| {
            dead.is_some_and(|(host, boot)| {
                record.state == LeaseState::Held
                    && &record.owner_host == host
                    && boot.is_none_or(|boot| boot == record.owner_boot_id)
            })
        };
        let claimable_now = match &current {
            None => true,
            Some(Ok(record)) => {
                record.state == LeaseState::Released || self.is_mine(record) || held_by_the_dead(record)
            }
            // Unreadable: someone may be mid-write or the file is damaged; it becomes
            // claimable only once it has stayed exactly as it is for the expiry.
            Some(Err(_)) => false,
        };
        if !claimable_now {
            observation = self.wait_for_expiry(vm, observation).await?;
        }
        let previous_counter =
            observation.bytes.as_deref().and_then(|bytes| self.decode(vm, bytes).ok()).map(|record| record.counter);
        self.claim(vm, &observation, previous_counter).await
    }

    /// Renews a held lease. `LeaseLost` means the VM must be stopped now.
    pub async fn renew(&self, held: &mut HeldLease) -> Result<()> {
        let current = self.check_still_mine(held).await?;
        let record = LeaseRecord { counter: current.counter.wrapping_add(1), writer_unix_ms: unix_now_ms(), ..current };
        self.write_own(held, record).await
    }

    /// Releases a held lease so that any host may claim it without waiting.
    pub async fn release(&self, mut held: HeldLease) -> Result<()> {
        let current = self.check_still_mine(&held).await?;
        let record = LeaseRecord {
            state: LeaseState::Released,
            counter: current.counter.wrapping_add(1),
            writer_unix_ms: unix_now_ms(),
            ..current
        };
        self.write_own(&mut held, record).await
    }

    fn is_mine(&self, record: &LeaseRecord) -> bool {
        record.state == LeaseState::Held
            && record.owner_host == self.identity.host
            && record.owner_boot_id == self.identity.boot_id
    }

    fn decode(&self, vm: &Name, bytes: &[u8]) -> Result<LeaseRecord> {
        decode_lease(bytes, &self.identity.cluster, vm)
    }

    async fn observe(&self, vm: &Name) -> Result<Observation> {
        let cluster = self.identity.cluster.clone();
        let vm = vm.clone();
        let read_started_at = Instant::now();
        let bytes = self
            .pool
            .run("read lease", self.timings.io_timeout, move |root| {
                read_bytes(&layout::lease_path(root, &cluster, &vm))
            })
            .await?;
        Ok(Observation { bytes, read_started_at, read_finished_at: Instant::now() })
    }

    /// Step 2: watch a lease held by someone else until it has stayed unchanged for
    /// the expiry (→ the last observation) or changes (→ `LeaseHeld`, or claimable at
    /// once if it was released or removed meanwhile).
    async fn wait_for_expiry(&self, vm: &Name, first: Observation) -> Result<Observation> {
        let required = self.timings.lease_expiry + self.timings.io_timeout;
        let mut tracker = LivenessTracker::new(required);
        // Time an observation at the end of its read: the value may have been written
        // just before that, so the unchanged interval is never overestimated at its
        // start (the extra io_timeout in `required` covers its end).
        tracker.observe(first.bytes.clone(), first.read_finished_at);
        loop {
            tokio::time::sleep(self.poll_interval).await;
            let observation = self.observe(vm).await?;
            let verdict = tracker.observe(observation.bytes.clone(), observation.read_finished_at);
            match verdict {
                Liveness::Stale { .. } => return Ok(observation),
                Liveness::Alive { .. } => {
                    let current = observation.bytes.as_deref().map(|bytes| self.decode(vm, bytes));
                    return match current {
                        None => Ok(observation),
                        Some(Ok(record)) if record.state == LeaseState::Released => Ok(observation),
                        Some(Ok(record)) => Err(StorageError::LeaseHeld {
                            vm: vm.to_string(),
                            owner: record.owner_host.to_string(),
                            boot_id: record.owner_boot_id.to_string(),
                        }),
                        Some(Err(_)) => Err(StorageError::LeaseHeld {
                            vm: vm.to_string(),
                            owner: "unknown (record being rewritten)".to_owned(),
                            boot_id: "unknown".to_owned(),
                        }),
                    };
                }
                Liveness::NeverSeen | Liveness::Undetermined { .. } => {}
            }
        }
    }

    /// Steps 3 and 4: write our claim within the window our read justifies, wait,
    /// confirm.
    async fn claim(&self, vm: &Name, justification: &Observation, previous_counter: Option<u64>) -> Result<HeldLease> {
        let io_timeout = self.timings.io_timeout;
        let since_read = justification.read_started_at.elapsed();
        if since_read > io_timeout {
            return Err(StorageError::AcquireTooSlow { vm: vm.to_string(), elapsed: since_read, limit: io_timeout });
        }
        let counter = previous_counter.map_or(1, |counter| counter.wrapping_add(1));
        let record = LeaseRecord {
            cluster: self.identity.cluster.clone(),
            vm: vm.clone(),
            state: LeaseState::Held,
            owner_host: self.identity.host.clone(),
            owner_boot_id: self.identity.boot_id,
            counter,
            acquired_at_counter: counter,
            writer_unix_ms: unix_now_ms(),
        };
        let bytes = record.encode();
        let write_deadline = (io_timeout * 2).saturating_sub(since_read);
        let write_started_at = Instant::now();
        self.write(vm, bytes, write_deadline).await?;
        tokio::time::sleep(self.timings.acquire_delay()).await;
        let confirmation = self.observe(vm).await?;
        if confirmation.bytes.as_deref() != Some(&bytes[..]) {
            return Err(StorageError::LeaseContended { vm: vm.to_string() });
        }
        let mut held = HeldLease { record, bytes, unconfirmed: None, last_renewal_started_at: write_started_at };
        // The self-fence clock has been running since the claim write started, and the
        // acquire delay ate part of it: renew once at once so the caller starts with
        // (nearly) the whole budget. If this write fails the lease is still ours, just
        // with the older clock; the caller's next renewal decides.
        let renewal = LeaseRecord {
            counter: held.record.counter.wrapping_add(1),
            writer_unix_ms: unix_now_ms(),
            ..held.record.clone()
        };
        let _ = self.write_own(&mut held, renewal).await;
        Ok(held)
    }

    /// Renew and release start here: refuse once the self-fence deadline has passed
    /// (others may be taking the lease over), and refuse if the record on storage is
    /// not ours.
    async fn check_still_mine(&self, held: &HeldLease) -> Result<LeaseRecord> {
        let lost = |reason| StorageError::LeaseLost { vm: held.vm().to_string(), reason };
        if held.last_renewal_started_at.elapsed() >= self.timings.self_fence_deadline {
            return Err(lost("not renewed within the self-fence deadline"));
        }
        let observation = self.observe(held.vm()).await?;
        let Some(bytes) = observation.bytes else {
            return Err(lost("lease record removed"));
        };
        let ours =
            bytes[..] == held.bytes[..] || held.unconfirmed.is_some_and(|unconfirmed| bytes[..] == unconfirmed[..]);
        if !ours {
            return Err(lost("record changed by another writer"));
        }
        self.decode(held.vm(), &bytes)
    }

    async fn write_own(&self, held: &mut HeldLease, record: LeaseRecord) -> Result<()> {
        let bytes = record.encode();
        held.unconfirmed = Some(bytes);
        let write_started_at = Instant::now();
        self.write(held.vm(), bytes, self.timings.io_timeout).await?;
        held.record = record;
        held.bytes = bytes;
        held.unconfirmed = None;
        held.last_renewal_started_at = write_started_at;
        Ok(())
    }

    async fn write(&self, vm: &Name, bytes: [u8; RECORD_LEN], deadline: Duration) -> Result<()> {
        let cluster = self.identity.cluster.clone();
        let writer = self.identity.host.clone();
        let vm = vm.clone();
        self.pool
            .run("write lease", deadline, move |root| {
                write_replace(
                    &layout::lease_path(root, &cluster, &vm),
                    &layout::lease_temporary_path(root, &cluster, &vm, &writer),
                    &bytes,
                )
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(root: &std::path::Path) -> LeaseClient {
        let timings = LeaseTimings {
            renewal_interval: Duration::from_millis(300),
            io_timeout: Duration::from_millis(250),
            self_fence_deadline: Duration::from_millis(1_250),
            watchdog_timeout: Duration::from_millis(200),
            lease_expiry: Duration::from_millis(1_500),
        };
        let identity = HostIdentity {
            cluster: Name::new("prod").unwrap(),
            host: Name::new("host-a").unwrap(),
            boot_id: BootId([1; 16]),
        };
        LeaseClient::new(Pool::open("p", root).unwrap(), identity, timings).unwrap()
    }

    /// A renewal whose write timed out may land afterwards. Finding it on storage at
    /// the next renewal is our own write, not a theft: renewal goes on from it.
    #[test]
    fn a_renewal_that_landed_after_its_timeout_is_not_taken_for_theft() {
        let directory = tempfile::tempdir().unwrap();
        let client = client(directory.path());
        let vm = Name::new("vm1").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(async {
            let mut held = client.acquire(&vm).await.unwrap();
            // Simulate: the renewal was submitted, its caller saw a timeout, and the
            // write landed later anyway.
            let late = LeaseRecord { counter: held.record.counter + 1, ..held.record.clone() };
            let late_bytes = late.encode();
            held.unconfirmed = Some(late_bytes);
            let path = layout::lease_path(directory.path(), &held.record.cluster, &vm);
            std::fs::write(&path, late_bytes).unwrap();

            client.renew(&mut held).await.unwrap();
            assert_eq!(held.record.counter, late.counter + 1);
            assert_eq!(held.unconfirmed, None);

            // Without the unconfirmed write on record, the same bytes are a theft.
            let foreign = LeaseRecord { counter: held.record.counter + 1, ..held.record.clone() };
            std::fs::write(&path, foreign.encode()).unwrap();
            assert!(matches!(client.renew(&mut held).await, Err(StorageError::LeaseLost { .. })));
        });
    }
}
