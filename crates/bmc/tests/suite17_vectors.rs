//! Cipher suite 17 (RAKP-HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128) has no
//! live peer here: ipmi_sim implements no SHA-256. So the whole suite-17
//! path of the pure session state machine is checked against values computed
//! independently of our code, at test time: HMACs by Python's `hmac` and
//! `hashlib`, AES-CBC by the `openssl enc` command. The formulas fed to them
//! are written out below from the IPMI v2.0 spec (§13.31–13.32, §13.28–29).

use kvmha_bmc::ipmi::codec::{self, V2Header};
use kvmha_bmc::ipmi::commands::Privilege;
use kvmha_bmc::ipmi::crypto::CipherSuite;
use kvmha_bmc::ipmi::session::{Handshake, HandshakeFailure, HandshakeParams};
use kvmha_bmc::{BmcError, Secret};
use std::process::Command;

const PYTHON_VECTORS: &str = r#"
import hashlib, hmac, json, sys
a = json.loads(sys.argv[1])
x = bytes.fromhex
h = lambda key, msg: hmac.new(key, msg, hashlib.sha256).digest()
kuid = a["password"].encode().ljust(20, b"\0")
user = a["user"].encode()
role = bytes([a["role"]])
ulen = bytes([len(user)])
sidm = int(a["sidm"]).to_bytes(4, "little")
sidc = int(a["sidc"]).to_bytes(4, "little")
rm, rc, guid = x(a["rm"]), x(a["rc"]), x(a["guid"])
sik = h(kuid, rm + rc + role + ulen + user)
# The K constants are 20 bytes for every algorithm (IPMI v2.0 §13.32; what ipmitool does).
k1 = h(sik, b"\x01" * 20)
k2 = h(sik, b"\x02" * 20)
out = {
  "rakp2": h(kuid, sidm + sidc + rm + rc + guid + role + ulen + user).hex(),
  "rakp3": h(kuid, rc + sidm + role + ulen + user).hex(),
  "rakp4": h(sik, rm + sidc + guid)[:16].hex(),
  "k1": k1.hex(),
  "k2": k2.hex(),
}
for i, covered in enumerate(a.get("covered", [])):
  out["integrity%d" % i] = h(k1, x(covered))[:16].hex()
print(json.dumps(out))
"#;

const SIDM: u32 = 0xa1b2_c3d4;
const SIDC: u32 = 0x0102_0304;
const RM: [u8; 16] = *b"console-random-1";
const RC: [u8; 16] = *b"managed-random-2";
const GUID: [u8; 16] = *b"guid-of-the-bmc!";
const USER: &str = "fencer";
const PASSWORD: &str = "s3cret-for-suite-17";
const TAG: u8 = 0x42;
/// Administrator (4) with the name-only lookup bit, as RAKP1 sends it.
const ROLE: u8 = 0x14;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|index| u8::from_str_radix(&text[index..index + 2], 16).unwrap()).collect()
}

fn python_vectors(covered: &[Vec<u8>]) -> serde_json::Value {
    let input = serde_json::json!({
        "password": PASSWORD, "user": USER, "role": ROLE,
        "sidm": SIDM, "sidc": SIDC,
        "rm": hex(&RM), "rc": hex(&RC), "guid": hex(&GUID),
        "covered": covered.iter().map(|bytes| hex(bytes)).collect::<Vec<_>>(),
    });
    let output = Command::new("python3")
        .args(["-c", PYTHON_VECTORS, &input.to_string()])
        .output()
        .expect("python3 is needed for the suite 17 vectors");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn vector(values: &serde_json::Value, name: &str) -> Vec<u8> {
    unhex(values[name].as_str().unwrap())
}

/// AES-128-CBC without padding through the openssl command line.
fn openssl_aes(decrypt: bool, key: &[u8], iv: &[u8], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut command = Command::new("openssl");
    command.args(["enc", "-aes-128-cbc", "-nopad", "-K", &hex(&key[..16]), "-iv", &hex(iv)]);
    if decrypt {
        command.arg("-d");
    }
    let mut child =
        command.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().expect("openssl");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    output.stdout
}

fn setup_packet(payload_type: u8, payload: &[u8]) -> Vec<u8> {
    codec::encode_v2(
        V2Header { payload_type, encrypted: false, authenticated: false, session_id: 0, session_seq: 0 },
        payload,
        None,
    )
}

fn handshake() -> Handshake {
    Handshake::new(HandshakeParams {
        username: USER.into(),
        password: Secret::new(PASSWORD),
        privilege: Privilege::Administrator,
        suite: CipherSuite::SUITE_17,
        console_session_id: SIDM,
        console_random: RM,
        tag: TAG,
    })
    .unwrap()
}

fn open_session_response() -> Vec<u8> {
    let mut payload = vec![TAG, 0x00, 0x04, 0x00];
    payload.extend_from_slice(&SIDM.to_le_bytes());
    payload.extend_from_slice(&SIDC.to_le_bytes());
    for (kind, algorithm) in [(0u8, 0x03u8), (1, 0x04), (2, 0x01)] {
        payload.extend_from_slice(&[kind, 0, 0, 8, algorithm, 0, 0, 0]);
    }
    setup_packet(codec::PAYLOAD_OPEN_SESSION_RESPONSE, &payload)
}

fn rakp2(auth_code: &[u8]) -> Vec<u8> {
    let mut payload = vec![TAG, 0x00, 0x00, 0x00];
    payload.extend_from_slice(&SIDM.to_le_bytes());
    payload.extend_from_slice(&RC);
    payload.extend_from_slice(&GUID);
    payload.extend_from_slice(auth_code);
    setup_packet(codec::PAYLOAD_RAKP2, &payload)
}

fn rakp4(icv: &[u8]) -> Vec<u8> {
    let mut payload = vec![TAG, 0x00, 0x00, 0x00];
    payload.extend_from_slice(&SIDM.to_le_bytes());
    payload.extend_from_slice(icv);
    setup_packet(codec::PAYLOAD_RAKP4, &payload)
}

#[test]
fn suite_17_handshake_and_session_match_independent_vectors() {
    let values = python_vectors(&[]);
    let mut handshake = handshake();

    // Open Session Request proposes exactly suite 17's algorithms.
    let request = handshake.open_session_request();
    let request = codec::decode_v2(&request, 0).unwrap();
    assert_eq!(request.payload[8 + 4], 0x03, "rakp-hmac-sha256");
    assert_eq!(request.payload[16 + 4], 0x04, "hmac-sha256-128");
    assert_eq!(request.payload[24 + 4], 0x01, "aes-cbc-128");

    let rakp1 = handshake.on_open_session_response(&open_session_response()).unwrap().expect("rakp1");
    let rakp1 = codec::decode_v2(&rakp1, 0).unwrap();
    assert_eq!(&rakp1.payload[4..8], &SIDC.to_le_bytes());
    assert_eq!(&rakp1.payload[8..24], &RM);
    assert_eq!(rakp1.payload[24], ROLE);
    assert_eq!(&rakp1.payload[28..], USER.as_bytes());

    let rakp3 = handshake.on_rakp2(&rakp2(&vector(&values, "rakp2"))).unwrap().expect("rakp3");
    let rakp3 = codec::decode_v2(&rakp3, 0).unwrap();
    assert_eq!(&rakp3.payload[8..], &vector(&values, "rakp3")[..]);

    let mut session = handshake.on_rakp4(&rakp4(&vector(&values, "rakp4"))).unwrap().expect("session");
    assert_eq!(session.suite().id, 17);

    // A sealed request: its integrity code and ciphertext must match what
    // Python (HMAC-SHA256-128 with K1) and openssl (AES with K2) compute.
    let iv = *b"fixed-iv-for-kat";
    let (packet, rq_seq) = session.seal_request(0x00, 0x01, &[], None, iv);
    let sealed = codec::decode_v2(&packet, 16).unwrap();
    assert!(sealed.header.encrypted && sealed.header.authenticated);
    assert_eq!(sealed.header.session_id, SIDC);
    assert_eq!(sealed.header.session_seq, 1);
    let covered = sealed.integrity_range.to_vec();
    let integrity = python_vectors(&[covered]);
    assert_eq!(sealed.auth_code, &vector(&integrity, "integrity0")[..]);
    assert_eq!(&sealed.payload[..16], &iv);
    let k2 = vector(&values, "k2");
    let plaintext = openssl_aes(true, &k2, &iv, &sealed.payload[16..]);
    let message = codec::encode_ipmi_request(&codec::IpmiRequest { netfn: 0x00, cmd: 0x01, rq_seq, data: vec![] });
    // Data, then pad bytes 1..n, then n, filling a 16-byte block.
    let mut expected = message.clone();
    let pad_len = 16 - (message.len() + 1) % 16;
    expected.extend(1..=pad_len as u8);
    expected.push(pad_len as u8);
    assert_eq!(plaintext, expected);

    // A BMC response encrypted by openssl and signed by Python is accepted…
    let mut response = vec![0x81, 0x04];
    response.push(codec::checksum(&response));
    response.extend_from_slice(&[0x20, rq_seq << 2, 0x01, 0x00, 0x01, 0x10, 0x00]);
    response.push(codec::checksum(&response[3..]));
    let mut padded = response.clone();
    let pad_len = (16 - (response.len() + 1) % 16) % 16;
    padded.extend(1..=pad_len as u8);
    padded.push(pad_len as u8);
    let response_iv = *b"bmc-iv-for-the-k";
    let mut payload = response_iv.to_vec();
    payload.extend(openssl_aes(false, &k2, &response_iv, &padded));
    let header = V2Header {
        payload_type: codec::PAYLOAD_IPMI,
        encrypted: true,
        authenticated: true,
        session_id: SIDM,
        session_seq: 1,
    };
    // Build with a placeholder code, then let Python sign the covered range.
    let placeholder = |_: &[u8]| vec![0u8; 16];
    let mut packet = codec::encode_v2(header, &payload, Some(&placeholder));
    let covered_end = packet.len() - 16;
    let signed = python_vectors(&[packet[4..covered_end].to_vec()]);
    packet[covered_end..].copy_from_slice(&vector(&signed, "integrity0"));
    let mut tampered = packet.clone();
    let opened = session.open_response(&packet).unwrap();
    assert_eq!(opened.completion_code, 0);
    assert_eq!(opened.data, vec![0x01, 0x10, 0x00]);

    // …and the same packet with one flipped payload bit is not.
    tampered[20] ^= 0x01;
    assert!(session.open_response(&tampered).is_err());
}

#[test]
fn suite_17_rakp2_from_a_bmc_with_another_password_is_an_authentication_failure() {
    let mut handshake = handshake();
    handshake.on_open_session_response(&open_session_response()).unwrap().expect("rakp1");
    let mut forged = python_vectors(&[]);
    let mut code = vector(&forged, "rakp2");
    code[0] ^= 0xff;
    forged["rakp2"] = serde_json::Value::String(hex(&code));
    match handshake.on_rakp2(&rakp2(&vector(&forged, "rakp2"))) {
        Err(HandshakeFailure::Error(BmcError::Authentication { .. })) => {}
        other => panic!("expected an authentication failure, got {other:?}"),
    }
}

#[test]
fn suite_17_rakp4_with_a_wrong_integrity_check_is_refused() {
    let values = python_vectors(&[]);
    let mut handshake = handshake();
    handshake.on_open_session_response(&open_session_response()).unwrap().expect("rakp1");
    handshake.on_rakp2(&rakp2(&vector(&values, "rakp2"))).unwrap().expect("rakp3");
    let mut icv = vector(&values, "rakp4");
    icv[15] ^= 0x01;
    // Refused as a protocol error, not as wrong credentials: RAKP2 already
    // proved the password, so a bad RAKP4 is forged or corrupted and is
    // ignored while the genuine one may still arrive.
    assert!(matches!(handshake.on_rakp4(&rakp4(&icv)), Err(HandshakeFailure::Error(BmcError::Protocol { .. }))));
    let genuine = vector(&values, "rakp4");
    assert!(matches!(handshake.on_rakp4(&rakp4(&genuine)), Ok(Some(_))));
}
