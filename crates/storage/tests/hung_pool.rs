//! A pool whose mount hangs (a real FUSE mount, `bindfs`, whose daemon we SIGSTOP: every
//! file operation on it then blocks in the kernel, as on a dead NFS server) must not
//! delay the heartbeat on another pool, and must answer Timeout at its deadline.
//!
//! Needs root and `bindfs` + `fuse3` (installed by scripts/setup.sh).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvmha_storage::pool::PoolHealth;
use kvmha_storage::{
    read_heartbeat, AgentState, BootId, HeartbeatWriter, HostIdentity, LeaseClient, LeaseTimings, LivenessTracker,
    Name, Pool, StorageError,
};

const PATIENCE: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_millis(1_000);
const INTERVAL: Duration = Duration::from_millis(100);
const TICKS: usize = 25;

/// A bindfs mount whose daemon can be frozen. Dropping it thaws the daemon, detaches
/// the mount (lazily, so a stuck user cannot keep it busy) and reaps the daemon, also
/// when the test panics.
#[derive(Debug)]
struct FreezableMount {
    daemon: Child,
    mount_point: PathBuf,
}

impl FreezableMount {
    fn mount(source: &Path, mount_point: &Path) -> Self {
        let daemon = Command::new("bindfs")
            .arg("-f")
            .arg(source)
            .arg(mount_point)
            .stdin(Stdio::null())
            .spawn()
            .expect("bindfs runs (install it with scripts/setup.sh)");
        let mount = Self { daemon, mount_point: mount_point.to_owned() };
        let give_up_at = Instant::now() + PATIENCE;
        while !mount.is_mounted() {
            assert!(Instant::now() < give_up_at, "bindfs never mounted {mount_point:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        mount
    }

    fn is_mounted(&self) -> bool {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let wanted = self.mount_point.to_string_lossy();
        table.lines().any(|line| line.split(' ').nth(4) == Some(wanted.as_ref()))
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(signal).arg(self.daemon.id().to_string()).status().expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    fn freeze(&self) {
        self.signal("-STOP");
    }

    fn thaw(&self) {
        self.signal("-CONT");
    }
}

impl Drop for FreezableMount {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").arg(self.daemon.id().to_string()).status();
        let unmounted = Command::new("fusermount")
            .arg("-u")
            .arg("-z")
            .arg(&self.mount_point)
            .status()
            .is_ok_and(|status| status.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mount_point).status();
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

fn identity() -> HostIdentity {
    HostIdentity { cluster: Name::new("prod").unwrap(), host: Name::new("host1").unwrap(), boot_id: BootId([1; 16]) }
}

#[test]
fn a_hung_pool_times_out_and_never_delays_the_other_pools_heartbeat() {
    let directory = tempfile::tempdir().unwrap();
    let good_root = directory.path().join("good");
    let hung_source = directory.path().join("hung-source");
    let hung_root = directory.path().join("hung");
    for path in [&good_root, &hung_source, &hung_root] {
        std::fs::create_dir(path).unwrap();
    }
    let mount = FreezableMount::mount(&hung_source, &hung_root);
    let good = Pool::open("good", &good_root).unwrap();
    let hung = Pool::with_queue_capacity("hung", &hung_root, 4).unwrap();
    let me = identity();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();

    runtime.block_on(async {
        let mut good_writer = HeartbeatWriter::new(good.clone(), me.clone(), IO_TIMEOUT);
        let mut hung_writer = HeartbeatWriter::new(hung.clone(), me.clone(), IO_TIMEOUT);
        // Both pools work before the hang.
        for _ in 0..3 {
            good_writer.beat(AgentState::Running, true).await.unwrap();
            hung_writer.beat(AgentState::Running, true).await.unwrap();
        }
        let good_before = good_writer.beat(AgentState::Running, true).await.unwrap().counter;

        mount.freeze();

        // One task per pool, as the agent runs them.
        let good_task = tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut ticker = tokio::time::interval(INTERVAL);
            for _ in 0..TICKS {
                ticker.tick().await;
                let started = Instant::now();
                let record = good_writer.beat(AgentState::Running, true).await;
                latencies.push(started.elapsed());
                record.expect("the good pool's heartbeat never fails");
            }
            latencies
        });
        let hung_task = tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut ticker = tokio::time::interval(INTERVAL);
            let stop_at = Instant::now() + INTERVAL * TICKS as u32;
            while Instant::now() < stop_at {
                ticker.tick().await;
                let started = Instant::now();
                let result = hung_writer.beat(AgentState::Running, true).await;
                outcomes.push((started.elapsed(), result));
            }
            (hung_writer, outcomes)
        });
        // A reader of the good pool (the manager, or a neighbour) sees it alive
        // throughout.
        let reader_pool = Pool::open("good-reader", &good_root).unwrap();
        let reader_identity = me.clone();
        let reader_task = tokio::spawn(async move {
            let mut tracker = LivenessTracker::new(Duration::from_secs(2));
            let mut verdicts = Vec::new();
            for _ in 0..TICKS / 2 {
                tokio::time::sleep(INTERVAL * 2).await;
                let record = read_heartbeat(
                    &reader_pool,
                    &reader_identity.cluster,
                    &reader_identity.host,
                    IO_TIMEOUT,
                )
                .await
                .unwrap()
                .unwrap();
                verdicts.push(tracker.observe(record.progress(), Instant::now()));
            }
            verdicts
        });

        let latencies = good_task.await.unwrap();
        let (mut hung_writer, outcomes) = hung_task.await.unwrap();
        let verdicts = reader_task.await.unwrap();

        // The good pool: every beat landed, and its reader never saw it stale.
        let good_after = read_heartbeat(&good, &me.cluster, &me.host, IO_TIMEOUT)
            .await
            .unwrap()
            .unwrap()
            .counter;
        assert_eq!(good_after, good_before + TICKS as u64);
        assert!(verdicts.iter().all(|verdict| !verdict.is_stale()), "{verdicts:?}");
        assert!(verdicts.last().unwrap().is_alive(), "{verdicts:?}");

        // The hung pool: the first write answers Timeout at its deadline (not before,
        // and not much after), every later one fails too.
        let (first_elapsed, first) = &outcomes[0];
        assert!(
            matches!(first, Err(StorageError::Timeout { op: "write heartbeat", .. })),
            "{first:?}"
        );
        assert!(*first_elapsed >= IO_TIMEOUT, "{first_elapsed:?}");
        assert!(*first_elapsed < IO_TIMEOUT + PATIENCE, "{first_elapsed:?}");
        for (_, outcome) in &outcomes {
            assert!(
                matches!(outcome, Err(StorageError::Timeout { .. } | StorageError::PoolHung { .. })),
                "{outcome:?}"
            );
        }
        assert!(matches!(hung.health(Instant::now()), PoolHealth::Hung { .. }));
        assert_eq!(good.health(Instant::now()), PoolHealth::Responsive);

        // Work for the hung pool does not pile up: once its small queue is full,
        // further operations are refused at once.
        let burst: Vec<_> = (0..8)
            .map(|_| {
                let pool = hung.clone();
                let me = me.clone();
                tokio::spawn(async move {
                    read_heartbeat(&pool, &me.cluster, &me.host, Duration::from_secs(3600)).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut refused = 0;
        for task in burst {
            if task.is_finished() {
                let result = task.await.unwrap();
                assert!(matches!(result, Err(StorageError::PoolHung { .. })), "{result:?}");
                refused += 1;
            } else {
                task.abort();
            }
        }
        assert!(refused >= 4, "only {refused} of 8 refused by a full queue");

        let mut sorted = latencies.clone();
        sorted.sort();
        eprintln!(
            "measured: good-pool heartbeat write latency median {:?} max {:?}; hung pool answered Timeout after {:?} (deadline {IO_TIMEOUT:?})",
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1],
            first_elapsed
        );

        // The mount comes back: the same writer recovers without intervention.
        mount.thaw();
        let give_up_at = Instant::now() + PATIENCE;
        loop {
            match hung_writer.beat(AgentState::Running, true).await {
                Ok(_) => break,
                Err(error) => {
                    assert!(Instant::now() < give_up_at, "hung pool never recovered: {error}");
                    tokio::time::sleep(INTERVAL).await;
                }
            }
        }
    });
    drop(mount);
}

/// A holder whose lease pool hangs keeps getting retryable errors until its
/// self-fence deadline, then `LeaseLost` (the agent's cue to stop the VM): never
/// sooner, so a short hang does not kill VMs, and never much later. Its heartbeat on
/// another pool is untouched meanwhile.
#[test]
fn a_hung_lease_pool_reports_lease_lost_only_at_the_self_fence_deadline() {
    let directory = tempfile::tempdir().unwrap();
    let good_root = directory.path().join("good");
    let hung_source = directory.path().join("hung-source");
    let hung_root = directory.path().join("hung");
    for path in [&good_root, &hung_source, &hung_root] {
        std::fs::create_dir(path).unwrap();
    }
    let mount = FreezableMount::mount(&hung_source, &hung_root);
    let timings = LeaseTimings {
        renewal_interval: Duration::from_millis(300),
        io_timeout: Duration::from_millis(250),
        self_fence_deadline: Duration::from_millis(1_250),
        watchdog_timeout: Duration::from_millis(200),
        lease_expiry: Duration::from_millis(1_500),
    };
    let me = identity();
    let leases = LeaseClient::new(Pool::open("hung", &hung_root).unwrap(), me.clone(), timings).unwrap();
    let good = Pool::open("good", &good_root).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        let vm = Name::new("vm1").unwrap();
        let mut held = leases.acquire(&vm).await.unwrap();
        leases.renew(&mut held).await.unwrap();
        let mut heartbeat = HeartbeatWriter::new(good.clone(), me.clone(), IO_TIMEOUT);
        let heartbeat_task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(INTERVAL);
            for _ in 0..TICKS {
                ticker.tick().await;
                heartbeat.beat(AgentState::Running, true).await.expect("good pool beats");
            }
        });

        mount.freeze();
        let due_at = held.self_fence_due_at(&timings);
        let give_up_at = Instant::now() + PATIENCE;
        let lost_at = loop {
            tokio::time::sleep(timings.renewal_interval).await;
            let result = leases.renew(&mut held).await;
            let now = Instant::now();
            match result {
                Err(StorageError::LeaseLost { .. }) => break now,
                Err(error) => assert!(error.is_retryable(), "{error:?}"),
                Ok(()) => panic!("renewed on a frozen pool"),
            }
            assert!(now < give_up_at, "never reported the lease lost");
        };
        assert!(lost_at >= due_at, "lease given up {:?} early", due_at - lost_at);
        eprintln!(
            "measured: lease lost reported {:?} after the self-fence deadline (renewal interval {:?}, i/o timeout {:?})",
            lost_at - due_at,
            timings.renewal_interval,
            timings.io_timeout
        );
        heartbeat_task.await.unwrap();
    });
    drop(mount);
}
