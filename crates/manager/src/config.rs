//! `manager.toml`: read into a raw struct (unknown keys refused), then validated into a
//! [`ManagerConfig`] that cannot hold an unsafe timing or a missing certificate. Every
//! error names the file and the field.

use crate::error::ManagerError;
use kvmha_bmc::Secret;
use kvmha_core::model::ShutdownPolicy;
use kvmha_core::{HostName, PoolName, Profile, Timing, TimingSettings};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The file as written by `kvmha manager init` and edited by operators.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Random id written by `kvmha manager init`; agents' certificates name it.
    pub cluster_id: String,
    /// Agent-facing mutual-TLS listener (`IP:PORT`).
    pub listen: String,
    /// Operator API, plain HTTP: keep it on a loopback address (see docs/daemons.md).
    pub api_listen: String,
    /// Where `manager.db` lives; relative paths are relative to this file.
    pub data_dir: PathBuf,
    /// Timing profile: `fast` (lab), `balanced` or `conservative` (docs/timing.md).
    pub profile: String,
    /// Per-field overrides of the profile's timings, in ms (refused when unsafe).
    #[serde(default)]
    pub timing: TimingSettings,
    /// What a planned agent stop does to the host's VMs: `freeze` (default: they stay, a
    /// reboot brings them back on the same host) or `failover` (the agent stops them and
    /// they restart on other hosts at once).
    #[serde(default)]
    pub shutdown_policy: ShutdownPolicy,
    /// The cluster CA and the manager's certificate (files written by `kvmha manager init`).
    pub tls: RawTls,
    /// Who may use the operator API, the dashboard and `/metrics`.
    pub api: RawApi,
    /// Per-host settings the agent cannot report itself: BMC, pools, watchdog.
    #[serde(default)]
    pub hosts: BTreeMap<String, RawHost>,
    /// Shared pools the manager mounts: it reads hosts' heartbeat records there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, RawPool>,
    /// Where the engine state, the audit log and the registry live: the embedded SQLite
    /// file (default, one manager) or etcd (several managers, one leader; docs/manager-ha.md).
    #[serde(default, skip_serializing_if = "RawStore::is_default")]
    pub store: RawStore,
}

/// `[store]`: the persistence backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `sqlite` (default: `manager.db` in `data_dir`, one manager) or `etcd` (any number of
    /// managers; the one holding etcd's leader key acts, the others serve reads).
    #[serde(default)]
    pub backend: StoreBackend,
    /// etcd only: client URLs, `https://HOST:2379` (or `http://` on a trusted loopback).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// etcd only: CA certificate (PEM) etcd's server certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// etcd only: client certificate (PEM) for etcd's client-certificate auth (with `key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// etcd only: the client certificate's private key (PEM, mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// etcd only: every key kvmha writes starts with this; default `/kvmha/<cluster_id>/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// etcd only: TTL of the leader's etcd lease, in ms (whole seconds, at least 2000;
    /// default 5000). A dead leader is replaced after about this long; a leader that
    /// cannot renew stops acting before it runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl_ms: Option<u64>,
    /// etcd only: the agent URL of this manager (`https://HOST:PORT`) that followers hand
    /// to agents and clients as the leader's; default `https://<listen>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    /// etcd only: the operator API URL of this manager that followers name as the
    /// leader's; default `http://<api_listen>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
}

impl RawStore {
    fn is_default(&self) -> bool {
        *self == RawStore::default()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    #[default]
    Sqlite,
    Etcd,
}

/// The validated `[store]`.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    Sqlite { path: PathBuf },
    Etcd(EtcdConfig),
}

#[derive(Clone, Debug)]
pub struct EtcdConfig {
    pub settings: crate::etcd::EtcdSettings,
    /// Ends with `/`.
    pub prefix: String,
    pub lease_ttl: std::time::Duration,
    pub agent_url: String,
    pub api_url: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Where the pool is mounted on the manager's machine.
    pub path: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The cluster CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The cluster CA key (PEM, mode 0600): signs agents' certificates at join.
    pub ca_key: PathBuf,
    /// The manager's certificate (PEM), signed by the cluster CA.
    pub cert: PathBuf,
    /// The manager's private key (PEM, mode 0600).
    pub key: PathBuf,
}

/// Tokens are stored as SHA-256 hex: the file never holds a usable token.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    /// SHA-256 (hex) of each operator token: read and act (maintenance, HA, confirm-down).
    pub operator_token_sha256: Vec<String>,
    /// SHA-256 (hex) of each read-only token: read, dashboard, `/metrics`.
    #[serde(default)]
    pub readonly_token_sha256: Vec<String>,
    /// SHA-256 (hex) of the join secret agents present to `kvmha agent join`.
    pub join_token_sha256: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    /// The host's BMC, used to power it off and read the power state back.
    pub bmc: Option<RawBmc>,
    /// Names of the `[pools.NAME]` the host writes its heartbeat to.
    #[serde(default)]
    pub pools: Vec<String>,
    /// The host's agent runs with an armed hardware watchdog and self-fences: lease
    /// expiry may then prove it dead (ARCHITECTURE.md §5).
    #[serde(default)]
    pub watchdog: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBmc {
    /// Protocol: `ipmi` (IPMI 2.0 RMCP+) or `redfish`.
    pub kind: BmcKind,
    /// `HOST:PORT` for IPMI (port 623 by default), `https://HOST` for Redfish.
    pub address: String,
    /// BMC user allowed to power the host off (an operator-level user, not admin).
    pub username: String,
    /// The password is read from this file only, never from the config itself.
    pub password_file: PathBuf,
    /// Redfish only: verify the BMC against this CA bundle.
    pub ca_bundle: Option<PathBuf>,
    /// Redfish only: no TLS verification (lab use).
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BmcKind {
    Ipmi,
    Redfish,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub file: PathBuf,
    pub cluster_id: String,
    pub listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub db_path: PathBuf,
    pub profile: Profile,
    pub timing_overrides: TimingSettings,
    pub timing: Timing,
    pub shutdown_policy: ShutdownPolicy,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub operator_token_sha256: Vec<String>,
    pub readonly_token_sha256: Vec<String>,
    pub join_token_sha256: String,
    pub hosts: BTreeMap<HostName, HostConfig>,
    /// Pools mounted here, by name: where the heartbeat investigator reads.
    pub pools: BTreeMap<PoolName, PathBuf>,
    /// The profile's lease numbers, checked by [`kvmha_storage::LeaseTimings::check`].
    pub lease: kvmha_storage::LeaseTimings,
    pub store: StoreConfig,
}

#[derive(Clone, Debug)]
pub struct HostConfig {
    pub bmc: Option<BmcConfig>,
    pub pools: Vec<PoolName>,
    pub watchdog: bool,
}

/// The storage crate's view of the timing profile (the agent uses the same mapping).
pub fn lease_timings(timing: &Timing) -> kvmha_storage::LeaseTimings {
    kvmha_storage::LeaseTimings {
        renewal_interval: timing.lease_renew_interval(),
        io_timeout: timing.lease_renew_interval() / 2,
        self_fence_deadline: timing.self_fence_after(),
        watchdog_timeout: timing.watchdog_timeout(),
        lease_expiry: timing.lease_takeover_after(),
    }
}

#[derive(Clone, Debug)]
pub struct BmcConfig {
    pub kind: BmcKind,
    pub address: String,
    pub username: String,
    /// Redacted in Debug output by [`Secret`].
    pub password: Secret,
    pub ca_bundle: Option<PathBuf>,
    pub insecure: bool,
}

impl ManagerConfig {
    pub fn load(file: &Path) -> Result<ManagerConfig, ManagerError> {
        let text =
            std::fs::read_to_string(file).map_err(|source| ManagerError::ConfigRead { file: file.into(), source })?;
        let raw: RawConfig = parse_toml(file, &text)?;
        ManagerConfig::validate(file, raw)
    }

    pub fn validate(file: &Path, raw: RawConfig) -> Result<ManagerConfig, ManagerError> {
        let base = file.parent().unwrap_or(Path::new("."));
        let field =
            |field: &str, problem: String| ManagerError::Config { file: file.into(), field: field.to_owned(), problem };
        let address = |name: &str, value: &str| {
            value.parse::<SocketAddr>().map_err(|_| field(name, format!("{value:?} is not IP:PORT")))
        };
        let listen = address("listen", &raw.listen)?;
        let api_listen = address("api_listen", &raw.api_listen)?;
        let profile: Profile = raw.profile.parse().map_err(|error| field("profile", format!("{error}")))?;
        let timing = Timing::from_profile(profile, &raw.timing).map_err(|error| field("timing", error.to_string()))?;
        let lease = lease_timings(&timing);
        lease.check().map_err(|error| field("timing", error.to_string()))?;
        let read_pem = |name: &str, path: &Path| {
            let path = base.join(path);
            std::fs::read_to_string(&path).map_err(|error| field(name, format!("{}: {error}", path.display())))
        };
        let ca_cert_pem = read_pem("tls.ca_cert", &raw.tls.ca_cert)?;
        let ca_key_pem = read_pem("tls.ca_key", &raw.tls.ca_key)?;
        let cert_pem = read_pem("tls.cert", &raw.tls.cert)?;
        let key_pem = read_pem("tls.key", &raw.tls.key)?;
        for (name, pem) in [("tls.ca_cert", &ca_cert_pem), ("tls.cert", &cert_pem)] {
            kvmha_proto::pki::parse_certs(pem).map_err(|error| field(name, error.to_string()))?;
        }
        for (name, pem) in [("tls.ca_key", &ca_key_pem), ("tls.key", &key_pem)] {
            kvmha_proto::pki::parse_key(pem).map_err(|error| field(name, error.to_string()))?;
        }
        let is_hash = |value: &String| value.len() == 64 && value.chars().all(|c| c.is_ascii_hexdigit());
        if raw.api.operator_token_sha256.is_empty() || !raw.api.operator_token_sha256.iter().all(is_hash) {
            return Err(field("api.operator_token_sha256", "expected a non-empty list of SHA-256 hex digests".into()));
        }
        if !raw.api.readonly_token_sha256.iter().all(is_hash) {
            return Err(field("api.readonly_token_sha256", "expected SHA-256 hex digests".into()));
        }
        if !is_hash(&raw.api.join_token_sha256) {
            return Err(field("api.join_token_sha256", "expected a SHA-256 hex digest".into()));
        }
        let mut hosts = BTreeMap::new();
        for (name, host) in raw.hosts {
            // The names agents join under (see server::valid_host_name): a host that can
            // never join would only ever be seen silent.
            let valid_name = !name.is_empty()
                && name.len() <= 63
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !name.starts_with('-')
                && !name.ends_with('-');
            if !valid_name {
                return Err(field(&format!("hosts.{name}"), "letters, digits and '-' only, at most 63".into()));
            }
            for pool in &host.pools {
                kvmha_storage::Name::new(pool)
                    .map_err(|error| field(&format!("hosts.{name}.pools"), error.to_string()))?;
            }
            let bmc = match host.bmc {
                None => None,
                Some(bmc) => {
                    let address_field = format!("hosts.{name}.bmc.address");
                    if bmc.address.contains('@') {
                        // Never echoed: it may hold a password.
                        return Err(field(
                            &address_field,
                            "embeds user credentials: use username and password_file".into(),
                        ));
                    }
                    if !bmc.address.contains("://") {
                        kvmha_bmc::split_host_port(&bmc.address, 623)
                            .map_err(|error| field(&address_field, error.to_string()))?;
                    }
                    let password_path = base.join(&bmc.password_file);
                    let password = Secret::from_file(&password_path).map_err(|error| {
                        field(
                            &format!("hosts.{name}.bmc.password_file"),
                            format!("{}: {error}", password_path.display()),
                        )
                    })?;
                    Some(BmcConfig {
                        kind: bmc.kind,
                        address: bmc.address,
                        username: bmc.username,
                        password,
                        ca_bundle: bmc.ca_bundle.map(|path| base.join(path)),
                        insecure: bmc.insecure,
                    })
                }
            };
            let pools = host.pools.iter().map(|pool| PoolName::from(pool.as_str())).collect();
            hosts.insert(HostName::from(name.as_str()), HostConfig { bmc, pools, watchdog: host.watchdog });
        }
        let mut pools = BTreeMap::new();
        for (name, pool) in raw.pools {
            kvmha_storage::Name::new(&name).map_err(|error| field(&format!("pools.{name}"), error.to_string()))?;
            pools.insert(PoolName::from(name.as_str()), base.join(pool.path));
        }
        if !pools.is_empty() {
            kvmha_storage::Name::new(&raw.cluster_id).map_err(|error| field("cluster_id", error.to_string()))?;
        }
        let db_path = base.join(&raw.data_dir).join("manager.db");
        let store = match raw.store.backend {
            StoreBackend::Sqlite => {
                if raw.store != (RawStore { backend: StoreBackend::Sqlite, ..RawStore::default() }) {
                    return Err(field("store", "etcd settings given with backend = \"sqlite\"".into()));
                }
                StoreConfig::Sqlite { path: db_path.clone() }
            }
            StoreBackend::Etcd => {
                let settings = &raw.store;
                if settings.endpoints.is_empty() {
                    return Err(field("store.endpoints", "backend = \"etcd\" needs at least one endpoint".into()));
                }
                for endpoint in &settings.endpoints {
                    if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
                        return Err(field(
                            "store.endpoints",
                            format!("{endpoint:?} must start with https:// or http://"),
                        ));
                    }
                }
                let ca_pem = settings.ca_cert.as_ref().map(|path| read_pem("store.ca_cert", path)).transpose()?;
                let identity_pem = match (&settings.cert, &settings.key) {
                    (Some(cert), Some(key)) => Some((read_pem("store.cert", cert)?, read_pem("store.key", key)?)),
                    (None, None) => None,
                    _ => return Err(field("store.cert", "cert and key go together".into())),
                };
                let ttl_ms = settings.lease_ttl_ms.unwrap_or(5000);
                if ttl_ms < 2000 || ttl_ms % 1000 != 0 {
                    return Err(field("store.lease_ttl_ms", format!("{ttl_ms}: whole seconds, at least 2000")));
                }
                let lease_ttl = std::time::Duration::from_millis(ttl_ms);
                let mut prefix = settings.prefix.clone().unwrap_or_else(|| format!("/kvmha/{}/", raw.cluster_id));
                if !prefix.ends_with('/') {
                    prefix.push('/');
                }
                let agent_url = settings.agent_url.clone().unwrap_or_else(|| format!("https://{listen}"));
                let api_url = settings.api_url.clone().unwrap_or_else(|| format!("http://{api_listen}"));
                StoreConfig::Etcd(EtcdConfig {
                    settings: crate::etcd::EtcdSettings {
                        endpoints: settings.endpoints.clone(),
                        ca_pem,
                        identity_pem,
                        // A request must end well inside the lease: an answer later than
                        // that could not be acted on anyway.
                        request_timeout: lease_ttl / 4,
                    },
                    prefix,
                    lease_ttl,
                    agent_url: agent_url.trim_end_matches('/').to_owned(),
                    api_url: api_url.trim_end_matches('/').to_owned(),
                })
            }
        };
        Ok(ManagerConfig {
            store,
            file: file.into(),
            cluster_id: raw.cluster_id,
            listen,
            api_listen,
            db_path,
            profile,
            timing_overrides: raw.timing,
            shutdown_policy: raw.shutdown_policy,
            timing,
            ca_cert_pem,
            ca_key_pem,
            cert_pem,
            key_pem,
            operator_token_sha256: raw.api.operator_token_sha256,
            readonly_token_sha256: raw.api.readonly_token_sha256,
            join_token_sha256: raw.api.join_token_sha256,
            hosts,
            pools,
            lease,
        })
    }
}

/// Parses TOML, turning serde's message into one that names the file and the field (the
/// key on the line the error points at).
pub fn parse_toml<T: serde::de::DeserializeOwned>(file: &Path, text: &str) -> Result<T, ManagerError> {
    toml::from_str(text).map_err(|error: toml::de::Error| {
        let field = error
            .span()
            .and_then(|span| {
                let line_start = text[..span.start.min(text.len())].rfind('\n').map_or(0, |at| at + 1);
                let line = text[line_start..].lines().next()?;
                let (key, _) = line.split_once('=')?;
                Some(key.trim().to_owned())
            })
            .unwrap_or_else(|| "(see message)".to_owned());
        ManagerError::Config { file: file.into(), field, problem: error.message().to_owned() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_is_taken_from_the_line_the_error_points_at() {
        let text = "cluster_id = \"c\"\nlisten = 5\n";
        let error = parse_toml::<RawConfig>(Path::new("/etc/kvmha/manager.toml"), text).unwrap_err();
        let message = error.to_string();
        assert!(message.starts_with("/etc/kvmha/manager.toml: field `listen`:"), "{message}");
    }
}
