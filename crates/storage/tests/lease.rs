//! Lease acquisition, renewal and release among hosts sharing one directory. Each
//! simulated host is a thread with its own runtime and its own pool worker, as on
//! separate machines; only the directory is shared.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use kvmha_storage::layout::lease_path;
use kvmha_storage::{
    BootId, HostIdentity, LeaseClient, LeaseRecord, LeaseState, LeaseTimings, Name, Pool, StorageError,
};

/// Generous i/o budget: the machine is shared with other builds, and a slow fsync must
/// not turn into a spurious loss. The safety rule holds for these numbers.
fn timings() -> LeaseTimings {
    LeaseTimings {
        renewal_interval: Duration::from_millis(300),
        io_timeout: Duration::from_millis(250),
        self_fence_deadline: Duration::from_millis(1_250),
        watchdog_timeout: Duration::from_millis(200),
        lease_expiry: Duration::from_millis(1_500),
    }
}

fn name(text: &str) -> Name {
    Name::new(text).unwrap()
}

fn client(directory: &std::path::Path, host: &str, boot: u8) -> LeaseClient {
    let pool = Pool::open(host, directory).unwrap();
    let identity = HostIdentity { cluster: name("prod"), host: name(host), boot_id: BootId([boot; 16]) };
    LeaseClient::new(pool, identity, timings()).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
}

/// N hosts start acquiring the same free lease at the same instant, over many
/// rounds: exactly one wins each round, and the winner is the holder on storage. The
/// winner keeps renewing until every loser has finished, so a loser that arrives late
/// meets a live holder.
#[test]
fn concurrent_acquirers_exactly_one_wins() {
    const HOSTS: usize = 4;
    const ROUNDS: usize = 8;
    let directory = tempfile::tempdir().unwrap();
    for round in 0..ROUNDS {
        let vm = name(&format!("vm-{round}"));
        let barrier = Arc::new(Barrier::new(HOSTS));
        let finished = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..HOSTS)
            .map(|index| {
                let client = client(directory.path(), &format!("host{index}"), index as u8);
                let barrier = Arc::clone(&barrier);
                let finished = Arc::clone(&finished);
                let vm = vm.clone();
                thread::spawn(move || {
                    runtime().block_on(async move {
                        barrier.wait();
                        let outcome = client.acquire(&vm).await;
                        finished.fetch_add(1, Ordering::SeqCst);
                        let Ok(mut held) = outcome else {
                            return outcome.map(|_| index);
                        };
                        let give_up_at = Instant::now() + Duration::from_secs(120);
                        while finished.load(Ordering::SeqCst) < HOSTS && Instant::now() < give_up_at {
                            tokio::time::sleep(client.timings().renewal_interval).await;
                            client.renew(&mut held).await.expect("winner keeps its lease");
                        }
                        Ok(index)
                    })
                })
            })
            .collect();
        let outcomes: Vec<Result<usize, StorageError>> =
            handles.into_iter().map(|handle| handle.join().unwrap()).collect();
        let winners: Vec<usize> = outcomes.iter().filter_map(|outcome| outcome.as_ref().ok().copied()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        for outcome in &outcomes {
            if let Err(error) = outcome {
                assert!(
                    matches!(error, StorageError::LeaseContended { .. } | StorageError::LeaseHeld { .. }),
                    "round {round}: unexpected loss {error:?}"
                );
            }
        }
        let on_storage = std::fs::read(lease_path(directory.path(), &name("prod"), &vm)).unwrap();
        let record = LeaseRecord::decode(&on_storage, &name("prod")).unwrap();
        assert_eq!(record.owner_host.as_str(), format!("host{}", winners[0]));
        assert_eq!(record.state, LeaseState::Held);
    }
}

#[test]
fn a_live_holder_keeps_its_lease_and_an_expired_one_is_taken_over() {
    let directory = tempfile::tempdir().unwrap();
    let host_a = client(directory.path(), "host-a", 1);
    let host_b = client(directory.path(), "host-b", 2);
    let vm = name("vm1");
    let runtime = runtime();
    runtime.block_on(async {
        let mut held = host_a.acquire(&vm).await.unwrap();
        // A renews while B tries: B must see the renewals and give up.
        let renewer = async {
            for _ in 0..20 {
                tokio::time::sleep(host_a.timings().renewal_interval).await;
                host_a.renew(&mut held).await.unwrap();
            }
        };
        let (_, attempt) = tokio::join!(renewer, async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            host_b.acquire(&vm).await
        });
        assert!(matches!(&attempt, Err(StorageError::LeaseHeld { owner, .. }) if owner == "host-a"), "{attempt:?}");

        // A stops renewing (its host died). B may take over, but not before the record
        // has stayed unchanged for the expiry on B's clock.
        let started = Instant::now();
        let taken = host_b.acquire(&vm).await.unwrap();
        assert!(started.elapsed() >= host_b.timings().lease_expiry);
        assert_eq!(taken.record().owner_host.as_str(), "host-b");

        // A comes back: its lease is gone, whatever it tries.
        let lost = host_a.renew(&mut held).await;
        assert!(matches!(lost, Err(StorageError::LeaseLost { .. })), "{lost:?}");
    });
}

#[test]
fn renewal_refuses_after_theft_or_after_the_self_fence_deadline() {
    let directory = tempfile::tempdir().unwrap();
    let host_a = client(directory.path(), "host-a", 1);
    let vm = name("vm1");
    let runtime = runtime();
    runtime.block_on(async {
        let mut held = host_a.acquire(&vm).await.unwrap();
        host_a.renew(&mut held).await.unwrap();
        let mut record = held.record().clone();
        // Acquire renews once right after confirming, then our explicit renewal.
        assert_eq!(record.counter, record.acquired_at_counter + 2);

        // Someone else's claim lands on storage.
        record.owner_host = name("host-z");
        record.counter += 1;
        let path = lease_path(directory.path(), &name("prod"), &vm);
        std::fs::write(&path, record.encode()).unwrap();
        let stolen = host_a.renew(&mut held).await;
        assert!(
            matches!(stolen, Err(StorageError::LeaseLost { reason, .. }) if reason.contains("another writer")),
            "{stolen:?}"
        );

        // A fresh lease not renewed within the self-fence deadline is given up, even
        // though nobody touched it: others may already be counting towards expiry.
        let vm2 = name("vm2");
        let mut held = host_a.acquire(&vm2).await.unwrap();
        tokio::time::sleep(host_a.timings().self_fence_deadline).await;
        let late = host_a.renew(&mut held).await;
        assert!(
            matches!(late, Err(StorageError::LeaseLost { reason, .. }) if reason.contains("self-fence")),
            "{late:?}"
        );
    });
}

#[test]
fn released_leases_are_claimed_without_waiting_and_a_restarted_agent_keeps_its_own() {
    let directory = tempfile::tempdir().unwrap();
    let host_a = client(directory.path(), "host-a", 1);
    let host_b = client(directory.path(), "host-b", 2);
    let vm = name("vm1");
    runtime().block_on(async {
        let held = host_a.acquire(&vm).await.unwrap();
        // The agent restarts (same host, same boot): it takes its own lease back
        // without waiting for it to expire.
        let restarted = client(directory.path(), "host-a", 1);
        let started = Instant::now();
        let again = restarted.acquire(&vm).await.unwrap();
        assert!(started.elapsed() < restarted.timings().lease_expiry);
        assert!(again.record().acquired_at_counter > held.record().acquired_at_counter);
        // The old handle is stale now.
        let mut old = held;
        assert!(host_a.renew(&mut old).await.is_err());

        restarted.release(again).await.unwrap();
        let record = host_b.read(&vm).await.unwrap().unwrap();
        assert_eq!(record.state, LeaseState::Released);
        // The read-only path (no lease client, as the manager reads) agrees.
        let reader = Pool::open("manager", directory.path()).unwrap();
        let read_only = kvmha_storage::read_lease(&reader, &name("prod"), &vm, Duration::from_secs(10)).await.unwrap();
        assert_eq!(read_only, Some(record));
        let absent =
            kvmha_storage::read_lease(&reader, &name("prod"), &name("nope"), Duration::from_secs(10)).await.unwrap();
        assert_eq!(absent, None);
        let started = Instant::now();
        let taken = host_b.acquire(&vm).await.unwrap();
        assert!(started.elapsed() < host_b.timings().lease_expiry);
        assert_eq!(taken.record().owner_host.as_str(), "host-b");
    });
}

/// An unreadable lease file (damage, or a writer mid-way on a file system without
/// atomic rename) is treated as held by someone unknown: claimable only after it has
/// stayed unchanged for the expiry.
#[test]
fn a_corrupt_lease_is_claimed_only_after_it_stays_unchanged_for_the_expiry() {
    let directory = tempfile::tempdir().unwrap();
    let host_b = client(directory.path(), "host-b", 2);
    let vm = name("vm1");
    let path = lease_path(directory.path(), &name("prod"), &vm);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"half a rec").unwrap();
    runtime().block_on(async {
        let started = Instant::now();
        let taken = host_b.acquire(&vm).await.unwrap();
        assert!(started.elapsed() >= host_b.timings().lease_expiry);
        assert_eq!(taken.record().owner_host.as_str(), "host-b");
    });
}

#[test]
fn unsafe_timings_are_refused_when_the_client_is_built() {
    let directory = tempfile::tempdir().unwrap();
    let pool = Pool::open("p", directory.path()).unwrap();
    let identity = HostIdentity { cluster: name("prod"), host: name("host-a"), boot_id: BootId([1; 16]) };
    let unsafe_timings = LeaseTimings { lease_expiry: Duration::from_millis(1_400), ..timings() };
    let refused = LeaseClient::new(pool, identity, unsafe_timings);
    assert!(matches!(refused, Err(StorageError::TimingConflict { .. })));
}

/// Lease counters are compared for equality only, so one that wraps past u64::MAX
/// keeps working through claim and renewals.
#[test]
fn lease_counters_wrap_past_u64_max() {
    let directory = tempfile::tempdir().unwrap();
    let host_a = client(directory.path(), "host-a", 1);
    let vm = name("vm1");
    let released = LeaseRecord {
        cluster: name("prod"),
        vm: vm.clone(),
        state: LeaseState::Released,
        owner_host: name("host-z"),
        owner_boot_id: BootId([9; 16]),
        counter: u64::MAX,
        acquired_at_counter: u64::MAX - 7,
        writer_unix_ms: 0,
    };
    let path = lease_path(directory.path(), &name("prod"), &vm);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, released.encode()).unwrap();
    runtime().block_on(async {
        let mut held = host_a.acquire(&vm).await.unwrap();
        assert_eq!(held.record().acquired_at_counter, 0);
        host_a.renew(&mut held).await.unwrap();
        host_a.renew(&mut held).await.unwrap();
        assert_eq!(held.record().counter, 3);
    });
}

/// A dead owner's fresh lease is taken over at once by a breaking acquirer; the same
/// acquirer without the break waits for the expiry; a break naming another owner or
/// another boot is an ordinary acquire (it meets a live holder: `LeaseHeld`).
#[test]
fn breaking_a_dead_owners_lease_skips_the_expiry_and_only_for_that_owner_and_boot() {
    let directory = tempfile::tempdir().unwrap();
    let host_a = client(directory.path(), "host-a", 1);
    let host_b = client(directory.path(), "host-b", 2);
    runtime().block_on(async {
        // host-a holds vm1 and dies at once: its lease is as fresh as it gets.
        let vm = name("vm1");
        let _dead = host_a.acquire(&vm).await.unwrap();
        let started = Instant::now();
        let taken = host_b.acquire_from_dead_owner(&vm, &name("host-a"), Some(BootId([1; 16]))).await.unwrap();
        assert!(started.elapsed() < host_b.timings().lease_expiry, "the break waited for the expiry");
        assert_eq!(taken.record().owner_host.as_str(), "host-b");
        let on_storage = host_b.read(&vm).await.unwrap().unwrap();
        assert_eq!(on_storage.owner_host.as_str(), "host-b");
        // The dead owner, should it come back, has lost it.
        let mut stale = _dead;
        assert!(matches!(host_a.renew(&mut stale).await, Err(StorageError::LeaseLost { .. })));

        // Without a boot id any boot of the owner is broken.
        let vm2 = name("vm2");
        let _dead = host_a.acquire(&vm2).await.unwrap();
        let taken = host_b.acquire_from_dead_owner(&vm2, &name("host-a"), None).await.unwrap();
        assert_eq!(taken.record().owner_host.as_str(), "host-b");

        // Held by host-a, but the proof is about another boot (host-a rebooted and
        // took it again) or another host: the holder renews, so the answer is LeaseHeld.
        for (owner, boot) in [("host-a", Some(BootId([7; 16]))), ("host-z", None)] {
            let vm3 = name(&format!("vm3-{owner}"));
            let mut held = host_a.acquire(&vm3).await.unwrap();
            let renewer = async {
                for _ in 0..12 {
                    tokio::time::sleep(host_a.timings().renewal_interval).await;
                    host_a.renew(&mut held).await.unwrap();
                }
            };
            let named = name(owner);
            let (_, attempt) = tokio::join!(renewer, host_b.acquire_from_dead_owner(&vm3, &named, boot));
            assert!(
                matches!(&attempt, Err(StorageError::LeaseHeld { owner: holder, .. }) if holder == "host-a"),
                "{owner} {boot:?}: {attempt:?}"
            );
        }

        // An ordinary acquire of a dead owner's fresh lease waits for the expiry.
        let vm4 = name("vm4");
        let _dead = host_a.acquire(&vm4).await.unwrap();
        let started = Instant::now();
        let taken = host_b.acquire(&vm4).await.unwrap();
        assert!(started.elapsed() >= host_b.timings().lease_expiry);
        assert_eq!(taken.record().owner_host.as_str(), "host-b");
    });
}

/// Breakers and ordinary acquirers race for one dead owner's fresh lease, over many
/// rounds: exactly one wins each round. Those that read after the winner's claim see
/// a live holder that is not the dead owner, so they wait and meet its renewals.
#[test]
fn concurrent_breakers_and_acquirers_exactly_one_wins() {
    const HOSTS: usize = 4;
    const ROUNDS: usize = 6;
    let directory = tempfile::tempdir().unwrap();
    let dead = client(directory.path(), "dead", 99);
    for round in 0..ROUNDS {
        let vm = name(&format!("vm-{round}"));
        runtime().block_on(dead.acquire(&vm)).unwrap();
        let barrier = Arc::new(Barrier::new(HOSTS));
        let finished = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..HOSTS)
            .map(|index| {
                let client = client(directory.path(), &format!("host{index}"), index as u8);
                let barrier = Arc::clone(&barrier);
                let finished = Arc::clone(&finished);
                let vm = vm.clone();
                // Every other host breaks; with the round, the mix changes.
                let breaks = (index + round) % 2 == 0;
                thread::spawn(move || {
                    runtime().block_on(async move {
                        barrier.wait();
                        let outcome = if breaks {
                            client.acquire_from_dead_owner(&vm, &name("dead"), Some(BootId([99; 16]))).await
                        } else {
                            client.acquire(&vm).await
                        };
                        finished.fetch_add(1, Ordering::SeqCst);
                        let Ok(mut held) = outcome else {
                            return outcome.map(|_| index);
                        };
                        let give_up_at = Instant::now() + Duration::from_secs(120);
                        while finished.load(Ordering::SeqCst) < HOSTS && Instant::now() < give_up_at {
                            tokio::time::sleep(client.timings().renewal_interval).await;
                            client.renew(&mut held).await.expect("winner keeps its lease");
                        }
                        Ok(index)
                    })
                })
            })
            .collect();
        let outcomes: Vec<Result<usize, StorageError>> =
            handles.into_iter().map(|handle| handle.join().unwrap()).collect();
        let winners: Vec<usize> = outcomes.iter().filter_map(|outcome| outcome.as_ref().ok().copied()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        for outcome in &outcomes {
            if let Err(error) = outcome {
                assert!(
                    matches!(error, StorageError::LeaseContended { .. } | StorageError::LeaseHeld { .. }),
                    "round {round}: unexpected loss {error:?}"
                );
            }
        }
        let record = runtime().block_on(dead.read(&vm)).unwrap().unwrap();
        assert_eq!(record.owner_host.as_str(), format!("host{}", winners[0]));
    }
}
