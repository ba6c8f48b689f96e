//! A pool: one directory on a shared mount, served by its own worker thread.
//!
//! Every file operation on a pool runs on that pool's dedicated thread, never on the
//! async runtime, so a hung NFS/FUSE mount blocks exactly one thread and nothing else:
//! not the runtime, not another pool. Callers submit an operation with a deadline and
//! get `Err(Timeout)` at the deadline even if the worker stays stuck in the kernel.
//!
//! Limits: the queue in front of the worker is bounded; when it is full the pool is
//! hung and new operations are refused at once (`PoolHung`) instead of piling up. An
//! operation whose deadline passed while it waited in the queue is dropped unrun: its
//! caller has already been told "timeout", and a late lease claim landing on storage
//! long after its justification expired is exactly what the lease algorithm must avoid.
//! An operation that *started* before its deadline may still finish after it; that is
//! why a timeout means "unknown", not "did not happen".

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::{Result, StorageError};
use crate::record::RECORD_LEN;

/// Operations allowed to wait behind a busy worker. Small: a heartbeat writer and a
/// handful of lease renewals per tick; anything more means the mount is stuck.
pub const DEFAULT_QUEUE_CAPACITY: usize = 16;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// What the worker is doing right now, for health reports.
#[derive(Clone, Copy, Debug)]
struct Busy {
    operation: &'static str,
    started_at: Instant,
    deadline_at: Instant,
}

#[derive(Debug)]
struct Shared {
    name: String,
    root: PathBuf,
    queue_capacity: usize,
    busy: Mutex<Option<Busy>>,
}

/// The pool's state as its worker last reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolHealth {
    /// Idle, or busy within the deadline of the current operation.
    Responsive,
    /// The current operation is past its deadline: the mount is hung (or very slow).
    Hung { operation: &'static str, stuck_for: Duration },
}

/// Handle to one pool. Cheap to clone; the worker exits when the last handle is
/// dropped and its current operation (if any) returns.
#[derive(Clone, Debug)]
pub struct Pool {
    shared: Arc<Shared>,
    sender: SyncSender<Job>,
}

impl Pool {
    /// Starts the worker for the directory `root` (the mount point, or a directory in
    /// it). `name` labels errors and logs. Does no I/O: a hung mount cannot block this.
    pub fn open(name: &str, root: impl Into<PathBuf>) -> Result<Self> {
        Self::with_queue_capacity(name, root, DEFAULT_QUEUE_CAPACITY)
    }

    pub fn with_queue_capacity(name: &str, root: impl Into<PathBuf>, queue_capacity: usize) -> Result<Self> {
        assert!(queue_capacity > 0, "a pool needs room for one queued operation");
        let shared =
            Arc::new(Shared { name: name.to_owned(), root: root.into(), queue_capacity, busy: Mutex::new(None) });
        let (sender, receiver) = sync_channel::<Job>(queue_capacity);
        thread::Builder::new()
            .name(format!("kvmha-pool-{name}"))
            .spawn(move || {
                while let Ok(job) = receiver.recv() {
                    // A panicking operation must not take the pool down with it; the
                    // caller sees its reply channel close and reports a timeout.
                    let _ = catch_unwind(AssertUnwindSafe(job));
                }
            })
            .map_err(|source| StorageError::Io { op: "start pool worker", path: shared.root.clone(), source })?;
        Ok(Self { shared, sender })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// Hung if the worker's current operation is past its deadline at `now`.
    pub fn health(&self, now: Instant) -> PoolHealth {
        let busy = *self.shared.busy.lock().unwrap_or_else(PoisonError::into_inner);
        match busy {
            Some(busy) if now >= busy.deadline_at => PoolHealth::Hung {
                operation: busy.operation,
                stuck_for: now.saturating_duration_since(busy.started_at),
            },
            _ => PoolHealth::Responsive,
        }
    }

    /// Runs `operation` on the pool's worker with the pool root as argument, and
    /// returns its result, or `Timeout` once `deadline` has passed, or `PoolHung` at
    /// once if the queue is full.
    pub async fn run<T, F>(&self, name: &'static str, deadline: Duration, operation: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> Result<T> + Send + 'static,
    {
        let deadline_at = Instant::now() + deadline;
        let (reply, answer) = oneshot::channel();
        let shared = Arc::clone(&self.shared);
        let job: Job = Box::new(move || {
            if Instant::now() >= deadline_at {
                return;
            }
            set_busy(&shared, Some(Busy { operation: name, started_at: Instant::now(), deadline_at }));
            let result = operation(&shared.root);
            set_busy(&shared, None);
            let _ = reply.send(result);
        });
        match self.sender.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(StorageError::PoolHung {
                    pool: self.shared.name.clone(),
                    queue_capacity: self.shared.queue_capacity,
                })
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(StorageError::PoolStopped { pool: self.shared.name.clone() })
            }
        }
        let timeout = || StorageError::Timeout { pool: self.shared.name.clone(), op: name, deadline };
        match tokio::time::timeout_at(deadline_at.into(), answer).await {
            Ok(Ok(result)) => result,
            // The worker dropped the job unrun (deadline passed in the queue) or the
            // operation panicked: either way no answer arrived in time.
            Ok(Err(_closed)) => Err(timeout()),
            Err(_elapsed) => Err(timeout()),
        }
    }
}

fn set_busy(shared: &Shared, busy: Option<Busy>) {
    *shared.busy.lock().unwrap_or_else(PoisonError::into_inner) = busy;
}

fn io_error<'path>(op: &'static str, path: &'path Path) -> impl FnOnce(std::io::Error) -> StorageError + 'path {
    move |source| StorageError::Io { op, path: path.to_owned(), source }
}

/// Blocking: replaces `path` with `bytes` so that readers see the old record or the
/// new one, never a mix: write a temporary file next to it, fsync it, rename it over
/// the record (atomic on POSIX file systems and NFS), fsync the directory so the
/// rename survives a crash. Where a file system does not make rename atomic, the
/// record's length and checksum still make a torn record undecodable.
pub fn write_replace(path: &Path, temporary: &Path, bytes: &[u8]) -> Result<()> {
    let directory = path.parent().expect("record paths have a parent directory");
    fs::create_dir_all(directory).map_err(io_error("create directory", directory))?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(temporary)
        .map_err(io_error("open temporary record", temporary))?;
    file.write_all(bytes).map_err(io_error("write temporary record", temporary))?;
    file.sync_all().map_err(io_error("fsync temporary record", temporary))?;
    drop(file);
    fs::rename(temporary, path).map_err(io_error("rename record into place", path))?;
    match File::open(directory).and_then(|directory| directory.sync_all()) {
        Ok(()) => Ok(()),
        // Some network and FUSE file systems cannot fsync a directory; the rename is
        // then as durable as that file system makes it.
        Err(error) if matches!(error.kind(), ErrorKind::InvalidInput | ErrorKind::Unsupported) => Ok(()),
        Err(error) => Err(io_error("fsync record directory", directory)(error)),
    }
}

/// Blocking: the record file's bytes, `None` if it does not exist. Reads at most one
/// byte more than a record so that an over-long file is seen as such (and rejected by
/// the decoder) without reading an arbitrary amount.
pub fn read_bytes(path: &Path) -> Result<Option<Vec<u8>>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error("open record", path)(error)),
    };
    let mut bytes = Vec::with_capacity(RECORD_LEN + 1);
    file.take(RECORD_LEN as u64 + 1).read_to_end(&mut bytes).map_err(io_error("read record", path))?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    #[test]
    fn operations_run_on_the_worker_and_return_results() {
        let directory = tempfile::tempdir().unwrap();
        let pool = Pool::open("test", directory.path()).unwrap();
        let root =
            runtime().block_on(pool.run("echo root", Duration::from_secs(10), |root| Ok(root.to_owned()))).unwrap();
        assert_eq!(root, directory.path());
    }

    /// A worker blocked forever (a channel stands in for a hung syscall here; the real
    /// hung mount is in tests/hung_pool.rs) answers Timeout at the deadline, reports
    /// itself hung, and refuses work once its bounded queue is full.
    #[test]
    fn a_stuck_worker_times_out_reports_hung_and_bounds_its_queue() {
        let directory = tempfile::tempdir().unwrap();
        let pool = Pool::with_queue_capacity("stuck", directory.path(), 2).unwrap();
        let (release, blocked) = mpsc::channel::<()>();
        let runtime = runtime();
        let deadline = Duration::from_millis(200);
        let result = runtime.block_on(pool.run("block", deadline, move |_| {
            let _ = blocked.recv();
            Ok(())
        }));
        assert!(matches!(result, Err(StorageError::Timeout { op: "block", .. })));
        assert!(matches!(pool.health(Instant::now()), PoolHealth::Hung { operation: "block", .. }));
        // Two more fit in the queue (and time out); the next is refused at once.
        for _ in 0..2 {
            let queued = runtime.block_on(pool.run("queued", deadline, |_| Ok(())));
            assert!(matches!(queued, Err(StorageError::Timeout { .. })));
        }
        let refused = runtime.block_on(pool.run("refused", Duration::from_secs(3600), |_| Ok(())));
        assert!(matches!(refused, Err(StorageError::PoolHung { queue_capacity: 2, .. })));
        // Once unstuck, the stale queued jobs are dropped unrun and the pool serves again.
        release.send(()).unwrap();
        let ran = runtime.block_on(async {
            // The worker needs a moment to drain the queue it was stuck behind.
            for _ in 0..500 {
                match pool.run("after", Duration::from_secs(10), |_| Ok(7)).await {
                    Err(StorageError::PoolHung { .. }) => tokio::time::sleep(Duration::from_millis(10)).await,
                    other => return other,
                }
            }
            panic!("pool never drained its queue");
        });
        assert_eq!(ran.unwrap(), 7);
        assert_eq!(pool.health(Instant::now()), PoolHealth::Responsive);
    }

    #[test]
    fn replace_then_read_returns_the_bytes_and_missing_is_none() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("a/b/record");
        let temporary = directory.path().join("a/b/.record.tmp");
        assert_eq!(read_bytes(&path).unwrap(), None);
        write_replace(&path, &temporary, b"first").unwrap();
        write_replace(&path, &temporary, b"second").unwrap();
        assert_eq!(read_bytes(&path).unwrap(), Some(b"second".to_vec()));
        assert!(!temporary.exists());
    }

    #[test]
    fn over_long_files_are_read_one_byte_past_a_record() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("big");
        fs::write(&path, vec![0u8; 10 * RECORD_LEN]).unwrap();
        assert_eq!(read_bytes(&path).unwrap().unwrap().len(), RECORD_LEN + 1);
    }
}
