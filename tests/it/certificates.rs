//! mTLS: who may connect, and what happens to those who may not.

use std::time::Duration;

use credbroker::pb;
use credbroker::pki::{ClientSpec, DevCa};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::*;

fn roles() -> String {
    role(
        "ro",
        "{db}",
        "1m",
        "10m",
        "spiffe://credbroker.dev/ns/demo/*",
    ) + &role("by-dns", "{db}", "1m", "10m", "billing.internal")
}

async fn channel(b: &TestBroker, identity: Option<(String, String)>) -> Channel {
    credbroker::server::tls::install_crypto_provider();
    let ca = std::fs::read(b.env.pki.join("ca.pem")).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(b.addr.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

async fn try_issue(
    b: &TestBroker,
    identity: Option<(String, String)>,
    role: &str,
) -> Result<pb::Lease, tonic::Status> {
    let mut c = pb::broker_client::BrokerClient::new(channel(b, identity).await);
    c.issue_lease(pb::IssueLeaseRequest {
        role: role.into(),
        ttl_seconds: 0,
    })
    .await
    .map(|r| r.into_inner())
}

fn dev_ca(b: &TestBroker) -> DevCa {
    let cert = std::fs::read_to_string(b.env.pki.join("ca.pem")).unwrap();
    let key = std::fs::read_to_string(b.env.pki.join("ca-key.pem")).unwrap();
    DevCa::load(&cert, &key).unwrap()
}

/// A refused handshake surfaces as a transport error on the client.
fn assert_refused(err: &tonic::Status, what: &str) {
    assert!(
        matches!(err.code(), tonic::Code::Unknown | tonic::Code::Unavailable),
        "{what}: expected a transport failure, got {err:?}"
    );
}

#[tokio::test]
async fn certificates_that_are_missing_foreign_or_expired_are_refused_and_create_nothing() {
    let mut b = TestBroker::start(&roles()).await;
    let before = b.broker_role_count().await;

    let none = try_issue(&b, None, "ro").await.unwrap_err();
    assert_refused(&none, "no client certificate");

    let stranger = DevCa::generate("some other CA").unwrap();
    let foreign = stranger.client_cert(&ClientSpec::spiffe(APP)).unwrap();
    let err = try_issue(&b, Some((foreign.cert_pem, foreign.key_pem)), "ro")
        .await
        .unwrap_err();
    assert_refused(&err, "wrong CA");

    let expired = dev_ca(&b).client_cert(&ClientSpec::expired(APP)).unwrap();
    let err = try_issue(&b, Some((expired.cert_pem, expired.key_pem)), "ro")
        .await
        .unwrap_err();
    assert_refused(&err, "expired");

    // A valid certificate whose identity is not allowed: PermissionDenied.
    let outsider = dev_ca(&b)
        .client_cert(&ClientSpec::spiffe("spiffe://credbroker.dev/ns/evil/app"))
        .unwrap();
    let err = try_issue(&b, Some((outsider.cert_pem, outsider.key_pem)), "ro")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let audited = b.audit_records().into_iter().any(|r| {
        r.identity == "spiffe://credbroker.dev/ns/evil/app"
            && r.outcome == credbroker::audit::Outcome::Denied
    });
    assert!(audited, "denied identity not audited");

    let refused_handshakes = b
        .audit_records()
        .into_iter()
        .filter(|r| r.action == "tls_handshake")
        .count();
    assert!(
        refused_handshakes >= 3,
        "refused handshakes should be audited, saw {refused_handshakes}"
    );
    assert_eq!(
        b.broker_role_count().await,
        before,
        "a refused caller created a role"
    );
    b.stop().await;
}

#[tokio::test]
async fn identity_falls_back_from_spiffe_to_dns_to_cn() {
    let mut b = TestBroker::start(&roles()).await;
    let ca = dev_ca(&b);
    let dns = ca
        .client_cert(&ClientSpec::dns("billing.internal"))
        .unwrap();
    let lease = try_issue(&b, Some((dns.cert_pem, dns.key_pem)), "by-dns")
        .await
        .unwrap();
    assert_eq!(lease.identity, "billing.internal");
    let cn = ca
        .client_cert(&ClientSpec::common_name("billing.internal"))
        .unwrap();
    let lease = try_issue(&b, Some((cn.cert_pem, cn.key_pem)), "by-dns")
        .await
        .unwrap();
    assert_eq!(lease.identity, "billing.internal");
    let spiffe = ca
        .client_cert(&ClientSpec {
            dns_name: Some("billing.internal".into()),
            ..ClientSpec::spiffe(APP)
        })
        .unwrap();
    let err = try_issue(&b, Some((spiffe.cert_pem, spiffe.key_pem)), "by-dns")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::PermissionDenied,
        "the SPIFFE ID must win over the DNS SAN"
    );
    b.stop().await;
}
