//! Two sshfs mounts of one directory, served by an sshd on loopback, stand in for two
//! hosts mounting one network file system (the lab's storage is sshfs too). What must
//! hold across mounts, not just within one: a record renamed into place through one
//! mount is read afresh through the other, and lease contention through different
//! mounts still has exactly one winner.
//!
//! Needs root, `openssh-server` and `sshfs` (installed by scripts/setup.sh).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use kvmha_storage::{
    read_heartbeat, AgentState, BootId, HeartbeatWriter, HostIdentity, LeaseClient, LeaseTimings, LivenessTracker,
    Name, Pool, StorageError,
};

const PATIENCE: Duration = Duration::from_secs(30);

/// An sshd on 127.0.0.1 with throwaway keys, and the sshfs mounts made through it.
/// Dropping it unmounts (lazily) and stops the sshd, also when a test fails.
#[derive(Debug)]
struct LoopbackSshfs {
    directory: PathBuf,
    sshd: Child,
    port: u16,
    mounts: Vec<PathBuf>,
}

impl LoopbackSshfs {
    fn start(directory: &Path) -> Self {
        for key in ["host_key", "client_key"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(directory.join(key))
                .status()
                .expect("ssh-keygen runs");
            assert!(status.success());
        }
        std::fs::copy(directory.join("client_key.pub"), directory.join("authorized_keys")).unwrap();
        // A port the kernel just handed out; another process could take it before
        // sshd binds, in which case sshd exits and the test reports it.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\nAuthorizedKeysFile {authorized}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n\
             PidFile none\nSubsystem sftp internal-sftp\n",
            host_key = directory.join("host_key").display(),
            authorized = directory.join("authorized_keys").display(),
        );
        std::fs::write(directory.join("sshd_config"), config).unwrap();
        // sshd's privilege separation directory; Debian creates it only at boot.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let sshd = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(directory.join("sshd_config"))
            .stdin(Stdio::null())
            .spawn()
            .expect("sshd runs (install openssh-server with scripts/setup.sh)");
        Self { directory: directory.to_owned(), sshd, port, mounts: Vec::new() }
    }

    fn mount(&mut self, remote: &Path, mount_point: &Path) {
        std::fs::create_dir_all(mount_point).unwrap();
        let give_up_at = Instant::now() + PATIENCE;
        loop {
            let status = Command::new("sshfs")
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-o")
                .arg(format!("IdentityFile={}", self.directory.join("client_key").display()))
                .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
                .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
                .arg(format!("root@127.0.0.1:{}", remote.display()))
                .arg(mount_point)
                .status()
                .expect("sshfs runs (install it with scripts/setup.sh)");
            if status.success() {
                self.mounts.push(mount_point.to_owned());
                return;
            }
            // sshd may still be starting.
            assert!(Instant::now() < give_up_at, "sshfs never mounted {mount_point:?}");
            assert!(self.sshd.try_wait().unwrap().is_none(), "sshd exited");
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LoopbackSshfs {
    fn drop(&mut self) {
        for mount_point in &self.mounts {
            let _ = Command::new("fusermount").arg("-u").arg("-z").arg(mount_point).status();
        }
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

fn name(text: &str) -> Name {
    Name::new(text).unwrap()
}

fn identity(host: &str, boot: u8) -> HostIdentity {
    HostIdentity { cluster: name("prod"), host: name(host), boot_id: BootId([boot; 16]) }
}

#[test]
fn records_written_through_one_mount_are_seen_through_another() {
    let directory = tempfile::tempdir().unwrap();
    let shared = directory.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let mut sshfs = LoopbackSshfs::start(directory.path());
    let (mount_a, mount_b) = (directory.path().join("a"), directory.path().join("b"));
    sshfs.mount(&shared, &mount_a);
    sshfs.mount(&shared, &mount_b);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        let io_timeout = Duration::from_secs(5);
        let me = identity("host1", 1);
        let mut writer = HeartbeatWriter::new(Pool::open("a", &mount_a).unwrap(), me.clone(), io_timeout);
        let reader = Pool::open("b", &mount_b).unwrap();
        let mut tracker = LivenessTracker::new(Duration::from_secs(3600));
        // Every write through A is what the next read through B returns: no stale
        // cache between hosts, which the lease algorithm relies on.
        let mut latencies = Vec::new();
        for tick in 0..20u64 {
            let started = Instant::now();
            let written = writer.beat(AgentState::Running, true).await.unwrap();
            latencies.push(started.elapsed());
            let read = read_heartbeat(&reader, &me.cluster, &me.host, io_timeout).await.unwrap().unwrap();
            assert_eq!(read, written, "tick {tick}");
            let verdict = tracker.observe(read.progress(), Instant::now());
            assert_eq!(verdict.is_alive(), tick > 0, "tick {tick}: {verdict:?}");
        }
        latencies.sort();
        eprintln!(
            "measured: heartbeat write through sshfs median {:?} max {:?}",
            latencies[latencies.len() / 2],
            latencies[latencies.len() - 1]
        );
    });
    drop(sshfs);
}

#[test]
fn lease_contention_through_different_mounts_has_one_winner() {
    const ROUNDS: usize = 3;
    const HOSTS: usize = 3;
    let directory = tempfile::tempdir().unwrap();
    let shared = directory.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let mut sshfs = LoopbackSshfs::start(directory.path());
    let mounts: Vec<PathBuf> = (0..HOSTS).map(|index| directory.path().join(format!("m{index}"))).collect();
    for mount_point in &mounts {
        sshfs.mount(&shared, mount_point);
    }
    let timings = LeaseTimings {
        renewal_interval: Duration::from_millis(300),
        io_timeout: Duration::from_millis(250),
        self_fence_deadline: Duration::from_millis(1_250),
        watchdog_timeout: Duration::from_millis(200),
        lease_expiry: Duration::from_millis(1_500),
    };
    for round in 0..ROUNDS {
        let vm = name(&format!("vm-{round}"));
        let barrier = Arc::new(Barrier::new(HOSTS));
        let finished = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = mounts
            .iter()
            .enumerate()
            .map(|(index, mount_point)| {
                let pool = Pool::open(&format!("m{index}"), mount_point).unwrap();
                let client =
                    LeaseClient::new(pool, identity(&format!("host{index}"), index as u8 + 1), timings).unwrap();
                let (barrier, finished, vm) = (Arc::clone(&barrier), Arc::clone(&finished), vm.clone());
                thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
                    runtime.block_on(async {
                        barrier.wait();
                        let outcome = client.acquire(&vm).await;
                        finished.fetch_add(1, Ordering::SeqCst);
                        let mut held = outcome?;
                        // Hold on (renewing) until every contender is done, so a late
                        // one meets a live holder rather than an abandoned lease.
                        let give_up_at = Instant::now() + PATIENCE;
                        while finished.load(Ordering::SeqCst) < HOSTS && Instant::now() < give_up_at {
                            tokio::time::sleep(timings.renewal_interval).await;
                            client.renew(&mut held).await.expect("the winner keeps its lease");
                        }
                        Ok(held.record().owner_host.clone())
                    })
                })
            })
            .collect();
        let outcomes: Vec<Result<Name, StorageError>> =
            handles.into_iter().map(|handle| handle.join().unwrap()).collect();
        let winners: Vec<&Name> = outcomes.iter().filter_map(|outcome| outcome.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let record_bytes = std::fs::read(kvmha_storage::layout::lease_path(&shared, &name("prod"), &vm)).unwrap();
        let record = kvmha_storage::LeaseRecord::decode(&record_bytes, &name("prod")).unwrap();
        assert_eq!(&record.owner_host, winners[0], "round {round}");
    }
    drop(sshfs);
}
