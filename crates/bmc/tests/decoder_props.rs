//! Every decoder must survive any datagram a hostile or broken network can
//! deliver: no panic, only `Err` or a value.

use kvmha_bmc::ipmi::codec::{self, V2Header};
use kvmha_bmc::ipmi::commands::{decode_chassis_status, Privilege};
use kvmha_bmc::ipmi::crypto::{self, CipherSuite};
use kvmha_bmc::ipmi::session::{Handshake, HandshakeParams};
use kvmha_bmc::Secret;
use proptest::prelude::*;

fn handshake(suite: CipherSuite) -> Handshake {
    Handshake::new(HandshakeParams {
        username: "admin".into(),
        password: Secret::new("password"),
        privilege: Privilege::Administrator,
        suite,
        console_session_id: 7,
        console_random: [1; 16],
        tag: 9,
    })
    .unwrap()
}

/// A datagram that starts like a real RMCP+ packet, so the fuzzing gets past
/// the first header checks more often than uniformly random bytes would.
fn rmcp_plus_like() -> impl Strategy<Value = Vec<u8>> {
    (any::<u8>(), any::<[u8; 10]>(), any::<u16>(), prop::collection::vec(any::<u8>(), 0..200)).prop_map(
        |(payload_type, ids, length, rest)| {
            let mut packet = vec![0x06, 0x00, 0xff, 0x07, 0x06, payload_type];
            packet.extend_from_slice(&ids[..8]);
            packet.extend_from_slice(&(length % 256).to_le_bytes());
            packet.extend_from_slice(&rest);
            packet
        },
    )
}

fn datagram() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![prop::collection::vec(any::<u8>(), 0..300), rmcp_plus_like()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn codec_decoders_never_panic(bytes in datagram()) {
        for auth_code_len in [0, 12, 16, 255] {
            let _ = codec::decode_v2(&bytes, auth_code_len);
        }
        let _ = codec::decode_v15_sessionless(&bytes);
        let _ = codec::decode_ipmi_response(&bytes);
        let _ = codec::decode_asf_presence_pong(&bytes);
        let _ = codec::decode_open_session_response(&bytes);
        let _ = codec::decode_rakp2(&bytes);
        let _ = codec::decode_rakp4(&bytes);
        let _ = decode_chassis_status(&bytes);
        let _ = crypto::decrypt_aes_cbc_128(&[3; 20], &bytes);
    }

    #[test]
    fn handshake_steps_never_panic(bytes in datagram()) {
        for suite in [CipherSuite::SUITE_3, CipherSuite::SUITE_17] {
            let mut handshake = handshake(suite);
            let _ = handshake.on_open_session_response(&bytes);
            let _ = handshake.on_rakp2(&bytes);
            let _ = handshake.on_rakp4(&bytes);
        }
    }

    #[test]
    fn v2_packets_round_trip(
        payload in prop::collection::vec(any::<u8>(), 0..300),
        session_id in any::<u32>(),
        session_seq in any::<u32>(),
        authenticated in any::<bool>(),
    ) {
        let header = V2Header {
            payload_type: codec::PAYLOAD_IPMI,
            encrypted: false,
            authenticated,
            session_id,
            session_seq,
        };
        let integrity = |covered: &[u8]| covered.iter().take(12).copied().chain(std::iter::repeat(0)).take(12).collect::<Vec<u8>>();
        let packet = if authenticated {
            codec::encode_v2(header, &payload, Some(&integrity))
        } else {
            codec::encode_v2(header, &payload, None)
        };
        let decoded = codec::decode_v2(&packet, if authenticated { 12 } else { 0 }).unwrap();
        prop_assert_eq!(decoded.header, header);
        prop_assert_eq!(decoded.payload, &payload[..]);
    }

    #[test]
    fn aes_round_trips(
        plaintext in prop::collection::vec(any::<u8>(), 0..100),
        key in any::<[u8; 20]>(),
        iv in any::<[u8; 16]>(),
    ) {
        let sealed = crypto::encrypt_aes_cbc_128(&key, &iv, &plaintext);
        prop_assert_eq!(crypto::decrypt_aes_cbc_128(&key, &sealed).unwrap(), plaintext);
    }
}

/// A real established session (keys derived through the public crypto API,
/// BMC side included), plus the BMC-side keys to forge valid responses.
fn established(suite: CipherSuite) -> (kvmha_bmc::ipmi::session::Session, Vec<u8>, Vec<u8>) {
    let hash = suite.hash.expect("authenticated suite");
    let password = b"password";
    let user_key = crypto::user_key(password);
    let managed_random = [2u8; 16];
    let guid = [3u8; 16];
    let mut handshake = handshake(suite);
    let mut open = vec![9, 0, 4, 0];
    open.extend_from_slice(&7u32.to_le_bytes());
    open.extend_from_slice(&0x55u32.to_le_bytes());
    for (kind, algorithm) in [(0u8, suite.authentication_algorithm()), (1, suite.integrity), (2, suite.confidentiality)]
    {
        open.extend_from_slice(&[kind, 0, 0, 8, algorithm, 0, 0, 0]);
    }
    let setup = |payload_type, payload: &[u8]| {
        codec::encode_v2(
            V2Header { payload_type, encrypted: false, authenticated: false, session_id: 0, session_seq: 0 },
            payload,
            None,
        )
    };
    handshake.on_open_session_response(&setup(codec::PAYLOAD_OPEN_SESSION_RESPONSE, &open)).unwrap().unwrap();
    let inputs = crypto::RakpInputs {
        console_session_id: 7,
        managed_session_id: 0x55,
        console_random: &[1; 16],
        managed_random: &managed_random,
        managed_guid: &guid,
        role: 0x14,
        username: b"admin",
    };
    let mut rakp2 = vec![9, 0, 0, 0];
    rakp2.extend_from_slice(&7u32.to_le_bytes());
    rakp2.extend_from_slice(&managed_random);
    rakp2.extend_from_slice(&guid);
    rakp2.extend(inputs.rakp2_auth_code(hash, &user_key));
    handshake.on_rakp2(&setup(codec::PAYLOAD_RAKP2, &rakp2)).unwrap().unwrap();
    let sik = inputs.session_integrity_key(hash, &user_key);
    let mut rakp4 = vec![9, 0, 0, 0];
    rakp4.extend_from_slice(&7u32.to_le_bytes());
    rakp4.extend(inputs.rakp4_integrity_check(hash, &sik));
    let session = handshake.on_rakp4(&setup(codec::PAYLOAD_RAKP4, &rakp4)).unwrap().unwrap();
    (session, crypto::additional_key(hash, &sik, 1), crypto::additional_key(hash, &sik, 2))
}

/// A valid, sealed Get Chassis Status response from the BMC side.
fn bmc_response(suite: CipherSuite, k1: &[u8], k2: &[u8], seq: u32) -> Vec<u8> {
    let mut message = vec![0x81, 0x04];
    message.push(codec::checksum(&message));
    message.extend_from_slice(&[0x20, 0x04, 0x01, 0x00, 0x01, 0x00, 0x00]);
    message.push(codec::checksum(&message[3..]));
    let payload = crypto::encrypt_aes_cbc_128(k2, &[4; 16], &message);
    let integrity = |covered: &[u8]| crypto::integrity_code(suite, k1, covered);
    codec::encode_v2(
        V2Header {
            payload_type: codec::PAYLOAD_IPMI,
            encrypted: true,
            authenticated: true,
            session_id: 7,
            session_seq: seq,
        },
        &payload,
        Some(&integrity),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn established_sessions_reject_garbage_and_any_bit_flip(
        garbage in datagram(),
        flip_at in any::<prop::sample::Index>(),
        flip_bit in 0u8..8,
    ) {
        for suite in [CipherSuite::SUITE_3, CipherSuite::SUITE_17] {
            let (mut session, k1, k2) = established(suite);
            let _ = session.open_response(&garbage);
            let valid = bmc_response(suite, &k1, &k2, 1);
            let mut flipped = valid.clone();
            // Bytes 0..4 are the RMCP header, outside the integrity code
            // (and the decoder only accepts one value for most of them).
            let at = 4 + flip_at.index(flipped.len() - 4);
            flipped[at] ^= 1 << flip_bit;
            prop_assert!(session.open_response(&flipped).is_err(), "flip at {} accepted", at);
            let opened = session.open_response(&valid).unwrap();
            prop_assert_eq!(opened.data, vec![0x01, 0x00, 0x00]);
        }
    }
}
