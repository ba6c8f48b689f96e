//! Heartbeat writer and reader against a real directory.

use std::fs;
use std::time::{Duration, Instant};

use kvmha_storage::layout::heartbeat_path;
use kvmha_storage::{
    read_heartbeat, AgentState, BootId, HeartbeatWriter, HostIdentity, LivenessTracker, Name, Pool, StorageError,
};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn name(text: &str) -> Name {
    Name::new(text).unwrap()
}

fn identity(cluster: &str, host: &str) -> HostIdentity {
    HostIdentity { cluster: name(cluster), host: name(host), boot_id: BootId([host.len() as u8; 16]) }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
}

#[test]
fn beats_are_read_back_and_seen_advancing() {
    let directory = tempfile::tempdir().unwrap();
    let pool = Pool::open("p1", directory.path()).unwrap();
    let me = identity("prod", "host1");
    runtime().block_on(async {
        let mut writer = HeartbeatWriter::new(pool.clone(), me.clone(), IO_TIMEOUT);
        assert_eq!(read_heartbeat(&pool, &me.cluster, &me.host, IO_TIMEOUT).await.unwrap(), None);
        let mut tracker = LivenessTracker::new(Duration::from_secs(5));
        let start = Instant::now();
        for tick in 0..5u64 {
            let written = writer.beat(AgentState::Running, true).await.unwrap();
            let read = read_heartbeat(&pool, &me.cluster, &me.host, IO_TIMEOUT).await.unwrap().unwrap();
            assert_eq!(read, written);
            assert_eq!(read.counter, tick + 1);
            let verdict = tracker.observe(read.progress(), start + Duration::from_secs(tick));
            assert_eq!(verdict.is_alive(), tick > 0, "tick {tick}: {verdict:?}");
        }
        let stopped = writer.beat(AgentState::StoppedCleanly, false).await.unwrap();
        let read = read_heartbeat(&pool, &me.cluster, &me.host, IO_TIMEOUT).await.unwrap().unwrap();
        assert_eq!(read, stopped);
        assert_eq!(read.agent_state, AgentState::StoppedCleanly);
        assert!(!read.watchdog_armed);
    });
    // Only the record is left behind: the temporary file was renamed into place.
    let hosts = heartbeat_path(directory.path(), &me.cluster, &me.host);
    let entries: Vec<_> =
        fs::read_dir(hosts.parent().unwrap()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("host1.hb")]);
}

#[test]
fn a_restarted_writer_resumes_the_counter_and_wraps_past_u64_max() {
    let directory = tempfile::tempdir().unwrap();
    let pool = Pool::open("p1", directory.path()).unwrap();
    let me = identity("prod", "host1");
    runtime().block_on(async {
        let mut writer = HeartbeatWriter::starting_after(pool.clone(), me.clone(), IO_TIMEOUT, u64::MAX - 2);
        assert_eq!(writer.beat(AgentState::Running, true).await.unwrap().counter, u64::MAX - 1);
        drop(writer);
        let mut resumed = HeartbeatWriter::resume(pool.clone(), me.clone(), IO_TIMEOUT).await;
        let mut tracker = LivenessTracker::new(Duration::from_secs(5));
        let start = Instant::now();
        tracker.observe((me.boot_id, u64::MAX - 1), start);
        let counters: Vec<u64> = {
            let mut counters = Vec::new();
            for tick in 1..=3u64 {
                let record = resumed.beat(AgentState::Running, true).await.unwrap();
                let verdict = tracker.observe(record.progress(), start + Duration::from_secs(tick));
                assert!(verdict.is_alive(), "{verdict:?}");
                counters.push(record.counter);
            }
            counters
        };
        assert_eq!(counters, vec![u64::MAX, 0, 1]);
    });
}

#[test]
fn damaged_foreign_and_misplaced_records_are_typed_errors() {
    let directory = tempfile::tempdir().unwrap();
    let pool = Pool::open("p1", directory.path()).unwrap();
    let me = identity("prod", "host1");
    let runtime = runtime();
    let path = heartbeat_path(directory.path(), &me.cluster, &me.host);
    runtime.block_on(async {
        let mut writer = HeartbeatWriter::new(pool.clone(), me.clone(), IO_TIMEOUT);
        writer.beat(AgentState::Running, true).await.unwrap();
    });
    let good = fs::read(&path).unwrap();
    let read =
        |cluster: &str, host: &str| runtime.block_on(read_heartbeat(&pool, &name(cluster), &name(host), IO_TIMEOUT));

    // A torn write that left half a record.
    fs::write(&path, &good[..100]).unwrap();
    assert!(matches!(read("prod", "host1"), Err(StorageError::WrongLength { actual: 100, .. })));
    // Garbage of the right size.
    fs::write(&path, vec![0xA5; good.len()]).unwrap();
    assert!(read("prod", "host1").unwrap_err().is_corrupt_record());
    // Another cluster's record copied into ours.
    let foreign_path = heartbeat_path(directory.path(), &name("test"), &me.host);
    fs::create_dir_all(foreign_path.parent().unwrap()).unwrap();
    fs::write(&foreign_path, &good).unwrap();
    assert!(matches!(read("test", "host1"), Err(StorageError::ForeignCluster { .. })));
    // host1's record copied to host2's file name.
    let misplaced = heartbeat_path(directory.path(), &me.cluster, &name("host2"));
    fs::write(&misplaced, &good).unwrap();
    assert!(matches!(read("prod", "host2"), Err(StorageError::WrongSubject { .. })));
}

#[test]
fn a_monitor_reports_never_seen_then_alive_and_keeps_its_verdict_through_unreadable_records() {
    let directory = tempfile::tempdir().unwrap();
    let pool = Pool::open("p1", directory.path()).unwrap();
    let me = identity("prod", "host1");
    runtime().block_on(async {
        let mut monitor = kvmha_storage::HeartbeatMonitor::new(
            pool.clone(),
            me.cluster.clone(),
            me.host.clone(),
            IO_TIMEOUT,
            Duration::from_secs(3600),
        );
        let first = monitor.poll().await;
        assert_eq!(first.liveness, kvmha_storage::Liveness::NeverSeen);
        assert!(first.record.is_none() && first.read_error.is_none());

        let mut writer = HeartbeatWriter::new(pool.clone(), me.clone(), IO_TIMEOUT);
        writer.beat(AgentState::Running, true).await.unwrap();
        assert!(!monitor.poll().await.liveness.is_alive());
        writer.beat(AgentState::Running, true).await.unwrap();
        let alive = monitor.poll().await;
        assert!(alive.liveness.is_alive(), "{alive:?}");
        assert_eq!(alive.record.as_ref().unwrap().counter, 2);

        // A damaged record: the error is reported, the verdict and last record stay.
        let path = heartbeat_path(directory.path(), &me.cluster, &me.host);
        fs::write(&path, b"torn").unwrap();
        let damaged = monitor.poll().await;
        assert!(damaged.liveness.is_alive());
        assert_eq!(damaged.record.unwrap().counter, 2);
        assert!(damaged.read_error.unwrap().is_corrupt_record());
    });
}
