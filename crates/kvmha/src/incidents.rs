//! `kvmha incident list|show ID`: the manager's incidents (`/v1/incidents`) in the
//! terminal, the same timeline the dashboard shows.

use crate::ops::{print_json, runtime, table, text, Api, ApiArgs};
use clap::Subcommand;
use serde_json::Value;

#[derive(Debug, Subcommand)]
pub enum IncidentCommand {
    /// Every incident, newest first.
    List,
    /// One incident's timeline.
    Show { id: i64 },
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn ms(value: &Value, key: &str) -> Option<u64> {
    value.get(key).and_then(Value::as_u64)
}

pub fn run(api_args: ApiArgs, command: IncidentCommand) -> anyhow::Result<()> {
    let api = Api::new(&api_args)?;
    runtime()?.block_on(async {
        match command {
            IncidentCommand::List => {
                let list = api.get("/v1/incidents").await?;
                if api.json {
                    return print_json(&list);
                }
                let rows = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|incident| {
                        let ongoing = incident.get("ended_at_ms").is_none_or(Value::is_null);
                        vec![
                            text(incident, "id"),
                            text(incident, "host"),
                            text(incident, "status"),
                            format!(
                                "{}{}",
                                seconds(ms(incident, "duration_ms").unwrap_or(0)),
                                if ongoing { "+" } else { "" }
                            ),
                            text(incident, "rounds"),
                            text(incident, "fence_attempts"),
                            format!("{}/{}", text(incident, "vms_running"), text(incident, "vms")),
                            text(incident, "summary"),
                        ]
                    })
                    .collect();
                table(&["ID", "HOST", "STATUS", "DURATION", "ROUNDS", "FENCES", "VMS BACK", "SUMMARY"], rows);
                Ok(())
            }
            IncidentCommand::Show { id } => {
                let incident = api.get(&format!("/v1/incidents/{id}")).await?;
                if api.json {
                    return print_json(&incident);
                }
                print!("{}", render(&incident));
                Ok(())
            }
        }
    })
}

/// The incident as terminal text: a header, the fence attempts, the VM restarts, then the
/// timeline with each verdict's findings under it.
pub fn render(incident: &Value) -> String {
    let mut out = String::new();
    let ongoing = incident.get("ended_at_ms").is_none_or(Value::is_null);
    out.push_str(&format!(
        "incident {} on {}: {}{}\n  {}\n",
        text(incident, "id"),
        text(incident, "host"),
        text(incident, "status"),
        if ongoing { " (ongoing)" } else { "" },
        text(incident, "summary"),
    ));
    out.push_str(&format!("  duration {}\n", seconds(ms(incident, "duration_ms").unwrap_or(0))));
    let opened = ms(incident, "opened_at_ms").unwrap_or(0);
    let fences = incident.get("fence_attempts").and_then(Value::as_array).cloned().unwrap_or_default();
    if !fences.is_empty() {
        out.push_str("\nfence attempts:\n");
        for attempt in &fences {
            let result = match attempt.get("confirmed_off").and_then(Value::as_bool) {
                Some(true) => "power off confirmed",
                Some(false) => "failed",
                None => "in flight",
            };
            out.push_str(&format!(
                "  {} {} at +{}: {} ({})\n",
                text(attempt, "attempt"),
                text(attempt, "request"),
                seconds(ms(attempt, "sent_at_ms").unwrap_or(opened).saturating_sub(opened)),
                result,
                text(attempt, "outcome"),
            ));
        }
    }
    let vms = incident.get("vms").and_then(Value::as_array).cloned().unwrap_or_default();
    if !vms.is_empty() {
        out.push_str("\nvm restarts:\n");
        for vm in &vms {
            let took = |key: &str| ms(vm, key).map(seconds).unwrap_or_else(|| "-".to_owned());
            out.push_str(&format!(
                "  {:<16} {:<14} on {:<12} start took {:<7} down for {}\n",
                text(vm, "vm"),
                text(vm, "state"),
                text(vm, "target"),
                took("start_ms"),
                took("recovery_ms"),
            ));
        }
    }
    out.push_str("\ntimeline:\n");
    for entry in incident.get("timeline").and_then(Value::as_array).into_iter().flatten() {
        out.push_str(&format!("  +{:>8}  {}\n", seconds(ms(entry, "offset_ms").unwrap_or(0)), text(entry, "text")));
        for finding in entry.get("findings").and_then(Value::as_array).into_iter().flatten() {
            out.push_str(&format!(
                "             {:<15} {:<8} {}\n",
                text(finding, "investigator"),
                text(finding, "finding"),
                text(finding, "evidence"),
            ));
        }
    }
    out
}
