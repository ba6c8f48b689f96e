//! A Redfish client: discover the ComputerSystem, read `PowerState`, and
//! post `ComputerSystem.Reset`.
//!
//! TLS is verified against a CA bundle (or the built-in web roots) unless
//! the operator explicitly chose insecure mode: BMCs mostly carry
//! self-signed certificates, and silently skipping verification would let
//! anyone on the out-of-band network answer "off" for a running host.

use crate::error::{BmcError, Result};
use crate::{PowerControl, PowerState, Secret};
pub use reqwest::StatusCode;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedfishAuth {
    /// HTTP Basic on every request.
    Basic,
    /// POST to SessionService once, then X-Auth-Token; the session is
    /// deleted when the client is done with it.
    Session,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedfishTls {
    /// Verify against the built-in web PKI roots.
    WebRoots,
    /// Verify against the certificates in this PEM file only.
    CaBundle(PathBuf),
    /// No verification at all: only when the operator asked for it.
    Insecure,
}

#[derive(Debug, Clone)]
pub struct RedfishConfig {
    /// `https://host[:port]`, `http://…`, or `HOST[:PORT]` (then https).
    pub address: String,
    pub username: String,
    pub password: Secret,
    pub auth: RedfishAuth,
    pub tls: RedfishTls,
    /// Bound on every HTTP request.
    pub timeout: Duration,
    /// Which member of /redfish/v1/Systems; required when there are several.
    pub system_id: Option<String>,
}

impl RedfishConfig {
    pub fn new(address: impl Into<String>, username: impl Into<String>, password: Secret) -> Self {
        RedfishConfig {
            address: address.into(),
            username: username.into(),
            password,
            auth: RedfishAuth::Basic,
            tls: RedfishTls::WebRoots,
            timeout: Duration::from_secs(10),
            system_id: None,
        }
    }
}

struct SessionToken {
    token: String,
    location: Option<String>,
}

/// The token is a credential: never in Debug output.
impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionToken").field("token", &"<redacted>").field("location", &self.location).finish()
    }
}

#[derive(Debug)]
pub struct RedfishClient {
    config: RedfishConfig,
    base_url: String,
    http: reqwest::Client,
    /// Discovered once: the system's @odata.id.
    system_path: Mutex<Option<String>>,
    session: Mutex<Option<SessionToken>>,
}

/// Reset types of `ComputerSystem.Reset` this crate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetType {
    ForceOff,
    On,
    ForceRestart,
    PowerCycle,
}

impl ResetType {
    fn as_str(self) -> &'static str {
        match self {
            ResetType::ForceOff => "ForceOff",
            ResetType::On => "On",
            ResetType::ForceRestart => "ForceRestart",
            ResetType::PowerCycle => "PowerCycle",
        }
    }

    /// The state that makes a refusal of this reset moot ("already off").
    fn already_done_state(self) -> Option<PowerState> {
        match self {
            ResetType::ForceOff => Some(PowerState::Off),
            ResetType::On => Some(PowerState::On),
            ResetType::ForceRestart | ResetType::PowerCycle => None,
        }
    }
}

impl RedfishClient {
    pub fn new(config: RedfishConfig) -> Result<Self> {
        let base_url = base_url(&config.address, &config.tls)?;
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            // A redirect would carry our Basic credentials (or token) to
            // wherever the answer points: a BMC has no business redirecting.
            .redirect(reqwest::redirect::Policy::none())
            .use_rustls_tls();
        builder = match &config.tls {
            RedfishTls::WebRoots => builder,
            RedfishTls::CaBundle(path) => {
                let pem = std::fs::read(path)
                    .map_err(|source| BmcError::Io { context: format!("read ca bundle {}", path.display()), source })?;
                let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|error| BmcError::Config { reason: format!("ca bundle {}: {error}", path.display()) })?;
                certificates.into_iter().fold(builder.tls_built_in_root_certs(false), |builder, certificate| {
                    builder.add_root_certificate(certificate)
                })
            }
            RedfishTls::Insecure => builder.danger_accept_invalid_certs(true),
        };
        let http = builder.build().map_err(|error| BmcError::Config { reason: format!("http client: {error}") })?;
        Ok(RedfishClient { config, base_url, http, system_path: Mutex::new(None), session: Mutex::new(None) })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    fn transport_error(&self, error: reqwest::Error) -> BmcError {
        if error.is_timeout() {
            return BmcError::Timeout {
                operation: format!("redfish request to {}", self.base_url),
                after_ms: self.config.timeout.as_millis() as u64,
            };
        }
        // reqwest hides the cause (refused, tls, dns) in the source chain.
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        BmcError::Unreachable { address: self.base_url.clone(), reason }
    }

    async fn authorize(&self, request: reqwest::RequestBuilder) -> Result<reqwest::RequestBuilder> {
        match self.config.auth {
            RedfishAuth::Basic => {
                Ok(request
                    .basic_auth(&self.config.username, Some(String::from_utf8_lossy(self.config.password.expose()))))
            }
            RedfishAuth::Session => {
                let mut session = self.session.lock().await;
                if session.is_none() {
                    *session = Some(self.login().await?);
                }
                let token = &session.as_ref().expect("just set").token;
                Ok(request.header("X-Auth-Token", token_header(token)?))
            }
        }
    }

    async fn login(&self) -> Result<SessionToken> {
        let body = serde_json::json!({
            "UserName": self.config.username,
            "Password": String::from_utf8_lossy(self.config.password.expose()),
        });
        let response = self
            .http
            .post(self.url("/redfish/v1/SessionService/Sessions"))
            .json(&body)
            .send()
            .await
            .map_err(|error| self.transport_error(error))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.login_refusal(status).await);
        }
        if !status.is_success() {
            return Err(BmcError::Refused {
                operation: "redfish session login".into(),
                code: status.as_u16(),
                meaning: format!(
                    "{}; the bmc may not offer a SessionService (use basic auth)",
                    status.canonical_reason().unwrap_or("http error")
                ),
            });
        }
        let header =
            |name: &str| response.headers().get(name).and_then(|value| value.to_str().ok()).map(str::to_string);
        let token = header("X-Auth-Token")
            .ok_or_else(|| BmcError::protocol("redfish session created without an X-Auth-Token header"))?;
        Ok(SessionToken { token, location: header("Location") })
    }

    /// A BMC without a SessionService (sushy-emulator) may answer the login
    /// POST with 401 like a wrong password would. One GET of the service
    /// with Basic auth tells them apart: 404 means there is no session
    /// service to log in to, anything else leaves the credentials to blame.
    async fn login_refusal(&self, login_status: StatusCode) -> BmcError {
        let authentication =
            || BmcError::Authentication { reason: format!("redfish session login answered http {login_status}") };
        let probe = self
            .http
            .get(self.url("/redfish/v1/SessionService"))
            .basic_auth(&self.config.username, Some(String::from_utf8_lossy(self.config.password.expose())))
            .send()
            .await;
        match probe {
            Ok(response) if response.status() == StatusCode::NOT_FOUND => BmcError::Refused {
                operation: "redfish session login".into(),
                code: login_status.as_u16(),
                meaning: "the bmc offers no SessionService (use basic auth)".into(),
            },
            _ => authentication(),
        }
    }

    /// Deletes the Redfish session, if one was made (BMCs have few slots).
    pub async fn logout(&self) -> Result<()> {
        let Some(session) = self.session.lock().await.take() else {
            return Ok(());
        };
        let Some(location) = session.location else {
            return Ok(());
        };
        // The session's Location comes from the BMC: the token goes to the BMC
        // itself only (a full URL under our base, or a plain path).
        let url = match location.strip_prefix(&self.base_url) {
            Some(rest) if rest.starts_with('/') => self.url(bmc_path("session location", rest)?),
            _ => self.url(bmc_path("session location", &location)?),
        };
        self.http
            .delete(url)
            .header("X-Auth-Token", token_header(&session.token)?)
            .send()
            .await
            .map_err(|error| self.transport_error(error))?;
        Ok(())
    }

    /// Sends one request and returns status and body. With session auth, a
    /// 401 on a cached token (the BMC expired the session) logs in again
    /// once and repeats the request.
    async fn execute(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<(StatusCode, String)> {
        let mut relogged = false;
        loop {
            let mut request = self.http.request(method.clone(), self.url(path));
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = self.authorize(request).await?.send().await.map_err(|error| self.transport_error(error))?;
            let status = response.status();
            let text = response.text().await.map_err(|error| self.transport_error(error))?;
            if status == StatusCode::UNAUTHORIZED && self.config.auth == RedfishAuth::Session && !relogged {
                relogged = true;
                self.session.lock().await.take();
                continue;
            }
            return Ok((status, text));
        }
    }

    async fn get_json(&self, path: &str) -> Result<Value> {
        let (status, body) = self.execute(reqwest::Method::GET, path, None).await?;
        check_status(&format!("GET {path}"), status, &body)?;
        parse_json(path, &body)
    }

    /// Finds the ComputerSystem to control under /redfish/v1/Systems.
    pub async fn system_path(&self) -> Result<String> {
        let mut cached = self.system_path.lock().await;
        if let Some(path) = cached.as_ref() {
            return Ok(path.clone());
        }
        let collection = self.get_json("/redfish/v1/Systems").await?;
        let path = system_path_from_collection(&collection, self.config.system_id.as_deref())?;
        *cached = Some(path.clone());
        Ok(path)
    }

    pub async fn power_state(&self) -> Result<PowerState> {
        let path = self.system_path().await?;
        let system = self.get_json(&path).await?;
        power_state_from_system(&path, &system)
    }

    pub async fn reset(&self, reset_type: ResetType) -> Result<()> {
        let path = self.system_path().await?;
        let system = self.get_json(&path).await?;
        let target = reset_target_from_system(&path, &system)?;
        let body = serde_json::json!({ "ResetType": reset_type.as_str() });
        let (status, text) = self.execute(reqwest::Method::POST, &target, Some(&body)).await?;
        let operation = format!("redfish reset {}", reset_type.as_str());
        match check_status(&operation, status, &text) {
            Ok(()) => Ok(()),
            // A BMC may refuse ForceOff on a host that is off (409 and the
            // like). Whether that is fine is decided by reading the state.
            Err(refusal @ BmcError::Refused { .. }) => match reset_type.already_done_state() {
                Some(wanted) if self.power_state().await? == wanted => {
                    tracing::info!(%operation, status = status.as_u16(), "refused, but state already {wanted}");
                    Ok(())
                }
                _ => Err(refusal),
            },
            Err(other) => Err(other),
        }
    }
}

/// A response body as JSON. Response parsing is pure (no I/O) from here on,
/// so that the fuzz target `redfish_json` reaches all of it.
pub fn parse_json(path: &str, body: &str) -> Result<Value> {
    serde_json::from_str(body).map_err(|error| BmcError::protocol(format!("GET {path}: invalid json: {error}")))
}

/// The ComputerSystem to control, from the `/redfish/v1/Systems` collection:
/// the one named `system_id`, or the only member.
pub fn system_path_from_collection(collection: &Value, system_id: Option<&str>) -> Result<String> {
    let members: Vec<String> = collection["Members"]
        .as_array()
        .map(|members| members.iter().filter_map(|member| member["@odata.id"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    for member in &members {
        bmc_path("a /redfish/v1/Systems member", member)?;
    }
    match system_id {
        Some(id) => {
            members.iter().find(|path| path.trim_end_matches('/').rsplit('/').next() == Some(id)).cloned().ok_or_else(
                || BmcError::Config {
                    reason: format!("no system {id:?} under /redfish/v1/Systems (found {members:?})"),
                },
            )
        }
        None => match members.as_slice() {
            [only] => Ok(only.clone()),
            [] => Err(BmcError::protocol("no system under /redfish/v1/Systems")),
            _ => {
                Err(BmcError::Config { reason: format!("several systems ({members:?}): choose one with a system id") })
            }
        },
    }
}

/// The power state of a ComputerSystem resource.
pub fn power_state_from_system(path: &str, system: &Value) -> Result<PowerState> {
    let state = system["PowerState"].as_str().ok_or_else(|| BmcError::protocol(format!("{path} has no PowerState")))?;
    // Only "Off" is off. "PoweringOff" is still on, and "PoweringOn"
    // already draws power: neither may count as fenced.
    Ok(match state {
        "Off" => PowerState::Off,
        _ => PowerState::On,
    })
}

/// Where to POST a reset: the system's advertised action target, or the
/// standard path under the system.
pub fn reset_target_from_system(path: &str, system: &Value) -> Result<String> {
    match system["Actions"]["#ComputerSystem.Reset"]["target"].as_str() {
        Some(target) => bmc_path(&format!("{path} reset target"), target).map(str::to_string),
        None => Ok(format!("{}/Actions/ComputerSystem.Reset", path.trim_end_matches('/'))),
    }
}

/// A path the BMC told us to use (a system, an action target) is appended to
/// the base URL, with the credentials attached. Only a plain absolute path may
/// be: `@evil/x` would turn `https://bmc:443` into user `bmc` at host `evil`,
/// and `//evil/x` or a full URL would leave the BMC. Such an answer is refused.
pub fn bmc_path<'a>(what: &str, value: &'a str) -> Result<&'a str> {
    let plain = value.starts_with('/')
        && !value.starts_with("//")
        && !value.chars().any(|c| c == '@' || c == '\\' || c.is_whitespace() || c.is_control());
    if !plain {
        // Debug-quoted and cut short: the value comes from the BMC.
        let shown: String = value.chars().take(80).collect();
        return Err(BmcError::protocol(format!("{what} {shown:?} is not a plain absolute path on the bmc")));
    }
    Ok(value)
}

/// The base URL from `--address`. Plain `http://` sends the credentials
/// and the power state in clear, so it is as insecure as skipping TLS
/// verification and needs the same explicit insecure mode. An address that
/// embeds `user:pass@` is refused: the password must come from the password
/// file, and the address ends up in `target()`, errors and audit evidence.
fn base_url(address: &str, tls: &RedfishTls) -> Result<String> {
    if address.contains("://") {
        let url = reqwest::Url::parse(address)
            .map_err(|error| BmcError::Config { reason: format!("invalid redfish url: {error}") })?;
        if !url.username().is_empty() || url.password().is_some() {
            // Never echo the address: it holds the credentials.
            return Err(BmcError::Config {
                reason: format!(
                    "redfish address for host {} embeds user credentials; use --user and --password-file",
                    url.host_str().unwrap_or("?")
                ),
            });
        }
        match url.scheme() {
            "https" => {}
            "http" if *tls == RedfishTls::Insecure => {}
            "http" => {
                return Err(BmcError::Config {
                    reason: format!(
                        "redfish address {} is plain http: credentials and power state would travel \
                         unprotected; use https, or insecure mode (--insecure) on a trusted lab network",
                        address.trim_end_matches('/')
                    ),
                })
            }
            other => return Err(BmcError::Config { reason: format!("unsupported redfish url scheme {other:?}") }),
        }
        return Ok(address.trim_end_matches('/').to_string());
    }
    if address.contains('@') {
        return Err(BmcError::Config {
            reason: "redfish address embeds user credentials; use --user and --password-file".into(),
        });
    }
    let (host, port) = crate::split_host_port(address, 443)?;
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    Ok(format!("https://{host}:{port}"))
}

/// The session token as a header value marked sensitive, so that no debug
/// output of a request (reqwest's, hyper's) prints it.
fn token_header(token: &str) -> Result<reqwest::header::HeaderValue> {
    let mut value = reqwest::header::HeaderValue::from_str(token)
        .map_err(|_| BmcError::protocol("redfish session token is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Maps an HTTP status to the typed error, with Redfish's extended message
/// when the body has one.
pub fn check_status(operation: &str, status: StatusCode, body: &str) -> Result<()> {
    if status.is_success() {
        return Ok(());
    }
    if status == StatusCode::UNAUTHORIZED {
        return Err(BmcError::Authentication { reason: format!("{operation}: http 401 unauthorized") });
    }
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|json| {
            let error = &json["error"];
            error["@Message.ExtendedInfo"][0]["Message"]
                .as_str()
                .or_else(|| error["message"].as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("http error").to_string());
    Err(BmcError::Refused { operation: operation.to_string(), code: status.as_u16(), meaning: message })
}

#[async_trait::async_trait]
impl PowerControl for RedfishClient {
    fn target(&self) -> String {
        format!("{} redfish", self.base_url)
    }

    async fn status(&self) -> Result<PowerState> {
        self.power_state().await
    }

    async fn close(&self) -> Result<()> {
        self.logout().await
    }

    async fn power_off(&self) -> Result<()> {
        self.reset(ResetType::ForceOff).await
    }

    async fn power_on(&self) -> Result<()> {
        self.reset(ResetType::On).await
    }

    async fn power_cycle(&self) -> Result<()> {
        // PowerCycle is optional in Redfish (sushy's fake driver lacks it);
        // a BMC that rejects the value gets ForceRestart, the nearest one.
        match RedfishClient::reset(self, ResetType::PowerCycle).await {
            Err(BmcError::Refused { code: 400 | 501, .. }) => RedfishClient::reset(self, ResetType::ForceRestart).await,
            other => other,
        }
    }

    async fn reset(&self) -> Result<()> {
        RedfishClient::reset(self, ResetType::ForceRestart).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(address: &str, tls: RedfishTls) -> RedfishConfig {
        let mut config = RedfishConfig::new(address, "admin", Secret::new("sekrit-pw"));
        config.tls = tls;
        config
    }

    #[test]
    fn plain_http_needs_insecure_mode_and_the_error_names_the_address() {
        let error = RedfishClient::new(config("http://10.0.3.11:8000", RedfishTls::WebRoots)).unwrap_err();
        assert!(matches!(error, BmcError::Config { .. }), "{error:?}");
        assert!(error.to_string().contains("http://10.0.3.11:8000"), "{error}");
        assert!(error.to_string().contains("insecure"), "{error}");
        let ca = RedfishTls::CaBundle(PathBuf::from("/nonexistent"));
        assert!(matches!(RedfishClient::new(config("http://10.0.3.11", ca)), Err(BmcError::Config { .. })));
        let client = RedfishClient::new(config("http://10.0.3.11:8000", RedfishTls::Insecure)).unwrap();
        assert_eq!(client.target(), "http://10.0.3.11:8000 redfish");
        let client = RedfishClient::new(config("10.0.3.11", RedfishTls::WebRoots)).unwrap();
        assert_eq!(client.target(), "https://10.0.3.11:443 redfish");
    }

    #[test]
    fn an_address_with_embedded_credentials_is_refused_without_echoing_them() {
        for address in ["https://root:hunter2@10.0.3.11", "http://root:hunter2@10.0.3.11/", "root:hunter2@10.0.3.11"] {
            for tls in [RedfishTls::WebRoots, RedfishTls::Insecure] {
                let error = RedfishClient::new(config(address, tls)).unwrap_err();
                assert!(matches!(error, BmcError::Config { .. }), "{address}: {error:?}");
                let shown = format!("{error} {error:?}");
                assert!(!shown.contains("hunter2"), "{shown}");
                assert!(shown.contains("credentials"), "{shown}");
            }
        }
    }

    #[test]
    fn the_session_token_header_is_sensitive() {
        let value = token_header("0123abcd").unwrap();
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("0123abcd"));
    }

    /// A hostile BMC answering `"target": "@evil.example/x"` would make
    /// `https://bmc:443@evil.example/x` of it: the reset POST, with the
    /// credentials, would go to another host. Such paths are refused.
    #[test]
    fn paths_from_the_bmc_that_would_leave_it_are_refused() {
        let system = |target: &str| serde_json::json!({"Actions": {"#ComputerSystem.Reset": {"target": target}}});
        for target in ["@evil.example/x", "//evil.example/x", "https://evil.example/x", "x", "/a b", "/a\\b", ""] {
            let error = reset_target_from_system("/redfish/v1/Systems/1", &system(target)).unwrap_err();
            assert!(matches!(error, BmcError::Protocol { .. }), "{target:?}: {error:?}");
        }
        let target = "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset";
        assert_eq!(reset_target_from_system("/redfish/v1/Systems/1", &system(target)).unwrap(), target);
        assert_eq!(
            reset_target_from_system("/redfish/v1/Systems/1/", &serde_json::json!({})).unwrap(),
            "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"
        );
        let members = serde_json::json!({"Members": [{"@odata.id": "@evil.example/redfish/v1/Systems/1"}]});
        assert!(matches!(system_path_from_collection(&members, None), Err(BmcError::Protocol { .. })));
    }

    #[test]
    fn garbage_system_answers_are_protocol_errors_not_a_power_state() {
        for body in ["", "null", "[]", "{\"PowerState\": 0}", "{\"PowerState\": null}", "{"] {
            let outcome = parse_json("/redfish/v1/Systems/1", body)
                .and_then(|system| power_state_from_system("/redfish/v1/Systems/1", &system));
            assert!(matches!(outcome, Err(BmcError::Protocol { .. })), "{body:?}: {outcome:?}");
        }
        let off = parse_json("/s", r#"{"PowerState": "Off"}"#).unwrap();
        assert_eq!(power_state_from_system("/s", &off).unwrap(), PowerState::Off);
        let powering_off = parse_json("/s", r#"{"PowerState": "PoweringOff"}"#).unwrap();
        assert_eq!(power_state_from_system("/s", &powering_off).unwrap(), PowerState::On);
    }
}
