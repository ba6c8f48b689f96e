//! `agent.toml`, written by `kvmha agent join`: unknown keys refused, every error names
//! the file and the field.

use crate::error::AgentError;
use kvmha_core::{HostName, Profile, Timing, TimingSettings};
use kvmha_storage::LeaseTimings;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This host's name in the cluster (as in the manager's `[hosts.NAME]`).
    pub name: String,
    /// The cluster this agent joined (from the manager's certificate).
    pub cluster_id: String,
    /// `https://HOST:PORT` of the manager (with several managers: the first to try).
    pub manager_url: String,
    /// Several managers (etcd backend, docs/manager-ha.md): every manager's
    /// `https://HOST:PORT`. The agent pings one; a follower answers with the leader's URL
    /// and the agent switches; an unreachable one makes it try the next.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manager_urls: Vec<String>,
    /// Where the agent takes manager commands (mutual TLS).
    pub listen: String,
    /// The hypervisor driver: a libvirt URI (`qemu:///system`, `test:///default`) or
    /// `lab:<storage_root>?state=<dir>[&host=..]` for the lab process driver. Absent:
    /// the agent runs no VMs (VM commands answer `Unsupported`).
    pub hypervisor: Option<String>,
    /// The pool (one of `pools`) that holds this cluster's VM leases; default: the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_pool: Option<String>,
    /// Timing profile; must be the manager's (docs/timing.md).
    pub profile: String,
    /// Per-field overrides of the profile's timings, in ms; must match the manager's.
    #[serde(default)]
    pub timing: TimingSettings,
    /// The cluster CA, this agent's certificate and the manager's fingerprint.
    pub tls: RawTls,
    /// Shared pools this host writes its heartbeat record to (issue 5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<RawPool>,
    /// The hardware watchdog; absent: no watchdog, the host never self-fences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<RawWatchdog>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// The pool's name, as the manager's config names it.
    pub name: String,
    /// Where the pool is mounted on this host (relative paths: relative to agent.toml).
    pub path: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatchdog {
    /// The watchdog device, `/dev/watchdog` on a real host.
    pub device: PathBuf,
    /// Whether the agent opens the device and self-fences when its storage is lost.
    pub armed: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The cluster CA certificate (PEM), checked against the join token's fingerprint.
    pub ca_cert: PathBuf,
    /// This agent's certificate (PEM), issued by the cluster CA at join.
    pub cert: PathBuf,
    /// This agent's private key (PEM, mode 0600).
    pub key: PathBuf,
    /// SHA-256 of the manager's certificate: the only client allowed to send commands.
    pub manager_cert_sha256: String,
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub file: PathBuf,
    pub name: HostName,
    pub cluster_id: String,
    pub manager_url: String,
    /// `manager_url` first, then the other `manager_urls`; no duplicates.
    pub manager_urls: Vec<String>,
    pub listen: SocketAddr,
    pub hypervisor: Option<String>,
    /// The pool holding VM leases: `None` only when no pool is configured.
    pub lease_pool: Option<PoolConfig>,
    pub timing: Timing,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub manager_cert_sha256: String,
    pub pools: Vec<PoolConfig>,
    pub watchdog: Option<WatchdogConfig>,
    /// The profile's lease numbers, checked by [`LeaseTimings::check`].
    pub lease: LeaseTimings,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchdogConfig {
    pub device: PathBuf,
    pub armed: bool,
}

/// The storage crate's view of the timing profile. One storage operation may take half
/// a renewal interval: a renewal never queues behind the previous one.
pub fn lease_timings(timing: &Timing) -> LeaseTimings {
    LeaseTimings {
        renewal_interval: timing.lease_renew_interval(),
        io_timeout: timing.lease_renew_interval() / 2,
        self_fence_deadline: timing.self_fence_after(),
        watchdog_timeout: timing.watchdog_timeout(),
        lease_expiry: timing.lease_takeover_after(),
    }
}

impl AgentConfig {
    pub fn load(file: &Path) -> Result<AgentConfig, AgentError> {
        let text =
            std::fs::read_to_string(file).map_err(|source| AgentError::ConfigRead { file: file.into(), source })?;
        AgentConfig::parse(file, &text)
    }

    /// Parses and validates the text of `file` (relative paths in it are relative to
    /// the file's directory, where the certificates are read from).
    pub fn parse(file: &Path, text: &str) -> Result<AgentConfig, AgentError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error: toml::de::Error| {
            let field = error
                .span()
                .and_then(|span| {
                    let line_start = text[..span.start.min(text.len())].rfind('\n').map_or(0, |at| at + 1);
                    let (key, _) = text[line_start..].lines().next()?.split_once('=')?;
                    Some(key.trim().to_owned())
                })
                .unwrap_or_else(|| "(see message)".to_owned());
            AgentError::Config { file: file.into(), field, problem: error.message().to_owned() }
        })?;
        let field =
            |field: &str, problem: String| AgentError::Config { file: file.into(), field: field.into(), problem };
        let base = file.parent().unwrap_or(Path::new("."));
        let listen = raw.listen.parse().map_err(|_| field("listen", format!("{:?} is not IP:PORT", raw.listen)))?;
        let profile: Profile = raw.profile.parse().map_err(|error| field("profile", format!("{error}")))?;
        let timing = Timing::from_profile(profile, &raw.timing).map_err(|error| field("timing", error.to_string()))?;
        kvmha_storage::Name::new(&raw.name).map_err(|error| field("name", error.to_string()))?;
        let fingerprint = &raw.tls.manager_cert_sha256;
        if fingerprint.len() != 64 || !fingerprint.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(field("tls.manager_cert_sha256", "expected a SHA-256 hex digest".into()));
        }
        if !raw.manager_url.starts_with("https://") {
            return Err(field("manager_url", format!("{:?} must start with https://", raw.manager_url)));
        }
        let mut manager_urls = vec![raw.manager_url.trim_end_matches('/').to_owned()];
        for url in &raw.manager_urls {
            if !url.starts_with("https://") {
                return Err(field("manager_urls", format!("{url:?} must start with https://")));
            }
            let url = url.trim_end_matches('/').to_owned();
            if !manager_urls.contains(&url) {
                manager_urls.push(url);
            }
        }
        let read = |name: &str, path: &Path| {
            let path = base.join(path);
            std::fs::read_to_string(&path).map_err(|error| field(name, format!("{}: {error}", path.display())))
        };
        let ca_pem = read("tls.ca_cert", &raw.tls.ca_cert)?;
        let cert_pem = read("tls.cert", &raw.tls.cert)?;
        let key_pem = read("tls.key", &raw.tls.key)?;
        kvmha_proto::pki::parse_certs(&ca_pem).map_err(|error| field("tls.ca_cert", error.to_string()))?;
        kvmha_proto::pki::parse_certs(&cert_pem).map_err(|error| field("tls.cert", error.to_string()))?;
        kvmha_proto::pki::parse_key(&key_pem).map_err(|error| field("tls.key", error.to_string()))?;
        let lease = lease_timings(&timing);
        lease.check().map_err(|error| field("timing", error.to_string()))?;
        let mut pools: Vec<PoolConfig> = Vec::new();
        for (index, pool) in raw.pools.iter().enumerate() {
            kvmha_storage::Name::new(&pool.name)
                .map_err(|error| field(&format!("pools[{index}].name"), error.to_string()))?;
            if pools.iter().any(|seen| seen.name == pool.name) {
                return Err(field(&format!("pools[{index}].name"), format!("pool {:?} is named twice", pool.name)));
            }
            pools.push(PoolConfig { name: pool.name.clone(), path: base.join(&pool.path) });
        }
        if !pools.is_empty() {
            kvmha_storage::Name::new(&raw.cluster_id).map_err(|error| field("cluster_id", error.to_string()))?;
            kvmha_storage::Name::new(&raw.name).map_err(|error| field("name", error.to_string()))?;
        }
        let lease_pool = match &raw.lease_pool {
            Some(name) => Some(pools.iter().find(|pool| &pool.name == name).cloned().ok_or_else(|| {
                let known: Vec<&str> = pools.iter().map(|pool| pool.name.as_str()).collect();
                field("lease_pool", format!("{name:?} is not one of the configured pools {known:?}"))
            })?),
            None => pools.first().cloned(),
        };
        if let Some(uri) = &raw.hypervisor {
            check_hypervisor_uri(uri).map_err(|problem| field("hypervisor", problem))?;
        }
        let watchdog =
            raw.watchdog.map(|watchdog| WatchdogConfig { device: base.join(watchdog.device), armed: watchdog.armed });
        if watchdog.as_ref().is_some_and(|watchdog| watchdog.armed) && pools.is_empty() {
            return Err(field(
                "watchdog.armed",
                "an armed watchdog needs at least one heartbeat pool: without one the agent could only self-fence"
                    .into(),
            ));
        }
        Ok(AgentConfig {
            file: file.into(),
            name: HostName::new(raw.name),
            cluster_id: raw.cluster_id,
            manager_url: raw.manager_url.trim_end_matches('/').to_owned(),
            manager_urls,
            listen,
            hypervisor: raw.hypervisor,
            lease_pool,
            timing,
            ca_pem,
            cert_pem,
            key_pem,
            manager_cert_sha256: raw.tls.manager_cert_sha256,
            pools,
            watchdog,
            lease,
        })
    }
}

/// A hypervisor URI the agent can open: the lab driver's (parsed in full: paths, VM
/// binary) or a libvirt URI (`scheme:...`; libvirt itself is asked only at run time).
pub fn check_hypervisor_uri(uri: &str) -> Result<(), String> {
    if kvmha_hypervisor::lab::LabConfig::is_lab_uri(uri) {
        return kvmha_hypervisor::lab::LabConfig::from_uri(uri).map(|_| ()).map_err(|error| error.to_string());
    }
    let scheme = uri.split_once(':').map(|(scheme, _)| scheme).unwrap_or("");
    let valid_scheme =
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.');
    if !valid_scheme || uri.chars().any(char::is_whitespace) {
        return Err(format!(
            "{uri:?} is neither a libvirt URI (qemu:///system, test:///default) nor lab:<root>?state=<dir>"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_uris_are_checked() {
        assert!(check_hypervisor_uri("qemu:///system").is_ok());
        assert!(check_hypervisor_uri("test:///default").is_ok());
        assert!(check_hypervisor_uri("qemu+ssh://node2/system").is_ok());
        for bad in ["", "libvirt", "qemu :///x", "lab:relative?state=/x", "lab:/x"] {
            let error = check_hypervisor_uri(bad).unwrap_err();
            assert!(!error.is_empty(), "{bad}");
        }
        let error = check_hypervisor_uri("lab:/srv?state=/var/x&colour=red").unwrap_err();
        assert!(error.contains("colour"), "{error}");
    }
}
