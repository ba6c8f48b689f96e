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
    /// Take a host out of HA (on) or put it back (off).
    Maintenance {
        name: String,
        mode: OnOff,
    },
    /// Declare a host off after checking it yourself: its VMs may then start elsewhere.
    ConfirmDown {
        name: String,
    },
    Ha {
        name: String,
        mode: EnableDisable,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    List,
    Show { name: String },
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
            HostCommand::Maintenance { name, mode } => {
                let on = matches!(mode, OnOff::On);
                let outcome =
                    api.post(&format!("/v1/hosts/{name}/maintenance"), serde_json::json!({ "on": on })).await?;
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

pub fn vm(api_args: ApiArgs, command: VmCommand) -> anyhow::Result<()> {
    let api = Api::new(&api_args)?;
    runtime()?.block_on(async {
        let value = match &command {
            VmCommand::List => api.get("/v1/vms").await?,
            VmCommand::Show { name } => api.get(&format!("/v1/vms/{name}")).await?,
        };
        if api.json {
            return print_json(&value);
        }
        let vms: Vec<Value> = match value {
            Value::Array(vms) => vms,
            one => vec![one],
        };
        let rows = vms
            .iter()
            .map(|vm| {
                vec![text(vm, "name"), text(vm, "state"), age(vm, "state_for_ms"), text(vm, "host"), text(vm, "ha")]
            })
            .collect();
        table(&["NAME", "STATE", "FOR", "HOST", "HA"], rows);
        Ok(())
    })
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
