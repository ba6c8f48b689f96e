//! SQLite persistence (WAL, `synchronous = FULL`).
//!
//! - `engine`: one row, the engine's whole state as JSON plus the engine clock at the
//!   time it was written. Work items, counters, fencing and incidents live inside the
//!   engine state, so they are persisted with it.
//! - `audit`: the append-only audit log; each row is one `Command::Audit`.
//! - `hosts`: agents that joined: address and certificate fingerprint.
//! - `vms`: the VM registry ([`crate::registry`]): definition, resources, HA settings,
//!   last host. One JSON row per VM (its columns change with the registry, not the schema).
//!
//! A step that returned commands is persisted (state + its audit lines, one
//! transaction) before any of its commands runs: intent before action. Steps without
//! commands (most pings, most ticks) are not written one by one; a periodic snapshot
//! catches them up. Losing them in a crash loses only "last ping at" times, which the
//! reconnect grace after a restart makes irrelevant.

use crate::error::ManagerError;
use crate::registry::VmRow;
use kvmha_core::event::AuditEvent;
use kvmha_core::{Engine, HostName};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Connection,
}

/// The persistence backend the controller and the API use: which one is
/// `[store] backend` in manager.toml. Both keep the same records (see each module's header).
#[derive(Debug)]
pub enum Store {
    Sqlite(SqliteStore),
    Etcd(crate::store_etcd::EtcdStore),
}

macro_rules! each_backend {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Store::Sqlite($store) => $call,
            Store::Etcd($store) => $call,
        }
    };
}

impl Store {
    /// Opens the configured backend. For etcd, `leader` is the epoch source every write
    /// is fenced by (None: a reader that never writes).
    pub fn open(
        config: &crate::config::StoreConfig,
        leader: Option<crate::leader::Leadership>,
    ) -> Result<Store, ManagerError> {
        match config {
            crate::config::StoreConfig::Sqlite { path } => SqliteStore::open(path).map(Store::Sqlite),
            crate::config::StoreConfig::Etcd(etcd) => crate::store_etcd::EtcdStore::open(etcd, leader).map(Store::Etcd),
        }
    }
    pub fn load_engine(&self) -> Result<Option<(Engine, u64)>, ManagerError> {
        each_backend!(self, store => store.load_engine())
    }
    pub fn commit(&mut self, engine: &Engine, clock_ms: u64, audits: &[&AuditEvent]) -> Result<i64, ManagerError> {
        each_backend!(self, store => store.commit(engine, clock_ms, audits))
    }
    pub fn last_event_id(&self) -> Result<i64, ManagerError> {
        each_backend!(self, store => store.last_event_id())
    }
    pub fn upsert_host(&self, host: &HostRow) -> Result<(), ManagerError> {
        each_backend!(self, store => store.upsert_host(host))
    }
    pub fn hosts(&self) -> Result<Vec<HostRow>, ManagerError> {
        each_backend!(self, store => store.hosts())
    }
    pub fn remove_host_and_revoke(&mut self, name: &HostName, cert_sha256: Option<&str>) -> Result<(), ManagerError> {
        each_backend!(self, store => store.remove_host_and_revoke(name, cert_sha256))
    }
    pub fn revoked_certs(&self) -> Result<Vec<(String, HostName)>, ManagerError> {
        each_backend!(self, store => store.revoked_certs())
    }
    pub fn upsert_vm(&mut self, vm: &VmRow, audits: &[&AuditEvent]) -> Result<i64, ManagerError> {
        each_backend!(self, store => store.upsert_vm(vm, audits))
    }
    pub fn append_audits(&mut self, audits: &[&AuditEvent]) -> Result<i64, ManagerError> {
        each_backend!(self, store => store.append_audits(audits))
    }
    pub fn vms(&self) -> Result<Vec<VmRow>, ManagerError> {
        each_backend!(self, store => store.vms())
    }
    pub fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRow>, ManagerError> {
        each_backend!(self, store => store.events_after(after, limit))
    }
    pub fn audit_records_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<crate::incident::AuditRecord>, ManagerError> {
        each_backend!(self, store => store.audit_records_after(after, limit))
    }
}

/// One joined agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HostRow {
    pub name: HostName,
    /// `IP:PORT` where the agent takes commands.
    pub address: String,
    pub cert_sha256: String,
    pub hypervisor: Option<String>,
}

/// One audit line as stored.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct EventRow {
    pub id: i64,
    /// Engine clock (ms).
    pub at_ms: u64,
    /// Wall clock when written (ms since the Unix epoch).
    pub unix_ms: u64,
    pub host: Option<String>,
    pub vm: Option<String>,
    pub kind: String,
    pub line: String,
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn audit_kind(audit: &AuditEvent) -> String {
    match &audit.kind {
        kvmha_core::event::AuditKind::HostState { .. } => "HostState".to_owned(),
        other => format!("{other:?}"),
    }
}

fn insert_audits(transaction: &rusqlite::Transaction<'_>, audits: &[&AuditEvent]) -> Result<(), rusqlite::Error> {
    let now = unix_ms() as i64;
    for audit in audits {
        let kind = audit_kind(audit);
        let event = serde_json::to_string(audit).unwrap_or_default();
        transaction.execute(
            "INSERT INTO audit (at_ms, unix_ms, host, vm, kind, line, event) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                audit.at.as_millis() as i64,
                now,
                audit.host.as_ref().map(|host| host.to_string()),
                audit.vm.as_ref().map(|vm| vm.to_string()),
                kind,
                audit.describe(),
                event
            ],
        )?;
    }
    Ok(())
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, ManagerError> {
        let wrap = |source| ManagerError::Store { path: path.into(), source };
        let conn = Connection::open(path).map_err(wrap)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(wrap)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(wrap)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(wrap)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS engine (id INTEGER PRIMARY KEY CHECK (id = 1), clock_ms INTEGER NOT NULL, state TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, unix_ms INTEGER NOT NULL,
                 host TEXT, vm TEXT, kind TEXT NOT NULL, line TEXT NOT NULL, event TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, address TEXT NOT NULL, cert_sha256 TEXT NOT NULL, hypervisor TEXT);
             CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, row TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS revoked_certs (cert_sha256 TEXT PRIMARY KEY, host TEXT NOT NULL, unix_ms INTEGER NOT NULL);",
        )
        .map_err(wrap)?;
        Ok(SqliteStore { path: path.into(), conn })
    }

    fn wrap(&self, source: rusqlite::Error) -> ManagerError {
        ManagerError::Store { path: self.path.clone(), source }
    }

    /// The engine and its clock, if a snapshot was ever written.
    pub fn load_engine(&self) -> Result<Option<(Engine, u64)>, ManagerError> {
        let row: Option<(i64, String)> = self
            .conn
            .query_row("SELECT clock_ms, state FROM engine WHERE id = 1", [], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()
            .map_err(|error| self.wrap(error))?;
        let Some((clock_ms, state)) = row else { return Ok(None) };
        let engine: Engine =
            serde_json::from_str(&state).map_err(|error| ManagerError::Snapshot { reason: error.to_string() })?;
        Ok(Some((engine, clock_ms as u64)))
    }

    /// Writes the engine state and the step's audit lines in one transaction. Returns the
    /// id of the last audit row.
    pub fn commit(&mut self, engine: &Engine, clock_ms: u64, audits: &[&AuditEvent]) -> Result<i64, ManagerError> {
        let state =
            serde_json::to_string(engine).map_err(|error| ManagerError::Snapshot { reason: error.to_string() })?;
        let path = self.path.clone();
        let wrap = |source| ManagerError::Store { path: path.clone(), source };
        let transaction = self.conn.transaction().map_err(wrap)?;
        transaction
            .execute(
                "INSERT INTO engine (id, clock_ms, state) VALUES (1, ?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET clock_ms = excluded.clock_ms, state = excluded.state",
                params![clock_ms as i64, state],
            )
            .map_err(wrap)?;
        insert_audits(&transaction, audits).map_err(wrap)?;
        transaction.commit().map_err(wrap)?;
        self.last_event_id()
    }

    pub fn last_event_id(&self) -> Result<i64, ManagerError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM audit", [], |row| row.get(0))
            .map_err(|error| self.wrap(error))
    }

    pub fn upsert_host(&self, host: &HostRow) -> Result<(), ManagerError> {
        self.conn
            .execute(
                "INSERT INTO hosts (name, address, cert_sha256, hypervisor) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET address = excluded.address, cert_sha256 = excluded.cert_sha256,
                 hypervisor = excluded.hypervisor",
                params![host.name.as_str(), host.address, host.cert_sha256, host.hypervisor],
            )
            .map_err(|error| self.wrap(error))?;
        Ok(())
    }

    pub fn hosts(&self) -> Result<Vec<HostRow>, ManagerError> {
        let mut statement = self
            .conn
            .prepare("SELECT name, address, cert_sha256, hypervisor FROM hosts ORDER BY name")
            .map_err(|error| self.wrap(error))?;
        let rows = statement
            .query_map([], |row| {
                Ok(HostRow {
                    name: HostName::new(row.get::<_, String>(0)?),
                    address: row.get(1)?,
                    cert_sha256: row.get(2)?,
                    hypervisor: row.get(3)?,
                })
            })
            .map_err(|error| self.wrap(error))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|error| self.wrap(error))
    }

    /// `kvmha host remove`: the host's row goes and its certificate is revoked for good,
    /// in one transaction (a restart must neither re-add the host nor accept its agent).
    pub fn remove_host_and_revoke(&mut self, name: &HostName, cert_sha256: Option<&str>) -> Result<(), ManagerError> {
        let path = self.path.clone();
        let wrap = |source| ManagerError::Store { path: path.clone(), source };
        let transaction = self.conn.transaction().map_err(wrap)?;
        if let Some(fingerprint) = cert_sha256 {
            transaction
                .execute(
                    "INSERT OR REPLACE INTO revoked_certs (cert_sha256, host, unix_ms) VALUES (?1, ?2, ?3)",
                    params![fingerprint, name.as_str(), unix_ms() as i64],
                )
                .map_err(wrap)?;
        }
        transaction.execute("DELETE FROM hosts WHERE name = ?1", params![name.as_str()]).map_err(wrap)?;
        transaction.commit().map_err(wrap)
    }

    /// Revoked agent certificates: fingerprint -> the host it belonged to.
    pub fn revoked_certs(&self) -> Result<Vec<(String, HostName)>, ManagerError> {
        let mut statement = self
            .conn
            .prepare("SELECT cert_sha256, host FROM revoked_certs ORDER BY unix_ms")
            .map_err(|error| self.wrap(error))?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, HostName::new(row.get::<_, String>(1)?))))
            .map_err(|error| self.wrap(error))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|error| self.wrap(error))
    }

    /// Writes one registry row and the audit lines that explain the change, in one
    /// transaction. Returns the id of the last audit row.
    pub fn upsert_vm(&mut self, vm: &VmRow, audits: &[&AuditEvent]) -> Result<i64, ManagerError> {
        let row = serde_json::to_string(vm).map_err(|error| ManagerError::Snapshot { reason: error.to_string() })?;
        let path = self.path.clone();
        let wrap = |source| ManagerError::Store { path: path.clone(), source };
        let transaction = self.conn.transaction().map_err(wrap)?;
        transaction
            .execute(
                "INSERT INTO vms (name, row) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET row = excluded.row",
                params![vm.name.as_str(), row],
            )
            .map_err(wrap)?;
        insert_audits(&transaction, audits).map_err(wrap)?;
        transaction.commit().map_err(wrap)?;
        self.last_event_id()
    }

    /// Audit lines that change nothing else (an operator's start or stop, its outcome).
    pub fn append_audits(&mut self, audits: &[&AuditEvent]) -> Result<i64, ManagerError> {
        let path = self.path.clone();
        let wrap = |source| ManagerError::Store { path: path.clone(), source };
        let transaction = self.conn.transaction().map_err(wrap)?;
        insert_audits(&transaction, audits).map_err(wrap)?;
        transaction.commit().map_err(wrap)?;
        self.last_event_id()
    }

    /// Every registry row, by name.
    pub fn vms(&self) -> Result<Vec<VmRow>, ManagerError> {
        let mut statement = self.conn.prepare("SELECT row FROM vms ORDER BY name").map_err(|error| self.wrap(error))?;
        let rows = statement.query_map([], |row| row.get::<_, String>(0)).map_err(|error| self.wrap(error))?;
        let mut vms = Vec::new();
        for row in rows {
            let text = row.map_err(|error| self.wrap(error))?;
            let vm: VmRow = serde_json::from_str(&text)
                .map_err(|error| ManagerError::Snapshot { reason: format!("vm registry row: {error}") })?;
            vms.push(vm);
        }
        Ok(vms)
    }

    /// At most `limit` audit rows after `after`, oldest first.
    pub fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRow>, ManagerError> {
        let mut statement = self
            .conn
            .prepare("SELECT id, at_ms, unix_ms, host, vm, kind, line FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2")
            .map_err(|error| self.wrap(error))?;
        let rows = statement
            .query_map(params![after, limit], |row| {
                Ok(EventRow {
                    id: row.get(0)?,
                    at_ms: row.get::<_, i64>(1)? as u64,
                    unix_ms: row.get::<_, i64>(2)? as u64,
                    host: row.get(3)?,
                    vm: row.get(4)?,
                    kind: row.get(5)?,
                    line: row.get(6)?,
                })
            })
            .map_err(|error| self.wrap(error))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|error| self.wrap(error))
    }
}

impl SqliteStore {
    /// At most `limit` audit lines after `after` with their structured event, oldest first
    /// (for incidents and metrics, which fold the log rather than read its text).
    pub fn audit_records_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<crate::incident::AuditRecord>, ManagerError> {
        let mut statement = self
            .conn
            .prepare("SELECT id, unix_ms, event FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2")
            .map_err(|error| self.wrap(error))?;
        let rows = statement
            .query_map(params![after, limit], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)? as u64, row.get::<_, String>(2)?))
            })
            .map_err(|error| self.wrap(error))?;
        let mut records = Vec::new();
        for row in rows {
            let (id, unix_ms, event) = row.map_err(|error| self.wrap(error))?;
            let event = serde_json::from_str(&event)
                .map_err(|error| ManagerError::Snapshot { reason: format!("audit row {id}: {error}") })?;
            records.push(crate::incident::AuditRecord { id, unix_ms, event });
        }
        Ok(records)
    }
}

impl SqliteStore {
    /// Writes many registry rows in one transaction, without audit lines: a bulk import
    /// into a store no manager runs on (`kvmha bench scale` seeds 200,000 VMs this way;
    /// one transaction each would be one fsync each).
    pub fn import_vms(&mut self, vms: &[VmRow]) -> Result<(), ManagerError> {
        let path = self.path.clone();
        let wrap = |source| ManagerError::Store { path: path.clone(), source };
        let transaction = self.conn.transaction().map_err(wrap)?;
        {
            let mut insert = transaction
                .prepare(
                    "INSERT INTO vms (name, row) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET row = excluded.row",
                )
                .map_err(wrap)?;
            for vm in vms {
                let row =
                    serde_json::to_string(vm).map_err(|error| ManagerError::Snapshot { reason: error.to_string() })?;
                insert.execute(params![vm.name.as_str(), row]).map_err(wrap)?;
            }
        }
        transaction.commit().map_err(wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmha_core::event::{AuditKind, Event};
    use kvmha_core::model::Resources;
    use kvmha_core::{EngineConfig, HostSpec, Instant, Profile, Timing, TimingSettings};

    fn engine_with_one_host() -> (Engine, Vec<AuditEvent>) {
        let timing = Timing::from_profile(Profile::Fast, &TimingSettings::default()).unwrap();
        let mut engine = Engine::new(EngineConfig::new(timing), Instant::ZERO);
        let spec = HostSpec {
            name: HostName::from("host1"),
            networks: vec!["mgmt".into()],
            capacity: Resources { cpus: 1, memory_mb: 1 },
            has_bmc: false,
            has_watchdog: false,
            pools: vec![],
        };
        let commands = engine.step(Instant::from_millis(5), Event::HostAdded(spec));
        let audits = commands
            .into_iter()
            .filter_map(|command| match command {
                kvmha_core::Command::Audit(audit) => Some(audit),
                _ => None,
            })
            .collect();
        (engine, audits)
    }

    #[test]
    fn engine_and_audit_lines_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manager.db");
        let (engine, audits) = engine_with_one_host();
        assert!(!audits.is_empty());
        {
            let mut store = SqliteStore::open(&path).unwrap();
            assert!(store.load_engine().unwrap().is_none());
            let references: Vec<&AuditEvent> = audits.iter().collect();
            let last = store.commit(&engine, 1234, &references).unwrap();
            assert_eq!(last, audits.len() as i64);
            store.commit(&engine, 2000, &[]).unwrap();
            store
                .upsert_host(&HostRow {
                    name: HostName::from("host1"),
                    address: "127.0.0.1:1".into(),
                    cert_sha256: "ab".into(),
                    hypervisor: None,
                })
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let (restored, clock_ms) = store.load_engine().unwrap().expect("a snapshot");
        assert_eq!(clock_ms, 2000);
        assert_eq!(restored.host_state(&HostName::from("host1")), engine.host_state(&HostName::from("host1")));
        let rows = store.events_after(0, 100).unwrap();
        assert_eq!(rows.len(), audits.len());
        assert_eq!(rows[0].line, audits[0].describe());
        assert_eq!(rows[0].host.as_deref(), Some("host1"));
        assert!(store.events_after(rows[0].id, 100).unwrap().len() == audits.len() - 1);
        assert_eq!(store.hosts().unwrap()[0].address, "127.0.0.1:1");
        assert!(matches!(audits[0].kind, AuditKind::Manager | AuditKind::HostState { .. }));
    }

    #[test]
    fn registry_rows_and_their_audit_lines_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manager.db");
        let mut row = VmRow::new(kvmha_core::VmName::from("db1"));
        row.xml = Some("<domain><name>db1</name></domain>".into());
        row.vcpus = 2;
        row.ha.enabled = true;
        row.ha.group = Some("db-tier".into());
        row.last_host = Some(HostName::from("host1"));
        let audit = AuditEvent {
            at: Instant::from_millis(7),
            host: Some(HostName::from("host1")),
            vm: Some(kvmha_core::VmName::from("db1")),
            kind: AuditKind::Operator,
            detail: "HA enabled by operator-token".into(),
        };
        {
            let mut store = SqliteStore::open(&path).unwrap();
            store.upsert_vm(&row, &[&audit]).unwrap();
            row.ha.priority = 10;
            let last = store.upsert_vm(&row, &[]).unwrap();
            assert_eq!(last, 1);
            store.append_audits(&[&audit]).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.vms().unwrap(), vec![row]);
        let lines = store.events_after(0, 10).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].line, "host1 vm db1 Operator: HA enabled by operator-token");
        assert_eq!(lines[0].vm.as_deref(), Some("db1"));
    }

    #[test]
    fn a_removed_hosts_certificate_stays_revoked_after_a_reopen() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("kvmha.db");
        let mut store = SqliteStore::open(&path).unwrap();
        let row = HostRow {
            name: HostName::from("host1"),
            address: "127.0.0.1:1".to_owned(),
            cert_sha256: "ab".repeat(32),
            hypervisor: None,
        };
        store.upsert_host(&row).unwrap();
        store.remove_host_and_revoke(&row.name, Some(&row.cert_sha256)).unwrap();
        drop(store);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.hosts().unwrap(), Vec::new());
        assert_eq!(store.revoked_certs().unwrap(), vec![("ab".repeat(32), HostName::from("host1"))]);
    }

    #[test]
    fn a_corrupt_snapshot_is_an_error_not_a_fresh_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manager.db");
        let store = SqliteStore::open(&path).unwrap();
        store.conn.execute("INSERT INTO engine (id, clock_ms, state) VALUES (1, 0, '{broken')", []).unwrap();
        assert!(matches!(store.load_engine(), Err(ManagerError::Snapshot { .. })));
    }
}
