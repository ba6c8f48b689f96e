//! Record formats: pure encoding and decoding, no I/O.
//!
//! Every record is exactly [`RECORD_LEN`] bytes, little-endian, with a CRC-32C over
//! everything before it in the last four bytes:
//!
//! ```text
//! offset size  field
//!      0    4  magic: "KVHB" heartbeat, "KVLS" lease
//!      4    2  format version (1)
//!      6    2  record length (256)
//!      8   64  cluster id   (1 length byte + 63 bytes, zero padded)
//!     72   64  subject      (heartbeat: host name; lease: vm name)
//!    136   16  boot id      (heartbeat: writer's; lease: owner's)
//!    152    8  counter      (u64; compared for equality only, so wrapping is harmless)
//!    160    8  writer unix time in ms (informational only, never used for liveness)
//!    168   80  kind-specific, zero where unused:
//!                heartbeat: 168 agent state (1 running, 2 stopped cleanly),
//!                           169 watchdog armed (0/1)
//!                lease:     168 state (1 held, 2 released), 176 owner host (64),
//!                           240 acquired-at counter (u64)
//!    248    4  reserved, zero
//!    252    4  CRC-32C of bytes 0..252
//! ```
//!
//! Fixed size plus checksum means a torn write (a prefix of the new record over the
//! old one, or a short file) can never decode: the decoder rejects any other length,
//! any checksum mismatch, any non-zero padding and any unknown enum value with a typed
//! [`StorageError`]. Padding must be zero so that decode(encode(x)) == x and
//! encode(decode(bytes)) == bytes: a record has exactly one encoding.

use std::fmt;

use crate::crc32c::crc32c;
use crate::error::{Result, StorageError};

/// Every record is this many bytes (one 512-byte sector holds it, so block-backed
/// pools later can write it with one sector write).
pub const RECORD_LEN: usize = 256;
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Longest cluster, host or vm name in bytes.
pub const NAME_MAX_LEN: usize = 63;

const HEARTBEAT_MAGIC: [u8; 4] = *b"KVHB";
const LEASE_MAGIC: [u8; 4] = *b"KVLS";

const OFFSET_VERSION: usize = 4;
const OFFSET_LENGTH: usize = 6;
const OFFSET_CLUSTER: usize = 8;
const OFFSET_SUBJECT: usize = 72;
const OFFSET_BOOT_ID: usize = 136;
const OFFSET_COUNTER: usize = 152;
const OFFSET_WRITER_TIME: usize = 160;
const OFFSET_KIND: usize = 168;
const OFFSET_RESERVED: usize = 248;
const OFFSET_CHECKSUM: usize = 252;
const NAME_FIELD_LEN: usize = 1 + NAME_MAX_LEN;

// Heartbeat kind-specific fields.
const OFFSET_AGENT_STATE: usize = OFFSET_KIND;
const OFFSET_WATCHDOG_ARMED: usize = OFFSET_KIND + 1;
const HEARTBEAT_KIND_USED: usize = 2;

// Lease kind-specific fields.
const OFFSET_LEASE_STATE: usize = OFFSET_KIND;
const OFFSET_OWNER_HOST: usize = OFFSET_KIND + 8;
const OFFSET_ACQUIRED_AT: usize = OFFSET_OWNER_HOST + NAME_FIELD_LEN;
const _: () = assert!(OFFSET_ACQUIRED_AT + 8 == OFFSET_RESERVED);

/// A cluster id, host name or vm name: 1..=63 bytes of `[A-Za-z0-9._-]`, not starting
/// with `.` or `-`. Names become file names on the pool, so this also rules out
/// `..`, slashes, hidden files and anything a shell would misread.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    pub fn new(name: &str) -> Result<Self> {
        let invalid = |reason| StorageError::InvalidName { name: name.to_owned(), reason };
        if name.is_empty() {
            return Err(invalid("empty"));
        }
        if name.len() > NAME_MAX_LEN {
            return Err(invalid("longer than 63 bytes"));
        }
        if name.starts_with('.') || name.starts_with('-') {
            return Err(invalid("starts with '.' or '-'"));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if !name.chars().all(allowed) {
            return Err(invalid("only A-Z a-z 0-9 . _ - are allowed"));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:?}", self.0)
    }
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): tells a rebooted host
/// from the same host still running, without trusting anyone's clock.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BootId(pub [u8; 16]);

impl BootId {
    /// Parses the kernel's text form (hex with dashes).
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = || StorageError::InvalidBootId { text: text.to_owned() };
        let digits: Vec<u8> = text.trim().bytes().filter(|&byte| byte != b'-').collect();
        if digits.len() != 32 {
            return Err(invalid());
        }
        let mut bytes = [0u8; 16];
        for (index, pair) in digits.chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
            bytes[index] = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
        }
        Ok(Self(bytes))
    }

    /// This machine's current boot id.
    pub fn current() -> Result<Self> {
        let path = "/proc/sys/kernel/random/boot_id";
        let text = std::fs::read_to_string(path).map_err(|source| StorageError::Io {
            op: "read boot id",
            path: path.into(),
            source,
        })?;
        Self::parse(&text)
    }
}

impl fmt::Display for BootId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, byte) in self.0.iter().enumerate() {
            if matches!(index, 4 | 6 | 8 | 10) {
                formatter.write_str("-")?;
            }
            write!(formatter, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BootId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "BootId({self})")
    }
}

/// What the agent says about itself in its heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AgentState {
    /// Agent running: its HA VMs are protected by leases and (if armed) the watchdog.
    Running,
    /// Agent stopped cleanly and disarmed its watchdog: lease expiry of this host proves
    /// nothing (ARCHITECTURE.md §6), only the BMC or an operator can declare it dead.
    StoppedCleanly,
}

impl AgentState {
    fn to_byte(self) -> u8 {
        match self {
            Self::Running => 1,
            Self::StoppedCleanly => 2,
        }
    }

    fn from_byte(byte: u8) -> Result<Self> {
        match byte {
            1 => Ok(Self::Running),
            2 => Ok(Self::StoppedCleanly),
            _ => Err(StorageError::MalformedField { field: "agent state", reason: "unknown value" }),
        }
    }
}

/// One host's heartbeat on one pool (`hosts/<host>.hb`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HeartbeatRecord {
    pub cluster: Name,
    pub host: Name,
    pub boot_id: BootId,
    /// Bumped on every write. Readers only ever compare it for equality (changed or
    /// not), so it may start anywhere and wrap from u64::MAX to 0 without harm.
    pub counter: u64,
    /// Writer's wall clock, for humans reading the file. Liveness never uses it: hosts'
    /// clocks are not synchronised and may jump.
    pub writer_unix_ms: u64,
    pub agent_state: AgentState,
    pub watchdog_armed: bool,
}

/// What a VM lease record says about its holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseState {
    /// The owner holds the lease and renews it by bumping the counter.
    Held,
    /// The owner released it cleanly: anyone may claim it without waiting for expiry.
    Released,
}

impl LeaseState {
    fn to_byte(self) -> u8 {
        match self {
            Self::Held => 1,
            Self::Released => 2,
        }
    }

    fn from_byte(byte: u8) -> Result<Self> {
        match byte {
            1 => Ok(Self::Held),
            2 => Ok(Self::Released),
            _ => Err(StorageError::MalformedField { field: "lease state", reason: "unknown value" }),
        }
    }
}

/// One VM's lease (`leases/<vm>.lease`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseRecord {
    pub cluster: Name,
    pub vm: Name,
    pub state: LeaseState,
    /// Last (or current) holder. Kept after release so an operator can see who had it.
    pub owner_host: Name,
    pub owner_boot_id: BootId,
    /// Bumped on every write (claim, renewal, release); equality-compared only.
    pub counter: u64,
    /// The counter value written by the claim that made `owner_host` the holder:
    /// tells one tenure from the next when the same host acquires twice.
    pub acquired_at_counter: u64,
    /// Writer's wall clock, informational only.
    pub writer_unix_ms: u64,
}

impl HeartbeatRecord {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut bytes = header(HEARTBEAT_MAGIC);
        put_name(&mut bytes, OFFSET_CLUSTER, &self.cluster);
        put_name(&mut bytes, OFFSET_SUBJECT, &self.host);
        bytes[OFFSET_BOOT_ID..OFFSET_BOOT_ID + 16].copy_from_slice(&self.boot_id.0);
        put_u64(&mut bytes, OFFSET_COUNTER, self.counter);
        put_u64(&mut bytes, OFFSET_WRITER_TIME, self.writer_unix_ms);
        bytes[OFFSET_AGENT_STATE] = self.agent_state.to_byte();
        bytes[OFFSET_WATCHDOG_ARMED] = u8::from(self.watchdog_armed);
        seal(&mut bytes);
        bytes
    }

    /// Decodes and checks that the record belongs to `cluster`.
    pub fn decode(bytes: &[u8], cluster: &Name) -> Result<Self> {
        let record = Self::decode_any_cluster(bytes)?;
        check_cluster(cluster, &record.cluster)?;
        Ok(record)
    }

    /// Decodes without the cluster check (for tools that inspect any file).
    pub fn decode_any_cluster(bytes: &[u8]) -> Result<Self> {
        let bytes = open(bytes, HEARTBEAT_MAGIC)?;
        require_zero(&bytes[OFFSET_KIND + HEARTBEAT_KIND_USED..OFFSET_RESERVED], "heartbeat padding")?;
        let watchdog_armed = match bytes[OFFSET_WATCHDOG_ARMED] {
            0 => false,
            1 => true,
            _ => return Err(StorageError::MalformedField { field: "watchdog armed", reason: "not 0 or 1" }),
        };
        Ok(Self {
            cluster: get_name(bytes, OFFSET_CLUSTER, "cluster")?,
            host: get_name(bytes, OFFSET_SUBJECT, "host")?,
            boot_id: get_boot_id(bytes),
            counter: get_u64(bytes, OFFSET_COUNTER),
            writer_unix_ms: get_u64(bytes, OFFSET_WRITER_TIME),
            agent_state: AgentState::from_byte(bytes[OFFSET_AGENT_STATE])?,
            watchdog_armed,
        })
    }

    /// What a reader compares to decide "this writer made progress": the boot id (a
    /// rebooted host counts as a change) and the counter. Not the timestamp, which
    /// belongs to an unsynchronised clock.
    pub fn progress(&self) -> (BootId, u64) {
        (self.boot_id, self.counter)
    }
}

impl LeaseRecord {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut bytes = header(LEASE_MAGIC);
        put_name(&mut bytes, OFFSET_CLUSTER, &self.cluster);
        put_name(&mut bytes, OFFSET_SUBJECT, &self.vm);
        bytes[OFFSET_BOOT_ID..OFFSET_BOOT_ID + 16].copy_from_slice(&self.owner_boot_id.0);
        put_u64(&mut bytes, OFFSET_COUNTER, self.counter);
        put_u64(&mut bytes, OFFSET_WRITER_TIME, self.writer_unix_ms);
        bytes[OFFSET_LEASE_STATE] = self.state.to_byte();
        put_name(&mut bytes, OFFSET_OWNER_HOST, &self.owner_host);
        put_u64(&mut bytes, OFFSET_ACQUIRED_AT, self.acquired_at_counter);
        seal(&mut bytes);
        bytes
    }

    /// Decodes and checks that the record belongs to `cluster`.
    pub fn decode(bytes: &[u8], cluster: &Name) -> Result<Self> {
        let record = Self::decode_any_cluster(bytes)?;
        check_cluster(cluster, &record.cluster)?;
        Ok(record)
    }

    /// Decodes without the cluster check (for tools that inspect any file).
    pub fn decode_any_cluster(bytes: &[u8]) -> Result<Self> {
        let bytes = open(bytes, LEASE_MAGIC)?;
        require_zero(&bytes[OFFSET_LEASE_STATE + 1..OFFSET_OWNER_HOST], "lease padding")?;
        Ok(Self {
            cluster: get_name(bytes, OFFSET_CLUSTER, "cluster")?,
            vm: get_name(bytes, OFFSET_SUBJECT, "vm")?,
            state: LeaseState::from_byte(bytes[OFFSET_LEASE_STATE])?,
            owner_host: get_name(bytes, OFFSET_OWNER_HOST, "owner host")?,
            owner_boot_id: get_boot_id(bytes),
            counter: get_u64(bytes, OFFSET_COUNTER),
            acquired_at_counter: get_u64(bytes, OFFSET_ACQUIRED_AT),
            writer_unix_ms: get_u64(bytes, OFFSET_WRITER_TIME),
        })
    }
}

impl LeaseRecord {
    /// What a VM-activity reader compares to decide "the holder is still renewing":
    /// the holder's boot and the counter (not the informational timestamp).
    pub fn progress(&self) -> (BootId, u64) {
        (self.owner_boot_id, self.counter)
    }
}

/// Either kind of record, for tools that show whatever file they are given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnyRecord {
    Heartbeat(HeartbeatRecord),
    Lease(LeaseRecord),
}

impl AnyRecord {
    pub fn decode_any_cluster(bytes: &[u8]) -> Result<Self> {
        if bytes.get(..4) == Some(&LEASE_MAGIC[..]) {
            return LeaseRecord::decode_any_cluster(bytes).map(Self::Lease);
        }
        HeartbeatRecord::decode_any_cluster(bytes).map(Self::Heartbeat)
    }
}

fn header(magic: [u8; 4]) -> [u8; RECORD_LEN] {
    let mut bytes = [0u8; RECORD_LEN];
    bytes[..4].copy_from_slice(&magic);
    bytes[OFFSET_VERSION..OFFSET_VERSION + 2].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let length = RECORD_LEN as u16;
    bytes[OFFSET_LENGTH..OFFSET_LENGTH + 2].copy_from_slice(&length.to_le_bytes());
    bytes
}

fn seal(bytes: &mut [u8; RECORD_LEN]) {
    let checksum = crc32c(&bytes[..OFFSET_CHECKSUM]);
    bytes[OFFSET_CHECKSUM..].copy_from_slice(&checksum.to_le_bytes());
}

/// Common checks, in the order that gives the most useful error: length first (a torn
/// write is usually short), then magic and version (someone else's file), then the
/// checksum (damage), then the fixed header fields and the reserved area.
fn open(bytes: &[u8], magic: [u8; 4]) -> Result<&[u8; RECORD_LEN]> {
    let bytes: &[u8; RECORD_LEN] =
        bytes.try_into().map_err(|_| StorageError::WrongLength { expected: RECORD_LEN, actual: bytes.len() })?;
    let found_magic: [u8; 4] = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if found_magic != magic {
        return Err(StorageError::BadMagic { expected: magic, found: found_magic });
    }
    let version = u16::from_le_bytes([bytes[OFFSET_VERSION], bytes[OFFSET_VERSION + 1]]);
    if version != FORMAT_VERSION {
        return Err(StorageError::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
    }
    let stored = u32::from_le_bytes([
        bytes[OFFSET_CHECKSUM],
        bytes[OFFSET_CHECKSUM + 1],
        bytes[OFFSET_CHECKSUM + 2],
        bytes[OFFSET_CHECKSUM + 3],
    ]);
    let computed = crc32c(&bytes[..OFFSET_CHECKSUM]);
    if stored != computed {
        return Err(StorageError::ChecksumMismatch { stored, computed });
    }
    let length = u16::from_le_bytes([bytes[OFFSET_LENGTH], bytes[OFFSET_LENGTH + 1]]);
    if usize::from(length) != RECORD_LEN {
        return Err(StorageError::MalformedField {
            field: "record length",
            reason: "does not match the format version",
        });
    }
    require_zero(&bytes[OFFSET_RESERVED..OFFSET_CHECKSUM], "reserved")?;
    Ok(bytes)
}

fn check_cluster(expected: &Name, found: &Name) -> Result<()> {
    if expected != found {
        return Err(StorageError::ForeignCluster { expected: expected.to_string(), found: found.to_string() });
    }
    Ok(())
}

fn require_zero(bytes: &[u8], field: &'static str) -> Result<()> {
    if bytes.iter().any(|&byte| byte != 0) {
        return Err(StorageError::MalformedField { field, reason: "padding is not zero" });
    }
    Ok(())
}

fn put_name(bytes: &mut [u8; RECORD_LEN], offset: usize, name: &Name) {
    let text = name.as_str().as_bytes();
    // Name::new guarantees 1..=63 bytes, so the length fits the byte and the field.
    bytes[offset] = text.len() as u8;
    bytes[offset + 1..offset + 1 + text.len()].copy_from_slice(text);
}

fn get_name(bytes: &[u8; RECORD_LEN], offset: usize, field: &'static str) -> Result<Name> {
    let malformed = |reason| StorageError::MalformedField { field, reason };
    let length = usize::from(bytes[offset]);
    if length == 0 || length > NAME_MAX_LEN {
        return Err(malformed("name length out of range"));
    }
    let text = &bytes[offset + 1..offset + 1 + length];
    require_zero(&bytes[offset + 1 + length..offset + NAME_FIELD_LEN], field)?;
    let text = std::str::from_utf8(text).map_err(|_| malformed("not utf-8"))?;
    Name::new(text).map_err(|_| malformed("not a valid name"))
}

fn get_boot_id(bytes: &[u8; RECORD_LEN]) -> BootId {
    let mut boot_id = [0u8; 16];
    boot_id.copy_from_slice(&bytes[OFFSET_BOOT_ID..OFFSET_BOOT_ID + 16]);
    BootId(boot_id)
}

fn put_u64(bytes: &mut [u8; RECORD_LEN], offset: usize, value: u64) {
    bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

fn get_u64(bytes: &[u8; RECORD_LEN], offset: usize) -> u64 {
    let mut value = [0u8; 8];
    value.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::new(text).unwrap()
    }

    fn heartbeat() -> HeartbeatRecord {
        HeartbeatRecord {
            cluster: name("prod"),
            host: name("host1"),
            boot_id: BootId([7; 16]),
            counter: 42,
            writer_unix_ms: 1_700_000_000_000,
            agent_state: AgentState::Running,
            watchdog_armed: true,
        }
    }

    #[test]
    fn names_that_could_escape_the_pool_directory_are_refused() {
        for bad in ["", ".", "..", "a/b", "-rf", ".hidden", "a b", "é", &"x".repeat(64)] {
            assert!(Name::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["h", "host-1", "vm_01.prod", &"x".repeat(63)] {
            assert!(Name::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn boot_id_round_trips_through_the_kernel_text_form() {
        let text = "0b4f8e33-3d4c-4bb5-a2a0-5f0c7d3c1e99";
        let boot_id = BootId::parse(text).unwrap();
        assert_eq!(boot_id.to_string(), text);
        assert!(BootId::parse("0b4f8e33").is_err());
        assert!(BootId::parse("zz4f8e33-3d4c-4bb5-a2a0-5f0c7d3c1e99").is_err());
    }

    #[test]
    fn this_machine_has_a_boot_id() {
        BootId::current().unwrap();
    }

    #[test]
    fn heartbeat_has_the_documented_layout() {
        let bytes = heartbeat().encode();
        assert_eq!(&bytes[..4], b"KVHB");
        assert_eq!(bytes[OFFSET_CLUSTER], 4);
        assert_eq!(&bytes[OFFSET_CLUSTER + 1..OFFSET_CLUSTER + 5], b"prod");
        assert_eq!(get_u64(&bytes, OFFSET_COUNTER), 42);
        assert_eq!(bytes[OFFSET_AGENT_STATE], 1);
        assert_eq!(bytes[OFFSET_WATCHDOG_ARMED], 1);
    }

    #[test]
    fn heartbeat_is_not_accepted_as_a_lease() {
        let bytes = heartbeat().encode();
        assert!(matches!(LeaseRecord::decode(&bytes, &name("prod")), Err(StorageError::BadMagic { .. })));
    }

    #[test]
    fn unknown_enum_values_are_rejected_even_with_a_valid_checksum() {
        let mut bytes = heartbeat().encode();
        bytes[OFFSET_AGENT_STATE] = 9;
        seal(&mut bytes);
        assert!(matches!(HeartbeatRecord::decode(&bytes, &name("prod")), Err(StorageError::MalformedField { .. })));
        let mut bytes = heartbeat().encode();
        bytes[OFFSET_WATCHDOG_ARMED] = 2;
        seal(&mut bytes);
        assert!(HeartbeatRecord::decode(&bytes, &name("prod")).is_err());
    }

    #[test]
    fn other_versions_are_rejected() {
        let mut bytes = heartbeat().encode();
        bytes[OFFSET_VERSION] = 2;
        seal(&mut bytes);
        assert!(matches!(
            HeartbeatRecord::decode(&bytes, &name("prod")),
            Err(StorageError::UnsupportedVersion { found: 2, .. })
        ));
    }
}
