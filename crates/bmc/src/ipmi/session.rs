//! The RMCP+ session as a pure state machine: the handshake turns BMC
//! answers into the next packet to send, and an established [`Session`]
//! seals requests and opens responses. Randomness (console session id,
//! random number, IVs) comes in from the caller, so tests are deterministic
//! and the transport owns every side effect.

use super::codec::{self, Algorithms, IpmiRequest, IpmiResponse, V2Header};
use super::commands::{
    rmcp_plus_status_meaning, status_means_bad_credentials, status_means_suite_unsupported, Privilege,
    ROLE_NAME_ONLY_LOOKUP,
};
use super::crypto::{self, CipherSuite, RakpInputs};
use crate::error::{BmcError, Result};
use crate::Secret;

/// Inputs of one session set-up attempt.
#[derive(Debug, Clone)]
pub struct HandshakeParams {
    pub username: String,
    pub password: Secret,
    pub privilege: Privilege,
    pub suite: CipherSuite,
    pub console_session_id: u32,
    pub console_random: [u8; 16],
    pub tag: u8,
}

enum Step {
    AwaitOpenSessionResponse,
    AwaitRakp2 { managed_session_id: u32 },
    AwaitRakp4 { managed_session_id: u32, managed_random: [u8; 16], managed_guid: [u8; 16], sik: Vec<u8> },
}

/// Hand-written so the session integrity key never reaches a log.
impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::AwaitOpenSessionResponse => f.write_str("AwaitOpenSessionResponse"),
            Step::AwaitRakp2 { managed_session_id } => {
                f.debug_struct("AwaitRakp2").field("managed_session_id", managed_session_id).finish()
            }
            Step::AwaitRakp4 { managed_session_id, .. } => f
                .debug_struct("AwaitRakp4")
                .field("managed_session_id", managed_session_id)
                .field("sik", &"<redacted>")
                .finish_non_exhaustive(),
        }
    }
}

/// Why a handshake stopped: either a hard error, or "this suite is not
/// offered" so the caller can try the next weaker one.
#[derive(Debug)]
pub enum HandshakeFailure {
    SuiteUnsupported { status: u8 },
    Error(BmcError),
}

impl From<BmcError> for HandshakeFailure {
    fn from(error: BmcError) -> Self {
        HandshakeFailure::Error(error)
    }
}

#[derive(Debug)]
pub struct Handshake {
    params: HandshakeParams,
    step: Step,
}

impl Handshake {
    pub fn new(params: HandshakeParams) -> Result<Self> {
        if params.username.len() > 16 {
            return Err(BmcError::Config { reason: "ipmi user names are at most 16 bytes".into() });
        }
        if params.password.len() > 20 {
            return Err(BmcError::Config { reason: "ipmi v2.0 passwords are at most 20 bytes".into() });
        }
        if params.console_session_id == 0 {
            return Err(BmcError::Config { reason: "session id 0 is reserved for session-less messages".into() });
        }
        Ok(Handshake { params, step: Step::AwaitOpenSessionResponse })
    }

    fn role(&self) -> u8 {
        ROLE_NAME_ONLY_LOOKUP | self.params.privilege.level()
    }

    fn setup_packet(payload_type: u8, payload: &[u8]) -> Vec<u8> {
        codec::encode_v2(
            V2Header { payload_type, encrypted: false, authenticated: false, session_id: 0, session_seq: 0 },
            payload,
            None,
        )
    }

    pub fn open_session_request(&self) -> Vec<u8> {
        let suite = self.params.suite;
        let payload = codec::encode_open_session_request(
            self.params.tag,
            self.params.privilege.level(),
            self.params.console_session_id,
            Algorithms {
                authentication: suite.authentication_algorithm(),
                integrity: suite.integrity,
                confidentiality: suite.confidentiality,
            },
        );
        Self::setup_packet(codec::PAYLOAD_OPEN_SESSION_REQUEST, &payload)
    }

    /// Decodes a set-up packet and checks it is the answer to this handshake.
    /// `Ok(None)` means "not ours" (a stale or stray datagram): keep waiting.
    fn setup_payload<'a>(&self, packet: &'a [u8], expected_type: u8) -> Result<Option<&'a [u8]>> {
        let decoded = codec::decode_v2(packet, 0)?;
        if decoded.header.payload_type != expected_type || decoded.header.session_id != 0 {
            return Ok(None);
        }
        Ok(Some(decoded.payload))
    }

    /// Handles the Open Session Response; returns RAKP message 1 to send.
    pub fn on_open_session_response(&mut self, packet: &[u8]) -> Result<Option<Vec<u8>>, HandshakeFailure> {
        let Some(payload) = self.setup_payload(packet, codec::PAYLOAD_OPEN_SESSION_RESPONSE)? else {
            return Ok(None);
        };
        let response = codec::decode_open_session_response(payload)?;
        if response.tag != self.params.tag {
            return Ok(None);
        }
        if response.status != 0 {
            if status_means_suite_unsupported(response.status) {
                return Err(HandshakeFailure::SuiteUnsupported { status: response.status });
            }
            return Err(refusal("open session", response.status).into());
        }
        if response.console_session_id != self.params.console_session_id {
            return Err(BmcError::protocol("open session response for another console session").into());
        }
        let suite = self.params.suite;
        let offered = Algorithms {
            authentication: suite.authentication_algorithm(),
            integrity: suite.integrity,
            confidentiality: suite.confidentiality,
        };
        if response.algorithms != Some(offered) {
            // A BMC must echo what we proposed; anything else would be a
            // downgrade we did not ask for.
            return Err(BmcError::protocol(format!(
                "bmc answered cipher suite {} with different algorithms {:?}",
                suite.id, response.algorithms
            ))
            .into());
        }
        if response.managed_session_id == 0 {
            return Err(BmcError::protocol("bmc assigned session id 0").into());
        }
        let rakp1 = codec::encode_rakp1(
            self.params.tag,
            response.managed_session_id,
            &self.params.console_random,
            self.role(),
            self.params.username.as_bytes(),
        );
        self.step = Step::AwaitRakp2 { managed_session_id: response.managed_session_id };
        Ok(Some(Self::setup_packet(codec::PAYLOAD_RAKP1, &rakp1)))
    }

    /// Handles RAKP message 2: verifies the BMC knows our password, derives
    /// the session key and returns RAKP message 3.
    pub fn on_rakp2(&mut self, packet: &[u8]) -> Result<Option<Vec<u8>>, HandshakeFailure> {
        let Step::AwaitRakp2 { managed_session_id } = self.step else {
            return Err(BmcError::protocol("rakp2 out of order").into());
        };
        let Some(payload) = self.setup_payload(packet, codec::PAYLOAD_RAKP2)? else {
            return Ok(None);
        };
        let rakp2 = codec::decode_rakp2(payload)?;
        if rakp2.tag != self.params.tag {
            return Ok(None);
        }
        if rakp2.status != 0 {
            return Err(rakp_failure("rakp2", rakp2.status).into());
        }
        if rakp2.console_session_id != self.params.console_session_id {
            return Err(BmcError::protocol("rakp2 for another console session").into());
        }
        let user_key = crypto::user_key(self.params.password.expose());
        let inputs = RakpInputs {
            console_session_id: self.params.console_session_id,
            managed_session_id,
            console_random: &self.params.console_random,
            managed_random: &rakp2.managed_random,
            managed_guid: &rakp2.managed_guid,
            role: self.role(),
            username: self.params.username.as_bytes(),
        };
        let (rakp3_code, sik) = match self.params.suite.hash {
            None => (Vec::new(), Vec::new()),
            Some(hash) => {
                let expected = inputs.rakp2_auth_code(hash, &user_key);
                if !constant_time_eq(&expected, &rakp2.auth_code) {
                    // The BMC proved a different password than ours: the
                    // password is wrong (or the BMC is not who we think).
                    return Err(BmcError::Authentication {
                        reason: "rakp2 key exchange code does not match: wrong password".into(),
                    }
                    .into());
                }
                (inputs.rakp3_auth_code(hash, &user_key), inputs.session_integrity_key(hash, &user_key))
            }
        };
        let rakp3 = codec::encode_rakp3(self.params.tag, 0, managed_session_id, &rakp3_code);
        self.step = Step::AwaitRakp4 {
            managed_session_id,
            managed_random: rakp2.managed_random,
            managed_guid: rakp2.managed_guid,
            sik,
        };
        Ok(Some(Self::setup_packet(codec::PAYLOAD_RAKP3, &rakp3)))
    }

    /// Handles RAKP message 4: verifies the BMC derived the same session key.
    pub fn on_rakp4(&self, packet: &[u8]) -> Result<Option<Session>, HandshakeFailure> {
        let Step::AwaitRakp4 { managed_session_id, managed_random, managed_guid, ref sik } = self.step else {
            return Err(BmcError::protocol("rakp4 out of order").into());
        };
        let Some(payload) = self.setup_payload(packet, codec::PAYLOAD_RAKP4)? else {
            return Ok(None);
        };
        let rakp4 = codec::decode_rakp4(payload)?;
        if rakp4.tag != self.params.tag {
            return Ok(None);
        }
        if rakp4.status != 0 {
            // RAKP2 already proved the BMC holds our password, so a status
            // here ("invalid integrity check value" and the like) is not a
            // credential problem: a BMC answering a retransmitted RAKP3, or
            // anyone on the network spoofing an unauthenticated status, can
            // send it. A protocol error is ignored by the handshake (a
            // genuine RAKP4 may still follow) and is retryable, so it can
            // never stop a fence the way a wrong password does.
            return Err(BmcError::protocol(format!(
                "rakp4 status {:#04x} ({}) after rakp2 proved the password",
                rakp4.status,
                rmcp_plus_status_meaning(rakp4.status)
            ))
            .into());
        }
        if rakp4.console_session_id != self.params.console_session_id {
            return Err(BmcError::protocol("rakp4 for another console session").into());
        }
        let suite = self.params.suite;
        let (k1, k2) = match suite.hash {
            None => (Vec::new(), Vec::new()),
            Some(hash) => {
                let inputs = RakpInputs {
                    console_session_id: self.params.console_session_id,
                    managed_session_id,
                    console_random: &self.params.console_random,
                    managed_random: &managed_random,
                    managed_guid: &managed_guid,
                    role: self.role(),
                    username: self.params.username.as_bytes(),
                };
                let expected = inputs.rakp4_integrity_check(hash, sik);
                if !constant_time_eq(&expected, &rakp4.integrity_check) {
                    // Not a credential problem either (RAKP2 proved the
                    // password): a forged or corrupted RAKP4, to be ignored.
                    return Err(BmcError::protocol("rakp4 integrity check value does not match").into());
                }
                (crypto::additional_key(hash, sik, 0x01), crypto::additional_key(hash, sik, 0x02))
            }
        };
        Ok(Some(Session {
            suite,
            console_session_id: self.params.console_session_id,
            managed_session_id,
            k1,
            k2,
            outbound_seq: 0,
            inbound_seq_highest: 0,
            inbound_seq_seen: 0,
            rq_seq: 0,
        }))
    }
}

fn refusal(operation: &str, status: u8) -> BmcError {
    BmcError::Refused {
        operation: operation.to_string(),
        code: u16::from(status),
        meaning: rmcp_plus_status_meaning(status).to_string(),
    }
}

fn rakp_failure(operation: &str, status: u8) -> BmcError {
    if status_means_bad_credentials(status) {
        return BmcError::Authentication {
            reason: format!("{operation} status {status:#04x}: {}", rmcp_plus_status_meaning(status)),
        };
    }
    refusal(operation, status)
}

/// Compares MACs without an early exit, so timing says nothing about how
/// many leading bytes matched.
fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter().zip(right).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// An established RMCP+ session: keys, ids and sequence numbers.
pub struct Session {
    suite: CipherSuite,
    console_session_id: u32,
    managed_session_id: u32,
    k1: Vec<u8>,
    k2: Vec<u8>,
    outbound_seq: u32,
    inbound_seq_highest: u32,
    /// Bit `n` set: `inbound_seq_highest - n` was accepted. An exact replay
    /// inside the window (a captured valid answer sent again, say "off"
    /// for a later status read) is then refused, not just a stale one.
    inbound_seq_seen: u64,
    rq_seq: u8,
}

/// Hand-written so K1 and K2 never reach a log.
impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("suite", &self.suite.id)
            .field("console_session_id", &self.console_session_id)
            .field("managed_session_id", &self.managed_session_id)
            .field("outbound_seq", &self.outbound_seq)
            .field("keys", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// How far behind the highest seen inbound sequence number a packet may be
/// and still be accepted (the spec's sliding window is 8 for BMC-side checks;
/// we apply the same to the BMC's packets).
const INBOUND_SEQ_WINDOW: u32 = 8;

impl Session {
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    pub fn managed_session_id(&self) -> u32 {
        self.managed_session_id
    }

    /// Seals one IPMI request. Every call uses a fresh session sequence
    /// number (never 0, which is reserved) and a fresh 6-bit rqSeq unless
    /// `rq_seq` is given (retransmissions keep it so a late answer still matches).
    pub fn seal_request(&mut self, netfn: u8, cmd: u8, data: &[u8], rq_seq: Option<u8>, iv: [u8; 16]) -> (Vec<u8>, u8) {
        let rq_seq = rq_seq.unwrap_or_else(|| {
            self.rq_seq = (self.rq_seq + 1) & 0x3f;
            self.rq_seq
        });
        self.outbound_seq = self.outbound_seq.wrapping_add(1).max(1);
        let message = codec::encode_ipmi_request(&IpmiRequest { netfn, cmd, rq_seq, data: data.to_vec() });
        let encrypted = self.suite.confidentiality == crypto::CONFIDENTIALITY_AES_CBC_128;
        let payload = if encrypted { crypto::encrypt_aes_cbc_128(&self.k2, &iv, &message) } else { message };
        let header = V2Header {
            payload_type: codec::PAYLOAD_IPMI,
            encrypted,
            authenticated: self.suite.integrity != crypto::INTEGRITY_NONE,
            session_id: self.managed_session_id,
            session_seq: self.outbound_seq,
        };
        let suite = self.suite;
        let k1 = &self.k1;
        let integrity = move |covered: &[u8]| crypto::integrity_code(suite, k1, covered);
        let packet = if header.authenticated {
            codec::encode_v2(header, &payload, Some(&integrity))
        } else {
            codec::encode_v2(header, &payload, None)
        };
        (packet, rq_seq)
    }

    /// Verifies, decrypts and decodes a BMC packet for this session. Any
    /// failure means the datagram must be ignored (it may be forged or stale).
    pub fn open_response(&mut self, packet: &[u8]) -> Result<IpmiResponse> {
        let decoded = codec::decode_v2(packet, self.suite.integrity_code_len())?;
        if decoded.header.payload_type != codec::PAYLOAD_IPMI {
            return Err(BmcError::protocol("unexpected payload type in session"));
        }
        if decoded.header.session_id != self.console_session_id {
            return Err(BmcError::protocol("packet for another session"));
        }
        let wants_integrity = self.suite.integrity != crypto::INTEGRITY_NONE;
        if wants_integrity {
            if !decoded.header.authenticated {
                return Err(BmcError::protocol("unauthenticated packet in an authenticated session"));
            }
            let expected = crypto::integrity_code(self.suite, &self.k1, decoded.integrity_range);
            if !constant_time_eq(&expected, decoded.auth_code) {
                return Err(BmcError::protocol("response integrity check failed"));
            }
        }
        let seq = decoded.header.session_seq;
        self.check_inbound_seq(seq)?;
        let wants_confidentiality = self.suite.confidentiality != crypto::CONFIDENTIALITY_NONE;
        let message = if wants_confidentiality {
            if !decoded.header.encrypted {
                return Err(BmcError::protocol("cleartext payload in an encrypted session"));
            }
            crypto::decrypt_aes_cbc_128(&self.k2, decoded.payload)?
        } else {
            decoded.payload.to_vec()
        };
        let response = codec::decode_ipmi_response(&message)?;
        // Recorded only now: a packet that failed any check must not use
        // up a sequence number a genuine answer may still carry.
        self.record_inbound_seq(seq);
        Ok(response)
    }

    fn check_inbound_seq(&self, seq: u32) -> Result<()> {
        if seq == 0 || seq.wrapping_add(INBOUND_SEQ_WINDOW) <= self.inbound_seq_highest {
            return Err(BmcError::protocol("response sequence number outside the window"));
        }
        if seq <= self.inbound_seq_highest {
            let behind = self.inbound_seq_highest - seq;
            if self.inbound_seq_seen & (1u64 << behind) != 0 {
                return Err(BmcError::protocol("replayed response sequence number"));
            }
        }
        Ok(())
    }

    fn record_inbound_seq(&mut self, seq: u32) {
        if seq > self.inbound_seq_highest {
            let ahead = seq - self.inbound_seq_highest;
            self.inbound_seq_seen = if ahead >= 64 { 0 } else { self.inbound_seq_seen << ahead };
            self.inbound_seq_highest = seq;
        }
        // check_inbound_seq keeps `behind` below the window (8 < 64).
        self.inbound_seq_seen |= 1u64 << (self.inbound_seq_highest - seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE_SESSION_ID: u32 = 0x1234_5678;

    fn session() -> Session {
        Session {
            suite: CipherSuite::SUITE_3,
            console_session_id: CONSOLE_SESSION_ID,
            managed_session_id: 0x0bad_cafe,
            k1: vec![0x11; 20],
            k2: vec![0x22; 20],
            outbound_seq: 0,
            inbound_seq_highest: 0,
            inbound_seq_seen: 0,
            rq_seq: 0,
        }
    }

    /// A Get Chassis Status answer as the BMC would seal it.
    fn sealed_response(session: &Session, seq: u32, power_on: bool) -> Vec<u8> {
        let mut message = vec![0x81, 0x01 << 2];
        message.push(codec::checksum(&message));
        message.extend_from_slice(&[0x20, 0x01 << 2, 0x01, 0x00, u8::from(power_on), 0, 0]);
        message.push(codec::checksum(&message[3..]));
        let payload = crypto::encrypt_aes_cbc_128(&session.k2, &[7; 16], &message);
        let header = V2Header {
            payload_type: codec::PAYLOAD_IPMI,
            encrypted: true,
            authenticated: true,
            session_id: CONSOLE_SESSION_ID,
            session_seq: seq,
        };
        let (suite, k1) = (session.suite, session.k1.clone());
        let integrity = move |covered: &[u8]| crypto::integrity_code(suite, &k1, covered);
        codec::encode_v2(header, &payload, Some(&integrity))
    }

    #[test]
    fn an_exact_replay_inside_the_window_is_rejected() {
        let mut session = session();
        let captured_off = sealed_response(&session, 5, false);
        assert!(session.open_response(&captured_off).is_ok());
        let error = session.open_response(&captured_off).unwrap_err();
        assert!(error.to_string().contains("replayed"), "{error}");
        // Later and (reordered) earlier answers inside the window still pass, once.
        assert!(session.open_response(&sealed_response(&session, 7, true)).is_ok());
        let late = sealed_response(&session, 6, true);
        assert!(session.open_response(&late).is_ok());
        assert!(session.open_response(&late).is_err());
        assert!(session.open_response(&captured_off).is_err());
        // Far ahead: the old window is gone, the new one starts clean.
        assert!(session.open_response(&sealed_response(&session, 200, true)).is_ok());
        assert!(session.open_response(&sealed_response(&session, 195, true)).is_ok());
        assert!(session.open_response(&sealed_response(&session, 195, true)).is_err());
        assert!(session.open_response(&sealed_response(&session, 100, true)).is_err());
    }

    #[test]
    fn a_packet_failing_integrity_does_not_use_up_its_sequence_number() {
        let mut session = session();
        let mut forged = sealed_response(&session, 3, false);
        let last = forged.len() - 1;
        forged[last] ^= 0xff;
        assert!(session.open_response(&forged).is_err());
        assert!(session.open_response(&sealed_response(&session, 3, true)).is_ok());
    }
}
