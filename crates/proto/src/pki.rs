//! The cluster's certificates: a CA made at `manager init`, certificates it signs for the
//! manager and, from their CSRs, for agents; and the rustls configurations built on them.
//!
//! Peers are identified by the SHA-256 fingerprint of their certificate (DER): the manager
//! records each agent's at join, each agent records the manager's. A certificate from
//! another CA never gets that far: the TLS handshake refuses it.

use crate::error::ProtoError;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Fingerprint of the first certificate of a PEM file's text.
pub fn cert_fingerprint_pem(pem: &str) -> Result<String, ProtoError> {
    let certs = parse_certs(pem)?;
    Ok(sha256_hex(certs[0].as_ref()))
}

pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, ProtoError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ProtoError::certificate(format!("unreadable PEM certificate: {error}")))?;
    if certs.is_empty() {
        return Err(ProtoError::certificate("no certificate in PEM text"));
    }
    Ok(certs)
}

pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, ProtoError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|error| ProtoError::certificate(format!("unreadable PEM private key: {error}")))
}

/// A certificate and its key, as PEM text.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The key is a secret: never in Debug output.
impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// The cluster CA, able to sign.
pub struct ClusterCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").field("key", &"<redacted>").finish()
    }
}

impl ClusterCa {
    pub fn generate(cluster_id: &str) -> Result<ClusterCa, ProtoError> {
        let key = KeyPair::generate().map_err(ProtoError::certificate)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ProtoError::certificate)?;
        params.distinguished_name = distinguished_name(&format!("kvmha cluster CA {cluster_id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).map_err(ProtoError::certificate)?;
        Ok(ClusterCa { cert, key })
    }

    /// Loads the CA written by [`ClusterCa::generate`] (the issuer name and key are what
    /// signing needs; they are read back from the files).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, ProtoError> {
        let key = KeyPair::from_pem(key_pem).map_err(ProtoError::certificate)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem).map_err(ProtoError::certificate)?;
        let cert = params.self_signed(&key).map_err(ProtoError::certificate)?;
        Ok(ClusterCa { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate and a fresh key for `common_name`, valid as TLS server and client.
    pub fn issue(&self, common_name: &str, subject_alt_names: Vec<String>) -> Result<Issued, ProtoError> {
        let key = KeyPair::generate().map_err(ProtoError::certificate)?;
        let params = leaf_params(common_name, subject_alt_names)?;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(ProtoError::certificate)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs the public key of a CSR. The subject and names come from the manager, never
    /// from the CSR: an agent cannot ask for someone else's name.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        common_name: &str,
        subject_alt_names: Vec<String>,
    ) -> Result<String, ProtoError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|error| ProtoError::certificate(format!("invalid certificate signing request: {error}")))?;
        let params = leaf_params(common_name, subject_alt_names)?;
        let cert = params.signed_by(&csr.public_key, &self.cert, &self.key).map_err(ProtoError::certificate)?;
        Ok(cert.pem())
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "kvmha");
    name
}

fn leaf_params(common_name: &str, subject_alt_names: Vec<String>) -> Result<CertificateParams, ProtoError> {
    let mut params = CertificateParams::new(subject_alt_names)
        .map_err(|error| ProtoError::certificate(format!("invalid subject alternative name: {error}")))?;
    params.distinguished_name = distinguished_name(common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// A key pair and a CSR for it, made by a joining agent. The key never leaves the agent.
pub fn generate_csr(common_name: &str) -> Result<Issued, ProtoError> {
    let key = KeyPair::generate().map_err(ProtoError::certificate)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ProtoError::certificate)?;
    params.distinguished_name = distinguished_name(common_name);
    let csr = params.serialize_request(&key).map_err(ProtoError::certificate)?;
    let csr_pem = csr.pem().map_err(ProtoError::certificate)?;
    Ok(Issued { cert_pem: csr_pem, key_pem: key.serialize_pem() })
}

/// Whether a client must present a certificate signed by the cluster CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Optional, but a certificate that is presented must verify (the manager: the join
    /// endpoint is reached without one; every agent endpoint checks for one).
    Optional,
    Required,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server configuration presenting `cert_pem` and verifying clients against `ca_pem`.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, ProtoError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots.add(cert).map_err(ProtoError::tls)?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = match client_auth {
        ClientAuth::Optional => builder.allow_unauthenticated(),
        ClientAuth::Required => builder,
    };
    let verifier = builder.build().map_err(ProtoError::tls)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(ProtoError::tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parse_certs(cert_pem)?, parse_key(key_pem)?)
        .map_err(ProtoError::tls)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_is_signed_with_the_managers_names_and_reloaded_ca_signs_the_same() {
        let ca = ClusterCa::generate("c1").unwrap();
        let csr = generate_csr("anything").unwrap();
        let cert = ca.sign_csr(&csr.cert_pem, "host1", vec!["host1".into(), "127.0.0.1".into()]).unwrap();
        assert!(cert_fingerprint_pem(&cert).unwrap().len() == 64);
        let reloaded = ClusterCa::load(&ca.cert_pem(), &ca.key_pem()).unwrap();
        let issued = reloaded.issue("kvmha-manager", vec!["localhost".into()]).unwrap();
        // Both verify under the original CA certificate in a server config.
        server_config(&issued.cert_pem, &issued.key_pem, &ca.cert_pem(), ClientAuth::Required).unwrap();
        assert!(!format!("{issued:?}").contains("PRIVATE"));
    }

    #[test]
    fn garbage_csr_is_an_error() {
        let ca = ClusterCa::generate("c1").unwrap();
        let error =
            ca.sign_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "h", vec![]);
        assert!(error.unwrap_err().to_string().contains("certificate signing request"));
        assert!(parse_certs("nothing here").is_err());
    }
}
