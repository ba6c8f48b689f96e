//! kvmha-bmc: out-of-band power control of KVM hosts through their BMCs.
//!
//! - [`ipmi`]: our own IPMI v2.0 / RMCP+ client (pure codec and session state
//!   machine, UDP at the edge).
//! - [`redfish`]: a Redfish client.
//! - [`ipmitool`]: drives the `ipmitool` binary, as an operator's fallback.
//! - [`fence`]: power off and prove it by reading the state back.
//! - [`cli`]: `kvmha bmc …`, wired into the binary by `crates/kvmha`.
//!
//! This crate does not depend on kvmha-core: the manager maps a
//! [`fence::FenceReport`] onto core's types.

pub mod bench;
pub mod cli;
pub mod error;
pub mod fence;
pub mod ipmi;
pub mod ipmitool;
pub mod redfish;
mod secret;
pub mod sim;

pub use error::{BmcError, Result};
pub use fence::{FenceOutcome, FenceReport, Fencer};

pub use secret::Secret;

use std::fmt;

/// Chassis power as the BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    On,
    Off,
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerState::On => "on",
            PowerState::Off => "off",
        })
    }
}

/// Power control of one host through one out-of-band interface. Every call
/// is bounded by the implementation's configured timeout, and errors are
/// typed (see [`BmcError`]) so a fencer can tell "refused" from "no answer".
#[async_trait::async_trait]
pub trait PowerControl: Send + Sync + fmt::Debug {
    /// Who we talk to and how, for audit evidence: `"10.0.3.11:623 ipmi"`.
    fn target(&self) -> String;
    async fn status(&self) -> Result<PowerState>;
    /// Hard power off (no guest shutdown): what fencing needs.
    async fn power_off(&self) -> Result<()>;
    async fn power_on(&self) -> Result<()>;
    async fn power_cycle(&self) -> Result<()>;
    /// Hard reset.
    async fn reset(&self) -> Result<()>;
    /// `Some(why)` when the answers of this BMC may be unauthenticated
    /// (IPMI cipher suite 0): anyone on the BMC network could then forge
    /// "power off confirmed". The fencer refuses such a driver unless told
    /// otherwise, and then says so in its evidence.
    fn unauthenticated(&self) -> Option<&'static str> {
        None
    }
    /// Releases what the driver holds on the BMC (a Redfish session).
    /// Drivers without state keep the default.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Splits `HOST[:PORT]`, `[V6]:PORT` or a bare IPv6 address.
pub fn split_host_port(address: &str, default_port: u16) -> Result<(String, u16)> {
    let invalid = || BmcError::Config { reason: format!("invalid bmc address {address:?}: expected HOST[:PORT]") };
    if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(invalid)?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().map_err(|_| invalid())?,
            None if after.is_empty() => default_port,
            None => return Err(invalid()),
        };
        return Ok((host.to_string(), port));
    }
    if address.is_empty() {
        return Err(invalid());
    }
    match address.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((host, _)) if host.contains(':') => Ok((address.to_string(), default_port)),
        Some((host, port)) => Ok((host.to_string(), port.parse().map_err(|_| invalid())?)),
        None => Ok((address.to_string(), default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("bmc1", 623).unwrap(), ("bmc1".into(), 623));
        assert_eq!(split_host_port("10.0.0.1:9001", 623).unwrap(), ("10.0.0.1".into(), 9001));
        assert_eq!(split_host_port("[::1]:9001", 623).unwrap(), ("::1".into(), 9001));
        assert_eq!(split_host_port("fe80::1", 623).unwrap(), ("fe80::1".into(), 623));
        assert!(split_host_port("host:notaport", 623).is_err());
        assert!(split_host_port("", 623).is_err());
    }
}
