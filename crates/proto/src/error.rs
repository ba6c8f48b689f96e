//! The one error type of this crate.

/// Why a message, a certificate or a TLS set-up was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("malformed {message}: {reason}")]
    Malformed { message: String, reason: String },
    #[error("unsupported protocol version {got} (this build speaks {supported})")]
    Version { got: u32, supported: u32 },
    #[error("certificate: {reason}")]
    Certificate { reason: String },
    #[error("tls: {reason}")]
    Tls { reason: String },
    #[error("{path}")]
    Io { path: String, source: std::io::Error },
}

impl ProtoError {
    pub(crate) fn certificate(reason: impl std::fmt::Display) -> ProtoError {
        ProtoError::Certificate { reason: reason.to_string() }
    }
    pub(crate) fn tls(reason: impl std::fmt::Display) -> ProtoError {
        ProtoError::Tls { reason: reason.to_string() }
    }
}
