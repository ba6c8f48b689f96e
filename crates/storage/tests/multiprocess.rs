//! Separate processes sharing one directory, as separate hosts share a mount: a
//! heartbeat writer that is killed goes stale on the reader's clock; lease contention
//! between processes has exactly one winner, a live holder keeps its lease, and a
//! killed holder's lease is taken over after the expiry.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kvmha_storage::layout::lease_path;
use kvmha_storage::{read_heartbeat, LeaseRecord, LeaseState, Liveness, LivenessTracker, Name, Pool};

const TOOL: &str = env!("CARGO_BIN_EXE_kvmha-storage-tool");
/// Bound on every wait in this file: generous, because the machine is shared.
const PATIENCE: Duration = Duration::from_secs(60);

/// Kills (SIGKILL) and reaps every child still running, even when a test fails.
#[derive(Debug, Default)]
struct Children(Vec<Child>);

impl Children {
    fn spawn(&mut self, command: &mut Command) -> usize {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the storage tool starts");
        self.0.push(child);
        self.0.len() - 1
    }

    fn kill(&mut self, index: usize) {
        let _ = self.0[index].kill();
        let _ = self.0[index].wait();
    }

    fn try_wait(&mut self, index: usize) -> Option<ExitStatus> {
        self.0[index].try_wait().expect("child status is readable")
    }

    fn wait_with_patience(&mut self, index: usize) -> ExitStatus {
        let give_up_at = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.try_wait(index) {
                return status;
            }
            assert!(Instant::now() < give_up_at, "child {index} did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn name(text: &str) -> Name {
    Name::new(text).unwrap()
}

fn heartbeat_command(pool: &Path, host: &str) -> Command {
    let mut command = Command::new(TOOL);
    command.arg("heartbeat").arg("--pool").arg(pool);
    command.args(["--cluster", "prod", "--host", host, "--interval-ms", "50"]);
    command
}

/// Fast lease timings that satisfy the safety rule, with room for a loaded machine.
fn acquire_command(pool: &Path, host: &str, boot: u8, vm: &str, hold: bool) -> Command {
    let mut command = Command::new(TOOL);
    command.arg("acquire").arg("--pool").arg(pool);
    command.args(["--cluster", "prod", "--host", host, "--vm", vm]);
    command.args(["--boot-id", &format!("{boot:02x}").repeat(16)]);
    command.args(["--renewal-ms", "300", "--io-timeout-ms", "250"]);
    command.args(["--self-fence-ms", "1250", "--watchdog-ms", "200", "--expiry-ms", "1500"]);
    if hold {
        command.arg("--hold");
    }
    command
}

#[test]
fn a_killed_writer_process_is_alive_then_stale_on_the_readers_clock() {
    let directory = tempfile::tempdir().unwrap();
    let mut children = Children::default();
    let writer = children.spawn(&mut heartbeat_command(directory.path(), "host1"));
    let pool = Pool::open("reader", directory.path()).unwrap();
    let (cluster, host) = (name("prod"), name("host1"));
    let expiry = Duration::from_secs(2);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        let mut tracker = LivenessTracker::new(expiry);
        let read = || async {
            let record = read_heartbeat(&pool, &cluster, &host, Duration::from_secs(5))
                .await
                .expect("a complete record is always readable");
            record.map(|record| record.progress())
        };

        // The writer's heartbeat is seen advancing.
        let give_up_at = Instant::now() + PATIENCE;
        loop {
            if let Some(progress) = read().await {
                if tracker.observe(progress, Instant::now()).is_alive() {
                    break;
                }
            }
            assert!(Instant::now() < give_up_at, "heartbeat never seen advancing");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        children.kill(writer);
        let killed_at = Instant::now();
        let last_written = read().await.unwrap();

        // After the kill the record never changes again, and goes stale once it has
        // been unchanged for the expiry on our clock.
        let verdict = loop {
            let progress = read().await.unwrap();
            assert_eq!(progress, last_written, "record changed after the writer died");
            let verdict = tracker.observe(progress, Instant::now());
            if verdict.is_stale() {
                break verdict;
            }
            assert!(Instant::now() < killed_at + PATIENCE, "never went stale: {verdict:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let Liveness::Stale { unchanged_for } = verdict else { unreachable!() };
        assert!(unchanged_for >= expiry);
        eprintln!("measured: stale {:?} after the kill (expiry {expiry:?})", killed_at.elapsed());
    });
}

#[test]
fn lease_contention_between_processes() {
    let directory = tempfile::tempdir().unwrap();
    let pool = directory.path();
    let cluster = name("prod");
    const ROUNDS: usize = 3;
    const CONTENDERS: usize = 3;
    for round in 0..ROUNDS {
        let vm = format!("vm-{round}");
        let mut children = Children::default();
        let contenders: Vec<usize> = (0..CONTENDERS)
            .map(|index| {
                let host = format!("host{index}");
                children.spawn(&mut acquire_command(pool, &host, index as u8 + 1, &vm, true))
            })
            .collect();

        // Losers exit with 3; the one winner holds and keeps renewing.
        let give_up_at = Instant::now() + PATIENCE;
        let winner = loop {
            let running: Vec<usize> =
                contenders.iter().copied().filter(|&index| children.try_wait(index).is_none()).collect();
            if running.len() == 1 {
                // Give a slow loser the chance to show up as a second holder.
                std::thread::sleep(Duration::from_secs(2));
                if children.try_wait(running[0]).is_none() {
                    break running[0];
                }
            }
            assert!(!running.is_empty(), "round {round}: nobody holds the lease");
            assert!(Instant::now() < give_up_at, "round {round}: {} still contending", running.len());
            std::thread::sleep(Duration::from_millis(50));
        };
        for &index in &contenders {
            if index != winner {
                assert_eq!(children.try_wait(index).unwrap().code(), Some(3), "round {round}");
            }
        }
        let record_path = lease_path(pool, &cluster, &name(&vm));
        let record = LeaseRecord::decode(&std::fs::read(&record_path).unwrap(), &cluster).unwrap();
        assert_eq!(record.owner_host.as_str(), format!("host{winner}"));
        assert_eq!(record.state, LeaseState::Held);

        if round == 0 {
            // A newcomer cannot take the lease from the live holder...
            let newcomer = children.spawn(&mut acquire_command(pool, "host9", 9, &vm, false));
            assert_eq!(children.wait_with_patience(newcomer).code(), Some(3));
            // ...but takes it over once the holder is killed and the lease expired.
            children.kill(winner);
            let successor = children.spawn(&mut acquire_command(pool, "host9", 9, &vm, false));
            assert_eq!(children.wait_with_patience(successor).code(), Some(0));
            let record = LeaseRecord::decode(&std::fs::read(&record_path).unwrap(), &cluster).unwrap();
            assert_eq!(record.owner_host.as_str(), "host9");
        }
    }
}
