//! Every datagram a BMC (or anyone on the out-of-band network) can send
//! goes through these decoders and handshake steps: none may panic.
//!
//! Run: `cargo fuzz run rmcp_decode --sanitizer none` (stable toolchain),
//! from the repository root.

#![no_main]

use kvmha_bmc::ipmi::codec;
use kvmha_bmc::ipmi::commands::{decode_chassis_status, Privilege};
use kvmha_bmc::ipmi::crypto::{self, CipherSuite};
use kvmha_bmc::ipmi::session::{Handshake, HandshakeParams};
use kvmha_bmc::Secret;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    for auth_code_len in [0, 12, 16] {
        let _ = codec::decode_v2(bytes, auth_code_len);
    }
    let _ = codec::decode_v15_sessionless(bytes);
    let _ = codec::decode_ipmi_response(bytes);
    let _ = codec::decode_asf_presence_pong(bytes);
    let _ = codec::decode_open_session_response(bytes);
    let _ = codec::decode_rakp2(bytes);
    let _ = codec::decode_rakp4(bytes);
    let _ = decode_chassis_status(bytes);
    let _ = crypto::decrypt_aes_cbc_128(&[7; 20], bytes);
    for suite in [CipherSuite::SUITE_3, CipherSuite::SUITE_17] {
        let mut handshake = Handshake::new(HandshakeParams {
            username: "admin".into(),
            password: Secret::new("password"),
            privilege: Privilege::Administrator,
            suite,
            console_session_id: 7,
            console_random: [1; 16],
            tag: 9,
        })
        .expect("valid params");
        let _ = handshake.on_open_session_response(bytes);
        let _ = handshake.on_rakp2(bytes);
        let _ = handshake.on_rakp4(bytes);
    }
});
