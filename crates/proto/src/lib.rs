//! kvmha-proto: the agent<->manager wire protocol and its transport.
//!
//! - [`messages`]: the JSON messages (join, ping, goodbye, manager→agent commands), each
//!   carrying a protocol version; [`decode`] turns unknown or malformed input into a
//!   [`ProtoError`] naming the problem, never a panic.
//! - [`pki`]: the cluster CA, certificate signing requests and signed certificates
//!   (rcgen), and the rustls configurations for mutual TLS.
//! - [`transport`]: serving an axum router over TLS with the peer's certificate
//!   fingerprint attached to every request, and HTTPS clients with a client certificate.

pub mod error;
pub mod messages;
pub mod pki;
pub mod transport;

pub use error::ProtoError;
pub use messages::*;

/// Decodes one JSON message, refusing unknown fields, malformed JSON and other versions.
pub fn decode<T: serde::de::DeserializeOwned + messages::Versioned>(bytes: &[u8]) -> Result<T, ProtoError> {
    let message: T = serde_json::from_slice(bytes).map_err(|error| ProtoError::Malformed {
        message: std::any::type_name::<T>().rsplit("::").next().unwrap_or("message").to_owned(),
        reason: error.to_string(),
    })?;
    messages::check_version(message.version())?;
    Ok(message)
}
