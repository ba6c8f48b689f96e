//! Property tests of the record formats: what the decoder accepts is exactly what the
//! encoder wrote; torn, truncated, extended, bit-flipped and foreign records never
//! decode; liveness ignores the writer's clock.

use std::time::{Duration, Instant};

use kvmha_storage::{
    AgentState, BootId, HeartbeatRecord, LeaseRecord, LeaseState, Liveness, LivenessTracker, Name, StorageError,
    RECORD_LEN,
};
use proptest::prelude::*;

fn name_strategy() -> impl Strategy<Value = Name> {
    "[A-Za-z0-9_][A-Za-z0-9._-]{0,62}".prop_map(|text| Name::new(&text).unwrap())
}

fn heartbeat_strategy() -> impl Strategy<Value = HeartbeatRecord> {
    (
        name_strategy(),
        name_strategy(),
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<u64>(),
        prop_oneof![Just(AgentState::Running), Just(AgentState::StoppedCleanly)],
        any::<bool>(),
    )
        .prop_map(|(cluster, host, boot_id, counter, writer_unix_ms, agent_state, watchdog_armed)| {
            HeartbeatRecord {
                cluster,
                host,
                boot_id: BootId(boot_id),
                counter,
                writer_unix_ms,
                agent_state,
                watchdog_armed,
            }
        })
}

fn lease_strategy() -> impl Strategy<Value = LeaseRecord> {
    (
        name_strategy(),
        name_strategy(),
        prop_oneof![Just(LeaseState::Held), Just(LeaseState::Released)],
        name_strategy(),
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(cluster, vm, state, owner_host, boot_id, counter, acquired_at, writer_unix_ms)| LeaseRecord {
            cluster,
            vm,
            state,
            owner_host,
            owner_boot_id: BootId(boot_id),
            counter,
            acquired_at_counter: acquired_at,
            writer_unix_ms,
        })
}

proptest! {
    #[test]
    fn heartbeat_round_trips(record in heartbeat_strategy()) {
        let bytes = record.encode();
        prop_assert_eq!(HeartbeatRecord::decode(&bytes, &record.cluster).unwrap(), record.clone());
        // One encoding per record: re-encoding the decoded record gives the same bytes.
        prop_assert_eq!(HeartbeatRecord::decode(&bytes, &record.cluster).unwrap().encode(), bytes);
    }

    #[test]
    fn lease_round_trips(record in lease_strategy()) {
        let bytes = record.encode();
        prop_assert_eq!(LeaseRecord::decode(&bytes, &record.cluster).unwrap(), record.clone());
    }

    #[test]
    fn every_truncation_and_extension_is_rejected(record in heartbeat_strategy(), extra in proptest::collection::vec(any::<u8>(), 1..64)) {
        let bytes = record.encode();
        for length in 0..RECORD_LEN {
            let error = HeartbeatRecord::decode(&bytes[..length], &record.cluster).unwrap_err();
            let is_wrong_length = matches!(error, StorageError::WrongLength { actual, .. } if actual == length);
            prop_assert!(is_wrong_length, "length {} gave {:?}", length, error);
        }
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(&extra);
        prop_assert!(HeartbeatRecord::decode(&longer, &record.cluster).is_err());
    }

    #[test]
    fn every_single_bit_flip_is_rejected(heartbeat in heartbeat_strategy(), lease in lease_strategy()) {
        let heartbeat_bytes = heartbeat.encode();
        let lease_bytes = lease.encode();
        for bit in 0..RECORD_LEN * 8 {
            let mut flipped = heartbeat_bytes;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let result = HeartbeatRecord::decode(&flipped, &heartbeat.cluster);
            prop_assert!(result.as_ref().is_err_and(StorageError::is_corrupt_record), "heartbeat bit {} accepted: {:?}", bit, result);
            let mut flipped = lease_bytes;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let result = LeaseRecord::decode(&flipped, &lease.cluster);
            prop_assert!(result.as_ref().is_err_and(StorageError::is_corrupt_record), "lease bit {} accepted: {:?}", bit, result);
        }
    }

    /// A torn in-place write: a prefix of the new record over the old one. It decodes
    /// as the old record, the new one, or not at all; never as a third record.
    #[test]
    fn torn_writes_never_decode_as_a_third_record(old in heartbeat_strategy(), new in heartbeat_strategy()) {
        let old_bytes = old.encode();
        let new_bytes = new.encode();
        for cut in 0..=RECORD_LEN {
            let mut torn = old_bytes;
            torn[..cut].copy_from_slice(&new_bytes[..cut]);
            if let Ok(decoded) = HeartbeatRecord::decode_any_cluster(&torn) {
                prop_assert!(decoded == old || decoded == new, "cut {} decoded as {:?}", cut, decoded);
            }
        }
    }

    #[test]
    fn foreign_cluster_records_are_rejected(record in heartbeat_strategy(), lease in lease_strategy(), other in name_strategy()) {
        prop_assume!(other != record.cluster && other != lease.cluster);
        let is_foreign = matches!(HeartbeatRecord::decode(&record.encode(), &other), Err(StorageError::ForeignCluster { .. }));
        prop_assert!(is_foreign);
        let is_foreign = matches!(LeaseRecord::decode(&lease.encode(), &other), Err(StorageError::ForeignCluster { .. }));
        prop_assert!(is_foreign);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = kvmha_storage::AnyRecord::decode_any_cluster(&bytes);
    }

    /// The writer's clock may jump anywhere (NTP step, wrong RTC, manual change): the
    /// verdict is the same as for the same writes with no timestamp at all.
    #[test]
    fn writer_clock_jumps_do_not_change_liveness(
        base in heartbeat_strategy(),
        steps in proptest::collection::vec((any::<bool>(), any::<u64>(), 1u64..3_000), 1..60),
    ) {
        let expiry = Duration::from_secs(5);
        let start = Instant::now();
        let mut with_clock = LivenessTracker::new(expiry);
        let mut without_clock = LivenessTracker::new(expiry);
        let mut record = base.clone();
        let mut reader_ms = 0u64;
        for (advance, writer_unix_ms, reader_step_ms) in steps {
            if advance {
                record.counter = record.counter.wrapping_add(1);
            }
            record.writer_unix_ms = writer_unix_ms;
            reader_ms += reader_step_ms;
            let read_at = start + Duration::from_millis(reader_ms);
            let mut clockless = record.clone();
            clockless.writer_unix_ms = 0;
            let decoded = HeartbeatRecord::decode(&record.encode(), &record.cluster).unwrap();
            prop_assert_eq!(
                with_clock.observe(decoded.progress(), read_at),
                without_clock.observe(clockless.progress(), read_at)
            );
        }
    }

    /// Model check of the tracker against a direct reading of the definition.
    #[test]
    fn liveness_matches_its_definition(steps in proptest::collection::vec((any::<bool>(), 0u64..4_000), 1..80)) {
        let expiry = Duration::from_secs(5);
        let start = Instant::now();
        let mut tracker = LivenessTracker::new(expiry);
        let mut counter = 0u64;
        let mut reader_ms = 0u64;
        let mut value_since_ms = 0u64;
        let mut changed_ever = false;
        for (index, (advance, step_ms)) in steps.into_iter().enumerate() {
            reader_ms += step_ms;
            if advance && index > 0 {
                counter += 1;
                value_since_ms = reader_ms;
                changed_ever = true;
            }
            if index == 0 {
                value_since_ms = reader_ms;
            }
            let verdict = tracker.observe(counter, start + Duration::from_millis(reader_ms));
            let unchanged_for = Duration::from_millis(reader_ms - value_since_ms);
            let expected = if unchanged_for >= expiry {
                Liveness::Stale { unchanged_for }
            } else if changed_ever {
                Liveness::Alive { unchanged_for }
            } else {
                Liveness::Undetermined { unchanged_for }
            };
            prop_assert_eq!(verdict, expected);
        }
    }
}

proptest! {
    /// Damage that happens to carry a valid checksum (a buggy or hostile writer)
    /// still cannot smuggle in a record with two encodings: whatever decodes,
    /// re-encodes to exactly the bytes on storage.
    #[test]
    fn whatever_decodes_is_canonical(
        heartbeat in heartbeat_strategy(),
        lease in lease_strategy(),
        damage in proptest::collection::vec((0usize..252, any::<u8>()), 1..4),
    ) {
        let reseal = |bytes: &mut [u8; RECORD_LEN]| {
            let checksum = kvmha_storage::crc32c::crc32c(&bytes[..252]);
            bytes[252..].copy_from_slice(&checksum.to_le_bytes());
        };
        let mut bytes = heartbeat.encode();
        for &(offset, value) in &damage {
            bytes[offset] = value;
        }
        reseal(&mut bytes);
        if let Ok(decoded) = HeartbeatRecord::decode_any_cluster(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
        let mut bytes = lease.encode();
        for &(offset, value) in &damage {
            bytes[offset] = value;
        }
        reseal(&mut bytes);
        if let Ok(decoded) = LeaseRecord::decode_any_cluster(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }
}
