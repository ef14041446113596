//! mTLS: who may connect, and what happens to those who may not.

use std::time::Duration;

use credbroker::pb;
use credbroker_testkit::pki::{ClientSpec, DevCa};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::*;

fn roles() -> String {
    demo_role("ro", "1m", "10m")
        + &role("by-dns", "{db}", "1m", "10m", "dns:billing.internal")
        + &role("by-cn", "{db}", "1m", "10m", "cn:legacy-batch")
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
    assert_eq!(lease.identity, "dns:billing.internal");
    let cn = ca
        .client_cert(&ClientSpec::common_name("legacy-batch"))
        .unwrap();
    let lease = try_issue(&b, Some((cn.cert_pem, cn.key_pem)), "by-cn")
        .await
        .unwrap();
    assert_eq!(lease.identity, "cn:legacy-batch");
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

async fn try_admin_list(
    b: &TestBroker,
    who: &str,
    identity: &str,
) -> Result<Vec<pb::LeaseSummary>, tonic::Status> {
    let req = pb::ListLeasesRequest {
        identity: identity.into(),
        ..Default::default()
    };
    b.list_as(who, req).await
}

/// Whether the audit log holds a denied `action` by a peer with no usable
/// identity, whose detail gives `reason`.
fn refusal_audited(b: &TestBroker, action: &str, reason: &str) -> bool {
    b.audit_records().into_iter().any(|r| {
        r.identity.starts_with("unauthenticated:")
            && r.action == action
            && r.outcome == credbroker::audit::Outcome::Denied
            && r.detail.as_deref().is_some_and(|d| d.contains(reason))
    })
}

#[tokio::test]
async fn a_cn_or_dns_name_that_looks_like_a_spiffe_id_is_not_one() {
    let mut b = TestBroker::start(&roles()).await;
    let before = b.broker_role_count().await;
    // The trusted CA lets teams pick their CN; none carries a URI SAN.
    write_client(
        &b,
        "cn-dba",
        &ClientSpec::common_name("spiffe://credbroker.dev/dba/x"),
    );
    write_client(
        &b,
        "cn-app",
        &ClientSpec::common_name("spiffe://credbroker.dev/ns/demo/app"),
    );

    let err = try_admin_list(&b, "cn-dba", "").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = issue(&b, "cn-app", "ro", 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let records = b.audit_records();
    for (who, action) in [
        ("cn:spiffe://credbroker.dev/dba/x", "admin_list"),
        ("cn:spiffe://credbroker.dev/ns/demo/app", "issue"),
    ] {
        assert!(
            records.iter().any(|r| r.identity == who
                && r.action == action
                && r.outcome == credbroker::audit::Outcome::Denied),
            "no denied {action} audited for {who}"
        );
    }

    // A DNS SAN cannot hold a SPIFFE ID: such a certificate is refused
    // outright, never read as a SPIFFE ID nor as a CN.
    for (name, dns) in [
        ("dns-dba", "spiffe://credbroker.dev/dba/x"),
        ("dns-app", "spiffe://credbroker.dev/ns/demo/app"),
    ] {
        write_client(
            &b,
            name,
            &ClientSpec {
                common_name: Some(dns.into()),
                ..ClientSpec::dns(dns)
            },
        );
    }
    let err = try_admin_list(&b, "dns-dba", "").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let err = issue(&b, "dns-app", "ro", 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("not a DNS name"), "{err:?}");
    assert!(refusal_audited(&b, "issue", "not a DNS name"));
    // A DNS name that spells the trust domain is just a DNS name.
    write_client(&b, "dns-td", &ClientSpec::dns("credbroker.dev"));
    let err = try_admin_list(&b, "dns-td", "").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    assert_eq!(b.broker_role_count().await, before, "a role was created");
    b.stop().await;
}

#[tokio::test]
async fn two_spiffe_ids_or_a_malformed_one_are_refused_and_audited() {
    let mut b = TestBroker::start(&roles()).await;
    let before = b.broker_role_count().await;
    write_two_id_client(&b, "two");
    let err = issue(&b, "two", "ro", 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("2 SPIFFE URI SANs"), "{err:?}");
    assert!(
        refusal_audited(&b, "issue", "2 SPIFFE URI SANs"),
        "refusal not audited: {:?}",
        b.audit_records()
    );
    let err = try_admin_list(&b, "two", "").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(refusal_audited(&b, "admin_list", "2 SPIFFE URI SANs"));

    // Each also has a DNS SAN the by-dns role allows: a broken SPIFFE ID
    // must not fall back to it.
    for (n, uri, reason) in [
        (0, "spiffe://credbroker.dev/ns/demo/../app", "'..'"),
        (1, "spiffe://CREDBROKER.dev/ns/demo/app", "lowercase"),
        (2, "spiffe://credbroker.dev/ns/demo/app?x=1", "query"),
        (3, "SPIFFE://credbroker.dev/ns/demo/app", "scheme"),
        (4, "spiffe://credbroker.dev/ns/demo/app/", "ends with '/'"),
    ] {
        let name = format!("bad{n}");
        write_client(
            &b,
            &name,
            &ClientSpec {
                dns_name: Some("billing.internal".into()),
                ..ClientSpec::spiffe(uri)
            },
        );
        for role in ["ro", "by-dns"] {
            let err = issue(&b, &name, role, 0).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{uri}: {err:?}");
            assert!(err.message().contains(reason), "{uri}: {err:?}");
        }
        assert!(refusal_audited(&b, "issue", reason), "{uri} not audited");
    }
    assert_eq!(b.broker_role_count().await, before, "a role was created");
    b.stop().await;
}

#[tokio::test]
async fn dns_and_cn_patterns_let_in_exactly_their_kind_and_show_it() {
    let mut b = TestBroker::start(&roles()).await;
    write_client(&b, "dns-billing", &ClientSpec::dns("billing.internal"));
    write_client(
        &b,
        "cn-billing",
        &ClientSpec::common_name("billing.internal"),
    );
    write_client(&b, "cn-legacy", &ClientSpec::common_name("legacy-batch"));
    write_client(&b, "dns-legacy", &ClientSpec::dns("legacy-batch"));

    let dns = issue(&b, "dns-billing", "by-dns", 0).await.unwrap();
    assert_eq!(dns.identity, "dns:billing.internal");
    let cn = issue(&b, "cn-legacy", "by-cn", 0).await.unwrap();
    assert_eq!(cn.identity, "cn:legacy-batch");
    for (who, role) in [
        ("cn-billing", "by-dns"),
        ("dns-legacy", "by-cn"),
        ("dns-billing", "by-cn"),
        ("cn-legacy", "by-dns"),
        ("dns-billing", "ro"),
        ("cn-legacy", "ro"),
    ] {
        let err = issue(&b, who, role, 0).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{who} on {role}");
    }

    let records = b.audit_records();
    for (who, id) in [
        ("dns:billing.internal", &dns.lease_id),
        ("cn:legacy-batch", &cn.lease_id),
    ] {
        assert!(
            records.iter().any(|r| r.identity == who
                && r.action == "issue"
                && r.lease_id.as_ref() == Some(id)
                && r.outcome == credbroker::audit::Outcome::Ok),
            "issue by {who} not audited with its kind"
        );
    }
    assert!(records
        .iter()
        .any(|r| r.identity == "cn:billing.internal" && r.role.as_deref() == Some("by-dns")));

    // `admin leases` shows the kinds and selects by the canonical text.
    let all = try_admin_list(&b, "admin", "").await.unwrap();
    let mut shown: Vec<&str> = all.iter().map(|l| l.identity.as_str()).collect();
    shown.sort();
    assert_eq!(shown, ["cn:legacy-batch", "dns:billing.internal"]);
    let one = try_admin_list(&b, "admin", "dns:Billing.Internal")
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].lease_id, dns.lease_id);
    let err = try_admin_list(&b, "admin", "billing.internal")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains(r#"write "dns:billing.internal""#),
        "{err:?}"
    );

    // The CLI: the table shows the kinds; a bare --identity is a usage
    // error (exit 64) with the hint, before anything is revoked.
    let table = cli(&b, "admin", &["admin", "leases"]).await;
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains("dns:billing.internal") && text.contains("cn:legacy-batch"),
        "{text}"
    );
    let bare = cli(
        &b,
        "admin",
        &["admin", "revoke", "--identity", "legacy-batch", "--yes"],
    )
    .await;
    assert_eq!(bare.status.code(), Some(64), "{bare:?}");
    let said = String::from_utf8_lossy(&bare.stderr);
    assert!(said.contains(r#"write "dns:legacy-batch""#), "{said}");
    assert!(b.role_exists(&cn.username).await, "a bare selector revoked");
    let done = cli(
        &b,
        "admin",
        &["admin", "revoke", "--identity", "cn:legacy-batch", "--yes"],
    )
    .await;
    assert!(done.status.success(), "{done:?}");
    assert!(!b.role_exists(&cn.username).await, "cn lease not revoked");
    assert!(b.role_exists(&dns.username).await, "dns lease revoked too");
    b.stop().await;
}

#[tokio::test]
async fn a_pattern_without_a_kind_stops_the_broker_from_starting() {
    let b = TestBroker::prepare(&role("by-dns", "{db}", "1m", "10m", "billing.internal")).await;
    let want = r#"roles.by-dns.allowed: identity pattern "billing.internal" has no kind; write "dns:billing.internal" (a DNS SAN) or "cn:billing.internal" (the subject CN)"#;
    let Err(err) = credbroker::config::Config::load(&b.env.config_path) else {
        panic!("a config with a bare pattern loaded");
    };
    let err = err.to_string();
    assert!(err.contains(want), "{err}");
    let serve = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(["serve", "--config"])
        .arg(&b.env.config_path)
        .output()
        .unwrap();
    assert_eq!(serve.status.code(), Some(64), "{serve:?}");
    let said = String::from_utf8_lossy(&serve.stderr);
    assert!(said.contains(want), "{said}");
}
