//! Pure RMCP / IPMI v1.5 / IPMI v2.0 (RMCP+) packet encoding and decoding.
//! No I/O, no clocks, no randomness: everything comes in as arguments so the
//! decoders can be property-tested and fuzzed. Section numbers refer to the
//! IPMI v2.0 specification (rev 1.1).

use crate::error::{BmcError, Result};

pub const RMCP_VERSION_1_0: u8 = 0x06;
/// "No RMCP ACK" sequence number: IPMI traffic never uses RMCP acknowledgements (§13.1.3).
pub const RMCP_SEQUENCE_NO_ACK: u8 = 0xff;
pub const RMCP_CLASS_ASF: u8 = 0x06;
pub const RMCP_CLASS_IPMI: u8 = 0x07;
/// The ASF IANA enterprise number (4542), big-endian on the wire.
pub const ASF_IANA: [u8; 4] = [0x00, 0x00, 0x11, 0xbe];
const ASF_TYPE_PRESENCE_PING: u8 = 0x80;
const ASF_TYPE_PRESENCE_PONG: u8 = 0x40;

pub const AUTH_TYPE_NONE: u8 = 0x00;
pub const AUTH_TYPE_RMCP_PLUS: u8 = 0x06;

/// BMC responder address and our software ID as requester (§5.5, "81h" is the
/// first remote console software ID).
pub const BMC_SLAVE_ADDRESS: u8 = 0x20;
pub const REMOTE_CONSOLE_SOFTWARE_ID: u8 = 0x81;

/// The "next header" byte of the integrity trailer is always 07h (§13.28).
const NEXT_HEADER_RMCP: u8 = 0x07;

pub const PAYLOAD_IPMI: u8 = 0x00;
pub const PAYLOAD_OPEN_SESSION_REQUEST: u8 = 0x10;
pub const PAYLOAD_OPEN_SESSION_RESPONSE: u8 = 0x11;
pub const PAYLOAD_RAKP1: u8 = 0x12;
pub const PAYLOAD_RAKP2: u8 = 0x13;
pub const PAYLOAD_RAKP3: u8 = 0x14;
pub const PAYLOAD_RAKP4: u8 = 0x15;

const PAYLOAD_FLAG_ENCRYPTED: u8 = 0x80;
const PAYLOAD_FLAG_AUTHENTICATED: u8 = 0x40;
const PAYLOAD_TYPE_MASK: u8 = 0x3f;
/// OEM explicit payloads carry 6 extra header bytes we never expect; we
/// reject them rather than mis-parse.
const PAYLOAD_OEM_EXPLICIT: u8 = 0x02;

/// Largest datagram we will produce or accept; IPMI LAN messages are far
/// smaller, and a bound keeps a hostile peer from making us allocate.
pub const DATAGRAM_MAX: usize = 1024;

fn rmcp_header(class: u8) -> [u8; 4] {
    [RMCP_VERSION_1_0, 0x00, RMCP_SEQUENCE_NO_ACK, class]
}

/// Two's-complement checksum used twice in every IPMI message (§13.8).
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte)).wrapping_neg()
}

fn take<'a>(bytes: &'a [u8], at: usize, len: usize, what: &str) -> Result<&'a [u8]> {
    bytes.get(at..at.saturating_add(len)).ok_or_else(|| BmcError::protocol(format!("{what}: packet too short")))
}

fn read_u32_le(bytes: &[u8], at: usize, what: &str) -> Result<u32> {
    let raw = take(bytes, at, 4, what)?;
    Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
}

// ---------------------------------------------------------------- ASF ping

pub fn encode_asf_presence_ping(tag: u8) -> Vec<u8> {
    let mut packet = rmcp_header(RMCP_CLASS_ASF).to_vec();
    packet.extend_from_slice(&ASF_IANA);
    packet.extend_from_slice(&[ASF_TYPE_PRESENCE_PING, tag, 0x00, 0x00]);
    packet
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsfPong {
    pub tag: u8,
    /// Bit 7 of "supported entities": the BMC speaks IPMI.
    pub ipmi_supported: bool,
}

pub fn decode_asf_presence_pong(bytes: &[u8]) -> Result<AsfPong> {
    let header = take(bytes, 0, 4, "rmcp header")?;
    if header[0] != RMCP_VERSION_1_0 || header[3] != RMCP_CLASS_ASF {
        return Err(BmcError::protocol("not an rmcp asf message"));
    }
    let asf = take(bytes, 4, 8, "asf header")?;
    if asf[0..4] != ASF_IANA || asf[4] != ASF_TYPE_PRESENCE_PONG {
        return Err(BmcError::protocol("not an asf presence pong"));
    }
    let data_len = usize::from(asf[7]);
    let data = take(bytes, 12, data_len, "asf pong data")?;
    let entities = *data.get(8).ok_or_else(|| BmcError::protocol("asf pong data too short"))?;
    Ok(AsfPong { tag: asf[5], ipmi_supported: entities & 0x80 != 0 })
}

// ---------------------------------------------------------------- IPMI messages

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpmiRequest {
    pub netfn: u8,
    pub cmd: u8,
    /// 6-bit requester sequence number, used to match the response.
    pub rq_seq: u8,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpmiResponse {
    /// The response netfn (request netfn + 1).
    pub netfn: u8,
    pub cmd: u8,
    pub rq_seq: u8,
    pub completion_code: u8,
    pub data: Vec<u8>,
}

/// Encodes the LAN form of an IPMI request (§13.8): the two checksums cover
/// the connection header and the rest respectively.
pub fn encode_ipmi_request(request: &IpmiRequest) -> Vec<u8> {
    let mut message = vec![BMC_SLAVE_ADDRESS, request.netfn << 2];
    message.push(checksum(&message));
    let body_start = message.len();
    message.push(REMOTE_CONSOLE_SOFTWARE_ID);
    message.push((request.rq_seq & 0x3f) << 2);
    message.push(request.cmd);
    message.extend_from_slice(&request.data);
    let body_checksum = checksum(&message[body_start..]);
    message.push(body_checksum);
    message
}

pub fn decode_ipmi_response(bytes: &[u8]) -> Result<IpmiResponse> {
    // rqAddr, netFn/LUN, chk1, rsAddr, rqSeq/LUN, cmd, completion code, chk2.
    const MINIMUM_LEN: usize = 8;
    if bytes.len() < MINIMUM_LEN {
        return Err(BmcError::protocol("ipmi response too short"));
    }
    if checksum(&bytes[0..2]) != bytes[2] {
        return Err(BmcError::protocol("ipmi response header checksum mismatch"));
    }
    let last = bytes.len() - 1;
    if checksum(&bytes[3..last]) != bytes[last] {
        return Err(BmcError::protocol("ipmi response body checksum mismatch"));
    }
    Ok(IpmiResponse {
        netfn: bytes[1] >> 2,
        rq_seq: bytes[4] >> 2,
        cmd: bytes[5],
        completion_code: bytes[6],
        data: bytes[7..last].to_vec(),
    })
}

// ---------------------------------------------------------------- IPMI v1.5 session wrapper

/// Wraps a message in an IPMI v1.5 session header with authentication type
/// none and session 0. Only used before a session exists (Get Channel
/// Authentication Capabilities), as the spec asks (§13.14).
pub fn encode_v15_sessionless(message: &[u8]) -> Vec<u8> {
    let mut packet = rmcp_header(RMCP_CLASS_IPMI).to_vec();
    packet.push(AUTH_TYPE_NONE);
    packet.extend_from_slice(&0u32.to_le_bytes()); // session sequence
    packet.extend_from_slice(&0u32.to_le_bytes()); // session id
    let message_len = u8::try_from(message.len()).expect("ipmi v1.5 message longer than 255");
    packet.push(message_len);
    packet.extend_from_slice(message);
    packet
}

/// Returns the IPMI message inside an unauthenticated v1.5 packet.
pub fn decode_v15_sessionless(bytes: &[u8]) -> Result<&[u8]> {
    let header = take(bytes, 0, 4, "rmcp header")?;
    if header[0] != RMCP_VERSION_1_0 || header[3] & 0x1f != RMCP_CLASS_IPMI {
        return Err(BmcError::protocol("not an rmcp ipmi message"));
    }
    let auth_type = take(bytes, 4, 1, "auth type")?[0];
    if auth_type != AUTH_TYPE_NONE {
        return Err(BmcError::protocol(format!(
            "expected an unauthenticated v1.5 packet, got auth type {auth_type:#04x}"
        )));
    }
    let message_len = usize::from(take(bytes, 13, 1, "message length")?[0]);
    take(bytes, 14, message_len, "v1.5 message")
}

// ---------------------------------------------------------------- IPMI v2.0 / RMCP+ packets

/// What the RMCP+ session header says (§13.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V2Header {
    pub payload_type: u8,
    pub encrypted: bool,
    pub authenticated: bool,
    pub session_id: u32,
    pub session_seq: u32,
}

/// A decoded RMCP+ packet whose trailer was split off but not yet verified:
/// the session layer checks `auth_code` over `integrity_range` with its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Packet<'a> {
    pub header: V2Header,
    /// Payload bytes as sent (still encrypted if `header.encrypted`).
    pub payload: &'a [u8],
    /// Bytes from the auth type through the next-header byte: what the
    /// integrity code covers.
    pub integrity_range: &'a [u8],
    pub auth_code: &'a [u8],
}

/// Computes the auth code over the bytes an integrity code covers.
pub type IntegrityFn<'a> = &'a dyn Fn(&[u8]) -> Vec<u8>;

/// Builds an RMCP+ packet. `integrity` computes the auth code over the
/// covered range; `None` sends the packet unauthenticated (session set-up).
pub fn encode_v2(header: V2Header, payload: &[u8], integrity: Option<IntegrityFn<'_>>) -> Vec<u8> {
    let mut packet = rmcp_header(RMCP_CLASS_IPMI).to_vec();
    let covered_start = packet.len();
    packet.push(AUTH_TYPE_RMCP_PLUS);
    let mut payload_type = header.payload_type & PAYLOAD_TYPE_MASK;
    if header.encrypted {
        payload_type |= PAYLOAD_FLAG_ENCRYPTED;
    }
    if integrity.is_some() {
        payload_type |= PAYLOAD_FLAG_AUTHENTICATED;
    }
    packet.push(payload_type);
    packet.extend_from_slice(&header.session_id.to_le_bytes());
    packet.extend_from_slice(&header.session_seq.to_le_bytes());
    let payload_len = u16::try_from(payload.len()).expect("rmcp+ payload longer than 65535");
    packet.extend_from_slice(&payload_len.to_le_bytes());
    packet.extend_from_slice(payload);
    if let Some(integrity) = integrity {
        // Pad so the covered range (auth type .. next header) is a multiple of 4.
        let covered_len_without_pad = packet.len() - covered_start + 2;
        let pad_len = (4 - covered_len_without_pad % 4) % 4;
        packet.extend(std::iter::repeat_n(0xff, pad_len));
        packet.push(pad_len as u8);
        packet.push(NEXT_HEADER_RMCP);
        let auth_code = integrity(&packet[covered_start..]);
        packet.extend_from_slice(&auth_code);
    }
    packet
}

/// Splits an RMCP+ packet. `auth_code_len` comes from the negotiated
/// integrity algorithm (0 before a session exists).
pub fn decode_v2(bytes: &[u8], auth_code_len: usize) -> Result<V2Packet<'_>> {
    if bytes.len() > DATAGRAM_MAX {
        return Err(BmcError::protocol("datagram too large"));
    }
    let header = take(bytes, 0, 4, "rmcp header")?;
    if header[0] != RMCP_VERSION_1_0 || header[3] & 0x1f != RMCP_CLASS_IPMI {
        return Err(BmcError::protocol("not an rmcp ipmi message"));
    }
    let fixed = take(bytes, 4, 12, "rmcp+ session header")?;
    if fixed[0] != AUTH_TYPE_RMCP_PLUS {
        return Err(BmcError::protocol(format!("expected rmcp+ auth type 06h, got {:#04x}", fixed[0])));
    }
    let payload_type_byte = fixed[1];
    let payload_type = payload_type_byte & PAYLOAD_TYPE_MASK;
    if payload_type == PAYLOAD_OEM_EXPLICIT {
        return Err(BmcError::protocol("oem explicit payloads are not supported"));
    }
    let header = V2Header {
        payload_type,
        encrypted: payload_type_byte & PAYLOAD_FLAG_ENCRYPTED != 0,
        authenticated: payload_type_byte & PAYLOAD_FLAG_AUTHENTICATED != 0,
        session_id: read_u32_le(fixed, 2, "session id")?,
        session_seq: read_u32_le(fixed, 6, "session sequence")?,
    };
    let payload_len = usize::from(u16::from_le_bytes([fixed[10], fixed[11]]));
    let payload_start = 16;
    let payload = take(bytes, payload_start, payload_len, "rmcp+ payload")?;
    let payload_end = payload_start + payload_len;
    if !header.authenticated {
        if payload_end != bytes.len() {
            return Err(BmcError::protocol("trailing bytes after unauthenticated payload"));
        }
        return Ok(V2Packet { header, payload, integrity_range: &bytes[4..payload_end], auth_code: &[] });
    }
    // Trailer: pad (0-3 x FFh), pad length, next header, auth code.
    let trailer_len = bytes.len() - payload_end;
    if trailer_len < 2 + auth_code_len {
        return Err(BmcError::protocol("integrity trailer too short"));
    }
    let next_header_at = bytes.len() - auth_code_len - 1;
    let pad_len_at = next_header_at - 1;
    let pad_len = usize::from(bytes[pad_len_at]);
    if payload_end + pad_len != pad_len_at {
        return Err(BmcError::protocol("integrity pad length inconsistent"));
    }
    if bytes[next_header_at] != NEXT_HEADER_RMCP {
        return Err(BmcError::protocol("integrity trailer next header is not 07h"));
    }
    Ok(V2Packet {
        header,
        payload,
        integrity_range: &bytes[4..=next_header_at],
        auth_code: &bytes[next_header_at + 1..],
    })
}

// ---------------------------------------------------------------- session set-up payloads

/// Algorithm triple proposed in Open Session Request (§13.17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algorithms {
    pub authentication: u8,
    pub integrity: u8,
    pub confidentiality: u8,
}

pub fn encode_open_session_request(
    tag: u8,
    max_privilege: u8,
    console_session_id: u32,
    algorithms: Algorithms,
) -> Vec<u8> {
    let mut payload = vec![tag, max_privilege, 0x00, 0x00];
    payload.extend_from_slice(&console_session_id.to_le_bytes());
    for (payload_kind, algorithm) in
        [(0x00, algorithms.authentication), (0x01, algorithms.integrity), (0x02, algorithms.confidentiality)]
    {
        payload.extend_from_slice(&[payload_kind, 0x00, 0x00, 0x08, algorithm, 0x00, 0x00, 0x00]);
    }
    payload
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSessionResponse {
    pub tag: u8,
    pub status: u8,
    pub max_privilege: u8,
    pub console_session_id: u32,
    /// Present only when `status` is 0.
    pub managed_session_id: u32,
    pub algorithms: Option<Algorithms>,
}

pub fn decode_open_session_response(payload: &[u8]) -> Result<OpenSessionResponse> {
    let head = take(payload, 0, 2, "open session response")?;
    let (tag, status) = (head[0], head[1]);
    if status != 0 {
        // On error the BMC may send only the first 8 bytes (§13.18).
        let console_session_id = read_u32_le(payload, 4, "open session response").unwrap_or(0);
        return Ok(OpenSessionResponse {
            tag,
            status,
            max_privilege: 0,
            console_session_id,
            managed_session_id: 0,
            algorithms: None,
        });
    }
    let body = take(payload, 0, 36, "open session response")?;
    Ok(OpenSessionResponse {
        tag,
        status,
        max_privilege: body[2] & 0x0f,
        console_session_id: read_u32_le(body, 4, "console session id")?,
        managed_session_id: read_u32_le(body, 8, "managed session id")?,
        algorithms: Some(Algorithms {
            authentication: body[16] & 0x3f,
            integrity: body[24] & 0x3f,
            confidentiality: body[32] & 0x3f,
        }),
    })
}

pub fn encode_rakp1(tag: u8, managed_session_id: u32, console_random: &[u8; 16], role: u8, username: &[u8]) -> Vec<u8> {
    let mut payload = vec![tag, 0x00, 0x00, 0x00];
    payload.extend_from_slice(&managed_session_id.to_le_bytes());
    payload.extend_from_slice(console_random);
    payload.extend_from_slice(&[role, 0x00, 0x00]);
    payload.push(username.len() as u8);
    payload.extend_from_slice(username);
    payload
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp2 {
    pub tag: u8,
    pub status: u8,
    pub console_session_id: u32,
    pub managed_random: [u8; 16],
    pub managed_guid: [u8; 16],
    pub auth_code: Vec<u8>,
}

pub fn decode_rakp2(payload: &[u8]) -> Result<Rakp2> {
    let head = take(payload, 0, 2, "rakp2")?;
    let (tag, status) = (head[0], head[1]);
    if status != 0 {
        return Ok(Rakp2 {
            tag,
            status,
            console_session_id: read_u32_le(payload, 4, "rakp2").unwrap_or(0),
            managed_random: [0; 16],
            managed_guid: [0; 16],
            auth_code: Vec::new(),
        });
    }
    let body = take(payload, 0, 40, "rakp2")?;
    let mut managed_random = [0u8; 16];
    managed_random.copy_from_slice(&body[8..24]);
    let mut managed_guid = [0u8; 16];
    managed_guid.copy_from_slice(&body[24..40]);
    Ok(Rakp2 {
        tag,
        status,
        console_session_id: read_u32_le(body, 4, "console session id")?,
        managed_random,
        managed_guid,
        auth_code: payload[40..].to_vec(),
    })
}

pub fn encode_rakp3(tag: u8, status: u8, managed_session_id: u32, auth_code: &[u8]) -> Vec<u8> {
    let mut payload = vec![tag, status, 0x00, 0x00];
    payload.extend_from_slice(&managed_session_id.to_le_bytes());
    payload.extend_from_slice(auth_code);
    payload
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rakp4 {
    pub tag: u8,
    pub status: u8,
    pub console_session_id: u32,
    pub integrity_check: Vec<u8>,
}

pub fn decode_rakp4(payload: &[u8]) -> Result<Rakp4> {
    let head = take(payload, 0, 2, "rakp4")?;
    let (tag, status) = (head[0], head[1]);
    let console_session_id = read_u32_le(payload, 4, "rakp4");
    if status != 0 {
        return Ok(Rakp4 {
            tag,
            status,
            console_session_id: console_session_id.unwrap_or(0),
            integrity_check: Vec::new(),
        });
    }
    Ok(Rakp4 { tag, status, console_session_id: console_session_id?, integrity_check: payload[8..].to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_makes_the_sum_zero() {
        let bytes = [0x20, 0x18];
        let sum = bytes.iter().fold(checksum(&bytes), |acc, byte| acc.wrapping_add(*byte));
        assert_eq!(sum, 0);
        assert_eq!(checksum(&[0x20, 0x18]), 0xc8);
    }

    #[test]
    fn get_channel_auth_caps_request_matches_the_spec_layout() {
        let message = encode_ipmi_request(&IpmiRequest { netfn: 0x06, cmd: 0x38, rq_seq: 0, data: vec![0x8e, 0x04] });
        assert_eq!(message, vec![0x20, 0x18, 0xc8, 0x81, 0x00, 0x38, 0x8e, 0x04, 0xb5]);
        let packet = encode_v15_sessionless(&message);
        assert_eq!(&packet[..4], &[0x06, 0x00, 0xff, 0x07]);
        assert_eq!(packet[13], 9);
        assert_eq!(decode_v15_sessionless(&packet).unwrap(), &message[..]);
    }

    #[test]
    fn response_checksums_are_verified() {
        // A Get Chassis Status response: power on.
        let mut response = vec![0x81, 0x04];
        response.push(checksum(&response));
        response.extend_from_slice(&[0x20, 0x04, 0x01, 0x00, 0x01, 0x00, 0x00]);
        response.push(checksum(&response[3..]));
        let decoded = decode_ipmi_response(&response).unwrap();
        assert_eq!(decoded.netfn, 0x01);
        assert_eq!(decoded.rq_seq, 1);
        assert_eq!(decoded.cmd, 0x01);
        assert_eq!(decoded.completion_code, 0);
        assert_eq!(decoded.data, vec![0x01, 0x00, 0x00]);
        let mut corrupted = response.clone();
        corrupted[7] ^= 0x01;
        assert!(decode_ipmi_response(&corrupted).is_err());
    }

    #[test]
    fn v2_packet_round_trips_with_integrity_padding() {
        for payload_len in 0..9 {
            let payload = vec![0xab; payload_len];
            let header = V2Header {
                payload_type: PAYLOAD_IPMI,
                encrypted: true,
                authenticated: true,
                session_id: 0x1122_3344,
                session_seq: 7,
            };
            let integrity = |covered: &[u8]| {
                assert_eq!(covered.len() % 4, 0, "covered range must be dword aligned");
                vec![0x5a; 12]
            };
            let packet = encode_v2(header, &payload, Some(&integrity));
            let decoded = decode_v2(&packet, 12).unwrap();
            assert_eq!(decoded.header, header);
            assert_eq!(decoded.payload, &payload[..]);
            assert_eq!(decoded.auth_code, &[0x5a; 12]);
            assert_eq!(decoded.integrity_range.len() % 4, 0);
        }
    }

    #[test]
    fn asf_ping_layout() {
        assert_eq!(
            encode_asf_presence_ping(3),
            vec![0x06, 0x00, 0xff, 0x06, 0x00, 0x00, 0x11, 0xbe, 0x80, 0x03, 0x00, 0x00]
        );
    }
}
