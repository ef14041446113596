//! Revoked client certificates: the CRL refuses what it lists, an expired
//! CRL refuses everyone (or, with `warn`, keeps serving), a new CRL file
//! takes effect without SIGHUP.

use super::*;

#[tokio::test]
async fn client_certificate_in_the_crl_is_refused() {
    let mut b = TestBroker::prepare(&roles()).await;
    let crl = revoke_cert(&b, "app");
    b.edit_config(|t| with_crl(t, &crl));
    b.start_in_process().await;
    let before = b.broker_role_count().await;
    let err = issue(&b, "app", "ro", 0).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unknown | Code::Unavailable),
        "revoked cert accepted: {err:?}"
    );
    issue(&b, "other", "ro", 0)
        .await
        .expect("a certificate not in the CRL still works");
    assert_eq!(b.broker_role_count().await, before + 1);
    b.stop().await;
}

/// A CRL past its nextUpdate no longer vouches for anyone: every client is
/// refused (and nothing is created) until a fresh CRL is in place.
#[tokio::test]
async fn an_expired_crl_refuses_every_client() {
    let mut b = TestBroker::prepare(&roles()).await;
    let now = chrono::Utc::now();
    let stale = dev_ca(&b)
        .crl_between(
            &[],
            now - chrono::Duration::hours(2),
            now - chrono::Duration::hours(1),
        )
        .unwrap();
    let crl = b.env.pki.join("ca.crl");
    std::fs::write(&crl, stale).unwrap();
    b.edit_config(|t| with_crl(t, &crl));
    let warnings = b.start_in_process().await;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("past its next update") && w.contains("every client is refused")),
        "no start-up warning for the stale CRL: {warnings:?}"
    );
    let before = b.broker_role_count().await;
    let err = issue(&b, "other", "ro", 0).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::Unknown | Code::Unavailable | Code::Cancelled
        ),
        "a client was accepted under an expired CRL: {err:?}"
    );
    assert_eq!(b.broker_role_count().await, before);
    let refused = b
        .audit_records()
        .iter()
        .any(|r| r.outcome == credbroker::audit::Outcome::Denied);
    assert!(refused, "the refused handshake is not audited");
    b.stop().await;
}

/// `crl_expired = "warn"`: a CA that publishes late does not take every
/// client down; the stale CRL is still enforced for what it lists, and the
/// operator hears of it at start.
#[tokio::test]
async fn an_expired_crl_with_warn_keeps_serving_and_still_refuses_what_it_lists() {
    let mut b = TestBroker::prepare(&roles()).await;
    let now = chrono::Utc::now();
    let app_pem = std::fs::read_to_string(b.env.pki.join("app.pem")).unwrap();
    let app_serial = cert_serial(&app_pem).unwrap();
    let stale = dev_ca(&b)
        .crl_between(
            &[app_serial],
            now - chrono::Duration::hours(2),
            now - chrono::Duration::hours(1),
        )
        .unwrap();
    let crl = b.env.pki.join("ca.crl");
    std::fs::write(&crl, stale).unwrap();
    b.edit_config(|t| with_crl(t, &crl).replace("[tls]\n", "[tls]\ncrl_expired = \"warn\"\n"));
    let warnings = b.start_in_process().await;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("past its next update") && w.contains("used anyway")),
        "no loud warning for the stale CRL: {warnings:?}"
    );
    issue(&b, "other", "ro", 0)
        .await
        .expect("a certificate the stale CRL does not list is served under warn");
    assert!(
        issue(&b, "app", "ro", 0).await.is_err(),
        "a certificate the stale CRL lists was accepted"
    );
    b.stop().await;

    // Anything else is a config error naming the key.
    b.edit_config(|t| t.replace("crl_expired = \"warn\"", "crl_expired = \"ignore\""));
    let err = credbroker::config::Config::load(&b.env.config_path).unwrap_err();
    assert!(err.to_string().contains("tls.crl_expired"), "{err}");
}

#[tokio::test]
async fn a_broker_without_a_crl_says_so_at_start() {
    let mut b = TestBroker::prepare(&roles()).await;
    let warnings = b.start_in_process().await;
    assert!(
        warnings.iter().any(|w| w.contains("tls.crl is not set")),
        "{warnings:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_new_crl_file_takes_effect_without_sighup() {
    let mut b = TestBroker::prepare(&roles()).await;
    let crl = b.env.pki.join("ca.crl");
    std::fs::write(&crl, dev_ca(&b).crl(&[]).unwrap()).unwrap();
    b.edit_config(|t| with_crl(t, &crl));
    b.start_in_process().await;
    issue(&b, "app", "ro", 0)
        .await
        .expect("app allowed at first");
    // The CA publishes a new CRL; nobody signals the broker.
    revoke_cert(&b, "app");
    let refused = eventually(Duration::from_secs(10), || async {
        issue(&b, "app", "ro", 0).await.is_err()
    })
    .await;
    assert!(
        refused,
        "the revoked certificate is still accepted 10 s after the CRL changed"
    );
    issue(&b, "other", "ro", 0)
        .await
        .expect("a certificate not in the CRL is still served");
    // A half-written CRL keeps the last good one: still refused, still
    // served.
    std::fs::write(&crl, b"-----BEGIN X509 CRL-----\ngarbage").unwrap();
    tokio::time::sleep(credbroker::server::tls::FILE_CHECK_INTERVAL * 2).await;
    assert!(
        issue(&b, "app", "ro", 0).await.is_err(),
        "a broken CRL file let the revoked certificate back in"
    );
    issue(&b, "other", "ro", 0)
        .await
        .expect("a broken CRL file stopped the broker serving");
    b.stop().await;
}
