//! `kvmha bmc …`: the operator's door to one BMC. `crates/kvmha` only
//! forwards [`Args`] to [`run`] (or [`run_blocking`]).

use crate::error::{BmcError, Result};
use crate::ipmi::commands::Privilege;
use crate::ipmi::{IpmiClient, IpmiConfig};
use crate::ipmitool::{Ipmitool, IpmitoolConfig};
use crate::redfish::{RedfishAuth, RedfishClient, RedfishConfig, RedfishTls};
use crate::{Fencer, PowerControl, Secret};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    /// Print the power state.
    Status,
    On,
    /// Hard power off (no verification; see `fence`).
    Off,
    Cycle,
    /// Hard reset.
    Reset,
    /// Power off and read the state back until it is off (what HA does).
    Fence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    /// kvmha's own IPMI v2.0 / RMCP+ client.
    Ipmi,
    Redfish,
    /// The ipmitool binary.
    Ipmitool,
}

/// Power control of one host through its BMC.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(value_enum)]
    pub action: Action,
    #[arg(long, value_enum, default_value = "ipmi")]
    pub driver: Driver,
    /// HOST[:PORT] (IPMI port 623 by default); for Redfish also a URL.
    #[arg(long)]
    pub address: String,
    #[arg(long)]
    pub user: String,
    /// File holding the password (one trailing newline is ignored). There
    /// is deliberately no --password: argv is visible to every local user.
    #[arg(long)]
    pub password_file: PathBuf,
    /// IPMI cipher suite (17 or 3). Default: 17, then 3 (ipmitool: 3).
    #[arg(long)]
    pub cipher_suite: Option<u8>,
    /// Allow IPMI cipher suite 0 (no authentication at all).
    #[arg(long)]
    pub allow_cipher_suite_zero: bool,
    /// `fence` through a BMC whose answers are unauthenticated (cipher
    /// suite 0): anyone on the BMC network could forge "off". The evidence
    /// then says UNAUTHENTICATED.
    #[arg(long)]
    pub allow_unauthenticated_fence: bool,
    /// IPMI session privilege: callback, user, operator, administrator.
    #[arg(long, default_value = "administrator")]
    pub privilege: String,
    /// Print JSON (`status`: {"power":"on"}).
    #[arg(long)]
    pub json: bool,
    /// Bound on the whole command (for `fence`: the deadline to read off).
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Redfish: PEM CA bundle to verify the BMC certificate with.
    #[arg(long)]
    pub ca_bundle: Option<PathBuf>,
    /// Redfish: skip TLS verification. Anyone on the path can then lie
    /// about the power state; use only on a trusted lab network.
    #[arg(long)]
    pub insecure: bool,
    #[arg(long, value_enum, default_value = "basic")]
    pub redfish_auth: RedfishAuth,
    /// Redfish: which system under /redfish/v1/Systems (if several).
    #[arg(long)]
    pub system_id: Option<String>,
}

/// Builds the chosen driver from CLI arguments (also used by the benchmark).
pub fn driver_from_args(args: &Args) -> Result<Box<dyn PowerControl>> {
    let password = Secret::from_file(&args.password_file).map_err(|source| BmcError::Io {
        context: format!("read password file {}", args.password_file.display()),
        source,
    })?;
    let privilege: Privilege = args.privilege.parse()?;
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    Ok(match args.driver {
        Driver::Ipmi => {
            let mut config = IpmiConfig::new(args.address.clone(), args.user.clone(), password);
            config.privilege = privilege;
            config.allow_suite_zero = args.allow_cipher_suite_zero;
            if let Some(suite) = args.cipher_suite {
                config.cipher_suites = vec![suite];
            }
            config.operation_timeout = timeout;
            // Three tries per datagram inside the budget, never over a second each.
            config.attempt_timeout = (timeout / 3).min(Duration::from_secs(1));
            Box::new(IpmiClient::new(config)?)
        }
        Driver::Ipmitool => {
            let mut config = IpmitoolConfig::new(args.address.clone(), args.user.clone(), password);
            config.privilege = privilege;
            config.cipher_suite = args.cipher_suite.unwrap_or(3);
            config.timeout = timeout;
            Box::new(Ipmitool::new(config)?)
        }
        Driver::Redfish => {
            let mut config = RedfishConfig::new(args.address.clone(), args.user.clone(), password);
            config.auth = args.redfish_auth;
            config.timeout = timeout;
            config.system_id = args.system_id.clone();
            config.tls = match (&args.ca_bundle, args.insecure) {
                (Some(_), true) => {
                    return Err(BmcError::Config { reason: "--ca-bundle and --insecure contradict each other".into() })
                }
                (Some(path), false) => RedfishTls::CaBundle(path.clone()),
                (None, true) => RedfishTls::Insecure,
                (None, false) => RedfishTls::WebRoots,
            };
            Box::new(RedfishClient::new(config)?)
        }
    })
}

/// Runs the command, printing to stdout.
pub async fn run(args: Args) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    run_to(&args, &mut stdout).await
}

/// For callers without a tokio runtime (the `kvmha` binary's sync main).
pub fn run_blocking(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| BmcError::Io { context: "start async runtime".into(), source })?;
    runtime.block_on(run(args))
}

/// Runs the command, writing its output to `out` (tests capture it).
pub async fn run_to(args: &Args, out: &mut dyn Write) -> Result<()> {
    let driver = driver_from_args(args)?;
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let write_error = |source| BmcError::Io { context: "write output".into(), source };
    let outcome = act(args, driver.as_ref(), timeout).await;
    // Courtesy cleanup (a Redfish session slot); never changes the outcome.
    if let Err(error) = bounded(timeout, "close", driver.close()).await {
        tracing::debug!(%error, "closing the bmc session failed");
    }
    writeln!(out, "{}", outcome?).map_err(write_error)
}

async fn act(args: &Args, driver: &dyn PowerControl, timeout: Duration) -> Result<String> {
    let simple = |name: &str| -> serde_json::Value { serde_json::json!({ "action": name, "ok": true }) };
    let line = match args.action {
        Action::Status => {
            let power = bounded(timeout, "status", driver.status()).await?;
            if args.json {
                serde_json::json!({ "power": power }).to_string()
            } else {
                format!("power {power}")
            }
        }
        Action::Fence => {
            let fencer = Fencer {
                deadline: timeout,
                allow_unauthenticated_fence: args.allow_unauthenticated_fence,
                ..Fencer::default()
            };
            let report = fencer.fence(driver).await?;
            if args.json {
                serde_json::to_string(&report).expect("report serializes")
            } else {
                report.evidence
            }
        }
        action => {
            let (name, call) = match action {
                Action::On => ("on", driver.power_on()),
                Action::Off => ("off", driver.power_off()),
                Action::Cycle => ("cycle", driver.power_cycle()),
                Action::Reset => ("reset", driver.reset()),
                Action::Status | Action::Fence => unreachable!("handled above"),
            };
            bounded(timeout, name, call).await?;
            if args.json {
                simple(name).to_string()
            } else {
                format!("power {name}: done")
            }
        }
    };
    Ok(line)
}

async fn bounded<T>(
    timeout: Duration,
    operation: &str,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, call).await.unwrap_or_else(|_elapsed| {
        Err(BmcError::Timeout { operation: operation.to_string(), after_ms: timeout.as_millis() as u64 })
    })
}
