//! An agent certificate signed by the cluster CA but expired is refused by the TLS layer
//! itself (issue 10), on a listener that requires client certificates and on one where
//! they are optional (the manager's, which also serves joins): presenting an expired
//! certificate is never the same as presenting none.

use kvmha_proto::pki::{self, ClientAuth, ClusterCa};
use std::time::Duration;

/// A client certificate for `host1` from the cluster CA, valid from `not_before` to
/// `not_after` (year, month, day).
fn agent_cert(ca: &ClusterCa, not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> (String, String) {
    let ca_key = rcgen::KeyPair::from_pem(&ca.key_pem()).unwrap();
    let ca_cert = rcgen::CertificateParams::from_ca_cert_pem(&ca.cert_pem()).unwrap().self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["host1".to_owned()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "host1");
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn an_expired_agent_certificate_is_refused_a_valid_one_is_taken() {
    let ca = ClusterCa::generate("test").unwrap();
    let server = ca.issue("manager", vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let expired = agent_cert(&ca, (2020, 1, 1), (2021, 1, 1));
    let valid = agent_cert(&ca, (2020, 1, 1), (4000, 1, 1));
    for client_auth in [ClientAuth::Required, ClientAuth::Optional] {
        let tls = pki::server_config(&server.cert_pem, &server.key_pem, &ca.cert_pem(), client_auth).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let serving = tokio::spawn(kvmha_proto::transport::serve_tls(listener, tls, router, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
        let get = |identity: &(String, String)| {
            let client = kvmha_proto::transport::client(
                &ca.cert_pem(),
                Some((&identity.0, &identity.1)),
                Duration::from_secs(10),
            )
            .unwrap();
            async move { client.get(format!("https://127.0.0.1:{}/", address.port())).send().await }
        };
        let refused = get(&expired).await;
        assert!(refused.is_err(), "{client_auth:?}: an expired certificate was served: {refused:?}");
        let taken = get(&valid).await.unwrap_or_else(|error| panic!("{client_auth:?}: valid refused: {error:?}"));
        assert_eq!(taken.status().as_u16(), 200, "{client_auth:?}");
        let _ = stop.send(true);
        let _ = serving.await;
    }
}
