//! The dashboard, metrics and incidents against a real manager with real agents, looked at
//! through headless Chromium (Debian's `chromium`, scripts/setup.sh) driven over the
//! DevTools protocol, through a Prometheus text-format parser, and through the CLI.
//!
//! Screenshots land in `target/browser-artifacts/` (CI keeps them as artifacts).
//! Tests assert what is shown, never durations: every wait is a bounded poll.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/browser-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

// ----- a small DevTools-protocol client -------------------------------------------------------

/// Headless Chromium in its own process group with a private profile (and HOME, so its
/// crash handler's files are there too). On drop the group is killed, then every process
/// whose command line names the profile (the crash handlers leave the group).
struct ChromiumProcess {
    child: Child,
    profile: tempfile::TempDir,
}

impl Drop for ChromiumProcess {
    fn drop(&mut self) {
        // The group is chromium's own (process_group(0)) and still reserved: the leader
        // is not reaped before the wait below. Never our own group, never 0 or 1.
        let group = self.child.id() as i32;
        if group > 1 && group != nix::unistd::getpgrp().as_raw() {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(group), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let marker = self.profile.path().to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&marker) {
                if let Some(process) = Recorded::of(pid as i32) {
                    process.kill();
                }
            }
        }
    }
}

struct Browser {
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next_id: u64,
    // Last: the socket closes before the process goes.
    _process: ChromiumProcess,
}

/// A plain GET to the DevTools HTTP endpoint; `None` while it is not serving yet.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").ok()?;
    // Chromium keeps the connection open: read the headers, then Content-Length bytes.
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    let header_end = loop {
        let length = stream.read(&mut buffer).ok()?;
        if length == 0 {
            return None;
        }
        received.extend_from_slice(&buffer[..length]);
        if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let headers = String::from_utf8_lossy(&received[..header_end]).to_lowercase();
    let content_length: usize = headers
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())?;
    while received.len() < header_end + content_length {
        let length = stream.read(&mut buffer).ok()?;
        if length == 0 {
            return None;
        }
        received.extend_from_slice(&buffer[..length]);
    }
    Some(String::from_utf8_lossy(&received[header_end..header_end + content_length]).into_owned())
}

impl Browser {
    fn start() -> Browser {
        use std::os::unix::process::CommandExt;
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1440,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .env("HOME", profile.path())
            .env("XDG_CONFIG_HOME", profile.path())
            .env("XDG_CACHE_HOME", profile.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromium (scripts/setup.sh installs Debian's chromium)");
        let process = ChromiumProcess { child, profile };
        let port_file = process.profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + WAIT_LIMIT;
        let port: u16 = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|text| text.lines().next().and_then(|line| line.trim().parse().ok()))
            {
                break port;
            }
            assert!(Instant::now() < deadline, "chromium never opened its DevTools port");
            std::thread::sleep(POLL);
        };
        let page_url = loop {
            let targets: Value =
                http_get(port, "/json/list").and_then(|body| serde_json::from_str(&body).ok()).unwrap_or(Value::Null);
            let page = targets.as_array().into_iter().flatten().find(|target| target["type"] == "page");
            if let Some(url) = page.and_then(|page| page["webSocketDebuggerUrl"].as_str()) {
                break url.to_owned();
            }
            assert!(Instant::now() < deadline, "chromium shows no page target: {targets}");
            std::thread::sleep(POLL);
        };
        let (socket, _) = tungstenite::connect(page_url.as_str()).expect("devtools websocket");
        if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
        }
        Browser { socket, next_id: 0, _process: process }
    }

    /// One DevTools command; its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params).unwrap_or_else(|error| panic!("{method} failed: {error}"))
    }

    /// A command that may fail (e.g. an evaluation while a navigation replaces the page).
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({ "id": id, "method": method, "params": params });
        self.socket.send(tungstenite::Message::text(message.to_string())).expect("devtools send");
        loop {
            let reply = self.socket.read().expect("devtools read");
            let tungstenite::Message::Text(text) = reply else { continue };
            let value: Value = serde_json::from_str(text.as_str()).expect("devtools json");
            if value["id"] == id {
                return match value.get("error") {
                    Some(error) => Err(error.clone()),
                    None => Ok(value["result"].clone()),
                };
            }
        }
    }

    fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression).unwrap_or_else(|| panic!("evaluating {expression} failed"))
    }

    /// `None` when the page was being replaced or the expression threw.
    fn try_eval(&mut self, expression: &str) -> Option<Value> {
        let result = self
            .try_call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .ok()?;
        if result.get("exceptionDetails").is_some() {
            return None;
        }
        Some(result["result"]["value"].clone())
    }

    /// Navigates and waits until the document at `url` (or where it redirected) is loaded.
    fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_loaded();
    }

    fn wait_loaded(&mut self) {
        self.wait("the page loads", |browser| {
            browser.try_eval("document.readyState").is_some_and(|state| state == "complete")
        });
    }

    fn wait(&mut self, what: &str, mut condition: impl FnMut(&mut Browser) -> bool) {
        let deadline = Instant::now() + WAIT_LIMIT;
        while !condition(self) {
            if Instant::now() > deadline {
                let text = self.try_eval("document.body ? document.body.innerText : ''").unwrap_or_default();
                panic!("timed out waiting for {what}; page text:\n{text}");
            }
            std::thread::sleep(POLL);
        }
    }

    fn path(&mut self) -> String {
        self.eval("location.pathname").as_str().unwrap_or_default().to_owned()
    }

    fn text(&mut self) -> String {
        self.eval("document.body.innerText").as_str().unwrap_or_default().to_owned()
    }

    fn key(&mut self, key: &str, code: &str, key_code: u32, text: Option<&str>) {
        let mut down = json!({ "type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": key_code });
        if let Some(text) = text {
            down["text"] = json!(text);
        }
        self.call("Input.dispatchKeyEvent", down);
        self.call(
            "Input.dispatchKeyEvent",
            json!({ "type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": key_code }),
        );
    }

    fn screenshot(&mut self, name: &str, width: u32, height: u32) -> PathBuf {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }));
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = artifacts().join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |byte: u8| -> u32 {
        match byte {
            b'A'..=b'Z' => (byte - b'A') as u32,
            b'a'..=b'z' => (byte - b'a' + 26) as u32,
            b'0'..=b'9' => (byte - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            other => panic!("not base64: {other}"),
        }
    };
    let bytes: Vec<u8> = text.bytes().filter(|byte| *byte != b'=' && !byte.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut accumulator = 0u32;
        for (index, byte) in chunk.iter().enumerate() {
            accumulator |= value(*byte) << (18 - 6 * index);
        }
        let produced = chunk.len() * 6 / 8;
        for index in 0..produced {
            out.push((accumulator >> (16 - 8 * index)) as u8);
        }
    }
    out
}

// ----- the cluster ------------------------------------------------------------------------------

/// Three agents Up; host3 has an IPMI BMC (ipmi_sim) and is advertised at an address where
/// nothing answers, so once its agent dies only the BMC can tell (as in daemons.rs).
struct BmcCluster {
    cluster: Cluster,
    bmc: kvmha_bmc::sim::IpmiSim,
    _silent: SilentAddress,
}

fn bmc_cluster() -> BmcCluster {
    let bmc = kvmha_bmc::sim::IpmiSim::start(true).expect("ipmi_sim (scripts/setup.sh installs openipmi)");
    let mut cluster = Cluster::init();
    cluster.add_ipmi_bmc("host3", &bmc);
    cluster.start_manager();
    cluster.join("host1");
    cluster.join("host2");
    let silent = SilentAddress::new();
    cluster.join_with("host3", &["--advertise", &silent.address.to_string()]);
    for name in ["host1", "host2", "host3"] {
        cluster.start_agent(name);
    }
    for name in ["host1", "host2", "host3"] {
        cluster.wait_state(name, &["Up"]);
    }
    BmcCluster { cluster, bmc, _silent: silent }
}

/// Samples by (metric name, sorted labels).
type Samples = BTreeMap<(String, Vec<(String, String)>), f64>;

/// `/metrics` parsed by a Prometheus text-format parser.
fn scrape(cluster: &Cluster, token: &str) -> Samples {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, content_type, text) = runtime.block_on(async {
        let response = reqwest::Client::new()
            .get(format!("{}/metrics", cluster.api_url))
            .bearer_auth(token)
            .send()
            .await
            .expect("scrape");
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        (response.status().as_u16(), content_type, response.text().await.unwrap())
    });
    assert_eq!(status, 200, "{text}");
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    let mut samples = BTreeMap::new();
    for sample in scrape.samples {
        let mut labels: Vec<(String, String)> =
            sample.labels.iter().map(|(key, value)| (key.clone(), value.clone())).collect();
        labels.sort();
        let value = match sample.value {
            prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Untyped(value) => value,
            prometheus_parse::Value::Histogram(buckets) => {
                for bucket in buckets {
                    samples.insert(
                        (format!("{}_bucket", sample.metric), vec![("le".to_owned(), bucket.less_than.to_string())]),
                        bucket.count,
                    );
                }
                continue;
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        samples.insert((sample.metric.clone(), labels), value);
    }
    samples
}

fn metric(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut key: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    key.sort();
    *samples.get(&(name.to_owned(), key)).unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

fn dashboard_url(cluster: &Cluster) -> String {
    let log = cluster.manager.as_ref().expect("manager").log_text();
    let line = log.lines().find(|line| line.starts_with("dashboard: ")).expect("the manager prints `dashboard: URL`");
    let url = line.trim_start_matches("dashboard: ").trim().to_owned();
    assert_eq!(url, format!("{}/", cluster.api_url), "the printed URL is the API listener");
    url
}

fn tiles(browser: &mut Browser) -> BTreeMap<String, String> {
    let value = browser.eval(
        "JSON.stringify([...document.querySelectorAll('li.tile')].map(tile => [tile.dataset.host, tile.dataset.state]))",
    );
    let pairs: Vec<(String, String)> = serde_json::from_str(value.as_str().unwrap_or("[]")).unwrap();
    pairs.into_iter().collect()
}

#[test]
fn a_host_fenced_through_its_bmc_shows_in_the_browser_in_metrics_and_in_the_cli_as_one_incident() {
    let BmcCluster { mut cluster, bmc, _silent } = bmc_cluster();
    let url = dashboard_url(&cluster);

    // Metrics before: every host Up, every state written, three agent sessions.
    let samples = scrape(&cluster, &cluster.readonly_token);
    assert_eq!(metric(&samples, "kvmha_hosts", &[("state", "Up")]), 3.0);
    for state in kvmha_core::HostState::ALL.iter().filter(|state| **state != kvmha_core::HostState::Up) {
        assert_eq!(metric(&samples, "kvmha_hosts", &[("state", state.name())]), 0.0, "{state}");
    }
    assert_eq!(metric(&samples, "kvmha_agent_sessions", &[]), 3.0);
    assert_eq!(metric(&samples, "kvmha_fence_attempts_total", &[("driver", "ipmi")]), 0.0);

    let mut browser = Browser::start();
    // Without a session the dashboard asks for a token; it is typed, and Enter sends it.
    browser.open(&url);
    assert_eq!(browser.path(), "/login");
    browser.wait("the token field has the focus", |browser| {
        browser.try_eval("document.activeElement.id").is_some_and(|id| id == "token")
    });
    browser.call("Input.insertText", json!({ "text": cluster.operator_token }));
    browser.key("Enter", "Enter", 13, Some("\r"));
    browser.wait("the overview after login", |browser| {
        browser.try_eval("document.readyState === 'complete' && location.pathname").is_some_and(|path| path == "/")
    });
    let cookie = browser.eval("document.cookie");
    assert_eq!(cookie, "", "the session cookie is HttpOnly: scripts cannot read it");
    assert_eq!(
        tiles(&mut browser),
        BTreeMap::from([("host1".into(), "Up".into()), ("host2".into(), "Up".into()), ("host3".into(), "Up".into())])
    );
    let text = browser.text();
    assert!(text.contains("ipmi"), "host3's BMC driver is on its tile: {text}");
    assert!(!text.contains(&cluster.operator_token), "the token is rendered");
    // The keyboard reaches the page: the first Tab lands on the skip link.
    browser.key("Tab", "Tab", 9, None);
    assert_eq!(browser.eval("document.activeElement.textContent"), "Skip to content");
    browser.screenshot("overview-all-up.png", 1440, 900);

    // Break host3: its agent dies; only its BMC can prove it dead.
    browser.call("Runtime.evaluate", json!({ "expression": "document.activeElement.blur()" }));
    cluster.agents.get_mut("host3").expect("host3").kill();
    cluster.wait_state("host3", &["Fenced"]);
    assert!(!bmc.script_power(), "host3 is Fenced but its chassis is still on");
    // The open page follows without a reload.
    browser.wait("the host3 tile turns Fenced by itself", |browser| {
        tiles(browser).get("host3").map(String::as_str) == Some("Fenced")
    });
    browser.screenshot("overview-host3-fenced.png", 1440, 900);
    browser.screenshot("overview-wall-screen.png", 2560, 1440);

    // The incident: from the overview's link to the timeline.
    let incidents = cluster.try_api(&["incident", "list", "--json"]).expect("incident list");
    let incidents = incidents.as_array().expect("a list");
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    let id = incidents[0]["id"].as_i64().expect("id");
    assert_eq!(incidents[0]["host"], "host3");
    assert_eq!(incidents[0]["status"], "recovered", "fenced and no VM to wait for: {incidents:#?}");
    browser.open(&format!("{url}incidents/{id}"));
    let text = browser.text();
    // The BMC of a host whose agent died still reads "power on" (the machine runs): two
    // Unknown rounds, then the fence, whose read-back is the proof.
    for needle in ["Incident", "host3", "recovered", "Suspect", "Unknown", "bmc", "power off confirmed", "FenceIntent"]
    {
        assert!(text.contains(needle), "the incident page lacks {needle:?}:\n{text}");
    }
    let kinds =
        browser.eval("JSON.stringify([...document.querySelectorAll('ol.timeline li')].map(li => li.dataset.kind))");
    let kinds: Vec<String> = serde_json::from_str(kinds.as_str().unwrap()).unwrap();
    let first =
        |kind: &str| kinds.iter().position(|seen| seen == kind).unwrap_or_else(|| panic!("no {kind}: {kinds:?}"));
    assert!(first("HostState") < first("Verdict"));
    assert!(first("Verdict") < first("FenceIntent"));
    assert!(first("FenceIntent") < first("FenceOutcome"));
    let findings = browser.eval(
        "JSON.stringify([...document.querySelectorAll('table.findings tbody tr')].map(tr => tr.cells[0].innerText + '=' + tr.cells[1].innerText))",
    );
    let findings: Vec<String> = serde_json::from_str(findings.as_str().unwrap()).unwrap();
    assert!(findings.contains(&"bmc=unknown".to_owned()), "{findings:?}");
    assert!(findings.iter().any(|finding| finding.starts_with("neighbour-ping=")), "{findings:?}");
    browser.screenshot("incident-host3.png", 1440, 900);

    // The terminal shows the same timeline.
    let output = cluster.api_output(&["incident", "show", &id.to_string()], &cluster.readonly_token);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let shown = String::from_utf8_lossy(&output.stdout);
    for needle in
        ["incident", "host3", "recovered", "fence attempts:", "power off confirmed", "bmc", "unknown", "timeline:"]
    {
        assert!(shown.contains(needle), "`incident show` lacks {needle:?}:\n{shown}");
    }

    // Metrics after: one host Fenced, its fence counted under its driver.
    let samples = scrape(&cluster, &cluster.readonly_token);
    assert_eq!(metric(&samples, "kvmha_hosts", &[("state", "Up")]), 2.0);
    assert_eq!(metric(&samples, "kvmha_hosts", &[("state", "Fenced")]), 1.0);
    assert_eq!(metric(&samples, "kvmha_agent_sessions", &[]), 2.0);
    assert!(metric(&samples, "kvmha_fence_attempts_total", &[("driver", "ipmi")]) >= 1.0);
    assert!(metric(&samples, "kvmha_fence_outcomes_total", &[("driver", "ipmi"), ("outcome", "confirmed")]) >= 1.0);
    assert!(metric(&samples, "kvmha_investigations_total", &[("verdict", "unknown")]) >= 2.0);
    assert_eq!(metric(&samples, "kvmha_investigations_total", &[("verdict", "alive")]), 0.0);
    assert_eq!(metric(&samples, "kvmha_incidents", &[("status", "recovered")]), 1.0);
    assert!(metric(&samples, "kvmha_host_ping_age_seconds", &[("host", "host1")]) >= 0.0);

    // An operator switch from the browser, by keyboard: maintenance on host1.
    browser.open(&format!("{url}hosts/host1"));
    browser.eval(
        "[...document.querySelectorAll('form.switch button')].find(b => b.textContent === 'Start maintenance').focus()",
    );
    browser.key("Enter", "Enter", 13, Some("\r"));
    cluster.wait_state("host1", &["Maintenance"]);
    browser.wait("the outcome is shown", |browser| {
        browser
            .try_eval("document.readyState === 'complete' && document.body.innerText")
            .is_some_and(|text| text.as_str().is_some_and(|text| text.contains("operator-session")))
    });
    browser.screenshot("host1-maintenance.png", 1440, 900);
    let log = cluster.manager.as_ref().expect("manager").log_text();
    for secret in [&cluster.operator_token, &cluster.readonly_token] {
        assert!(!log.contains(secret.as_str()), "a token is in the manager's log");
    }
}

/// A session cookie and its CSRF token, from `POST /login` (no browser needed).
fn login(client: &reqwest::Client, cluster: &Cluster, token: &str) -> (u16, Option<String>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let response =
            client.post(format!("{}/login", cluster.api_url)).form(&[("token", token)]).send().await.expect("login");
        let cookie = response
            .headers()
            .get("set-cookie")
            .map(|value| value.to_str().unwrap().to_owned())
            .inspect(|cookie| {
                for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
                    assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
                }
            })
            .map(|cookie| cookie.split(';').next().unwrap().to_owned());
        (response.status().as_u16(), cookie)
    })
}

fn get_page(client: &reqwest::Client, cluster: &Cluster, path: &str, cookie: Option<&str>) -> (u16, String) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut request = client.get(format!("{}{path}", cluster.api_url));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.expect("get");
        (response.status().as_u16(), response.text().await.unwrap())
    })
}

fn post_form(client: &reqwest::Client, cluster: &Cluster, path: &str, cookie: &str, form: &[(&str, &str)]) -> u16 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let response = client
            .post(format!("{}{path}", cluster.api_url))
            .header("cookie", cookie)
            .form(form)
            .send()
            .await
            .expect("post");
        response.status().as_u16()
    })
}

fn csrf_of(page: &str) -> Option<String> {
    let start = page.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(page[start..].split('"').next()?.to_owned())
}

#[test]
fn sessions_carry_the_role_of_their_token_and_forms_need_their_csrf_token() {
    let cluster = Cluster::three_up();
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    let (status, cookie) = login(&client, &cluster, "not-a-token");
    assert_eq!((status, cookie), (401, None));
    let (status, page) = get_page(&client, &cluster, "/", None);
    assert_eq!(status, 303, "no session: to the login form ({page})");
    let (status, _) = get_page(&client, &cluster, "/v1/incidents", None);
    assert_eq!(status, 401);
    let (status, _) = get_page(&client, &cluster, "/metrics", None);
    assert_eq!(status, 401, "metrics need a token (a read-only one is enough)");

    // Read-only: sees everything, gets no switch, and a forged switch is refused.
    let (status, readonly) = login(&client, &cluster, &cluster.readonly_token);
    assert_eq!(status, 303);
    let readonly = readonly.expect("a cookie");
    let (status, page) = get_page(&client, &cluster, "/hosts/host1", Some(&readonly));
    assert_eq!(status, 200);
    assert!(page.contains("host1") && !page.contains("Start maintenance"), "{page}");
    assert!(!page.contains(&cluster.readonly_token) && !page.contains(readonly.split('=').nth(1).unwrap()));
    let csrf = csrf_of(&page).expect("the logout form's csrf");
    let status = post_form(&client, &cluster, "/hosts/host1/maintenance", &readonly, &[("csrf", &csrf), ("to", "on")]);
    assert_eq!(status, 403);

    // Operator: the switch is there; without its CSRF token it is refused, with it done.
    let (_, operator) = login(&client, &cluster, &cluster.operator_token);
    let operator = operator.expect("a cookie");
    let (_, page) = get_page(&client, &cluster, "/hosts/host2", Some(&operator));
    assert!(page.contains("Start maintenance"), "{page}");
    let csrf = csrf_of(&page).expect("csrf");
    let status =
        post_form(&client, &cluster, "/hosts/host2/maintenance", &operator, &[("csrf", "forged"), ("to", "on")]);
    assert_eq!(status, 403);
    assert_eq!(cluster.states()["host2"], "Up");
    let status = post_form(&client, &cluster, "/hosts/host2/maintenance", &operator, &[("csrf", &csrf), ("to", "on")]);
    assert_eq!(status, 303);
    cluster.wait_state("host2", &["Maintenance"]);
    assert!(cluster.has_event("maintenance"), "the switch is in the audit log");
    let (_, page) = get_page(&client, &cluster, "/hosts/host2", Some(&operator));
    assert!(page.contains("End maintenance"), "{page}");

    // Logging out ends the session.
    let status = post_form(&client, &cluster, "/logout", &operator, &[("csrf", &csrf)]);
    assert_eq!(status, 303);
    let (status, _) = get_page(&client, &cluster, "/", Some(&operator));
    assert_eq!(status, 303);
    let (status, _) = get_page(&client, &cluster, "/incidents", Some(&readonly));
    assert_eq!(status, 200, "another session is untouched");
}

/// Under systemd (`Type=notify`) the manager says READY=1 once it serves, and WATCHDOG=1
/// while its engine answers; STOPPING=1 on SIGTERM.
#[test]
fn the_manager_notifies_systemd_ready_then_watchdog_then_stopping() {
    use std::os::unix::process::CommandExt;
    let mut cluster = Cluster::init();
    let socket_dir = tempfile::tempdir().unwrap();
    let socket_path = socket_dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
    let log = cluster.dir.path().join("manager-notify.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(KVMHA)
        .args(["manager", "run", "--config", cluster.config().to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env("KVMHA_LOG", "info")
        .env(MARKER_ENV, &cluster.marker)
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .process_group(0)
        .spawn()
        .expect("manager");
    cluster.manager = Some(Guard { child: Some(child), log, private_marker: None });
    let mut received = Vec::new();
    let mut buffer = [0u8; 512];
    while !received.iter().any(|message: &String| message.starts_with("WATCHDOG=1")) {
        let length = socket.recv(&mut buffer).unwrap_or_else(|error| {
            panic!(
                "no notification ({error}); got {received:?}; log:\n{}",
                cluster.manager.as_ref().unwrap().log_text()
            )
        });
        received.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
    }
    assert!(received[0].starts_with("READY=1\n"), "{received:?}");
    // Ready means serving: the API answers now.
    assert!(cluster.try_api(&["host", "list", "--json"]).is_some(), "READY=1 before the API answered");
    assert!(received.iter().any(|message| message.contains("STATUS=0 of 0 hosts up")), "{received:?}");
    let manager = cluster.manager.as_mut().unwrap();
    manager.signal("TERM");
    loop {
        let length = socket.recv(&mut buffer).expect("STOPPING=1 before exit");
        if &buffer[..length] == b"STOPPING=1" {
            break;
        }
    }
    assert!(manager.wait_exit().success());
}

/// Issue 8: an injected host failure with HA VMs, seen in the browser. host3 (IPMI BMC,
/// lab VM driver) runs two HA VMs; it hangs (agent frozen with SIGSTOP, its VMs killed),
/// only its BMC can prove it dead; the fence is confirmed by read-back and both VMs restart
/// on the other hosts. The incident page's timeline lists the verdicts, the fence and each
/// restart with its target host; the screenshot is kept as an artifact.
#[test]
fn an_incident_with_ha_vms_shows_verdicts_the_fence_and_each_vm_restart_with_its_target() {
    let bmc = kvmha_bmc::sim::IpmiSim::start(true).expect("ipmi_sim (scripts/setup.sh installs openipmi)");
    let mut cluster = Cluster::init();
    std::fs::create_dir_all(cluster.dir.path().join("pools/a")).unwrap();
    std::fs::create_dir_all(cluster.dir.path().join("pools/b")).unwrap();
    cluster.add_ipmi_bmc("host3", &bmc);
    cluster.start_manager();
    for host in ["host1", "host2", "host3"] {
        join_lab_agent(&cluster, host);
        add_agent_pools(&cluster, host);
        cluster.start_agent(host);
    }
    for host in ["host1", "host2", "host3"] {
        cluster.wait_state(host, &["Up"]);
    }
    let url = dashboard_url(&cluster);
    let operator = |args: &[&str]| {
        let output = cluster.api_output(args, &cluster.operator_token);
        assert!(output.status.success(), "kvmha {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    for (vm, priority) in [("db", "10"), ("web", "5")] {
        let file = cluster.dir.path().join(format!("{vm}.xml"));
        std::fs::write(&file, lab_vm_xml(vm)).unwrap();
        operator(&["vm", "define", "--host", "host3", file.to_str().unwrap(), "--start", "--json"]);
        operator(&["vm", "ha", vm, "enable", "--priority", priority, "--json"]);
    }
    let vm_host = |cluster: &Cluster, vm: &str| -> (String, String) {
        let vms = cluster.try_api(&["vm", "list", "--json"]).unwrap_or(Value::Null);
        let row = vms.as_array().into_iter().flatten().find(|row| row["name"] == vm).cloned().unwrap_or(Value::Null);
        (row["state"].as_str().unwrap_or("-").to_owned(), row["host"].as_str().unwrap_or("-").to_owned())
    };
    for vm in ["db", "web"] {
        cluster.wait(&format!("{vm} running on host3"), |cluster| {
            vm_host(cluster, vm) == ("Running".into(), "host3".into())
        });
        wait_disk_grows(&cluster, vm);
    }

    // From now on host3 is advertised where connections hang, as they do to a machine
    // that is off (a closed port answers at once, which neighbours take as "alive"): it
    // joins again with that address and its agent restarts, re-taking its VMs' leases.
    cluster.agents.get_mut("host3").expect("host3").kill();
    let silent = SilentAddress::new();
    let uri = format!(
        "lab:{}?state={}&host=host3&vm_binary={}",
        lab_storage(&cluster).display(),
        cluster.agent_dir("host3").join("lab").display(),
        lab_vm_binary().display()
    );
    cluster.join_with("host3", &["--hypervisor", &uri, "--advertise", &silent.address.to_string()]);
    add_agent_pools(&cluster, "host3");
    cluster.start_agent("host3");
    cluster.wait("host3's agent re-took both leases", |cluster| {
        cluster.agents["host3"].log_text().matches("lease re-taken after the agent restart").count() == 2
    });
    cluster.wait_state("host3", &["Up"]);
    // host3 dies: its agent and its VMs.
    cluster.agents.get_mut("host3").expect("host3").kill();
    for vm in ["db", "web"] {
        let pid_file = cluster.agent_dir("host3").join("lab/run").join(format!("{vm}.pid"));
        assert!(kill_lab_vm_group(&pid_file, &cluster.marker), "{vm} was not running");
    }
    cluster.wait_state("host3", &["Fenced"]);
    assert!(!bmc.script_power(), "host3 is Fenced but its chassis is still on");
    let mut targets = BTreeMap::new();
    for vm in ["db", "web"] {
        cluster.wait(&format!("{vm} running elsewhere"), |cluster| {
            let (state, host) = vm_host(cluster, vm);
            state == "Running" && host != "host3"
        });
        let target = vm_host(&cluster, vm).1;
        let writers = disk_writers(&cluster, vm);
        cluster.wait(&format!("{vm} writes on {target}"), |cluster| {
            disk_writers(cluster, vm).iter().any(|(host, _)| *host == target)
        });
        assert_eq!(writers.first().map(|(host, _)| host.as_str()), Some("host3"), "{writers:?}");
        targets.insert(vm.to_owned(), target);
    }
    let incidents = cluster.try_api(&["incident", "list", "--json"]).expect("incident list");
    let incident = incidents
        .as_array()
        .into_iter()
        .flatten()
        .find(|incident| incident["host"] == "host3")
        .cloned()
        .unwrap_or_else(|| panic!("no incident for host3: {incidents:#?}"));
    let id = incident["id"].as_i64().expect("id");
    cluster.wait("the incident counts both restarts", |cluster| {
        let shown = cluster.try_api(&["incident", "list", "--json"]).unwrap_or(Value::Null);
        shown.as_array().into_iter().flatten().any(|row| row["id"] == id && row["status"] == "recovered")
    });

    let mut browser = Browser::start();
    browser.open(&format!("{url}login"));
    browser
        .wait("the token field", |browser| browser.try_eval("!!document.getElementById('token')") == Some(json!(true)));
    browser.eval("document.getElementById('token').focus()");
    browser.call("Input.insertText", json!({ "text": cluster.operator_token }));
    browser.key("Enter", "Enter", 13, Some("\r"));
    browser.wait("the overview after login", |browser| {
        browser.try_eval("document.readyState === 'complete' && location.pathname").is_some_and(|path| path == "/")
    });
    browser.open(&format!("{url}incidents/{id}"));
    let kinds =
        browser.eval("JSON.stringify([...document.querySelectorAll('ol.timeline li')].map(li => li.dataset.kind))");
    let kinds: Vec<String> = serde_json::from_str(kinds.as_str().unwrap()).unwrap();
    let first =
        |kind: &str| kinds.iter().position(|seen| seen == kind).unwrap_or_else(|| panic!("no {kind}: {kinds:?}"));
    assert!(first("HostState") < first("Verdict"), "{kinds:?}");
    assert!(first("Verdict") < first("FenceIntent"), "{kinds:?}");
    assert!(first("FenceIntent") < first("FenceOutcome"), "{kinds:?}");
    assert!(first("FenceOutcome") < first("VmStartIntent"), "{kinds:?}");
    assert!(first("VmStartIntent") < first("VmStartOutcome"), "{kinds:?}");
    let timeline = browser.eval("document.querySelector('ol.timeline').innerText");
    let timeline = timeline.as_str().unwrap_or_default();
    assert!(timeline.contains("power off confirmed"), "{timeline}");
    // The restarts table: one row per VM, running, on the host the manager says it runs.
    let rows = browser.eval(
        "JSON.stringify([...document.querySelectorAll('section[aria-label=\"vm restarts\"] tbody tr')].map(tr => [...tr.cells].slice(0, 3).map(td => td.innerText)))",
    );
    let rows: Vec<Vec<String>> = serde_json::from_str(rows.as_str().unwrap()).unwrap();
    let shown: BTreeMap<String, (String, String)> =
        rows.into_iter().map(|row| (row[0].clone(), (row[1].clone(), row[2].clone()))).collect();
    for (vm, target) in &targets {
        assert_eq!(shown.get(vm), Some(&("Running".to_owned(), target.clone())), "{shown:?}");
    }
    let starts = browser.eval(
        "JSON.stringify([...document.querySelectorAll('ol.timeline li[data-kind=\"VmStartOutcome\"]')].map(li => li.innerText))",
    );
    let starts: Vec<String> = serde_json::from_str(starts.as_str().unwrap()).unwrap();
    for (vm, target) in &targets {
        assert!(
            starts.iter().any(|entry| entry.contains(vm.as_str()) && entry.contains(target.as_str())),
            "no timeline entry names {vm}'s restart on {target}: {starts:?}"
        );
    }
    browser.screenshot("incident-host3-vm-restarts.png", 1440, 1200);
}
