//! A small etcd v3 client over etcd's gRPC API, on the `etcd-client` crate (tonic; TLS by
//! rustls with ring, like the rest of the project). It keeps the calls the manager needs
//! (range, txn, lease grant/keepalive/revoke) behind types of our own, and two rules the
//! crate does not give:
//!
//! - Every call has a deadline (`request_timeout`). A request that timed out or lost its
//!   connection may still have been applied (seen on this machine: an isolated member's
//!   timed-out write was committed after the partition healed). Callers get
//!   [`EtcdError::Unknown`] for those and must re-read before deciding.
//! - Endpoints are tried in order from the one that answered last, each on a connection of
//!   its own, so that an error names the member it came from. A connection that timed out
//!   or broke is dropped and made anew on the next call (a silent link would otherwise hold
//!   every later request of that member until TCP gives up).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// One etcd member's URL and, once made, the client connected to it.
struct Member {
    url: String,
    connected: Mutex<Option<etcd_client::Client>>,
}

#[derive(Clone)]
pub struct EtcdClient {
    members: Arc<Vec<Member>>,
    /// Behind an `Arc`: the options are large and the client is cloned into every store.
    options: Arc<etcd_client::ConnectOptions>,
    request_timeout: Duration,
    /// Index of the member that answered last.
    preferred: Arc<AtomicUsize>,
}

impl std::fmt::Debug for EtcdClient {
    // The connect options hold the client key: never printed.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self.members.iter().map(|member| member.url.as_str()).collect();
        formatter.debug_struct("EtcdClient").field("endpoints", &urls).finish_non_exhaustive()
    }
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

/// What an error of the crate means for a request.
enum Outcome {
    /// Never reached the server: certainly not applied; the next member may be tried.
    NotSent,
    /// The server refused it: certainly not applied.
    Refused,
    /// May or may not have been applied.
    Unknown,
}

/// The error and its sources, one line (tonic's transport errors say little on their own).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// Whether the error comes from making the connection (TCP connect refused, TLS setup),
/// before any request could be written.
fn is_connect_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            let kind = io.kind();
            if matches!(
                kind,
                ErrorKind::ConnectionRefused
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::HostUnreachable
            ) {
                return true;
            }
        }
        let text = cause.to_string();
        if text.contains("tcp connect error") || text.contains("error trying to connect") {
            return true;
        }
        source = cause.source();
    }
    false
}

fn classify(error: &etcd_client::Error) -> (Outcome, String) {
    use etcd_client::Error as E;
    use tonic::Code;
    match error {
        E::GRpcStatus(status) => {
            let reason = format!("grpc {:?}: {}", status.code(), status.message());
            let outcome = match status.code() {
                // "request timed out", "leader changed", "no leader", a connection lost
                // mid-way: the request may still commit. Unless it never left.
                Code::Unavailable if is_connect_error(status) => Outcome::NotSent,
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
                | Code::Aborted
                | Code::DataLoss => Outcome::Unknown,
                _ => Outcome::Refused,
            };
            let reason = match outcome {
                Outcome::NotSent => format!("connection failed: {}", chain(status)),
                _ => reason,
            };
            (outcome, reason)
        }
        E::TransportError(transport) if is_connect_error(transport) => {
            (Outcome::NotSent, format!("connection failed: {}", chain(transport)))
        }
        E::InvalidArgs(_) | E::InvalidUri(_) | E::EndpointError(_) | E::InvalidMetadataValue(_) => {
            (Outcome::Refused, chain(error))
        }
        _ => (Outcome::Unknown, chain(error)),
    }
}

fn key_values(kvs: &[etcd_client::KeyValue]) -> Vec<KeyValue> {
    kvs.iter()
        .map(|kv| KeyValue {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        })
        .collect()
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map(etcd_client::ResponseHeader::revision).unwrap_or(0)
}

impl Op {
    fn to_txn_op(&self) -> etcd_client::TxnOp {
        use etcd_client::{DeleteOptions, PutOptions, TxnOp};
        match self {
            Op::Put { key, value, lease } => {
                TxnOp::put(key.as_bytes(), value.clone(), Some(PutOptions::new().with_lease(*lease)))
            }
            Op::Delete { key, range_end } => {
                let options = (!range_end.is_empty()).then(|| DeleteOptions::new().with_range(range_end.as_bytes()));
                TxnOp::delete(key.as_bytes(), options)
            }
            Op::Get { key } => TxnOp::get(key.as_bytes(), None),
        }
    }
}

impl Compare {
    fn to_compare(&self) -> etcd_client::Compare {
        match self {
            Compare::CreateRevision { key, revision } => {
                etcd_client::Compare::create_revision(key.as_bytes(), etcd_client::CompareOp::Equal, *revision)
            }
        }
    }
}

impl EtcdClient {
    /// Checks the settings; connects on the first request (no runtime needed here).
    pub fn new(settings: &EtcdSettings) -> Result<EtcdClient, EtcdError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        if settings.endpoints.is_empty() {
            return Err(EtcdError::Setup("no endpoints".into()));
        }
        let https = settings.endpoints.iter().filter(|endpoint| endpoint.starts_with("https://")).count();
        if https != 0 && https != settings.endpoints.len() {
            return Err(EtcdError::Setup("endpoints: all https:// or all http://".into()));
        }
        let mut options = etcd_client::ConnectOptions::new().with_connect_timeout(settings.request_timeout);
        if https != 0 {
            let mut tls = etcd_client::TlsOptions::new();
            match &settings.ca_pem {
                Some(ca) => {
                    let certificates = CertificateDer::pem_slice_iter(ca.as_bytes()).collect::<Result<Vec<_>, _>>();
                    if !matches!(certificates, Ok(ref list) if !list.is_empty()) {
                        return Err(EtcdError::Setup("ca_cert: no PEM certificate".into()));
                    }
                    tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
                }
                // No CA of our own: the public web roots, as the HTTP client had.
                None => tls = tls.with_webpki_roots(),
            }
            if let Some((cert, key)) = &settings.identity_pem {
                if !matches!(CertificateDer::pem_slice_iter(cert.as_bytes()).next(), Some(Ok(_))) {
                    return Err(EtcdError::Setup("cert: no PEM certificate".into()));
                }
                // The key's parse error is not shown: it could quote key material.
                if PrivateKeyDer::from_pem_slice(key.as_bytes()).is_err() {
                    return Err(EtcdError::Setup("key: no PEM private key".into()));
                }
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        } else if settings.ca_pem.is_some() || settings.identity_pem.is_some() {
            return Err(EtcdError::Setup("ca_cert/cert/key given for http:// endpoints".into()));
        }
        let members = settings
            .endpoints
            .iter()
            .map(|endpoint| Member { url: endpoint.trim_end_matches('/').to_owned(), connected: Mutex::new(None) })
            .collect();
        Ok(EtcdClient {
            members: Arc::new(members),
            options: Arc::new(options),
            request_timeout: settings.request_timeout,
            preferred: Default::default(),
        })
    }

    /// The client of member `index`, made if there is none (lazily: tonic connects on the
    /// first request).
    async fn member_client(&self, index: usize) -> Result<etcd_client::Client, etcd_client::Error> {
        let member = &self.members[index];
        if let Some(client) = member.connected.lock().expect("etcd member lock").clone() {
            return Ok(client);
        }
        let client = etcd_client::Client::connect([member.url.as_str()], Some(self.options.as_ref().clone())).await?;
        Ok(member.connected.lock().expect("etcd member lock").get_or_insert(client).clone())
    }

    fn forget_connection(&self, index: usize) {
        *self.members[index].connected.lock().expect("etcd member lock") = None;
    }

    /// Runs one request within the deadline, trying the members from the one that
    /// answered last. A request that was sent and got no answer is [`EtcdError::Unknown`]:
    /// it is not retried elsewhere (the caller re-reads and decides); the next call starts
    /// at the next member.
    async fn call<T, F, Fut>(&self, what: &'static str, request: F) -> Result<T, EtcdError>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let count = self.members.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let mut last_error = None;
        for offset in 0..count {
            let index = (first + offset) % count;
            let endpoint = self.members[index].url.clone();
            let attempt = async { request(self.member_client(index).await?).await };
            let error = match tokio::time::timeout(self.request_timeout, attempt).await {
                Ok(Ok(answer)) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(answer);
                }
                Ok(Err(error)) => error,
                Err(_) => {
                    self.forget_connection(index);
                    self.preferred.store((index + 1) % count, Ordering::Relaxed);
                    let reason = format!("no answer in {} ms", self.request_timeout.as_millis());
                    return Err(EtcdError::Unknown { endpoint, what, reason });
                }
            };
            let (outcome, reason) = classify(&error);
            match outcome {
                Outcome::NotSent => {
                    self.forget_connection(index);
                    last_error = Some(EtcdError::Failed { endpoint, what, reason });
                }
                Outcome::Refused => return Err(EtcdError::Failed { endpoint, what, reason }),
                Outcome::Unknown => {
                    self.forget_connection(index);
                    self.preferred.store((index + 1) % count, Ordering::Relaxed);
                    return Err(EtcdError::Unknown { endpoint, what, reason });
                }
            }
        }
        Err(last_error.unwrap_or(EtcdError::Setup("no endpoints".into())))
    }

    /// Keys in `[key, range_end)` (`range_end` empty: `key` alone), ascending; `limit` 0: all.
    pub async fn range(&self, key: &str, range_end: &str, limit: i64) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let mut options = etcd_client::GetOptions::new().with_limit(limit);
        if !range_end.is_empty() {
            options = options.with_range(range_end.as_bytes());
        }
        let answer = self
            .call("range", |mut client| {
                let options = options.clone();
                async move { client.get(key.as_bytes(), Some(options)).await }
            })
            .await?;
        Ok((key_values(answer.kvs()), revision(answer.header())))
    }

    /// The last key under `prefix` (by key order), if any.
    pub async fn last_under(&self, prefix: &str) -> Result<Option<KeyValue>, EtcdError> {
        use etcd_client::{SortOrder, SortTarget};
        let options = etcd_client::GetOptions::new()
            .with_range(prefix_end(prefix).as_bytes())
            .with_limit(1)
            .with_sort(SortTarget::Key, SortOrder::Descend);
        let answer = self
            .call("range", |mut client| {
                let options = options.clone();
                async move { client.get(prefix.as_bytes(), Some(options)).await }
            })
            .await?;
        Ok(key_values(answer.kvs()).into_iter().next())
    }

    pub async fn txn(&self, compare: &[Compare], success: &[Op], failure: &[Op]) -> Result<TxnResult, EtcdError> {
        let txn = etcd_client::Txn::new()
            .when(compare.iter().map(Compare::to_compare).collect::<Vec<_>>())
            .and_then(success.iter().map(Op::to_txn_op).collect::<Vec<_>>())
            .or_else(failure.iter().map(Op::to_txn_op).collect::<Vec<_>>());
        let answer = self
            .call("txn", |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
        let reads = answer
            .op_responses()
            .into_iter()
            .filter_map(|response| match response {
                etcd_client::TxnOpResponse::Get(get) => Some(key_values(get.kvs())),
                _ => None,
            })
            .collect();
        Ok(TxnResult { succeeded: answer.succeeded(), reads, revision: revision(answer.header()) })
    }

    /// A new lease of `ttl`; its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let seconds = ttl.as_secs().max(1) as i64;
        let answer =
            self.call("lease grant", |mut client| async move { client.lease_grant(seconds, None).await }).await?;
        match answer.id() {
            0 => Err(EtcdError::Failed { endpoint: String::new(), what: "lease grant", reason: "no lease id".into() }),
            id => Ok(id),
        }
    }

    /// Renews `lease` by one request and its answer on a keepalive stream; `false`: the
    /// lease is gone (expired or revoked).
    pub async fn keepalive(&self, lease: i64) -> Result<bool, EtcdError> {
        self.call("lease keepalive", |mut client| async move {
            // The crate sends the first request and reads its answer before handing out the
            // stream; an answer with no TTL left is its "lease not found".
            match client.lease_keep_alive(lease).await {
                Ok(_) => Ok(true),
                Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
                Err(error) => Err(error),
            }
        })
        .await
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("lease revoke", |mut client| async move { client.lease_revoke(lease).await }).await.map(|_| ())
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

    fn settings(endpoints: Vec<String>) -> EtcdSettings {
        EtcdSettings { endpoints, ca_pem: None, identity_pem: None, request_timeout: Duration::from_secs(2) }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_failure_naming_the_endpoint_not_an_unknown_outcome() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let client = EtcdClient::new(&settings(vec![endpoint.clone()])).expect("client");
        let error = client.txn(&[], &[Op::Get { key: "k".into() }], &[]).await.expect_err("nobody listens");
        assert!(!error.is_unknown(), "{error}");
        let text = error.to_string();
        assert!(text.contains(&endpoint) && text.contains("txn") && text.contains("connection failed"), "{text}");
    }

    #[test]
    fn a_bad_client_key_is_refused_without_quoting_it() {
        let mut bad = settings(vec!["https://127.0.0.1:2379".into()]);
        bad.ca_pem = Some(CA.into());
        bad.identity_pem = Some((CA.into(), "secret-key-material".into()));
        let error = EtcdClient::new(&bad).expect_err("no PEM key");
        assert!(!error.to_string().contains("secret-key-material"), "{error}");
        bad.identity_pem = None;
        bad.endpoints.push("http://127.0.0.1:2380".into());
        assert!(EtcdClient::new(&bad).is_err(), "https and http mixed");
    }

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUZ1ZqJ0Wq5l7b3kz0lPZsmJx8bnswCgYIKoZIzj0EAwIw\n-----END CERTIFICATE-----\n";
}
