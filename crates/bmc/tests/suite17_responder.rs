//! The whole client (negotiation, transport, session, commands) over
//! cipher suite 17, against a small in-tree BMC responder: ipmi_sim has no
//! SHA-256. The responder reuses the crate's crypto primitives, so it proves
//! integration, not the primitives; those are pinned by the independent
//! known-answer vectors in suite17_vectors.rs.

use kvmha_bmc::ipmi::codec::{self, V2Header};
use kvmha_bmc::ipmi::crypto::{self, CipherSuite, Hash, RakpInputs};
use kvmha_bmc::ipmi::{IpmiClient, IpmiConfig};
use kvmha_bmc::{BmcError, PowerControl, PowerState, Secret};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;

const USER: &str = "admin";
const PASSWORD: &str = "suite-17-only";
const MANAGED_SESSION_ID: u32 = 0x0bad_cafe;

#[derive(Default)]
struct BmcState {
    power_on: bool,
    console_session_id: u32,
    console_random: [u8; 16],
    role: u8,
    k1: Vec<u8>,
    k2: Vec<u8>,
    outbound_seq: u32,
    commands: Vec<(u8, u8)>,
    /// Answer every RAKP3 first with a RAKP4 carrying this status (what a
    /// spoofer, or a BMC answering a retransmission, sends), then properly.
    spoof_rakp4_status: Option<u8>,
    /// A datagram to send before the answer (see `spoof_rakp4_status`).
    send_first: Option<Vec<u8>>,
    /// Never send the genuine RAKP4 (only the spoofed one, if any).
    break_rakp4: bool,
    /// How the session's chassis answers go wrong (issue 10), once a session is open.
    chassis_fault: Option<ChassisFault>,
}

/// A BMC that misbehaves once the session is up: every case must end in an error (or,
/// for a dropped answer, a retry), never in a power state the BMC did not report.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ChassisFault {
    /// Chassis commands answer this completion code (busy, insufficient privilege, ...).
    CompletionCode(u8),
    /// Random bytes instead of the sealed answer.
    Garbage,
    /// A correctly sealed answer that reuses the first answer's session sequence number
    /// (a replay): the client drops it.
    StaleSequence,
    /// A "power off" answer sealed with the wrong key (a forgery by someone on the BMC
    /// network without the password).
    ForgedOff,
    /// No answer at all.
    Silent,
}

fn reply_message(request: &[u8], completion_code: u8, data: &[u8]) -> Vec<u8> {
    let netfn = request[1] >> 2;
    let mut message = vec![0x81, (netfn + 1) << 2];
    message.push(codec::checksum(&message));
    message.extend_from_slice(&[0x20, request[4], request[5], completion_code]);
    message.extend_from_slice(data);
    message.push(codec::checksum(&message[3..]));
    message
}

fn setup(payload_type: u8, payload: &[u8]) -> Vec<u8> {
    let header = V2Header { payload_type, encrypted: false, authenticated: false, session_id: 0, session_seq: 0 };
    codec::encode_v2(header, payload, None)
}

/// Answers one datagram as a suite-17-only BMC would; `None` = ignore.
fn answer(state: &mut BmcState, packet: &[u8]) -> Option<Vec<u8>> {
    const RANDOM: [u8; 16] = *b"bmc-side-random!";
    const GUID: [u8; 16] = *b"responder-guid-1";
    let user_key = crypto::user_key(PASSWORD.as_bytes());
    if packet.get(4) == Some(&codec::AUTH_TYPE_NONE) {
        // Get Channel Authentication Capabilities: IPMI v2.0 available.
        let request = codec::decode_v15_sessionless(packet).ok()?;
        let message = reply_message(request, 0, &[0x01, 0x80, 0x04, 0x02, 0, 0, 0, 0]);
        return Some(codec::encode_v15_sessionless(&message));
    }
    let suite = CipherSuite::SUITE_17;
    let header = codec::decode_v2(packet, 0).or_else(|_| codec::decode_v2(packet, 16)).ok()?.header;
    match header.payload_type {
        codec::PAYLOAD_OPEN_SESSION_REQUEST => {
            let request = codec::decode_v2(packet, 0).ok()?.payload.to_vec();
            state.console_session_id = u32::from_le_bytes(request[4..8].try_into().ok()?);
            let offered = (request[12], request[20], request[28]);
            let mut reply = vec![request[0]];
            if offered != (0x03, 0x04, 0x01) {
                reply.extend_from_slice(&[0x11, 0, 0]);
                reply.extend_from_slice(&state.console_session_id.to_le_bytes());
                return Some(setup(codec::PAYLOAD_OPEN_SESSION_RESPONSE, &reply));
            }
            reply.extend_from_slice(&[0x00, 0x04, 0x00]);
            reply.extend_from_slice(&state.console_session_id.to_le_bytes());
            reply.extend_from_slice(&MANAGED_SESSION_ID.to_le_bytes());
            for (kind, algorithm) in [(0u8, 0x03u8), (1, 0x04), (2, 0x01)] {
                reply.extend_from_slice(&[kind, 0, 0, 8, algorithm, 0, 0, 0]);
            }
            Some(setup(codec::PAYLOAD_OPEN_SESSION_RESPONSE, &reply))
        }
        codec::PAYLOAD_RAKP1 => {
            let request = codec::decode_v2(packet, 0).ok()?.payload.to_vec();
            state.console_random.copy_from_slice(&request[8..24]);
            state.role = request[24];
            let username = &request[28..28 + usize::from(request[27])];
            let mut reply = vec![request[0]];
            if username != USER.as_bytes() {
                reply.extend_from_slice(&[0x0d, 0, 0]);
                reply.extend_from_slice(&state.console_session_id.to_le_bytes());
                return Some(setup(codec::PAYLOAD_RAKP2, &reply));
            }
            let inputs = RakpInputs {
                console_session_id: state.console_session_id,
                managed_session_id: MANAGED_SESSION_ID,
                console_random: &state.console_random,
                managed_random: &RANDOM,
                managed_guid: &GUID,
                role: state.role,
                username,
            };
            reply.extend_from_slice(&[0x00, 0, 0]);
            reply.extend_from_slice(&state.console_session_id.to_le_bytes());
            reply.extend_from_slice(&RANDOM);
            reply.extend_from_slice(&GUID);
            reply.extend(inputs.rakp2_auth_code(Hash::Sha256, &user_key));
            Some(setup(codec::PAYLOAD_RAKP2, &reply))
        }
        codec::PAYLOAD_RAKP3 => {
            let request = codec::decode_v2(packet, 0).ok()?.payload.to_vec();
            let inputs = RakpInputs {
                console_session_id: state.console_session_id,
                managed_session_id: MANAGED_SESSION_ID,
                console_random: &state.console_random,
                managed_random: &RANDOM,
                managed_guid: &GUID,
                role: state.role,
                username: USER.as_bytes(),
            };
            let mut reply = vec![request[0]];
            if request[8..] != inputs.rakp3_auth_code(Hash::Sha256, &user_key)[..] {
                reply.extend_from_slice(&[0x0f, 0, 0]);
                reply.extend_from_slice(&state.console_session_id.to_le_bytes());
                return Some(setup(codec::PAYLOAD_RAKP4, &reply));
            }
            if let Some(status) = state.spoof_rakp4_status {
                let mut spoofed = vec![request[0], status, 0, 0];
                spoofed.extend_from_slice(&state.console_session_id.to_le_bytes());
                state.send_first = Some(setup(codec::PAYLOAD_RAKP4, &spoofed));
            }
            if state.break_rakp4 {
                return None;
            }
            let sik = inputs.session_integrity_key(Hash::Sha256, &user_key);
            state.k1 = crypto::additional_key(Hash::Sha256, &sik, 1);
            state.k2 = crypto::additional_key(Hash::Sha256, &sik, 2);
            // Session sequence numbers start over with every session.
            state.outbound_seq = 0;
            reply.extend_from_slice(&[0x00, 0, 0]);
            reply.extend_from_slice(&state.console_session_id.to_le_bytes());
            reply.extend(inputs.rakp4_integrity_check(Hash::Sha256, &sik));
            Some(setup(codec::PAYLOAD_RAKP4, &reply))
        }
        codec::PAYLOAD_IPMI => {
            let sealed = codec::decode_v2(packet, 16).ok()?;
            let expected = crypto::integrity_code(suite, &state.k1, sealed.integrity_range);
            if sealed.header.session_id != MANAGED_SESSION_ID || expected != sealed.auth_code {
                return None; // a real BMC silently drops unverifiable packets
            }
            let request = crypto::decrypt_aes_cbc_128(&state.k2, sealed.payload).ok()?;
            let (netfn, cmd) = (request[1] >> 2, request[5]);
            let data = &request[6..request.len() - 1];
            state.commands.push((netfn, cmd));
            let fault = if netfn == 0x00 { state.chassis_fault } else { None };
            match fault {
                Some(ChassisFault::Silent) => return None,
                Some(ChassisFault::Garbage) => {
                    let garbage: Vec<u8> = (0..60u8).map(|index| index.wrapping_mul(37) ^ 0x5a).collect();
                    return Some(garbage);
                }
                _ => {}
            }
            let message = match (netfn, cmd) {
                (0x00, _) if matches!(fault, Some(ChassisFault::CompletionCode(_))) => {
                    let Some(ChassisFault::CompletionCode(code)) = fault else { unreachable!() };
                    reply_message(&request, code, &[])
                }
                (0x00, 0x01) if fault == Some(ChassisFault::ForgedOff) => reply_message(&request, 0, &[0, 0, 0]),
                (0x06, 0x3b) => reply_message(&request, 0, &[data[0]]),
                (0x06, 0x3c) => reply_message(&request, 0, &[]),
                (0x00, 0x01) => reply_message(&request, 0, &[u8::from(state.power_on), 0, 0]),
                (0x00, 0x02) => {
                    match data[0] {
                        0 => state.power_on = false,
                        1 => state.power_on = true,
                        _ => {}
                    }
                    reply_message(&request, 0, &[])
                }
                _ => reply_message(&request, 0xc1, &[]),
            };
            state.outbound_seq += 1;
            let session_seq = if fault == Some(ChassisFault::StaleSequence) { 1 } else { state.outbound_seq };
            let payload = crypto::encrypt_aes_cbc_128(&state.k2, &[6; 16], &message);
            let k1 = if fault == Some(ChassisFault::ForgedOff) { vec![0x42; state.k1.len()] } else { state.k1.clone() };
            let integrity = move |covered: &[u8]| crypto::integrity_code(suite, &k1, covered);
            let header = V2Header {
                payload_type: codec::PAYLOAD_IPMI,
                encrypted: true,
                authenticated: true,
                session_id: state.console_session_id,
                session_seq,
            };
            Some(codec::encode_v2(header, &payload, Some(&integrity)))
        }
        _ => None,
    }
}

async fn start_responder() -> (String, Arc<Mutex<BmcState>>, tokio::task::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap().to_string();
    let state = Arc::new(Mutex::new(BmcState { power_on: true, ..Default::default() }));
    let shared = state.clone();
    let task = tokio::spawn(async move {
        let mut buffer = [0u8; 2048];
        while let Ok((length, peer)) = socket.recv_from(&mut buffer).await {
            let (first, reply) = {
                let mut state = shared.lock().unwrap();
                let reply = answer(&mut state, &buffer[..length]);
                (state.send_first.take(), reply)
            };
            if let Some(first) = first {
                let _ = socket.send_to(&first, peer).await;
            }
            if let Some(reply) = reply {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
    (address, state, task)
}

fn client(address: String, user: &str, password: &str) -> IpmiClient {
    let mut config = IpmiConfig::new(address, user, Secret::new(password));
    config.attempt_timeout = Duration::from_millis(300);
    IpmiClient::new(config).unwrap()
}

#[tokio::test]
async fn suite_17_is_negotiated_first_and_carries_power_control() {
    let (address, state, task) = start_responder().await;
    let client = client(address, USER, PASSWORD);
    let session = client.open_session().await.unwrap();
    assert_eq!(session.cipher_suite(), 17);
    session.close().await.unwrap();
    assert_eq!(client.status().await.unwrap(), PowerState::On);
    client.power_off().await.unwrap();
    assert_eq!(client.status().await.unwrap(), PowerState::Off);
    assert!(!state.lock().unwrap().power_on);
    // Every session raised its privilege before any chassis command.
    let commands = state.lock().unwrap().commands.clone();
    for window in commands.windows(2) {
        if window[1].0 == 0x00 {
            assert_eq!(window[0], (0x06, 0x3b), "chassis command without set privilege first: {commands:?}");
        }
    }
    task.abort();
}

#[tokio::test]
async fn suite_17_wrong_password_and_wrong_user_are_authentication_errors() {
    let (address, state, task) = start_responder().await;
    let error = client(address.clone(), USER, "not-it").power_off().await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");
    let error = client(address, "intruder", PASSWORD).power_off().await.unwrap_err();
    assert!(matches!(error, BmcError::Authentication { .. }), "{error:?}");
    assert!(state.lock().unwrap().power_on);
    task.abort();
}

#[tokio::test]
async fn a_bmc_without_suite_3_is_not_talked_into_it() {
    let (address, _state, task) = start_responder().await;
    let mut config = IpmiConfig::new(address, USER, Secret::new(PASSWORD));
    config.cipher_suites = vec![3];
    config.attempt_timeout = Duration::from_millis(300);
    let error = IpmiClient::new(config).unwrap().status().await.unwrap_err();
    assert!(matches!(error, BmcError::Negotiation { .. }), "{error:?}");
    task.abort();
}

/// After RAKP2 proved the password, a RAKP4 error status is no proof of
/// wrong credentials: it must neither be reported as an authentication
/// failure nor stop a fence.
#[tokio::test]
async fn a_rakp4_error_status_after_a_verified_rakp2_does_not_stop_a_fence() {
    let (address, state, task) = start_responder().await;
    state.lock().unwrap().spoof_rakp4_status = Some(0x0f);
    let fencer = kvmha_bmc::Fencer {
        deadline: Duration::from_secs(10),
        poll_interval: Duration::from_millis(50),
        power_off_attempts_max: 2,
        resend_after: Duration::from_secs(1),
        ..kvmha_bmc::Fencer::default()
    };
    let report = fencer.fence(&client(address, USER, PASSWORD)).await.unwrap();
    assert_eq!(report.outcome, kvmha_bmc::FenceOutcome::PoweredOff);
    assert!(!state.lock().unwrap().power_on);
    task.abort();
}

/// A BMC that answers only with the RAKP4 status: a retryable protocol
/// error naming the status, never `Authentication`.
#[tokio::test]
async fn a_rakp4_status_alone_is_a_protocol_error_not_authentication() {
    let (address, state, task) = start_responder().await;
    {
        let mut state = state.lock().unwrap();
        state.spoof_rakp4_status = Some(0x0f);
        state.break_rakp4 = true;
    }
    let mut config = IpmiConfig::new(address, USER, Secret::new(PASSWORD));
    config.attempt_timeout = Duration::from_millis(200);
    let client = IpmiClient::new(config).unwrap();
    let error = client.status().await.unwrap_err();
    assert!(matches!(error, BmcError::Protocol { .. }), "{error:?}");
    assert!(error.to_string().contains("rakp4 status 0x0f"), "{error}");
    task.abort();
}

/// Issue 10: a BMC that answers with error completion codes, garbage, replayed sequence
/// numbers, forged "off" answers, or not at all. Each yields an error within the
/// client's bounds, never a power state, and never a fence reported as done.
#[tokio::test]
async fn misbehaving_chassis_answers_are_errors_never_a_power_state() {
    for fault in [
        ChassisFault::CompletionCode(0xc0),
        ChassisFault::CompletionCode(0xd4),
        ChassisFault::CompletionCode(0xff),
        ChassisFault::Garbage,
        ChassisFault::StaleSequence,
        ChassisFault::ForgedOff,
        ChassisFault::Silent,
    ] {
        let (address, state, task) = start_responder().await;
        // The first answer of every session is Set Session Privilege (seq 1): a chassis
        // answer reusing seq 1 is then a replay.
        state.lock().unwrap().chassis_fault = Some(fault);
        let client = client(address, USER, PASSWORD);
        let status = tokio::time::timeout(Duration::from_secs(20), client.status()).await.expect("bounded");
        assert!(status.is_err(), "{fault:?}: status {status:?}");
        let fencer = kvmha_bmc::Fencer {
            deadline: Duration::from_secs(3),
            poll_interval: Duration::from_millis(50),
            power_off_attempts_max: 2,
            resend_after: Duration::from_secs(1),
            ..kvmha_bmc::Fencer::default()
        };
        let report = tokio::time::timeout(Duration::from_secs(30), fencer.fence(&client)).await.expect("bounded");
        let fenced = matches!(&report, Ok(report) if report.outcome == kvmha_bmc::FenceOutcome::PoweredOff
            || report.outcome == kvmha_bmc::FenceOutcome::AlreadyOff);
        assert!(!fenced, "{fault:?}: a misbehaving bmc was reported fenced: {report:?}");
        task.abort();
    }
}
