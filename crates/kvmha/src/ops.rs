//! The operator CLI against the manager's API: `kvmha host|vm|events|cluster …`.
//! Tables by default, `--json` for scripts (the API's JSON, unchanged).

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;
use std::time::Duration;

/// Bound on every API call (long-polls add their wait to it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `events --follow` poll waits on the manager for new lines.
const FOLLOW_WAIT_MS: u64 = 20_000;

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The manager's operator API.
    #[arg(long, env = "KVMHA_MANAGER", default_value = "http://127.0.0.1:7444", global = true)]
    manager: String,
    /// An operator or read-only token (see DIR/operator.token).
    #[arg(long, env = "KVMHA_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    List,
    Show {
        name: String,
    },
    /// Take a host out of HA (on) or put it back (off). `on` moves the host's VMs off
    /// first and shows each move on stderr until the host is in Maintenance.
    Maintenance {
        name: String,
        mode: OnOff,
        /// Return once the manager accepted it, without following the evacuation.
        #[arg(long)]
        no_wait: bool,
        /// Give up following (not the evacuation) after this many seconds.
        #[arg(long, default_value_t = 600)]
        wait_timeout_s: u64,
    },
    /// Declare a host off after checking it yourself: its VMs may then start elsewhere.
    ConfirmDown {
        name: String,
    },
    Ha {
        name: String,
        mode: EnableDisable,
    },
    /// Remove a host from the cluster and revoke its agent certificate for good (refused
    /// while VMs depend on it). Its agent is refused from then on, also after a manager
    /// restart; joining it again needs the join token.
    Remove {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    List,
    Show {
        name: String,
    },
    /// Define a VM on a host from its libvirt domain XML; the manager keeps the XML so
    /// that another host can start the VM.
    Define {
        /// The host to define it on.
        #[arg(long)]
        host: String,
        /// The domain XML file.
        file: std::path::PathBuf,
        /// Start it there once defined.
        #[arg(long)]
        start: bool,
    },
    /// Start a stopped VM (its lease must be free).
    Start {
        name: String,
        /// Default: the host it last ran on.
        #[arg(long)]
        host: Option<String>,
    },
    /// Stop a VM on purpose: kvmha does not restart it.
    Stop {
        name: String,
        /// Graceful shutdown for up to this long, then a hard stop (default: hard stop).
        #[arg(long)]
        graceful_ms: Option<u64>,
    },
    /// HA settings of a VM.
    Ha {
        name: String,
        mode: EnableDisable,
        /// Higher restarts first.
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i32>,
        /// Anti-affinity group ("" clears it).
        #[arg(long)]
        group: Option<String>,
        /// Hosts it may run on, comma-separated ("" clears: any host).
        #[arg(long)]
        hosts: Option<String>,
        /// Start attempts per host within the budget window.
        #[arg(long)]
        max_restarts: Option<u32>,
        /// Moves to other hosts within the budget window before the VM ends in Error.
        #[arg(long)]
        max_relocations: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Release watchdogs and fence nobody (upgrades, network work).
    Disarm,
    Arm,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new lines as they come.
    #[arg(long)]
    follow: bool,
    /// Start after this event id.
    #[arg(long, default_value_t = 0)]
    after: i64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EnableDisable {
    Enable,
    Disable,
}

pub(crate) struct Api {
    base: String,
    token: String,
    pub(crate) json: bool,
    client: reqwest::Client,
}

impl Api {
    pub(crate) fn new(args: &ApiArgs) -> anyhow::Result<Api> {
        let Some(token) = args.token.clone() else {
            bail!("no token: pass --token or set KVMHA_TOKEN (see DIR/operator.token or DIR/readonly.token)");
        };
        let client =
            reqwest::Client::builder().timeout(REQUEST_TIMEOUT + Duration::from_millis(FOLLOW_WAIT_MS)).build()?;
        Ok(Api {
            base: args.manager.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            json: args.json,
            client,
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| format!("calling {}", self.base))?;
        let status = response.status();
        let text = response.text().await?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message =
                value.get("error").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| value.to_string());
            bail!("{} ({status})", message);
        }
        Ok(value)
    }

    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

pub(crate) fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

fn age(value: &Value, key: &str) -> String {
    match value.get(key).and_then(Value::as_u64) {
        None => "-".to_owned(),
        Some(ms) if ms < 10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{}s", ms / 1000),
    }
}

/// Prints rows as aligned columns.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|header| header.to_string()).collect());
    for row in rows {
        line(row);
    }
}

pub(crate) fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn host_row(host: &Value) -> Vec<String> {
    vec![
        text(host, "name"),
        text(host, "state"),
        age(host, "state_for_ms"),
        age(host, "last_ping_ms_ago"),
        if host.get("ha_enabled").and_then(Value::as_bool).unwrap_or(false) { "on" } else { "off" }.to_owned(),
        text(host, "address"),
    ]
}

const HOST_HEADERS: [&str; 6] = ["NAME", "STATE", "FOR", "LAST PING", "HA", "ADDRESS"];

fn print_outcome(api: &Api, value: &Value) -> anyhow::Result<()> {
    if api.json {
        return print_json(value);
    }
    for line in value.get("audit").and_then(Value::as_array).into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or_default());
    }
    println!("ok");
    Ok(())
}

pub fn host(api_args: ApiArgs, command: HostCommand) -> anyhow::Result<()> {
    let api = Api::new(&api_args)?;
    runtime()?.block_on(async {
        match command {
            HostCommand::List => {
                let hosts = api.get("/v1/hosts").await?;
                if api.json {
                    return print_json(&hosts);
                }
                table(&HOST_HEADERS, hosts.as_array().into_iter().flatten().map(host_row).collect());
                Ok(())
            }
            HostCommand::Show { name } => {
                let host = api.get(&format!("/v1/hosts/{name}")).await?;
                if api.json {
                    return print_json(&host);
                }
                for (key, value) in host.as_object().into_iter().flatten() {
                    let shown = match value {
                        Value::String(text) => text.clone(),
                        Value::Null => "-".to_owned(),
                        other => other.to_string(),
                    };
                    println!("{key:<18} {shown}");
                }
                Ok(())
            }
            HostCommand::Maintenance { name, mode, no_wait, wait_timeout_s } => {
                let on = matches!(mode, OnOff::On);
                // Only what happens after the request counts as its progress.
                let after = if on && !no_wait { Some(last_event_id(&api).await?) } else { None };
                let outcome =
                    api.post(&format!("/v1/hosts/{name}/maintenance"), serde_json::json!({ "on": on })).await?;
                print_outcome(&api, &outcome)?;
                match after {
                    Some(after) => {
                        follow_evacuation(&api, &name, &outcome, after, Duration::from_secs(wait_timeout_s)).await
                    }
                    None => Ok(()),
                }
            }
            HostCommand::Remove { name } => {
                let outcome = api.post(&format!("/v1/hosts/{name}/remove"), serde_json::json!({})).await?;
                print_outcome(&api, &outcome)
            }
            HostCommand::ConfirmDown { name } => {
                let outcome = api.post(&format!("/v1/hosts/{name}/confirm-down"), serde_json::json!({})).await?;
                print_outcome(&api, &outcome)
            }
            HostCommand::Ha { name, mode } => {
                let enabled = matches!(mode, EnableDisable::Enable);
                let outcome =
                    api.post(&format!("/v1/hosts/{name}/ha"), serde_json::json!({ "enabled": enabled })).await?;
                print_outcome(&api, &outcome)
            }
        }
    })
}

const VM_HEADERS: [&str; 8] = ["NAME", "STATE", "FOR", "HOST", "HA", "PRIORITY", "GROUP", "RESTARTS"];

fn vm_row(vm: &Value) -> Vec<String> {
    let ha = if vm.get("ha").and_then(Value::as_bool).unwrap_or(false) { "on" } else { "off" };
    vec![
        text(vm, "name"),
        text(vm, "state"),
        age(vm, "state_for_ms"),
        text(vm, "host"),
        ha.to_owned(),
        text(vm, "priority"),
        text(vm, "group"),
        format!("{}/{}", text(vm, "restarts"), text(vm, "max_restarts")),
    ]
}

/// One VM as `key value` lines, then the action's audit lines if any.
fn print_vm(api: &Api, vm: &Value) -> anyhow::Result<()> {
    if api.json {
        return print_json(vm);
    }
    for line in vm.get("audit").and_then(Value::as_array).into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or_default());
    }
    for (key, value) in vm.as_object().into_iter().flatten() {
        if key == "audit" {
            continue;
        }
        let shown = match value {
            Value::String(text) => text.clone(),
            Value::Null => "-".to_owned(),
            Value::Array(items) => items.iter().map(|item| item.as_str().unwrap_or("?")).collect::<Vec<_>>().join(","),
            other => other.to_string(),
        };
        println!("{key:<16} {shown}");
    }
    Ok(())
}

pub fn vm(api_args: ApiArgs, command: VmCommand) -> anyhow::Result<()> {
    let api = Api::new(&api_args)?;
    runtime()?.block_on(async {
        match command {
            VmCommand::List => {
                let vms = api.get("/v1/vms").await?;
                if api.json {
                    return print_json(&vms);
                }
                table(&VM_HEADERS, vms.as_array().into_iter().flatten().map(vm_row).collect());
                Ok(())
            }
            VmCommand::Show { name } => print_vm(&api, &api.get(&format!("/v1/vms/{name}")).await?),
            VmCommand::Define { host, file, start } => {
                let xml = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                let body = serde_json::json!({ "host": host, "xml": xml, "start": start });
                print_vm(&api, &api.post("/v1/vms", body).await?)
            }
            VmCommand::Start { name, host } => {
                let body = match host {
                    Some(host) => serde_json::json!({ "host": host }),
                    None => serde_json::json!({}),
                };
                print_vm(&api, &api.post(&format!("/v1/vms/{name}/start"), body).await?)
            }
            VmCommand::Stop { name, graceful_ms } => {
                let body = match graceful_ms {
                    Some(graceful_ms) => serde_json::json!({ "graceful_ms": graceful_ms }),
                    None => serde_json::json!({}),
                };
                print_vm(&api, &api.post(&format!("/v1/vms/{name}/stop"), body).await?)
            }
            VmCommand::Ha { name, mode, priority, group, hosts, max_restarts, max_relocations } => {
                let mut body = serde_json::json!({ "enabled": matches!(mode, EnableDisable::Enable) });
                if let Some(priority) = priority {
                    body["priority"] = priority.into();
                }
                if let Some(group) = group {
                    body["group"] = group.into();
                }
                if let Some(hosts) = hosts {
                    let hosts: Vec<&str> = hosts.split(',').map(str::trim).filter(|host| !host.is_empty()).collect();
                    body["hosts"] = hosts.into();
                }
                if let Some(max_restarts) = max_restarts {
                    body["max_restarts"] = max_restarts.into();
                }
                if let Some(max_relocations) = max_relocations {
                    body["max_relocations"] = max_relocations.into();
                }
                print_vm(&api, &api.post(&format!("/v1/vms/{name}/ha"), body).await?)
            }
        }
    })
}

/// The id of the newest audit line.
async fn last_event_id(api: &Api) -> anyhow::Result<i64> {
    let mut after = 0;
    loop {
        let page = api.get(&format!("/v1/events?after={after}&limit=1000")).await?;
        let count = page.get("events").and_then(Value::as_array).map_or(0, Vec::len);
        after = page.get("last_id").and_then(Value::as_i64).unwrap_or(after);
        if count < 1000 {
            return Ok(after);
        }
    }
}

/// Prints the evacuation of `host` as it happens, one plain line per step on stderr (no
/// colours, no cursor movement: it reads the same in a terminal, a pipe or a log), until
/// the host is in Maintenance. An evacuation the manager gives up fails the command.
async fn follow_evacuation(api: &Api, host: &str, outcome: &Value, after: i64, limit: Duration) -> anyhow::Result<()> {
    let lines: Vec<String> = outcome
        .get("audit")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|line| line.as_str().map(str::to_owned))
        .collect();
    let entered = |line: &str| line.starts_with(&format!("{host} ")) && line.contains("-> Maintenance:");
    if lines.iter().any(|line| entered(line)) {
        eprintln!("maintenance {host}: no VM to move; in Maintenance");
        return Ok(());
    }
    // "moving N VMs off first, highest priority first: a, b"
    let total = lines.iter().find_map(|line| {
        let rest = line.split("moving ").nth(1)?;
        rest.split(' ').next()?.parse::<usize>().ok()
    });
    let Some(total) = total else {
        // Not an evacuation we can follow (already evacuating, or nothing was accepted).
        return Ok(());
    };
    if let Some(order) = lines.iter().find_map(|line| line.split("highest priority first: ").nth(1)) {
        eprintln!("maintenance {host}: moving {total} VMs off first: {order}");
    }
    let deadline = tokio::time::Instant::now() + limit;
    let mut after = after;
    let mut moved = 0;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            bail!(
                "maintenance {host}: stopped following after {}s with {moved} of {total} VMs moved; \
                 the evacuation goes on (`kvmha events --follow`)",
                limit.as_secs()
            );
        }
        let wait_ms = remaining.as_millis().min(u128::from(FOLLOW_WAIT_MS)) as u64;
        let page = api.get(&format!("/v1/events?after={after}&wait_ms={wait_ms}")).await?;
        after = page.get("last_id").and_then(Value::as_i64).unwrap_or(after);
        for event in page.get("events").and_then(Value::as_array).into_iter().flatten() {
            let line = text(event, "line");
            let ours = line.starts_with(&format!("{host} "));
            // A VM moved, or left the host without running elsewhere yet (it waits like
            // any HA restart): either way one step of the evacuation.
            let step_done = line.contains(" moved to ") || line.contains("left the host");
            if ours && line.contains(" Evacuation: ") && step_done {
                moved += 1;
                let step = line.split(" Evacuation: ").nth(1).unwrap_or_default();
                eprintln!("maintenance {host}: [{moved}/{total}] {step}");
            } else if entered(&line) {
                let detail = line.split("-> Maintenance: ").nth(1).unwrap_or_default();
                eprintln!("maintenance {host}: in Maintenance ({detail})");
                return Ok(());
            } else if line.contains(&format!("maintenance evacuation of {host} ")) && line.contains("stopped:") {
                bail!("maintenance {host}: evacuation stopped after {moved} of {total} VMs: {line}");
            }
        }
    }
}

pub fn cluster(api_args: ApiArgs, command: ClusterCommand) -> anyhow::Result<()> {
    let api = Api::new(&api_args)?;
    runtime()?.block_on(async {
        let path = match command {
            ClusterCommand::Disarm => "/v1/cluster/disarm",
            ClusterCommand::Arm => "/v1/cluster/arm",
        };
        let outcome = api.post(path, serde_json::json!({})).await?;
        print_outcome(&api, &outcome)
    })
}

pub fn events(api_args: ApiArgs, args: EventsArgs) -> anyhow::Result<()> {
    let api = Api::new(&api_args)?;
    runtime()?.block_on(async {
        let mut after = args.after;
        loop {
            let wait_ms = if args.follow { FOLLOW_WAIT_MS } else { 0 };
            let page = api.get(&format!("/v1/events?after={after}&wait_ms={wait_ms}")).await?;
            let events = page.get("events").and_then(Value::as_array).cloned().unwrap_or_default();
            for event in &events {
                if api.json {
                    println!("{}", serde_json::to_string(event)?);
                } else {
                    let at_ms = event.get("at_ms").and_then(Value::as_u64).unwrap_or(0);
                    println!("{:>6} {:>9.3}s {}", text(event, "id"), at_ms as f64 / 1000.0, text(event, "line"));
                }
            }
            after = page.get("last_id").and_then(Value::as_i64).unwrap_or(after);
            // A full page means more is waiting; otherwise stop unless following.
            if !args.follow && events.len() < 1000 {
                return Ok(());
            }
        }
    })
}
