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
    (
        any::<u8>(),
        any::<[u8; 10]>(),
        any::<u16>(),
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(payload_type, ids, length, rest)| {
            let mut packet = vec![0x06, 0x00, 0xff, 0x07, 0x06, payload_type];
            packet.extend_from_slice(&ids[..8]);
            packet.extend_from_slice(&(length % 256).to_le_bytes());
            packet.extend_from_slice(&rest);
            packet
        })
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
