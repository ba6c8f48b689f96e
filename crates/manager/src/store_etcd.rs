//! etcd persistence, for several managers (docs/manager-ha.md). Keys under the prefix:
//!
//! - `engine/meta`: `{generation, chunks, clock_ms}`; the engine state as JSON is split
//!   into `engine/chunk/<generation>/<index>` of at most [`CHUNK_BYTES`], so that no
//!   request nears etcd's 1.5 MiB limit. A new generation's chunks are written first and
//!   `engine/meta` last: a reader always sees one whole generation.
//! - `audit/<id, 20 digits>`: one audit line each (the log's order is the key order).
//! - `hosts/<name>`, `vms/<name>`: joined agents and the VM registry, one JSON value each.
//! - `intent/fence/<host>`, `intent/start/<vm>`: what the leader is about to do and, once
//!   known, how it went ([`crate::executor`]).
//! - `leader`: the leader key ([`crate::leader`]).
//!
//! Every write is a transaction fenced by the writer's epoch (the leader key's create
//! revision): a deposed leader's writes fail ([`ManagerError::NotLeader`]). As with
//! SQLite, the state is written when a step produced commands, and otherwise by the
//! periodic snapshot; never per ping.

use crate::config::EtcdConfig;
use crate::error::ManagerError;
use crate::etcd::{prefix_end, Compare, EtcdClient, EtcdError, Op};
use crate::leader::Leadership;
use crate::registry::VmRow;
use crate::store::{audit_kind, unix_ms, EventRow, HostRow};
use kvmha_core::event::AuditEvent;
use kvmha_core::Engine;
use kvmha_core::HostName;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Largest engine chunk: one chunk plus a step's audit lines stay far below 1.5 MiB.
pub const CHUNK_BYTES: usize = 512 * 1024;
/// Most operations in one transaction (etcd's `--max-txn-ops` defaults to 128).
const TXN_MAX_OPS: usize = 100;
/// Most bytes of values in one transaction.
const TXN_MAX_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct EngineMeta {
    generation: u64,
    chunks: u32,
    clock_ms: u64,
}

/// One audit line as stored in etcd.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredAudit {
    row: EventRow,
    event: AuditEvent,
}

#[derive(Debug)]
pub struct EtcdStore {
    client: EtcdClient,
    prefix: String,
    /// The writer's epoch source; `None`: a reader (follower API).
    leader: Option<Leadership>,
    runtime: tokio::runtime::Handle,
    /// Next audit id and the engine generation, as last written by us (`None`: read again).
    cursor: Mutex<Option<(i64, u64)>>,
}

fn snapshot_error(what: &str, error: impl std::fmt::Display) -> ManagerError {
    ManagerError::Snapshot { reason: format!("{what}: {error}") }
}

fn etcd(error: EtcdError) -> ManagerError {
    ManagerError::Etcd { reason: error.to_string() }
}

impl EtcdStore {
    pub fn open(config: &EtcdConfig, leader: Option<Leadership>) -> Result<EtcdStore, ManagerError> {
        let client = match &leader {
            Some(leader) => leader.client().clone(),
            None => EtcdClient::new(&config.settings).map_err(etcd)?,
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ManagerError::Etcd { reason: "the etcd store needs a tokio runtime".into() })?;
        Ok(EtcdStore { client, prefix: config.prefix.clone(), leader, runtime, cursor: Mutex::new(None) })
    }

    /// Runs an etcd request from synchronous code (the engine thread, blocking tasks).
    fn block<F: std::future::Future>(&self, future: F) -> F::Output {
        tokio::task::block_in_place(|| self.runtime.block_on(future))
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn audit_key(&self, id: i64) -> String {
        self.key(&format!("audit/{id:020}"))
    }

    fn range_under(&self, suffix: &str) -> Result<Vec<crate::etcd::KeyValue>, ManagerError> {
        let prefix = self.key(suffix);
        self.block(self.client.range(&prefix, &prefix_end(&prefix), 0)).map(|(kvs, _)| kvs).map_err(etcd)
    }

    fn read_meta(&self) -> Result<Option<EngineMeta>, ManagerError> {
        let (kvs, _) = self.block(self.client.range(&self.key("engine/meta"), "", 1)).map_err(etcd)?;
        kvs.first()
            .map(|kv| serde_json::from_slice(&kv.value).map_err(|error| snapshot_error("engine/meta", error)))
            .transpose()
    }

    pub fn load_engine(&self) -> Result<Option<(Engine, u64)>, ManagerError> {
        let Some(meta) = self.read_meta()? else { return Ok(None) };
        let chunks = self.range_under(&format!("engine/chunk/{:020}/", meta.generation))?;
        if chunks.len() != meta.chunks as usize {
            return Err(snapshot_error(
                "engine",
                format!("generation {} has {} of {} chunks", meta.generation, chunks.len(), meta.chunks),
            ));
        }
        let bytes: Vec<u8> = chunks.into_iter().flat_map(|kv| kv.value).collect();
        let engine: Engine = serde_json::from_slice(&bytes).map_err(|error| snapshot_error("engine", error))?;
        Ok(Some((engine, meta.clock_ms)))
    }

    /// The writer's epoch compare; a store without leadership, or a deposed leader, may
    /// not write.
    fn fence(&self) -> Result<Compare, ManagerError> {
        let leader = self.leader.as_ref().ok_or(ManagerError::NotLeader { reason: "a read-only store".into() })?;
        let epoch = leader.epoch().ok_or(ManagerError::NotLeader { reason: "not the leader".into() })?;
        Ok(leader.epoch_compare(epoch))
    }

    fn cursor(&self) -> Result<(i64, u64), ManagerError> {
        if let Some(cursor) = *self.cursor.lock().expect("cursor lock") {
            return Ok(cursor);
        }
        let next_id = self.last_event_id()? + 1;
        let generation = self.read_meta()?.map_or(0, |meta| meta.generation);
        Ok((next_id, generation))
    }

    /// Writes `ops` in as few epoch-fenced transactions as the limits allow, in order.
    fn write(&self, ops: Vec<Op>) -> Result<(), ManagerError> {
        let compare = self.fence()?;
        let mut batches: Vec<Vec<Op>> = vec![Vec::new()];
        let mut bytes = 0;
        for op in ops {
            let size = match &op {
                Op::Put { value, key, .. } => value.len() + key.len(),
                _ => 64,
            };
            let current = batches.last_mut().expect("one batch");
            if !current.is_empty() && (current.len() >= TXN_MAX_OPS || bytes + size > TXN_MAX_BYTES) {
                batches.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            batches.last_mut().expect("one batch").push(op);
        }
        for batch in batches {
            // Every batch is idempotent (puts of the same values under the same epoch,
            // deletes): a batch whose outcome is unknown is simply sent again, for as long
            // as this manager may still act. Past that, it stops (and steps down).
            loop {
                match self.block(self.client.txn(std::slice::from_ref(&compare), &batch, &[])) {
                    Ok(result) if result.succeeded => break,
                    Ok(_) => {
                        *self.cursor.lock().expect("cursor lock") = None;
                        return Err(ManagerError::NotLeader {
                            reason: "epoch superseded: another manager leads".into(),
                        });
                    }
                    Err(error) => {
                        let may_act = self.leader.as_ref().is_some_and(|leader| leader.may_act().is_ok());
                        if !may_act {
                            *self.cursor.lock().expect("cursor lock") = None;
                            return Err(etcd(error));
                        }
                        tracing::warn!(%error, "etcd write failed or timed out: sending it again");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        }
        Ok(())
    }

    fn audit_ops(&self, next_id: i64, audits: &[&AuditEvent]) -> Result<(Vec<Op>, i64), ManagerError> {
        let now = unix_ms();
        let mut ops = Vec::new();
        let mut id = next_id;
        for audit in audits {
            let row = EventRow {
                id,
                at_ms: audit.at.as_millis(),
                unix_ms: now,
                host: audit.host.as_ref().map(|host| host.to_string()),
                vm: audit.vm.as_ref().map(|vm| vm.to_string()),
                kind: audit_kind(audit),
                line: audit.describe(),
            };
            let value = serde_json::to_vec(&StoredAudit { row, event: (*audit).clone() })
                .map_err(|error| snapshot_error("audit", error))?;
            ops.push(Op::Put { key: self.audit_key(id), value, lease: 0 });
            id += 1;
        }
        Ok((ops, id))
    }

    pub fn commit(&mut self, engine: &Engine, clock_ms: u64, audits: &[&AuditEvent]) -> Result<i64, ManagerError> {
        let (next_id, generation) = self.cursor()?;
        let state = serde_json::to_vec(engine).map_err(|error| snapshot_error("engine", error))?;
        let new_generation = generation + 1;
        let chunks: Vec<&[u8]> = state.chunks(CHUNK_BYTES).collect();
        if self.cursor.lock().expect("cursor lock").is_none() {
            // Chunks a write that failed half-way may have left under this generation go
            // first (in a transaction of their own: etcd refuses a put and a delete of the
            // same key in one).
            let fresh = self.key(&format!("engine/chunk/{new_generation:020}/"));
            self.write(vec![Op::Delete { range_end: prefix_end(&fresh), key: fresh }])?;
        }
        let mut ops = Vec::new();
        ops.extend(chunks.iter().enumerate().map(|(index, chunk)| Op::Put {
            key: self.key(&format!("engine/chunk/{new_generation:020}/{index:06}")),
            value: chunk.to_vec(),
            lease: 0,
        }));
        let (audit_ops, after) = self.audit_ops(next_id, audits)?;
        ops.extend(audit_ops);
        let meta = EngineMeta { generation: new_generation, chunks: chunks.len() as u32, clock_ms };
        ops.push(Op::Put {
            key: self.key("engine/meta"),
            value: serde_json::to_vec(&meta).map_err(|error| snapshot_error("engine/meta", error))?,
            lease: 0,
        });
        let old = self.key(&format!("engine/chunk/{generation:020}/"));
        ops.push(Op::Delete { range_end: prefix_end(&old), key: old });
        self.write(ops)?;
        *self.cursor.lock().expect("cursor lock") = Some((after, new_generation));
        Ok(after - 1)
    }

    pub fn last_event_id(&self) -> Result<i64, ManagerError> {
        let last = self.block(self.client.last_under(&self.key("audit/"))).map_err(etcd)?;
        Ok(last.and_then(|kv| kv.key.rsplit('/').next().and_then(|id| id.parse().ok())).unwrap_or(0))
    }

    pub fn upsert_host(&self, host: &HostRow) -> Result<(), ManagerError> {
        let value = serde_json::to_vec(host).map_err(|error| snapshot_error("host row", error))?;
        self.write(vec![Op::Put { key: self.key(&format!("hosts/{}", host.name)), value, lease: 0 }])
    }

    pub fn hosts(&self) -> Result<Vec<HostRow>, ManagerError> {
        self.range_under("hosts/")?
            .iter()
            .map(|kv| serde_json::from_slice(&kv.value).map_err(|error| snapshot_error(&kv.key, error)))
            .collect()
    }

    /// `kvmha host remove`: the host's key goes and its certificate is revoked, in one
    /// epoch-fenced transaction (`revoked/<fingerprint>` holds the host it belonged to).
    pub fn remove_host_and_revoke(&mut self, name: &HostName, cert_sha256: Option<&str>) -> Result<(), ManagerError> {
        let mut ops = Vec::new();
        if let Some(fingerprint) = cert_sha256 {
            let value = serde_json::to_vec(name).map_err(|error| snapshot_error("revoked certificate", error))?;
            ops.push(Op::Put { key: self.key(&format!("revoked/{fingerprint}")), value, lease: 0 });
        }
        ops.push(Op::Delete { key: self.key(&format!("hosts/{name}")), range_end: String::new() });
        self.write(ops)
    }

    /// Revoked agent certificates: fingerprint -> the host it belonged to.
    pub fn revoked_certs(&self) -> Result<Vec<(String, HostName)>, ManagerError> {
        let prefix = self.key("revoked/");
        self.range_under("revoked/")?
            .iter()
            .map(|kv| {
                let host: HostName =
                    serde_json::from_slice(&kv.value).map_err(|error| snapshot_error(&kv.key, error))?;
                Ok((kv.key.strip_prefix(&prefix).unwrap_or(&kv.key).to_owned(), host))
            })
            .collect()
    }

    pub fn upsert_vm(&mut self, vm: &VmRow, audits: &[&AuditEvent]) -> Result<i64, ManagerError> {
        let (next_id, generation) = self.cursor()?;
        let value = serde_json::to_vec(vm).map_err(|error| snapshot_error("vm registry row", error))?;
        let mut ops = vec![Op::Put { key: self.key(&format!("vms/{}", vm.name)), value, lease: 0 }];
        let (audit_ops, after) = self.audit_ops(next_id, audits)?;
        ops.extend(audit_ops);
        self.write(ops)?;
        *self.cursor.lock().expect("cursor lock") = Some((after, generation));
        Ok(after - 1)
    }

    pub fn append_audits(&mut self, audits: &[&AuditEvent]) -> Result<i64, ManagerError> {
        let (next_id, generation) = self.cursor()?;
        let (ops, after) = self.audit_ops(next_id, audits)?;
        self.write(ops)?;
        *self.cursor.lock().expect("cursor lock") = Some((after, generation));
        Ok(after - 1)
    }

    pub fn vms(&self) -> Result<Vec<VmRow>, ManagerError> {
        self.range_under("vms/")?
            .iter()
            .map(|kv| serde_json::from_slice(&kv.value).map_err(|error| snapshot_error(&kv.key, error)))
            .collect()
    }

    fn audits_after(&self, after: i64, limit: u32) -> Result<Vec<StoredAudit>, ManagerError> {
        let from = self.audit_key(after + 1);
        let end = prefix_end(&self.key("audit/"));
        let (kvs, _) = self.block(self.client.range(&from, &end, limit as i64)).map_err(etcd)?;
        kvs.iter().map(|kv| serde_json::from_slice(&kv.value).map_err(|error| snapshot_error(&kv.key, error))).collect()
    }

    pub fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRow>, ManagerError> {
        Ok(self.audits_after(after, limit)?.into_iter().map(|stored| stored.row).collect())
    }

    pub fn audit_records_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<crate::incident::AuditRecord>, ManagerError> {
        Ok(self
            .audits_after(after, limit)?
            .into_iter()
            .map(|stored| crate::incident::AuditRecord {
                id: stored.row.id,
                unix_ms: stored.row.unix_ms,
                event: stored.event,
            })
            .collect())
    }
}
