//! Config changes under a running broker: SIGHUP reloads, a changed name
//! prefix is restart-only, leases of a removed role are still revoked.

use super::*;

#[tokio::test]
async fn sighup_reloads_crl_and_roles_without_a_restart() {
    let mut b = TestBroker::prepare(&roles()).await;
    // Start with an empty CRL in place.
    let empty = dev_ca(&b).crl(&[]).unwrap();
    let crl = b.env.pki.join("ca.crl");
    std::fs::write(&crl, empty).unwrap();
    b.edit_config(|t| with_crl(t, &crl));
    b.spawn_binary().await;
    issue(&b, "app", "ro", 0)
        .await
        .expect("app allowed before reload");
    let err = issue(&b, "app", "extra", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    revoke_cert(&b, "app");
    b.edit_config(|t| {
        t + &role(
            "extra",
            "main",
            "1m",
            "5m",
            "spiffe://credbroker.dev/ns/demo/other",
        )
    });
    b.signal_binary("HUP");
    let reloaded = eventually(Duration::from_secs(5), || async {
        issue(&b, "other", "extra", 0).await.is_ok()
    })
    .await;
    assert!(reloaded, "new role not served after SIGHUP");
    let err = issue(&b, "app", "ro", 0).await.unwrap_err();
    // A refused handshake reaches the client as a failed or a closed
    // connection, depending on timing (Cancelled under load).
    assert!(
        matches!(
            err.code(),
            Code::Unknown | Code::Unavailable | Code::Cancelled
        ),
        "CRL not reloaded: {err:?}"
    );

    // A broken edit keeps the running config.
    b.edit_config(|t| t.replace("[server]", "[server\n"));
    b.signal_binary("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    issue(&b, "other", "extra", 0)
        .await
        .expect("bad reload must keep the running config");
    b.kill_binary();
}

/// `server.name_prefix` is read live, but a SIGHUP that changes it is
/// named as restart-only and the old prefix stays: the orphan sweep keeps
/// seeing the users issued under it.
#[tokio::test]
async fn sighup_names_a_changed_name_prefix_and_keeps_the_old_one() {
    let mut b = TestBroker::prepare(&roles()).await;
    b.spawn_binary().await;
    let old = b.prefix.clone();
    b.edit_config(|t| t.replace(&format!("name_prefix = \"{old}\""), "name_prefix = \"zz_\""));
    b.signal_binary("HUP");
    let said = eventually(Duration::from_secs(5), || async {
        b.broker_log()
            .contains("server.name_prefix changed: restart the broker to apply")
    })
    .await;
    assert!(said, "SIGHUP did not name name_prefix: {}", b.broker_log());
    let lease = issue(&b, "app", "ro", 0).await.unwrap();
    assert!(
        lease.username.starts_with(&old),
        "{} does not keep the old prefix {old}",
        lease.username
    );
    b.kill_binary();
}

#[tokio::test]
async fn leases_of_a_role_removed_from_the_config_are_still_revoked_at_expiry() {
    let mut b = TestBroker::start(&roles()).await;
    let lease = issue(&b, "app", "short", 3).await.unwrap();
    b.stop().await;
    b.edit_config(|t| {
        let start = t.find("[roles.short]").unwrap();
        let end = t[start..]
            .find("\n\n")
            .map(|e| start + e + 2)
            .unwrap_or(t.len());
        format!("{}{}", &t[..start], &t[end..])
    });
    b.start_in_process().await;
    let short = pb::ListLeasesRequest {
        role: "short".into(),
        ..Default::default()
    };
    let listed = b.list_as("admin", short).await.unwrap();
    assert!(
        listed.iter().any(|l| l.lease_id == lease.lease_id),
        "admin must still show the lease"
    );
    let mut app = b.client("app").await;
    let err = app
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.lease_id.clone(),
            ttl_seconds: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            !b.role_exists(&lease.username).await
        })
        .await,
        "lease of a removed role was not revoked"
    );
    b.stop().await;
}
