//! The dashboard's HTML (maud: every interpolated value is escaped).
//!
//! Plain documents that work without JavaScript; `static/live.js` only refreshes the
//! `<main>` element every few seconds. Every action is a link or a button, so Tab and
//! Enter reach everything; `accesskey`s jump to the overview (o) and incidents (i).

use super::{Frame, Viewer};
use crate::api::Role;
use crate::controller::{HostView, VmView};
use crate::incident::{EntryKind, Incident, IncidentStatus, VmRecovery};
use kvmha_core::{HostState, VmState};
use maud::{html, Markup, DOCTYPE};
use std::collections::BTreeMap;

/// A name as one URL path segment (host and VM names are plain, but never trust that).
pub(crate) fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn seconds(ms: u64) -> String {
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 120_000 {
        format!("{}s", ms / 1000)
    } else if ms < 7_200_000 {
        format!("{}m {}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h {}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// A wall-clock time (UTC) for people: `2026-11-25 14:03:07Z`.
fn wall(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000;
    let days = (seconds / 86_400) as i64;
    let (hour, minute, second) = ((seconds / 3600) % 24, (seconds / 60) % 60, seconds % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}Z")
}

fn host_class(state: HostState) -> &'static str {
    match state {
        HostState::Up => "ok",
        HostState::Connecting | HostState::Disconnected => "quiet",
        HostState::Suspect | HostState::Investigating => "warn",
        HostState::Degraded => "degraded",
        HostState::Fencing | HostState::FenceFailed => "bad",
        HostState::Fenced => "fenced",
        HostState::Maintenance => "maint",
    }
}

fn vm_class(state: VmState) -> &'static str {
    match state {
        VmState::Running => "ok",
        VmState::Starting | VmState::AwaitingProof => "warn",
        VmState::PendingCapacity => "degraded",
        VmState::Stopped => "quiet",
        VmState::Error => "bad",
    }
}

fn incident_class(status: IncidentStatus) -> &'static str {
    match status {
        IncidentStatus::Investigating | IncidentStatus::Fencing => "warn",
        IncidentStatus::FenceFailed => "bad",
        IncidentStatus::Recovering => "degraded",
        IncidentStatus::Recovered => "fenced",
        IncidentStatus::FalseAlarm | IncidentStatus::Resolved => "ok",
    }
}

fn layout(frame: Option<&Frame<'_>>, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · kvmha" }
                link rel="stylesheet" href="/static/kvmha.css";
                @if frame.is_some() {
                    script src="/static/live.js" defer {}
                    noscript { meta http-equiv="refresh" content="10"; }
                }
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    a.brand href="/" accesskey="o" { "kvmha" }
                    @if let Some(frame) = frame {
                        nav aria-label="main" {
                            a href="/" { "Overview" }
                            a href="/incidents" accesskey="i" {
                                "Incidents"
                                @if frame.open_incidents > 0 {
                                    " " span.badge.bad { (frame.open_incidents) " open" }
                                }
                            }
                        }
                        div.switches {
                            (flag("HA", frame.view.cluster_ha, true))
                            @if frame.view.disarmed { span.pill.bad { "DISARMED: nobody is fenced" } }
                            @if frame.view.storage_hold { span.pill.bad { "STORAGE HOLD" } }
                            @if frame.view.manager_isolated { span.pill.bad { "MANAGER ISOLATED" } }
                            span.meta { "profile " (frame.profile) " · cluster " (frame.cluster_id) }
                        }
                        div.who {
                            span.meta {
                                @match frame.viewer.role { Role::Operator => "operator", Role::ReadOnly => "read-only" }
                            }
                            @if let Some(csrf) = &frame.viewer.csrf {
                                form method="post" action="/logout" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    button type="submit" { "Log out" }
                                }
                            }
                        }
                    }
                }
                main #main tabindex="-1" {
                    @if let Some(message) = frame.and_then(|frame| frame.viewer.flash.as_deref()) {
                        p.flash role="status" { (message) }
                    }
                    (body)
                }
            }
        }
    }
}

fn flag(name: &str, on: bool, good_when_on: bool) -> Markup {
    let class = if on == good_when_on { "pill ok" } else { "pill bad" };
    html! { span class=(class) { (name) " " @if on { "on" } @else { "off" } } }
}

pub(crate) fn login(error: Option<&str>) -> Markup {
    layout(
        None,
        "Log in",
        html! {
            section.login {
                h1 { "Log in to kvmha" }
                p { "Paste an operator or read-only token (" code { "DIR/operator.token" } ", " code { "DIR/readonly.token" } ")." }
                @if let Some(error) = error { p.flash.bad role="alert" { (error) } }
                form method="post" action="/login" {
                    label for="token" { "Token" }
                    input #token type="password" name="token" autocomplete="off" required autofocus;
                    button type="submit" { "Log in" }
                }
            }
        },
    )
}

pub(crate) fn not_found(frame: &Frame<'_>, what: &str) -> Markup {
    layout(
        Some(frame),
        "Not found",
        html! { h1 { "Not found" } p { (what) } p { a href="/" { "Back to the overview" } } },
    )
}

fn storage_text(host: &HostView, pools: &[String]) -> (String, &'static str) {
    if pools.is_empty() && host.storage == "Ok" {
        return ("no pools".to_owned(), "quiet");
    }
    match host.storage.as_str() {
        "Ok" => (format!("ok ({})", pools.join(", ")), "ok"),
        "AllFailing" => ("all pools failing".to_owned(), "bad"),
        other => (other.replace("Degraded { failing: ", "failing ").replace(" }", ""), "degraded"),
    }
}

pub(crate) fn overview(
    frame: &Frame<'_>,
    incidents: &[Incident],
    drivers: &BTreeMap<String, String>,
    pools: &BTreeMap<String, Vec<String>>,
) -> Markup {
    let view = frame.view;
    let open: Vec<&Incident> = incidents.iter().rev().filter(|incident| incident.status.is_open()).collect();
    let recent: Vec<&Incident> = incidents.iter().rev().filter(|incident| !incident.status.is_open()).take(5).collect();
    let body = html! {
        h1 { "Cluster overview" }
        p.summary {
            (view.hosts.len()) " hosts: "
            @for state in HostState::ALL {
                @let count = view.hosts.iter().filter(|host| host.state == state).count();
                @if count > 0 { span class=(format!("pill {}", host_class(state))) { (count) " " (state.name()) } " " }
            }
            " · " (view.vms.len()) " VMs" @if !view.vms.is_empty() { ": " }
            @for state in [VmState::Running, VmState::Starting, VmState::AwaitingProof, VmState::PendingCapacity, VmState::Stopped, VmState::Error] {
                @let count = view.vms.iter().filter(|vm| vm.state == state).count();
                @if count > 0 { span class=(format!("pill {}", vm_class(state))) { (count) " " (state.name()) } " " }
            }
        }
        @if !open.is_empty() {
            section.open aria-label="open incidents" {
                h2 { "Open incidents" }
                ul.incidents { @for incident in &open { li { (incident_link(incident, view.now_ms)) } } }
            }
        }
        section aria-label="hosts" {
            h2 { "Hosts" }
            ul.tiles {
                @for host in &view.hosts {
                    @let vms = view.vms.iter().filter(|vm| vm.host.as_deref() == Some(host.name.as_str())).count();
                    @let host_pools = pools.get(&host.name).cloned().unwrap_or_default();
                    @let (storage, storage_class) = storage_text(host, &host_pools);
                    li class=(format!("tile {}", host_class(host.state))) data-host=(host.name) data-state=(host.state.name()) {
                        a href=(format!("/hosts/{}", path_segment(&host.name))) {
                            span.name { (host.name) }
                            span.state { (host.state.name()) }
                            span.for { "for " (seconds(host.state_for_ms)) }
                        }
                        dl {
                            dt { "VMs" } dd { (vms) }
                            dt { "Free" } dd { (host.capacity.cpus.saturating_sub(host.used.cpus)) " CPU · " (host.capacity.memory_mb.saturating_sub(host.used.memory_mb)) " MB" }
                            dt { "BMC" } dd {
                                @match drivers.get(&host.name) { Some(driver) => (driver), None => @if host.has_bmc { "yes" } @else { "none" } }
                            }
                            dt { "Storage" } dd class=(storage_class) { (storage) }
                            dt { "Last ping" } dd { @match host.last_ping_ms_ago { Some(ms) => { (seconds(ms)) " ago" }, None => "never" } }
                            @if !host.ha_enabled { dt { "HA" } dd.bad { "off" } }
                        }
                    }
                }
            }
            @if view.hosts.is_empty() { p { "No host has joined yet: " code { "kvmha agent join" } "." } }
        }
        @if !recent.is_empty() {
            section aria-label="recent incidents" {
                h2 { "Recent incidents" }
                ul.incidents { @for incident in &recent { li { (incident_link(incident, view.now_ms)) } } }
            }
        }
        section aria-label="virtual machines" {
            h2 { "VMs" }
            (vm_table(&view.vms))
        }
    };
    layout(Some(frame), "Overview", body)
}

fn vm_table(vms: &[VmView]) -> Markup {
    html! {
        @if vms.is_empty() { p { "No VM is known." } } @else {
            table {
                thead { tr { th { "VM" } th { "State" } th { "For" } th { "Host" } th { "HA" } th { "Priority" } } }
                tbody {
                    @for vm in vms {
                        tr {
                            td { a href=(format!("/vms/{}", path_segment(&vm.name))) { (vm.name) } }
                            td { span class=(format!("pill {}", vm_class(vm.state))) { (vm.state.name()) } }
                            td { (seconds(vm.state_for_ms)) }
                            td { @match &vm.host { Some(host) => a href=(format!("/hosts/{}", path_segment(host))) { (host) }, None => "-" } }
                            td { @if vm.ha { "on" } @else { "off" } }
                            td { (vm.priority) }
                        }
                    }
                }
            }
        }
    }
}

fn incident_link(incident: &Incident, now_ms: u64) -> Markup {
    html! {
        a href=(format!("/incidents/{}", incident.id)) {
            span class=(format!("pill {}", incident_class(incident.status))) { (incident.status.name()) }
            " " strong { (incident.host) } " · " (wall(incident.opened_unix_ms)) " · " (seconds(incident.duration_ms(now_ms)))
        }
        " " span.meta { (incident.summary) }
    }
}

pub(crate) fn incident_list(frame: &Frame<'_>, incidents: &[Incident]) -> Markup {
    let now_ms = frame.view.now_ms;
    let body = html! {
        h1 { "Incidents" }
        @if incidents.is_empty() { p { "No host has failed yet." } } @else {
            table {
                thead { tr { th { "#" } th { "Host" } th { "Status" } th { "Opened" } th { "Duration" } th { "Rounds" } th { "Fences" } th { "VMs back" } th { "Summary" } } }
                tbody {
                    @for incident in incidents.iter().rev() {
                        tr {
                            td { a href=(format!("/incidents/{}", incident.id)) { (incident.id) } }
                            td { (incident.host) }
                            td { span class=(format!("pill {}", incident_class(incident.status))) { (incident.status.name()) } }
                            td { (wall(incident.opened_unix_ms)) }
                            td { (seconds(incident.duration_ms(now_ms))) @if incident.ended_at_ms.is_none() { " …" } }
                            td { (incident.rounds) }
                            td { (incident.fence_attempts.len()) }
                            td { (incident.vms.iter().filter(|vm| vm.state == VmRecovery::Running).count()) "/" (incident.vms.iter().filter(|vm| vm.state != VmRecovery::NotRestarted).count()) }
                            td { (incident.summary) }
                        }
                    }
                }
            }
        }
    };
    layout(Some(frame), "Incidents", body)
}

fn entry_class(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::HostState => "state",
        EntryKind::Investigation => "round",
        EntryKind::Verdict => "verdict",
        EntryKind::FenceIntent | EntryKind::FenceOutcome => "fence",
        EntryKind::VmReleased | EntryKind::VmStartIntent | EntryKind::VmStartOutcome | EntryKind::VmState => "vm",
        EntryKind::Alert => "alert",
        EntryKind::Operator => "operator",
    }
}

pub(crate) fn incident(frame: &Frame<'_>, incident: &Incident) -> Markup {
    let now_ms = frame.view.now_ms;
    let body = html! {
        h1 {
            "Incident " (incident.id) ": " (incident.host) " "
            span class=(format!("pill {}", incident_class(incident.status))) { (incident.status.name()) }
        }
        p.summary { (incident.summary) }
        dl.facts {
            dt { "Opened" } dd { (wall(incident.opened_unix_ms)) }
            dt { "Duration" } dd { (seconds(incident.duration_ms(now_ms))) @if incident.ended_at_ms.is_none() { " (ongoing)" } }
            dt { "Host now in incident" } dd { (incident.host_state.name()) }
            dt { "Investigation rounds" } dd { (incident.rounds) }
            @if let Some(proof) = &incident.proof { dt { "Proof" } dd { (proof) } }
        }
        @if !incident.fence_attempts.is_empty() {
            section aria-label="fence attempts" {
                h2 { "Fence attempts" }
                table {
                    thead { tr { th { "Attempt" } th { "Request" } th { "Sent at" } th { "Why" } th { "Read-back" } } }
                    tbody {
                        @for attempt in &incident.fence_attempts {
                            tr {
                                td { (attempt.attempt) }
                                td { (attempt.request) }
                                td { "+" (seconds(attempt.sent_at_ms.saturating_sub(incident.opened_at_ms))) }
                                td { (attempt.why) }
                                td {
                                    @match attempt.confirmed_off {
                                        Some(true) => span.pill.ok { "power off confirmed" },
                                        Some(false) => span.pill.bad { "failed" },
                                        None => span.pill.warn { "in flight" },
                                    }
                                    @if let Some(outcome) = &attempt.outcome { " " (outcome) }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if !incident.vms.is_empty() {
            section aria-label="vm restarts" {
                h2 { "VM restarts" }
                table {
                    thead { tr { th { "VM" } th { "State" } th { "Target host" } th { "Starts sent" } th { "Start took" } th { "Down for (from suspect)" } } }
                    tbody {
                        @for restart in &incident.vms {
                            tr {
                                td { a href=(format!("/vms/{}", path_segment(&restart.vm))) { (restart.vm) } }
                                td { (format!("{:?}", restart.state)) }
                                td { @match &restart.target { Some(target) => (target), None => "-" } }
                                td { (restart.start_attempts) }
                                td { @match restart.start_ms { Some(ms) => (seconds(ms)), None => "-" } }
                                td { @match restart.recovery_ms { Some(ms) => (seconds(ms)), None => "-" } }
                            }
                        }
                    }
                }
            }
        }
        section aria-label="timeline" {
            h2 { "Timeline" }
            ol.timeline {
                @for entry in &incident.timeline {
                    li class=(entry_class(entry.kind)) data-kind=(format!("{:?}", entry.kind)) {
                        span.offset { "+" (seconds(entry.offset_ms)) }
                        span.text {
                            @if let Some(verdict) = &entry.verdict {
                                span class=(format!("pill verdict-{}", verdict.to_lowercase())) { (verdict) } " "
                            }
                            (entry.text)
                        }
                        @if !entry.findings.is_empty() {
                            table.findings {
                                thead { tr { th { "Investigator" } th { "Finding" } th { "Evidence" } } }
                                tbody {
                                    @for finding in &entry.findings {
                                        tr {
                                            td { (finding.investigator) }
                                            td { span class=(format!("pill verdict-{}", finding.finding)) { (finding.finding) } }
                                            td { (finding.evidence) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        p { a href="/incidents" { "All incidents" } }
    };
    layout(Some(frame), &format!("Incident {} on {}", incident.id, incident.host), body)
}

fn switch_form(viewer: &Viewer, host: &str, what: &str, label: &str, to: bool) -> Markup {
    html! {
        @if let (Role::Operator, Some(csrf)) = (viewer.role, &viewer.csrf) {
            form.switch method="post" action=(format!("/hosts/{}/{what}", path_segment(host))) {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="to" value=(if to { "on" } else { "off" });
                button type="submit" { (label) }
            }
        }
    }
}

pub(crate) fn host(
    frame: &Frame<'_>,
    host: &HostView,
    incidents: &[&Incident],
    driver: Option<&str>,
    pools: &[String],
) -> Markup {
    let vms: Vec<VmView> =
        frame.view.vms.iter().filter(|vm| vm.host.as_deref() == Some(host.name.as_str())).cloned().collect();
    let (storage, storage_class) = storage_text(host, pools);
    let viewer = frame.viewer;
    let body = html! {
        h1 { "Host " (host.name) " " span class=(format!("pill {}", host_class(host.state))) { (host.state.name()) } }
        dl.facts {
            dt { "In this state for" } dd { (seconds(host.state_for_ms)) }
            dt { "HA" } dd { @if host.ha_enabled { "on" } @else { "off" } }
            dt { "Last ping" } dd { @match host.last_ping_ms_ago { Some(ms) => { (seconds(ms)) " ago" }, None => "never" } }
            dt { "Boot" } dd { @match &host.boot_id { Some(boot) => (boot), None => "-" } }
            dt { "Agent address" } dd { @match &host.address { Some(address) => (address), None => "-" } }
            dt { "BMC" } dd { @match driver { Some(driver) => (driver), None => @if host.has_bmc { "yes" } @else { "none: lease expiry or an operator must prove it dead" } } }
            dt { "Storage" } dd class=(storage_class) { (storage) }
            dt { "Capacity" } dd { (host.capacity.cpus) " CPU · " (host.capacity.memory_mb) " MB; used " (host.used.cpus) " CPU · " (host.used.memory_mb) " MB" }
            @if let Some(proof) = &host.proof { dt { "Proof" } dd { (proof) } }
        }
        @if viewer.role == Role::Operator && viewer.csrf.is_some() {
            section.actions aria-label="switches" {
                h2 { "Switches" }
                @if host.state == HostState::Maintenance {
                    (switch_form(viewer, &host.name, "maintenance", "End maintenance", false))
                } @else {
                    (switch_form(viewer, &host.name, "maintenance", "Start maintenance", true))
                }
                @if host.ha_enabled {
                    (switch_form(viewer, &host.name, "ha", "Switch HA off for this host", false))
                } @else {
                    (switch_form(viewer, &host.name, "ha", "Switch HA on for this host", true))
                }
            }
        }
        section aria-label="vms on this host" { h2 { "VMs" } (vm_table(&vms)) }
        section aria-label="incidents of this host" {
            h2 { "Incidents" }
            @if incidents.is_empty() { p { "None." } } @else {
                ul.incidents { @for incident in incidents { li { (incident_link(incident, frame.view.now_ms)) } } }
            }
        }
    };
    layout(Some(frame), &format!("Host {}", host.name), body)
}

pub(crate) fn vm(frame: &Frame<'_>, vm: &VmView, incidents: &[&Incident]) -> Markup {
    let body = html! {
        h1 { "VM " (vm.name) " " span class=(format!("pill {}", vm_class(vm.state))) { (vm.state.name()) } }
        dl.facts {
            dt { "In this state for" } dd { (seconds(vm.state_for_ms)) }
            dt { "Host" } dd { @match &vm.host { Some(host) => a href=(format!("/hosts/{}", path_segment(host))) { (host) }, None => "-" } }
            dt { "HA" } dd { @if vm.ha { "on" } @else { "off" } }
            dt { "Priority" } dd { (vm.priority) }
        }
        section aria-label="incidents of this vm" {
            h2 { "Incidents" }
            @if incidents.is_empty() { p { "None." } } @else {
                ul.incidents { @for incident in incidents { li { (incident_link(incident, frame.view.now_ms)) } } }
            }
        }
    };
    layout(Some(frame), &format!("VM {}", vm.name), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_and_durations_read_right() {
        assert_eq!(wall(0), "1970-01-01 00:00:00Z");
        assert_eq!(wall(1_795_000_000_000), "2026-11-18 11:06:40Z");
        assert_eq!(wall(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(seconds(1_500), "1.5s");
        assert_eq!(seconds(75_000), "75s");
        assert_eq!(seconds(3_725_000), "62m 5s");
    }

    #[test]
    fn names_are_escaped_in_urls_and_markup() {
        assert_eq!(path_segment("host-1.a"), "host-1.a");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
        let markup = login(Some("<script>")).into_string();
        assert!(markup.contains("&lt;script&gt;"), "{markup}");
    }
}
