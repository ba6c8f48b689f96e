//! Our IPMI v2.0 / RMCP+ client.
//!
//! Layers, innermost first: [`codec`] (bytes ↔ structs), [`crypto`] (RAKP
//! and session keys), [`session`] (handshake and session as a pure state
//! machine), `transport` (the UDP socket), and [`IpmiClient`] (one session
//! per operation, implementing [`PowerControl`]).

pub mod codec;
pub mod commands;
pub mod crypto;
pub mod session;
mod transport;

use crate::error::{BmcError, Result};
use crate::{PowerControl, PowerState, Secret};
use commands::{ChassisControl, ChassisStatus, Privilege};
use crypto::CipherSuite;
use session::{Handshake, HandshakeFailure, HandshakeParams, Session};
use std::net::SocketAddr;
use std::time::Duration;
use transport::{Transport, Verdict};

pub const IPMI_PORT_DEFAULT: u16 = 623;

/// Everything needed to reach one BMC over IPMI.
#[derive(Debug, Clone)]
pub struct IpmiConfig {
    /// `HOST[:PORT]`; the port defaults to 623.
    pub address: String,
    pub username: String,
    pub password: Secret,
    /// Session privilege requested with Set Session Privilege Level.
    pub privilege: Privilege,
    /// Suites to try, strongest first. Suite 0 is refused unless
    /// `allow_suite_zero` is set, because it authenticates nothing.
    pub cipher_suites: Vec<u8>,
    pub allow_suite_zero: bool,
    /// How long one datagram waits for its answer before it is resent.
    pub attempt_timeout: Duration,
    pub attempts_max: u32,
    /// Upper bound on one whole operation (session set-up, command, close).
    pub operation_timeout: Duration,
}

impl IpmiConfig {
    pub fn new(address: impl Into<String>, username: impl Into<String>, password: Secret) -> Self {
        IpmiConfig {
            address: address.into(),
            username: username.into(),
            password,
            privilege: Privilege::Administrator,
            cipher_suites: vec![17, 3],
            allow_suite_zero: false,
            attempt_timeout: Duration::from_millis(1000),
            attempts_max: 3,
            operation_timeout: Duration::from_secs(10),
        }
    }

    fn suites(&self) -> Result<Vec<CipherSuite>> {
        if self.cipher_suites.is_empty() {
            return Err(BmcError::Config { reason: "no cipher suite configured".into() });
        }
        self.cipher_suites
            .iter()
            .map(|id| {
                let suite = CipherSuite::from_id(*id)?;
                if suite.id == 0 && !self.allow_suite_zero {
                    return Err(BmcError::Negotiation {
                        reason: "cipher suite 0 (no authentication, no integrity, no encryption) \
                                 is refused unless explicitly allowed"
                            .into(),
                    });
                }
                Ok(suite)
            })
            .collect()
    }
}

/// An IPMI BMC. Cheap to clone; holds no socket between operations.
#[derive(Debug, Clone)]
pub struct IpmiClient {
    config: IpmiConfig,
    suites: Vec<CipherSuite>,
}

impl IpmiClient {
    pub fn new(config: IpmiConfig) -> Result<Self> {
        let suites = config.suites()?;
        crate::split_host_port(&config.address, IPMI_PORT_DEFAULT)?;
        if config.username.len() > 16 {
            return Err(BmcError::Config { reason: "ipmi user names are at most 16 bytes".into() });
        }
        if config.password.len() > 20 {
            return Err(BmcError::Config { reason: "ipmi v2.0 passwords are at most 20 bytes".into() });
        }
        Ok(IpmiClient { config, suites })
    }

    pub fn config(&self) -> &IpmiConfig {
        &self.config
    }

    async fn resolve(&self) -> Result<SocketAddr> {
        let (host, port) = crate::split_host_port(&self.config.address, IPMI_PORT_DEFAULT)?;
        let mut addresses = tokio::net::lookup_host((host.as_str(), port)).await.map_err(|error| {
            BmcError::Unreachable { address: self.config.address.clone(), reason: format!("cannot resolve: {error}") }
        })?;
        addresses.next().ok_or_else(|| BmcError::Unreachable {
            address: self.config.address.clone(),
            reason: "name resolved to no address".into(),
        })
    }

    async fn transport(&self) -> Result<Transport> {
        let peer = self.resolve().await?;
        Transport::connect(peer, self.config.attempt_timeout, self.config.attempts_max).await
    }

    /// ASF presence ping (RMCP class 6): is an IPMI-capable BMC listening?
    pub async fn presence_ping(&self) -> Result<codec::AsfPong> {
        let transport = self.transport().await?;
        let tag: u8 = rand::random::<u8>() & 0xfe;
        let ping = codec::encode_asf_presence_ping(tag);
        let pong = transport
            .exchange("asf presence ping", &[ping], |bytes| {
                Ok(match codec::decode_asf_presence_pong(bytes) {
                    Ok(pong) if pong.tag == tag => Verdict::Done(pong),
                    Ok(_) => Verdict::Ignore("pong with another tag".into()),
                    Err(error) => Verdict::Ignore(error.to_string()),
                })
            })
            .await;
        pong.map_err(|error| unreachable_if_silent(error, &transport.peer))
    }

    /// Opens an authenticated session at the configured privilege.
    pub async fn open_session(&self) -> Result<IpmiSession> {
        let transport = self.transport().await?;
        let peer = transport.peer;
        // Get Channel Authentication Capabilities first: it is the cheapest
        // way to learn the BMC is there and speaks IPMI v2.0, and silence
        // here means unreachable rather than a stuck session.
        channel_auth_capabilities(&transport, self.config.privilege)
            .await
            .map_err(|error| unreachable_if_silent(error, &peer))?;

        let mut unsupported = Vec::new();
        for suite in &self.suites {
            match self.handshake(&transport, *suite).await {
                Ok(session) => {
                    tracing::debug!(peer = %peer, suite = suite.id, "ipmi session established");
                    let mut session = IpmiSession { transport, session };
                    session.set_privilege(self.config.privilege).await?;
                    return Ok(session);
                }
                Err(HandshakeFailure::SuiteUnsupported { status }) => {
                    tracing::debug!(peer = %peer, suite = suite.id, status, "cipher suite not offered");
                    unsupported.push(format!("suite {}: {}", suite.id, commands::rmcp_plus_status_meaning(status)));
                }
                Err(HandshakeFailure::Error(error)) => return Err(error),
            }
        }
        Err(BmcError::Negotiation { reason: format!("bmc {peer} accepted none of: {}", unsupported.join("; ")) })
    }

    async fn handshake(&self, transport: &Transport, suite: CipherSuite) -> Result<Session, HandshakeFailure> {
        let mut console_session_id = 0;
        while console_session_id == 0 {
            console_session_id = rand::random();
        }
        let mut handshake = Handshake::new(HandshakeParams {
            username: self.config.username.clone(),
            password: self.config.password.clone(),
            privilege: self.config.privilege,
            suite,
            console_session_id,
            console_random: rand::random(),
            tag: rand::random(),
        })?;

        // Each step: send, then feed answers to the state machine until it
        // produces the next packet. Hard failures (wrong password, refusal)
        // stop at once; stray datagrams are ignored.
        let mut hard_failure: Option<HandshakeFailure> = None;
        let open_request = handshake.open_session_request();
        let rakp1 = transport
            .exchange("open session", &[open_request], |bytes| {
                judge_handshake(handshake.on_open_session_response(bytes), &mut hard_failure)
            })
            .await;
        let rakp1 = finish_step(rakp1, hard_failure.take())?;

        let rakp3 = transport
            .exchange("rakp 1", &[rakp1], |bytes| judge_handshake(handshake.on_rakp2(bytes), &mut hard_failure))
            .await;
        let rakp3 = finish_step(rakp3, hard_failure.take())?;

        let session = transport
            .exchange("rakp 3", &[rakp3], |bytes| judge_handshake(handshake.on_rakp4(bytes), &mut hard_failure))
            .await;
        finish_step(session, hard_failure.take())
    }

    /// Runs one operation in a fresh session, closing it afterwards, all
    /// within the operation timeout.
    async fn with_session<T>(
        &self,
        operation: &str,
        work: impl for<'a> FnOnce(
            &'a mut IpmiSession,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>>,
    ) -> Result<T> {
        let timeout = self.config.operation_timeout;
        let run = async {
            let mut session = self.open_session().await?;
            let outcome = work(&mut session).await;
            // Closing is courtesy (the BMC has few session slots); its
            // failure never changes the outcome of the operation itself.
            if let Err(error) = session.close().await {
                tracing::debug!(%error, "ipmi close session failed");
            }
            outcome
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(outcome) => outcome,
            Err(_elapsed) => Err(BmcError::Timeout {
                operation: format!("ipmi {operation} on {}", self.config.address),
                after_ms: timeout.as_millis() as u64,
            }),
        }
    }

    pub async fn chassis_status(&self) -> Result<ChassisStatus> {
        self.with_session("get chassis status", |session| Box::pin(session.chassis_status())).await
    }

    pub async fn chassis_control(&self, action: ChassisControl) -> Result<()> {
        self.with_session(action.name(), move |session| Box::pin(session.chassis_control(action))).await
    }
}

/// Silence (or ICMP refusal) before any session exists means the BMC is
/// not reachable, which the fencer treats differently from a stuck session.
fn unreachable_if_silent(error: BmcError, peer: &SocketAddr) -> BmcError {
    match error {
        BmcError::Timeout { operation, after_ms } => BmcError::Unreachable {
            address: peer.to_string(),
            reason: format!("no answer to {operation} within {after_ms} ms"),
        },
        other => other,
    }
}

fn judge_handshake<T>(
    step: Result<Option<T>, HandshakeFailure>,
    hard_failure: &mut Option<HandshakeFailure>,
) -> Result<Verdict<Option<T>>> {
    match step {
        Ok(Some(next)) => Ok(Verdict::Done(Some(next))),
        Ok(None) => Ok(Verdict::Ignore("not an answer to this handshake".into())),
        Err(HandshakeFailure::Error(BmcError::Protocol { reason })) => Ok(Verdict::Ignore(reason)),
        Err(failure) => {
            *hard_failure = Some(failure);
            Ok(Verdict::Done(None))
        }
    }
}

fn finish_step<T>(exchanged: Result<Option<T>>, hard_failure: Option<HandshakeFailure>) -> Result<T, HandshakeFailure> {
    match exchanged? {
        Some(value) => Ok(value),
        None => Err(hard_failure
            .unwrap_or_else(|| HandshakeFailure::Error(BmcError::protocol("handshake stopped without a reason")))),
    }
}

async fn channel_auth_capabilities(transport: &Transport, privilege: Privilege) -> Result<()> {
    let rq_seq = 1;
    let message = codec::encode_ipmi_request(&codec::IpmiRequest {
        netfn: commands::NETFN_APP,
        cmd: commands::CMD_GET_CHANNEL_AUTH_CAPABILITIES,
        rq_seq,
        data: vec![commands::CHANNEL_REQUEST_V2_DATA | commands::CHANNEL_CURRENT, privilege.level()],
    });
    let packet = codec::encode_v15_sessionless(&message);
    let response = transport
        .exchange("get channel authentication capabilities", &[packet], |bytes| {
            let decoded = codec::decode_v15_sessionless(bytes).and_then(codec::decode_ipmi_response);
            Ok(match decoded {
                Ok(response)
                    if response.cmd == commands::CMD_GET_CHANNEL_AUTH_CAPABILITIES && response.rq_seq == rq_seq =>
                {
                    Verdict::Done(response)
                }
                Ok(_) => Verdict::Ignore("answer to another request".into()),
                Err(error) => Verdict::Ignore(error.to_string()),
            })
        })
        .await?;
    commands::check_completion(
        "get channel authentication capabilities",
        response.completion_code,
        commands::completion_code_meaning,
    )?;
    // Byte 2 bit 7: extended capabilities present; byte 4 bit 1: IPMI v2.0.
    let supports_v2 = response.data.len() >= 4 && response.data[1] & 0x80 != 0 && response.data[3] & 0x02 != 0;
    if !supports_v2 {
        return Err(BmcError::Negotiation { reason: "bmc does not offer ipmi v2.0 (rmcp+) on this channel".into() });
    }
    Ok(())
}

/// An open, authenticated session. Close it with [`IpmiSession::close`];
/// a dropped session is left for the BMC to time out.
#[derive(Debug)]
pub struct IpmiSession {
    transport: Transport,
    session: Session,
}

impl IpmiSession {
    pub fn cipher_suite(&self) -> u8 {
        self.session.suite().id
    }

    /// Sends one command and returns the response whatever its completion
    /// code; the typed helpers below turn non-zero codes into errors.
    pub async fn command(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Result<codec::IpmiResponse> {
        // Every retransmission gets its own session sequence number (a BMC
        // may drop a repeated one) but keeps the rqSeq, so a late answer to
        // an earlier copy still matches.
        let attempts = self.transport.attempts_max() as usize;
        let mut packets = Vec::with_capacity(attempts);
        let (first, rq_seq) = self.session.seal_request(netfn, cmd, data, None, rand::random());
        packets.push(first);
        for _ in 1..attempts {
            let (packet, _) = self.session.seal_request(netfn, cmd, data, Some(rq_seq), rand::random());
            packets.push(packet);
        }
        let session = &mut self.session;
        let operation = format!("ipmi command netfn {netfn:#04x} cmd {cmd:#04x}");
        self.transport
            .exchange(&operation, &packets, |bytes| {
                Ok(match session.open_response(bytes) {
                    Ok(response) if response.cmd == cmd && response.netfn == netfn + 1 && response.rq_seq == rq_seq => {
                        Verdict::Done(response)
                    }
                    Ok(_) => Verdict::Ignore("answer to another request".into()),
                    Err(error) => Verdict::Ignore(error.to_string()),
                })
            })
            .await
    }

    pub async fn set_privilege(&mut self, privilege: Privilege) -> Result<Privilege> {
        let response =
            self.command(commands::NETFN_APP, commands::CMD_SET_SESSION_PRIVILEGE_LEVEL, &[privilege.level()]).await?;
        commands::check_completion(
            "set session privilege level",
            response.completion_code,
            commands::set_privilege_code_meaning,
        )?;
        let granted = response.data.first().copied().unwrap_or(0) & 0x0f;
        if granted != privilege.level() {
            return Err(BmcError::protocol(format!(
                "asked for privilege {}, bmc granted {granted}",
                privilege.level()
            )));
        }
        Ok(privilege)
    }

    pub async fn chassis_status(&mut self) -> Result<ChassisStatus> {
        let response = self.command(commands::NETFN_CHASSIS, commands::CMD_GET_CHASSIS_STATUS, &[]).await?;
        commands::check_completion("get chassis status", response.completion_code, commands::completion_code_meaning)?;
        commands::decode_chassis_status(&response.data)
    }

    pub async fn chassis_control(&mut self, action: ChassisControl) -> Result<()> {
        let response = self.command(commands::NETFN_CHASSIS, commands::CMD_CHASSIS_CONTROL, &[action as u8]).await?;
        commands::check_completion(
            &format!("chassis control ({})", action.name()),
            response.completion_code,
            commands::completion_code_meaning,
        )
    }

    pub async fn close(mut self) -> Result<()> {
        let session_id = self.session.managed_session_id().to_le_bytes();
        let response = self.command(commands::NETFN_APP, commands::CMD_CLOSE_SESSION, &session_id).await?;
        commands::check_completion("close session", response.completion_code, commands::completion_code_meaning)
    }
}

#[async_trait::async_trait]
impl PowerControl for IpmiClient {
    fn target(&self) -> String {
        format!("{} ipmi", self.config.address)
    }

    fn unauthenticated(&self) -> Option<&'static str> {
        // Suites are tried in order, so with suite 0 anywhere in the list a
        // BMC (or whoever answers for it) may choose it.
        self.suites.iter().any(|suite| suite.id == 0).then_some(crate::fence::UNAUTHENTICATED_SUITE_ZERO)
    }

    async fn status(&self) -> Result<PowerState> {
        Ok(self.chassis_status().await?.power)
    }

    async fn power_off(&self) -> Result<()> {
        self.chassis_control(ChassisControl::PowerDown).await
    }

    async fn power_on(&self) -> Result<()> {
        self.chassis_control(ChassisControl::PowerUp).await
    }

    async fn power_cycle(&self) -> Result<()> {
        self.chassis_control(ChassisControl::PowerCycle).await
    }

    async fn reset(&self) -> Result<()> {
        self.chassis_control(ChassisControl::HardReset).await
    }
}
