//! The sidecar recovers without a restart: a lease an admin revoked is
//! replaced, a renewed client certificate is read from disk.

use super::*;

/// A DBA revokes the role's leases: the next renewal is refused, and the
/// sidecar issues and writes a new credential instead of giving up. With
/// `--keep`, SIGTERM still revokes but leaves the file.
#[tokio::test]
async fn sidecar_replaces_a_lease_an_admin_revoked() {
    let role_name = "sc_adm";
    let (b, dir) = serving(&role(role_name, "{db}", "3s", "1m", APP)).await;
    let mut sc = Sidecar::spawn(&b, dir.path(), role_name, &["--keep"]);
    wait_for_file(&mut sc).await;
    let names = Names::of(&b);
    let first = parse_file(&std::fs::read_to_string(&sc.out).unwrap(), &names).unwrap();
    let r = admin_revoke_by(
        &b,
        pb::revoke_leases_request::Selector::Role(role_name.into()),
        false,
    )
    .await;
    assert_eq!(r.revoked, 1);
    assert!(!b.role_exists(&first.user).await);
    let replaced = eventually(Duration::from_secs(15), || async {
        std::fs::read_to_string(&sc.out)
            .ok()
            .and_then(|t| parse_file(&t, &names).ok())
            .is_some_and(|s| s.user != first.user)
    })
    .await;
    assert!(
        replaced,
        "no new credential after revocation:\n{}",
        sc.log_text()
    );
    let now = parse_file(&std::fs::read_to_string(&sc.out).unwrap(), &names).unwrap();
    connect(&now.dsn).await.unwrap();
    // The broker's event stream tells the sidecar at once (issue 16);
    // without it, the refused renewal would.
    let log = sc.log_text();
    assert!(
        log.contains("the current lease was revoked; replacing it now")
            || log.contains("renewal refused; issuing a new lease"),
        "{log}"
    );
    sc.signal("TERM");
    assert_eq!(sc.wait(Duration::from_secs(30)).await, Some(0));
    assert_eq!(b.broker_role_count().await, 0);
    assert!(sc.out.exists(), "--keep leaves the file");
}

/// A sidecar started before its certificate is valid (here: an expired
/// one) keeps retrying, and picks up the renewed certificate from disk
/// without a restart.
#[tokio::test]
async fn sidecar_reloads_its_client_certificate_from_disk() {
    use credbroker_testkit::pki::{ClientSpec, DevCa};
    let (b, dir) = serving(&short_role("sc_cert")).await;
    let pki = &b.env.pki;
    let ca = DevCa::load(
        &std::fs::read_to_string(pki.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(pki.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let (cert, key) = (dir.path().join("mine.pem"), dir.path().join("mine-key.pem"));
    let expired = ca.client_cert(&ClientSpec::expired(APP)).unwrap();
    std::fs::write(&cert, &expired.cert_pem).unwrap();
    std::fs::write(&key, &expired.key_pem).unwrap();

    let out = dir.path().join("db.conn");
    let log = dir.path().join("sidecar.log");
    let mut sc = Sidecar {
        child: Some(
            Command::new(BIN)
                .arg("sidecar")
                .args(["--role", "sc_cert", "--out"])
                .arg(&out)
                .args(["--addr", &b.addr, "--ca"])
                .arg(pki.join("ca.pem"))
                .arg("--cert")
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .env("RUST_LOG", "info")
                .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
                .spawn()
                .unwrap(),
        ),
        out,
        log,
    };
    let refused = eventually(Duration::from_secs(15), || async {
        sc.log_text()
            .contains("cannot issue the first lease; retrying")
    })
    .await;
    assert!(refused, "{}", sc.log_text());
    assert!(!sc.out.exists());

    let fresh = ca.client_cert(&ClientSpec::spiffe(APP)).unwrap();
    std::fs::write(&key, &fresh.key_pem).unwrap();
    std::fs::write(&cert, &fresh.cert_pem).unwrap();
    wait_for_file(&mut sc).await;
    assert!(sc.log_text().contains("client certificate reloaded"));
    sc.signal("TERM");
    assert_eq!(sc.wait(Duration::from_secs(30)).await, Some(0));
    assert_eq!(b.broker_role_count().await, 0);
}
