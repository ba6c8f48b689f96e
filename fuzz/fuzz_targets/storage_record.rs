//! Heartbeat and lease records are read from shared storage that anyone with
//! a mount can write (a torn write, another cluster, a broken disk): decoding
//! never panics, and a record that decodes has exactly one encoding.
//!
//! The input is used twice: as read, and resealed with a correct CRC-32C so
//! that the fuzzer gets past the checksum to the field checks.

#![no_main]

use kvmha_storage::crc32c::crc32c;
use kvmha_storage::{AnyRecord, HeartbeatRecord, LeaseRecord, Name, RECORD_LEN};
use libfuzzer_sys::fuzz_target;

fn check(bytes: &[u8]) {
    let cluster = Name::new("prod").expect("valid name");
    if let Ok(record) = HeartbeatRecord::decode_any_cluster(bytes) {
        assert_eq!(&record.encode()[..], bytes, "a heartbeat record has one encoding");
        match HeartbeatRecord::decode(bytes, &cluster) {
            Ok(mine) => assert_eq!(mine.cluster, cluster),
            Err(_) => assert_ne!(record.cluster, cluster, "only a foreign cluster may fail here"),
        }
    }
    if let Ok(record) = LeaseRecord::decode_any_cluster(bytes) {
        assert_eq!(&record.encode()[..], bytes, "a lease record has one encoding");
        match LeaseRecord::decode(bytes, &cluster) {
            Ok(mine) => assert_eq!(mine.cluster, cluster),
            Err(_) => assert_ne!(record.cluster, cluster, "only a foreign cluster may fail here"),
        }
    }
    let _ = AnyRecord::decode_any_cluster(bytes);
}

fuzz_target!(|bytes: &[u8]| {
    check(bytes);
    if bytes.len() >= RECORD_LEN - 4 {
        let mut sealed = bytes[..RECORD_LEN - 4].to_vec();
        let checksum = crc32c(&sealed);
        sealed.extend_from_slice(&checksum.to_le_bytes());
        check(&sealed);
    }
});
