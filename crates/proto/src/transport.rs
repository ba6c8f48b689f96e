//! TLS transport: serve an axum router over rustls, and build HTTPS clients.

use crate::error::ProtoError;
use crate::pki::sha256_hex;
use axum::Router;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Who is on the other end of a TLS connection, attached to every request as an axum
/// extension.
#[derive(Clone, Debug)]
pub struct Peer {
    pub remote: SocketAddr,
    /// SHA-256 of the client certificate (DER, hex) if one was presented. It verified
    /// against the cluster CA, or the handshake would have failed.
    pub cert_sha256: Option<String>,
}

/// A bound on the TLS handshake: a client that connects and says nothing costs a task
/// for this long at most.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` over TLS until `shutdown` completes.
pub async fn serve_tls(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
) {
    let acceptor = TlsAcceptor::from(config);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::info!(%remote, %error, "tls handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "tls handshake timed out");
                    return;
                }
            };
            let cert_sha256 = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| sha256_hex(cert.as_ref()));
            let router = router.layer(axum::Extension(Peer { remote, cert_sha256 }));
            let service = hyper_util::service::TowerToHyperService::new(router);
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
            if let Err(error) = connection.await {
                tracing::debug!(%remote, %error, "connection ended with an error");
            }
        });
    }
}

/// An HTTPS client that trusts only the cluster CA and presents `identity` (cert + key
/// PEM) when given. Every request is bounded by `timeout`.
pub fn client(ca_pem: &str, identity: Option<(&str, &str)>, timeout: Duration) -> Result<reqwest::Client, ProtoError> {
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(ProtoError::tls)?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(timeout)
        .connect_timeout(timeout);
    if let Some((cert_pem, key_pem)) = identity {
        let identity =
            reqwest::Identity::from_pem(format!("{cert_pem}\n{key_pem}").as_bytes()).map_err(ProtoError::tls)?;
        builder = builder.identity(identity);
    }
    builder.build().map_err(ProtoError::tls)
}
