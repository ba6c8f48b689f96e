//! A small etcd v3 client over etcd's JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/*`), on the HTTP client the manager already has.
//!
//! Why not the gRPC crate: `etcd-client` brings tonic, prost and a `protoc` run into every
//! build of the manager on a 2-core build machine; the gateway is part of every etcd 3.4+
//! server and carries the same requests (keys and values in base64, int64 as strings).
//!
//! A request that timed out or lost its connection may still have been applied (seen on
//! this machine: an isolated member's timed-out write was committed after the partition
//! healed). Callers get [`EtcdError::Unknown`] for those and must re-read before deciding.

use base64::Engine as _;
use serde_json::{json, Value};
use std::time::Duration;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The request may or may not have been applied (timeout, connection lost mid-way).
    #[error("etcd {endpoint}: {what}: outcome unknown ({reason})")]
    Unknown { endpoint: String, what: &'static str, reason: String },
    /// The request was certainly not applied.
    #[error("etcd {endpoint}: {what}: {reason}")]
    Failed { endpoint: String, what: &'static str, reason: String },
    #[error("etcd client setup: {0}")]
    Setup(String),
}

impl EtcdError {
    pub fn is_unknown(&self) -> bool {
        matches!(self, EtcdError::Unknown { .. })
    }
}

/// Where etcd is and how to reach it.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// `http(s)://HOST:PORT` client URLs; tried in order, the last one that answered first.
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) etcd's server certificate must chain to (https endpoints).
    pub ca_pem: Option<String>,
    /// Client certificate and key (PEM) for etcd's client-cert auth.
    pub identity_pem: Option<(String, String)>,
    /// Budget of one request.
    pub request_timeout: Duration,
}

/// One key-value as etcd returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// One operation of a transaction.
#[derive(Clone, Debug)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    /// Every key in `[key, range_end)`; `range_end` empty: `key` alone.
    Delete {
        key: String,
        range_end: String,
    },
    Get {
        key: String,
    },
}

/// A condition of a transaction.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key's create revision equals this (0: the key does not exist).
    CreateRevision { key: String, revision: i64 },
}

#[derive(Debug)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The key-values every `Get` of the branch that ran read, in order.
    pub reads: Vec<Vec<KeyValue>>,
    pub revision: i64,
}

#[derive(Clone, Debug)]
pub struct EtcdClient {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// Index of the endpoint that answered last.
    preferred: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The smallest key greater than every key starting with `prefix`.
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xff {
            bytes.push(last + 1);
            return String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    "\0".to_owned()
}

fn int(value: &Value) -> i64 {
    match value {
        Value::String(text) => text.parse().unwrap_or(0),
        Value::Number(number) => number.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn key_values(value: &Value) -> Vec<KeyValue> {
    let Some(kvs) = value.get("kvs").and_then(Value::as_array) else { return Vec::new() };
    kvs.iter()
        .map(|kv| {
            let decode = |field: &str| {
                kv.get(field).and_then(Value::as_str).and_then(|text| B64.decode(text).ok()).unwrap_or_default()
            };
            KeyValue {
                key: String::from_utf8_lossy(&decode("key")).into_owned(),
                value: decode("value"),
                create_revision: kv.get("create_revision").map(int).unwrap_or(0),
                mod_revision: kv.get("mod_revision").map(int).unwrap_or(0),
                lease: kv.get("lease").map(int).unwrap_or(0),
            }
        })
        .collect()
}

fn revision(value: &Value) -> i64 {
    value.get("header").and_then(|header| header.get("revision")).map(int).unwrap_or(0)
}

impl Op {
    fn to_json(&self) -> Value {
        match self {
            Op::Put { key, value, lease } => {
                json!({"request_put": {"key": b64(key.as_bytes()), "value": b64(value), "lease": lease.to_string()}})
            }
            Op::Delete { key, range_end } => {
                json!({"request_delete_range": {"key": b64(key.as_bytes()), "range_end": b64(range_end.as_bytes())}})
            }
            Op::Get { key } => json!({"request_range": {"key": b64(key.as_bytes())}}),
        }
    }
}

impl Compare {
    fn to_json(&self) -> Value {
        match self {
            Compare::CreateRevision { key, revision } => json!({
                "key": b64(key.as_bytes()),
                "result": "EQUAL",
                "target": "CREATE",
                "create_revision": revision.to_string(),
            }),
        }
    }
}

impl EtcdClient {
    pub fn new(settings: &EtcdSettings) -> Result<EtcdClient, EtcdError> {
        if settings.endpoints.is_empty() {
            return Err(EtcdError::Setup("no endpoints".into()));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout)
            .use_rustls_tls();
        if let Some(ca) = &settings.ca_pem {
            let certificate = reqwest::Certificate::from_pem(ca.as_bytes())
                .map_err(|error| EtcdError::Setup(format!("ca_cert: {error}")))?;
            builder = builder.tls_built_in_root_certs(false).add_root_certificate(certificate);
        }
        if let Some((cert, key)) = &settings.identity_pem {
            let identity = reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes())
                .map_err(|error| EtcdError::Setup(format!("client cert/key: {error}")))?;
            builder = builder.identity(identity);
        }
        let http = builder.build().map_err(|error| EtcdError::Setup(error.to_string()))?;
        Ok(EtcdClient {
            http,
            endpoints: settings.endpoints.iter().map(|endpoint| endpoint.trim_end_matches('/').to_owned()).collect(),
            preferred: Default::default(),
        })
    }

    /// Posts one request, trying the endpoints from the one that answered last. A request
    /// that was sent and got no answer is [`EtcdError::Unknown`]: it is not retried
    /// elsewhere (the caller re-reads and decides).
    async fn call(&self, what: &'static str, path: &str, body: &Value) -> Result<Value, EtcdError> {
        use std::sync::atomic::Ordering;
        let first = self.preferred.load(Ordering::Relaxed);
        let mut last_error = None;
        for offset in 0..self.endpoints.len() {
            let index = (first + offset) % self.endpoints.len();
            let endpoint = &self.endpoints[index];
            let sent = self.http.post(format!("{endpoint}{path}")).json(body).send().await;
            let response = match sent {
                Ok(response) => response,
                Err(error) if error.is_connect() => {
                    // Never reached the server: certainly not applied, try the next one.
                    last_error = Some(EtcdError::Failed {
                        endpoint: endpoint.clone(),
                        what,
                        reason: "connection failed".into(),
                    });
                    continue;
                }
                Err(error) => {
                    let reason = if error.is_timeout() { "no answer in time".to_owned() } else { error.to_string() };
                    return Err(EtcdError::Unknown { endpoint: endpoint.clone(), what, reason });
                }
            };
            let status = response.status();
            let bytes = match response.bytes().await {
                Ok(bytes) => bytes,
                Err(error) => {
                    return Err(EtcdError::Unknown { endpoint: endpoint.clone(), what, reason: error.to_string() })
                }
            };
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if !status.is_success() {
                let message = value.get("error").and_then(Value::as_str).unwrap_or("(no message)").to_owned();
                let reason = format!("http {status}: {message}");
                // "request timed out" and "leader changed" are server errors after which the
                // request may still commit: unknown, never "failed".
                if status.is_server_error() {
                    return Err(EtcdError::Unknown { endpoint: endpoint.clone(), what, reason });
                }
                return Err(EtcdError::Failed { endpoint: endpoint.clone(), what, reason });
            }
            self.preferred.store(index, Ordering::Relaxed);
            return Ok(value);
        }
        Err(last_error.unwrap_or(EtcdError::Setup("no endpoints".into())))
    }

    /// Keys in `[key, range_end)` (`range_end` empty: `key` alone), ascending; `limit` 0: all.
    pub async fn range(&self, key: &str, range_end: &str, limit: i64) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let mut body = json!({"key": b64(key.as_bytes()), "limit": limit.to_string()});
        if !range_end.is_empty() {
            body["range_end"] = json!(b64(range_end.as_bytes()));
        }
        let answer = self.call("range", "/v3/kv/range", &body).await?;
        Ok((key_values(&answer), revision(&answer)))
    }

    /// The last key under `prefix` (by key order), if any.
    pub async fn last_under(&self, prefix: &str) -> Result<Option<KeyValue>, EtcdError> {
        let body = json!({
            "key": b64(prefix.as_bytes()),
            "range_end": b64(prefix_end(prefix).as_bytes()),
            "limit": "1",
            "sort_order": "DESCEND",
            "sort_target": "KEY",
        });
        let answer = self.call("range", "/v3/kv/range", &body).await?;
        Ok(key_values(&answer).into_iter().next())
    }

    pub async fn txn(&self, compare: &[Compare], success: &[Op], failure: &[Op]) -> Result<TxnResult, EtcdError> {
        let body = json!({
            "compare": compare.iter().map(Compare::to_json).collect::<Vec<_>>(),
            "success": success.iter().map(Op::to_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(Op::to_json).collect::<Vec<_>>(),
        });
        let answer = self.call("txn", "/v3/kv/txn", &body).await?;
        let succeeded = answer.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        let reads = answer
            .get("responses")
            .and_then(Value::as_array)
            .map(|responses| {
                responses
                    .iter()
                    .filter_map(|response| response.get("response_range"))
                    .map(key_values)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        Ok(TxnResult { succeeded, reads, revision: revision(&answer) })
    }

    /// A new lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let seconds = ttl.as_secs().max(1);
        let answer = self.call("lease grant", "/v3/lease/grant", &json!({"TTL": seconds.to_string()})).await?;
        match answer.get("ID").map(int) {
            Some(id) if id != 0 => Ok(id),
            _ => Err(EtcdError::Failed { endpoint: String::new(), what: "lease grant", reason: "no lease id".into() }),
        }
    }

    /// Renews `lease`; its remaining TTL in seconds (0: the lease is gone).
    pub async fn keepalive(&self, lease: i64) -> Result<i64, EtcdError> {
        let answer = self.call("lease keepalive", "/v3/lease/keepalive", &json!({"ID": lease.to_string()})).await?;
        Ok(answer.get("result").and_then(|result| result.get("TTL")).map(int).unwrap_or(0))
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("lease revoke", "/v3/lease/revoke", &json!({"ID": lease.to_string()})).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_of_the_prefix() {
        assert_eq!(prefix_end("/kvmha/c1/"), "/kvmha/c10");
        assert_eq!(prefix_end("a"), "b");
    }
}
