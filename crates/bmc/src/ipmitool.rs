//! Power control by running the `ipmitool` binary: the operator's fallback
//! when our own client and a BMC disagree, and the yardstick for benchmarks.
//!
//! The password reaches ipmitool through the `IPMI_PASSWORD` environment
//! variable with `-E`, never through argv, where any local user could read
//! it in `ps`.

use crate::error::{BmcError, Result};
use crate::ipmi::commands::Privilege;
use crate::{PowerControl, PowerState, Secret};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct IpmitoolConfig {
    /// `HOST[:PORT]`; the port defaults to 623.
    pub address: String,
    pub username: String,
    pub password: Secret,
    /// 3 by default: ipmi_sim and many BMCs lack Get Channel Cipher Suites,
    /// and without `-C` ipmitool then waits ~10 s to find a suite.
    pub cipher_suite: u8,
    pub privilege: Privilege,
    /// Whole-invocation bound; the child is killed when it passes.
    pub timeout: Duration,
    pub binary: String,
}

impl IpmitoolConfig {
    pub fn new(address: impl Into<String>, username: impl Into<String>, password: Secret) -> Self {
        IpmitoolConfig {
            address: address.into(),
            username: username.into(),
            password,
            cipher_suite: 3,
            privilege: Privilege::Administrator,
            timeout: Duration::from_secs(10),
            binary: "ipmitool".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Ipmitool {
    config: IpmitoolConfig,
    host: String,
    port: u16,
}

impl Ipmitool {
    pub fn new(config: IpmitoolConfig) -> Result<Self> {
        let (host, port) = crate::split_host_port(&config.address, crate::ipmi::IPMI_PORT_DEFAULT)?;
        Ok(Ipmitool { config, host, port })
    }

    fn privilege_name(&self) -> &'static str {
        match self.config.privilege {
            Privilege::Callback => "CALLBACK",
            Privilege::User => "USER",
            Privilege::Operator => "OPERATOR",
            Privilege::Administrator => "ADMINISTRATOR",
        }
    }

    /// Runs `ipmitool … chassis power ARGS` and returns its stdout.
    async fn run(&self, chassis_args: &[&str]) -> Result<String> {
        // ipmitool's own retry knobs: split our budget so it gives up before
        // we kill it, and a hung BMC shows up as its error, not ours.
        let per_try_seconds = (self.config.timeout.as_secs() / 3).max(1);
        let mut command = tokio::process::Command::new(&self.config.binary);
        command
            .args(["-v", "-I", "lanplus", "-C"])
            .arg(self.config.cipher_suite.to_string())
            .args(["-H", &self.host, "-p"])
            .arg(self.port.to_string())
            .args(["-U", &self.config.username, "-E", "-L", self.privilege_name()])
            .args(["-N", &per_try_seconds.to_string(), "-R", "2"])
            .args(chassis_args)
            .env("IPMI_PASSWORD", std::ffi::OsStr::from_bytes(self.config.password.expose()))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let operation = format!("ipmitool {}", chassis_args.join(" "));
        let output = match tokio::time::timeout(self.config.timeout, command.output()).await {
            Err(_elapsed) => {
                return Err(BmcError::Timeout { operation, after_ms: self.config.timeout.as_millis() as u64 })
            }
            Ok(Err(source)) => return Err(BmcError::Io { context: format!("run {}", self.config.binary), source }),
            Ok(Ok(output)) => output,
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if output.status.success() {
            return Ok(stdout);
        }
        Err(classify_failure(&operation, &self.config.address, &stderr))
    }
}

/// Maps ipmitool's (verbose) error text onto our typed errors. ipmitool
/// prints "Unable to establish IPMI v2 / RMCP+ session" for every set-up
/// failure; the line before it (with `-v`) says which one it was.
fn classify_failure(operation: &str, address: &str, stderr: &str) -> BmcError {
    let lower = stderr.to_ascii_lowercase();
    let last_line = stderr.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or("").trim().to_string();
    if lower.contains("rakp 2 hmac is invalid")
        || lower.contains("unauthorized name")
        || lower.contains("invalid user name")
        || lower.contains("rakp 4 message has invalid integrity check")
    {
        return BmcError::Authentication { reason: format!("ipmitool: {last_line}") };
    }
    if lower.contains("insufficient privilege") {
        return BmcError::Refused {
            operation: operation.to_string(),
            code: 0xd4,
            meaning: "insufficient privilege level".into(),
        };
    }
    if lower.contains("get auth capabilities error")
        || lower.contains("no response from remote controller")
        || lower.contains("unable to establish lan session")
    {
        return BmcError::Unreachable { address: address.to_string(), reason: format!("ipmitool: {last_line}") };
    }
    BmcError::Protocol { reason: format!("{operation} failed: {last_line}") }
}

#[async_trait::async_trait]
impl PowerControl for Ipmitool {
    fn target(&self) -> String {
        format!("{} ipmitool", self.config.address)
    }

    fn unauthenticated(&self) -> Option<&'static str> {
        (self.config.cipher_suite == 0).then_some(crate::fence::UNAUTHENTICATED_SUITE_ZERO)
    }

    async fn status(&self) -> Result<PowerState> {
        let stdout = self.run(&["chassis", "power", "status"]).await?;
        if stdout.contains("Chassis Power is on") {
            Ok(PowerState::On)
        } else if stdout.contains("Chassis Power is off") {
            Ok(PowerState::Off)
        } else {
            Err(BmcError::protocol(format!("unexpected ipmitool status output {:?}", stdout.trim())))
        }
    }

    async fn power_off(&self) -> Result<()> {
        self.run(&["chassis", "power", "off"]).await.map(drop)
    }

    async fn power_on(&self) -> Result<()> {
        self.run(&["chassis", "power", "on"]).await.map(drop)
    }

    async fn power_cycle(&self) -> Result<()> {
        self.run(&["chassis", "power", "cycle"]).await.map(drop)
    }

    async fn reset(&self) -> Result<()> {
        self.run(&["chassis", "power", "reset"]).await.map(drop)
    }
}
