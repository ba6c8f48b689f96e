//! The Redfish client against sushy-tools' `sushy-emulator` (fake driver),
//! started per test on its own port with its own state directory.
//!
//! sushy's fake driver applies a power change `random.randint(1, 11)`
//! seconds after the request, and only on the next GET of the system. The
//! wrapper below replaces that module's `random` with one whose randint
//! returns 0, so a change lands on the very next GET: tests then see
//! Redfish semantics (reset accepted, state read back) without sleeping.

use kvmha_bmc::redfish::{RedfishAuth, RedfishClient, RedfishConfig, RedfishTls};
use kvmha_bmc::{BmcError, FenceOutcome, Fencer, PowerControl, PowerState, Secret};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "redfish-admin";
const PASSWORD: &str = "redfish-pw-123";

/// With `KVMHA_SESSIONS=1` the wrapper also puts a minimal Redfish
/// SessionService in front of sushy (which has none): POST …/Sessions with
/// the right credentials returns an X-Auth-Token and a Location, requests
/// bearing a live token are passed on as if they had Basic auth, DELETE of
/// the Location ends the session and is logged to `SESSIONS_LOG`.
const WRAPPER: &str = r#"
import base64, json, os, sys, types, uuid
from sushy_tools.emulator.resources.systems import fakedriver
fakedriver.random = types.SimpleNamespace(randint=lambda low, high: 0)
from sushy_tools.emulator import main

class Sessions:
    PREFIX = "/redfish/v1/SessionService/Sessions"

    def __init__(self, inner):
        self.inner = inner
        self.user, self.password = os.environ["U"], os.environ["P"]
        self.tokens = {}

    def reply(self, start, status, headers=(), body=b""):
        start(status, [("Content-Type", "application/json")] + list(headers))
        return [body]

    def __call__(self, env, start):
        path = env.get("PATH_INFO", "").rstrip("/")
        method = env["REQUEST_METHOD"]
        token = env.get("HTTP_X_AUTH_TOKEN")
        if path == self.PREFIX and method == "POST":
            length = int(env.get("CONTENT_LENGTH") or 0)
            body = json.loads(env["wsgi.input"].read(length) or b"{}")
            if (body.get("UserName"), body.get("Password")) != (self.user, self.password):
                return self.reply(start, "401 Unauthorized")
            session_id, token = uuid.uuid4().hex[:8], uuid.uuid4().hex
            self.tokens[token] = session_id
            location = self.PREFIX + "/" + session_id
            return self.reply(start, "201 Created", [("X-Auth-Token", token), ("Location", location)],
                              json.dumps({"Id": session_id}).encode())
        if path.startswith(self.PREFIX + "/") and method == "DELETE":
            session_id = path.rsplit("/", 1)[1]
            if self.tokens.get(token) != session_id:
                return self.reply(start, "401 Unauthorized")
            del self.tokens[token]
            with open(os.environ["SESSIONS_LOG"], "a") as log:
                log.write("deleted\n")
            return self.reply(start, "204 No Content")
        if token is not None:
            if token not in self.tokens:
                return self.reply(start, "401 Unauthorized")
            credentials = base64.b64encode((self.user + ":" + self.password).encode()).decode()
            env["HTTP_AUTHORIZATION"] = "Basic " + credentials
        return self.inner(env, start)

if os.environ.get("KVMHA_SESSIONS") == "1":
    run = main.app.run
    def run_with_sessions(*args, **kwargs):
        main.app.wsgi_app = Sessions(main.app.wsgi_app)
        return run(*args, **kwargs)
    main.app.run = run_with_sessions

sys.argv = ["sushy-emulator", "--config", sys.argv[1]]
sys.exit(main.main())
"#;

struct Sushy {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    tls: bool,
}

#[derive(Default)]
struct SushyOptions {
    initially_on: bool,
    tls: bool,
    disable_power_off: bool,
    sessions: bool,
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run_checked(command: &mut Command) {
    let output = command.output().expect("run helper");
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

impl Sushy {
    fn start(options: SushyOptions) -> Sushy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_tcp_port();
        let htpasswd = dir.path().join("htpasswd");
        // bcrypt is a sushy-tools dependency; the password goes via env.
        run_checked(
            Command::new("python3")
                .args([
                    "-c",
                    "import bcrypt, os, sys\n\
                     line = os.environ['U'] + ':' + bcrypt.hashpw(os.environ['P'].encode(), bcrypt.gensalt(4)).decode()\n\
                     open(sys.argv[1], 'w').write(line + '\\n')",
                ])
                .arg(&htpasswd)
                .env("U", USER)
                .env("P", PASSWORD),
        );
        let mut config = format!(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n\
             SUSHY_EMULATOR_LISTEN_PORT = {port}\n\
             SUSHY_EMULATOR_FAKE_DRIVER = True\n\
             SUSHY_EMULATOR_STATE_DIR = '{state}'\n\
             SUSHY_EMULATOR_AUTH_FILE = '{htpasswd}'\n\
             SUSHY_EMULATOR_FAKE_SYSTEMS = [{{'uuid': '5b4d1e0c-6c47-4a40-9bd6-2b6c0a7f2f11', 'name': 'host1', 'power_state': '{power}', 'nics': []}}]\n",
            state = dir.path().join("state").display(),
            htpasswd = htpasswd.display(),
            power = if options.initially_on { "On" } else { "Off" },
        );
        if options.disable_power_off {
            config.push_str("SUSHY_EMULATOR_DISABLE_POWER_OFF = True\n");
        }
        if options.tls {
            make_certificates(dir.path());
            config.push_str(&format!(
                "SUSHY_EMULATOR_SSL_CERT = '{}'\nSUSHY_EMULATOR_SSL_KEY = '{}'\n",
                dir.path().join("bmc.pem").display(),
                dir.path().join("bmc.key").display()
            ));
        }
        let config_path = dir.path().join("sushy.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("python3")
            .args(["-c", WRAPPER])
            .arg(&config_path)
            .env("KVMHA_SESSIONS", if options.sessions { "1" } else { "0" })
            .env("U", USER)
            .env("P", PASSWORD)
            .env("SESSIONS_LOG", dir.path().join("sessions.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("sushy.log")).unwrap()))
            .spawn()
            .expect("start sushy-emulator (PyPI sushy-tools)");
        let sushy = Sushy { child, dir, port, tls: options.tls };
        sushy.wait_ready();
        sushy
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.path().join("sushy.log")).unwrap_or_default();
        panic!("sushy-emulator never listened on {}: {log}", self.port);
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn deleted_sessions(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("sessions.log")).map(|text| text.lines().count()).unwrap_or(0)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A config that trusts this emulator: its CA over TLS, or the
    /// explicit insecure mode plain http needs.
    fn config(&self, user: &str, password: &str) -> RedfishConfig {
        let mut config = RedfishConfig::new(self.url(), user, Secret::new(password));
        config.timeout = Duration::from_secs(5);
        config.tls = if self.tls { RedfishTls::CaBundle(self.ca()) } else { RedfishTls::Insecure };
        config
    }

    fn client(&self, password: &str) -> RedfishClient {
        RedfishClient::new(self.config(USER, password)).unwrap()
    }

    /// PowerState read by Python's urllib: a witness independent of our client.
    fn witness_power(&self) -> String {
        let output = Command::new("python3")
            .args([
                "-c",
                "import base64, json, os, ssl, sys, urllib.request\n\
                 ctx = ssl.create_default_context(cafile=os.environ.get('CA')) if os.environ.get('CA') else None\n\
                 auth = base64.b64encode((os.environ['U'] + ':' + os.environ['P']).encode()).decode()\n\
                 def get(path):\n\
                 \x20   request = urllib.request.Request(sys.argv[1] + path, headers={'Authorization': 'Basic ' + auth})\n\
                 \x20   return json.load(urllib.request.urlopen(request, context=ctx))\n\
                 system = get('/redfish/v1/Systems')['Members'][0]['@odata.id']\n\
                 print(get(system)['PowerState'])",
            ])
            .arg(self.url())
            .env("U", USER)
            .env("P", PASSWORD)
            .env("CA", if self.tls { self.ca().display().to_string() } else { String::new() })
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }
}

impl Drop for Sushy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway CA and a leaf certificate for 127.0.0.1 signed by it.
fn make_certificates(dir: &Path) {
    let path = |name: &str| dir.join(name).display().to_string();
    run_checked(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
        "-days",
        "2",
        "-subj",
        "/CN=kvmha-test-ca",
    ]));
    run_checked(Command::new("openssl").args([
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &path("bmc.key"),
        "-out",
        &path("bmc.csr"),
        "-subj",
        "/CN=127.0.0.1",
    ]));
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_checked(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        &path("bmc.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-out",
        &path("bmc.pem"),
        "-days",
        "2",
        "-extfile",
        &path("ext.cnf"),
    ]));
}

#[tokio::test]
async fn status_off_on_read_back_and_witness_agrees() {
    let sushy = Sushy::start(SushyOptions { initially_on: true, ..Default::default() });
    let client = sushy.client(PASSWORD);
    assert_eq!(client.status().await.unwrap(), PowerState::On);
    client.power_off().await.unwrap();
    assert_eq!(client.status().await.unwrap(), PowerState::Off);
    assert_eq!(sushy.witness_power(), "Off");
    client.power_on().await.unwrap();
    assert_eq!(client.status().await.unwrap(), PowerState::On);
    assert_eq!(sushy.witness_power(), "On");
}

#[tokio::test]
async fn reset_and_cycle_end_on() {
    let sushy = Sushy::start(SushyOptions { initially_on: true, ..Default::default() });
    let client = sushy.client(PASSWORD);
    PowerControl::reset(&client).await.unwrap();
    assert_eq!(client.status().await.unwrap(), PowerState::On);
    client.power_cycle().await.unwrap();
    assert_eq!(client.status().await.unwrap(), PowerState::On);
    assert_eq!(sushy.witness_power(), "On");
}

#[tokio::test]
async fn fencing_over_redfish_reads_off_back() {
    let sushy = Sushy::start(SushyOptions { initially_on: true, ..Default::default() });
    let client = sushy.client(PASSWORD);
    let fencer = Fencer { deadline: Duration::from_secs(10), ..Fencer::default() };
    let report = fencer.fence(&client).await.unwrap();
    assert_eq!(report.outcome, FenceOutcome::PoweredOff);
    assert!(report.evidence.contains("redfish: power off sent"), "{}", report.evidence);
    assert_eq!(sushy.witness_power(), "Off");
    let again = fencer.fence(&client).await.unwrap();
    assert_eq!(again.outcome, FenceOutcome::AlreadyOff);
}

#[tokio::test]
async fn wrong_password_is_authentication_and_never_shown() {
    let sushy = Sushy::start(SushyOptions { initially_on: true, ..Default::default() });
    let wrong = "wrong-redfish-pw";
    let error = sushy.client(wrong).power_off().await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");
    assert!(!format!("{error} {error:?}").contains(wrong));
    assert_eq!(sushy.witness_power(), "On");
}

#[tokio::test]
async fn wrong_user_is_authentication_and_power_untouched() {
    let sushy = Sushy::start(SushyOptions { initially_on: true, ..Default::default() });
    let client = RedfishClient::new(sushy.config("intruder", PASSWORD)).unwrap();
    let error = client.power_off().await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");
    assert!(!format!("{error} {error:?}").contains(PASSWORD));
    assert_eq!(sushy.witness_power(), "On");
}

/// Several emulated BMCs at once: each client controls its own host only.
#[tokio::test]
async fn several_bmcs_at_once_are_fenced_independently() {
    let bmcs: Vec<Sushy> =
        (0..3).map(|_| Sushy::start(SushyOptions { initially_on: true, ..Default::default() })).collect();
    let fencer = Fencer { deadline: Duration::from_secs(10), ..Fencer::default() };
    let clients: Vec<RedfishClient> = bmcs.iter().map(|bmc| bmc.client(PASSWORD)).collect();
    // Fence the first two concurrently, leave the third alone.
    let (first, second) = tokio::join!(fencer.fence(&clients[0]), fencer.fence(&clients[1]));
    assert_eq!(first.unwrap().outcome, FenceOutcome::PoweredOff);
    assert_eq!(second.unwrap().outcome, FenceOutcome::PoweredOff);
    assert_eq!(bmcs[0].witness_power(), "Off");
    assert_eq!(bmcs[1].witness_power(), "Off");
    assert_eq!(bmcs[2].witness_power(), "On");
    assert_eq!(clients[2].status().await.unwrap(), PowerState::On);
}

#[tokio::test]
async fn refused_power_off_is_resolved_by_reading_the_state_back() {
    // With power-off disabled sushy answers 400 to ForceOff: on a host that
    // is off that refusal is moot, on a host that is on it is a refusal.
    let off = Sushy::start(SushyOptions { disable_power_off: true, ..Default::default() });
    off.client(PASSWORD).power_off().await.unwrap();
    let on = Sushy::start(SushyOptions { initially_on: true, disable_power_off: true, ..Default::default() });
    let error = on.client(PASSWORD).power_off().await.unwrap_err();
    match &error {
        BmcError::Refused { code, meaning, .. } => {
            assert_eq!(*code, 400);
            assert!(meaning.contains("disabled"), "{meaning}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(error.to_string().contains("code http 400"), "{error}");
    let fenced =
        Fencer { deadline: Duration::from_secs(2), ..Fencer::default() }.fence(&on.client(PASSWORD)).await.unwrap_err();
    assert!(matches!(fenced, BmcError::Refused { code: 400, .. }), "{fenced:?}");
    assert_eq!(on.witness_power(), "On");
}

#[tokio::test]
async fn unreachable_port_is_unreachable() {
    // Bound but never listening: the port is ours for the whole test (no
    // emulator can take it) and a connect is refused at once.
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = closed.local_addr().unwrap().port();
    let mut config = RedfishConfig::new(format!("http://127.0.0.1:{port}"), USER, Secret::new(PASSWORD));
    config.timeout = Duration::from_secs(2);
    config.tls = RedfishTls::Insecure;
    let started = Instant::now();
    let error = RedfishClient::new(config).unwrap().status().await.unwrap_err();
    assert!(matches!(error, BmcError::Unreachable { .. }), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(2 + 5), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn tls_verifies_against_the_ca_bundle_and_insecure_is_explicit() {
    let sushy = Sushy::start(SushyOptions { initially_on: true, tls: true, ..Default::default() });
    assert_eq!(sushy.client(PASSWORD).status().await.unwrap(), PowerState::On);

    // Without the CA the self-signed chain must be rejected…
    let mut config = RedfishConfig::new(sushy.url(), USER, Secret::new(PASSWORD));
    config.timeout = Duration::from_secs(5);
    let error = RedfishClient::new(config.clone()).unwrap().status().await.unwrap_err();
    assert!(matches!(error, BmcError::Unreachable { .. }), "{error:?}");
    assert!(error.to_string().to_lowercase().contains("certificate"), "{error}");

    // …unless the operator explicitly chose insecure mode.
    config.tls = RedfishTls::Insecure;
    assert_eq!(RedfishClient::new(config).unwrap().status().await.unwrap(), PowerState::On);
}

#[tokio::test]
async fn session_auth_against_a_bmc_without_session_service_fails_clearly() {
    let sushy = Sushy::start(SushyOptions { initially_on: true, ..Default::default() });
    let mut config = sushy.config(USER, PASSWORD);
    config.auth = RedfishAuth::Session;
    let error = RedfishClient::new(config).unwrap().status().await.unwrap_err();
    // sushy answers the login POST with 401, as for a wrong password; the
    // right credentials make that a refusal naming the missing service.
    assert!(matches!(error, BmcError::Refused { .. }), "{error:?}");
    assert!(error.to_string().contains("SessionService"), "{error}");
    // …while wrong credentials there stay an authentication failure.
    let mut config = sushy.config(USER, "wrong-session-pw");
    config.auth = RedfishAuth::Session;
    let error = RedfishClient::new(config).unwrap().status().await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");
}

#[tokio::test]
async fn session_auth_logs_in_controls_power_and_logs_out() {
    let sushy = Sushy::start(SushyOptions { initially_on: true, sessions: true, ..Default::default() });
    let mut config = sushy.config(USER, PASSWORD);
    config.auth = RedfishAuth::Session;
    let client = RedfishClient::new(config.clone()).unwrap();
    assert_eq!(client.status().await.unwrap(), PowerState::On);
    client.power_off().await.unwrap();
    assert_eq!(client.status().await.unwrap(), PowerState::Off);
    assert_eq!(sushy.witness_power(), "Off");
    client.close().await.unwrap();
    assert_eq!(sushy.deleted_sessions(), 1, "the session must be deleted on close");

    config.password = Secret::new("wrong-session-pw");
    let error = RedfishClient::new(config).unwrap().status().await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");
}

/// The CLI's Redfish path in-process: flags to driver to output.
#[derive(Debug, clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: kvmha_bmc::cli::Args,
}

async fn cli(sushy: &Sushy, extra: &[&str]) -> Result<String, BmcError> {
    use clap::Parser;
    let password_file = sushy.dir.path().join("cli-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&password_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut argv = vec![
        "kvmha-bmc".to_string(),
        "--driver".into(),
        "redfish".into(),
        "--address".into(),
        sushy.url(),
        "--user".into(),
        USER.into(),
        "--password-file".into(),
        password_file.display().to_string(),
    ];
    argv.extend(extra.iter().map(|arg| arg.to_string()));
    let parsed = Cli::try_parse_from(argv).unwrap();
    let mut out = Vec::new();
    kvmha_bmc::cli::run_to(&parsed.args, &mut out).await?;
    Ok(String::from_utf8(out).unwrap().trim().to_string())
}

#[tokio::test]
async fn cli_over_redfish_with_tls_status_and_fence() {
    let sushy = Sushy::start(SushyOptions { initially_on: true, tls: true, ..Default::default() });
    let ca = sushy.ca().display().to_string();
    assert_eq!(cli(&sushy, &["status", "--json", "--ca-bundle", &ca]).await.unwrap(), r#"{"power":"on"}"#);
    // Without a CA bundle the self-signed chain is refused, not trusted.
    let error = cli(&sushy, &["status"]).await.unwrap_err();
    assert!(matches!(error, BmcError::Unreachable { .. }), "{error:?}");
    let fenced = cli(&sushy, &["fence", "--insecure"]).await.unwrap();
    assert!(fenced.contains("redfish: power off sent"), "{fenced}");
    assert_eq!(sushy.witness_power(), "Off");
    let error = cli(&sushy, &["status", "--insecure", "--ca-bundle", &ca]).await.unwrap_err();
    assert!(matches!(error, BmcError::Config { .. }), "{error:?}");
}

/// A redirecting BMC (or anything on the path answering 3xx) must not get
/// our Basic credentials sent on to wherever it points.
#[tokio::test]
async fn redirects_are_not_followed() {
    let redirector = TcpListener::bind("127.0.0.1:0").unwrap();
    let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
    elsewhere.set_nonblocking(true).unwrap();
    let elsewhere_port = elsewhere.local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{}", redirector.local_addr().unwrap().port());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in redirector.incoming().take(4) {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{elsewhere_port}/redfish/v1/Systems\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    let mut config = RedfishConfig::new(url, USER, Secret::new(PASSWORD));
    config.tls = RedfishTls::Insecure;
    config.timeout = Duration::from_secs(3);
    let error = RedfishClient::new(config).unwrap().status().await.unwrap_err();
    assert!(matches!(error, BmcError::Refused { code: 307, .. }), "{error:?}");
    assert!(elsewhere.accept().is_err(), "the redirect was followed");
}
