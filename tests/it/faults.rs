//! Faults: crashes, outages, bad input, revoked certificates, abuse —
//! nothing lost, nothing left behind. Tests marked `#[ignore = "long"]` run
//! in their own step of scripts/test.sh (`cargo test -- --ignored`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use credbroker::pb;
use credbroker::pb::revoke_leases_request::Selector;
use credbroker::store::LeaseFilter;
use credbroker_testkit::pki::cert_serial;
use tonic::Code;

use crate::support::*;

fn roles() -> String {
    demo_role("ro", "1m", "10m") + &demo_role("short", "2s", "1m")
}

/// Writes a CRL revoking `who`'s dev certificate and returns its path.
fn revoke_cert(b: &TestBroker, who: &str) -> std::path::PathBuf {
    let pem = std::fs::read_to_string(b.env.pki.join(format!("{who}.pem"))).unwrap();
    let serial = cert_serial(&pem).expect("dev certificates have u64 serials");
    let crl = dev_ca(b).crl(&[serial]).unwrap();
    let path = b.env.pki.join("ca.crl");
    std::fs::write(&path, crl).unwrap();
    path
}

fn with_crl(text: String, path: &std::path::Path) -> String {
    text.replace("[tls]\n", &format!("[tls]\ncrl = \"{}\"\n", path.display()))
}

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
    let mut admin = b.admin("admin").await;
    let listed = admin
        .list_leases(pb::ListLeasesRequest {
            role: "short".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.leases.iter().any(|l| l.lease_id == lease.lease_id),
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

#[tokio::test]
async fn orphan_sweep_drops_only_broker_made_names_without_a_lease() {
    let b = TestBroker::prepare(&roles()).await;
    let su = b.superuser().await;
    let orphan = format!("{}x_{}", b.prefix, "abcdefghijklmnop");
    let handmade = format!("{}handmade", b.prefix);
    su.batch_execute(&format!(
        "CREATE ROLE \"{orphan}\" LOGIN; CREATE ROLE \"{handmade}\" LOGIN;"
    ))
    .await
    .unwrap();
    let mut b = b;
    b.start_in_process().await;
    let live = issue(&b, "app", "ro", 0).await.unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async {
            !b.role_exists(&orphan).await
        })
        .await,
        "orphan with the broker's name format was not dropped"
    );
    assert!(
        b.role_exists(&handmade).await,
        "a name the broker did not make was dropped"
    );
    assert!(
        b.role_exists(&live.username).await,
        "a live lease's role was dropped"
    );
    let audited = b
        .audit_records()
        .iter()
        .any(|r| r.action == "drop_orphan" && r.username.as_deref() == Some(&orphan));
    assert!(audited);
    su.batch_execute(&format!("DROP ROLE \"{handmade}\""))
        .await
        .unwrap();
    b.stop().await;
}

#[tokio::test]
async fn corrupt_store_is_a_clear_start_up_error() {
    let mut b = TestBroker::prepare(&roles()).await;
    b.release_port();
    std::fs::write(
        &b.env.store_path,
        b"this is not a sqlite database, it is a note about one".repeat(100),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(["serve", "--config"])
        .arg(&b.env.config_path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "corrupt store must stop start-up with EX_USAGE"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("lease store") && stderr.contains("not a readable SQLite database"),
        "{stderr}"
    );
}

#[tokio::test]
async fn hostile_requests_get_clear_errors_and_create_nothing() {
    let mut b = TestBroker::start(&roles()).await;
    let before = b.broker_role_count().await;
    let mut app = b.client("app").await;
    let mut admin = b.admin("admin").await;
    let hostile: Vec<String> = vec![
        "'".into(),
        "\"".into(),
        "ro'; DROP ROLE postgres; --".into(),
        "ro\"; DROP TABLE orders; --".into(),
        "🦀🦀🦀".into(),
        "ro\u{0}".into(),
        "ro\n".into(),
        "\u{202e}or".into(),
        "%".into(),
        "*".into(),
        "{{name}}".into(),
        "x".repeat(10_240),
        "l_".to_string() + &"'".repeat(26),
    ];
    let allowed = [
        Code::InvalidArgument,
        Code::NotFound,
        Code::PermissionDenied,
        Code::FailedPrecondition,
    ];
    for h in &hostile {
        for ttl in [0i64, -1, 1, i64::MIN, i64::MAX] {
            let err = app
                .issue_lease(pb::IssueLeaseRequest {
                    role: h.clone(),
                    ttl_seconds: ttl,
                })
                .await
                .unwrap_err();
            assert!(allowed.contains(&err.code()), "issue {h:.20?}: {err:?}");
        }
        for call in 0..3 {
            let r = match call {
                0 => app
                    .renew_lease(pb::RenewLeaseRequest {
                        lease_id: h.clone(),
                        ttl_seconds: 1,
                    })
                    .await
                    .map(|_| ()),
                1 => app
                    .revoke_lease(pb::RevokeLeaseRequest {
                        lease_id: h.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
                _ => app
                    .lookup_lease(pb::LookupLeaseRequest {
                        lease_id: h.clone(),
                    })
                    .await
                    .map(|_| ()),
            };
            assert_eq!(
                r.unwrap_err().code(),
                Code::InvalidArgument,
                "lease id {h:.20?}"
            );
        }
        let listed = admin
            .list_leases(pb::ListLeasesRequest {
                role: h.clone(),
                identity: h.clone(),
                ..Default::default()
            })
            .await;
        match listed {
            Ok(r) => assert!(r.into_inner().leases.is_empty()),
            Err(e) => assert_eq!(e.code(), Code::InvalidArgument),
        }
        let revoked = admin
            .revoke_leases(pb::RevokeLeasesRequest {
                selector: Some(pb::revoke_leases_request::Selector::Identity(h.clone())),
                force: false,
            })
            .await;
        match revoked {
            Ok(r) => assert_eq!(r.into_inner().revoked, 0),
            Err(e) => assert_eq!(e.code(), Code::InvalidArgument),
        }
    }
    assert_eq!(
        b.broker_role_count().await,
        before,
        "a rejected request created a role"
    );
    let log = std::fs::read_to_string(&b.env.audit_path).unwrap();
    assert!(
        log.lines().all(|l| l.len() < 4096),
        "caller text must be capped in audit records"
    );
    b.stop().await;
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[((v.len() as f64 * 0.99).ceil() as usize)
        .saturating_sub(1)
        .min(v.len() - 1)]
}

#[tokio::test]
async fn a_flooding_identity_hits_its_cap_and_rate_limit_without_starving_others() {
    let limited = "[roles.limited]\ndatabase = \"{db}\"\ndefault_ttl = \"1m\"\nmax_ttl = \"5m\"\n\
                   allowed = [\"spiffe://credbroker.dev/ns/demo/*\"]\ngrants = []\n\
                   max_leases_per_identity = 25\nissue_rate = 20.0\nissue_burst = 10\n\n";
    let mut b = TestBroker::start(&(roles() + limited)).await;
    let mut quiet = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        issue(&b, "other", "ro", 0).await.unwrap();
        quiet.push(t.elapsed());
    }
    let flood_until = Instant::now() + Duration::from_secs(3);
    let mut flooders = Vec::new();
    for _ in 0..4 {
        let client = b.client("app").await;
        flooders.push(tokio::spawn(async move {
            let mut c = client;
            let (mut ok, mut exhausted) = (0u32, 0u32);
            while Instant::now() < flood_until {
                match c
                    .issue_lease(pb::IssueLeaseRequest {
                        role: "limited".into(),
                        ttl_seconds: 0,
                    })
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
                    Err(e) => panic!("flood got {e:?}"),
                }
            }
            (ok, exhausted)
        }));
    }
    let mut during = Vec::new();
    while Instant::now() < flood_until {
        let t = Instant::now();
        issue(&b, "other", "ro", 0)
            .await
            .expect("the quiet identity must not be refused");
        during.push(t.elapsed());
    }
    let (mut ok, mut exhausted) = (0, 0);
    for f in flooders {
        let (o, e) = f.await.unwrap();
        ok += o;
        exhausted += e;
    }
    println!(
        "flood: {ok} issued, {exhausted} refused; other identity p99 quiet {:?}, during flood {:?} ({} requests)",
        p99(quiet),
        p99(during.clone()),
        during.len()
    );
    assert!(ok <= 25, "cap of 25 live leases exceeded: {ok}");
    assert!(exhausted > 0, "the flood was never limited");
    assert!(!during.is_empty());
    let refusals = b
        .audit_records()
        .iter()
        .filter(|r| {
            r.action == "issue"
                && r.detail
                    .as_deref()
                    .unwrap_or("")
                    .contains("resource exhausted")
        })
        .count();
    assert!(refusals as u32 >= exhausted.min(1), "refusals not audited");
    b.stop().await;
}

#[tokio::test]
async fn sigterm_during_a_burst_completes_or_cleanly_fails_every_request() {
    let mut b = TestBroker::prepare(&roles()).await;
    b.spawn_binary().await;
    let mut tasks = Vec::new();
    let stop_at = Instant::now() + Duration::from_secs(3);
    for _ in 0..6 {
        let client = b.client("app").await;
        tasks.push(tokio::spawn(async move {
            let mut c = client;
            let mut acked = Vec::new();
            let mut unclean = Vec::new();
            let mut failed = 0u32;
            while Instant::now() < stop_at {
                match c
                    .issue_lease(pb::IssueLeaseRequest {
                        role: "ro".into(),
                        ttl_seconds: 0,
                    })
                    .await
                {
                    Ok(l) => acked.push(l.into_inner()),
                    Err(e) => {
                        if !matches!(
                            e.code(),
                            Code::Unavailable | Code::Unknown | Code::Cancelled
                        ) {
                            unclean.push(format!("{e:?}"));
                        }
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (acked, failed, unclean)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    b.signal_binary("TERM");
    let code = b.wait_binary(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "graceful shutdown must exit 0");
    let mut acked = Vec::new();
    let mut failed = 0;
    let mut unclean = Vec::new();
    for t in tasks {
        let (a, f, u) = t.await.unwrap();
        acked.extend(a);
        failed += f;
        unclean.extend(u);
    }
    assert!(
        unclean.is_empty(),
        "unclean failures: {unclean:?}\nbroker log:\n{}",
        b.broker_log()
    );
    println!(
        "SIGTERM burst: {} acknowledged, {failed} failed cleanly",
        acked.len()
    );
    assert!(!acked.is_empty());
    let store = b.open_store().await;
    let audit = b.audit_records();
    for l in &acked {
        let id = credbroker::lease::LeaseId::parse(&l.lease_id).unwrap();
        let stored = store
            .get(&id)
            .await
            .unwrap()
            .expect("acknowledged lease missing from the store");
        assert_eq!(stored.state, credbroker::lease::LeaseState::Active);
        assert!(audit
            .iter()
            .any(|r| r.action == "issue" && r.lease_id.as_deref() == Some(&l.lease_id)));
    }
    let pending = store
        .list(&LeaseFilter {
            states: vec![credbroker::lease::LeaseState::Pending],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        pending.is_empty(),
        "graceful shutdown left {} intents unresolved",
        pending.len()
    );
    let roles = b.broker_roles().await;
    let live: BTreeSet<String> = store
        .list(&LeaseFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.username.to_string())
        .collect();
    assert_eq!(
        roles, live,
        "roles in PostgreSQL differ from live leases in the store"
    );
}

#[tokio::test]
#[ignore = "long: crash loop with 50 SIGKILLs; run by scripts/test.sh in its own step"]
async fn crash_loop_leaves_no_untracked_role_and_loses_no_acknowledged_lease() {
    use rand::Rng;
    let mut b = TestBroker::prepare(&roles()).await;
    b.edit_config(|t| t.replace("[reaper]\n", "[reaper]\nintent_grace = \"2s\"\n"));
    b.spawn_binary().await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let client = b.client("app").await;
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let mut c = client;
            let mut acked: Vec<pb::Lease> = Vec::new();
            let mut revoked_acked = Vec::new();
            let mut attempted = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                match c
                    .issue_lease(pb::IssueLeaseRequest {
                        role: "ro".into(),
                        ttl_seconds: 300,
                    })
                    .await
                {
                    Ok(l) => {
                        let l = l.into_inner();
                        let revoke = rand::rng().random_bool(0.5);
                        if revoke {
                            // A revoke cut off by a kill may or may not have
                            // taken effect: only an acknowledged one is known.
                            attempted.push(l.lease_id.clone());
                            if c.revoke_lease(pb::RevokeLeaseRequest {
                                lease_id: l.lease_id.clone(),
                                ..Default::default()
                            })
                            .await
                            .is_ok()
                            {
                                revoked_acked.push(l.lease_id.clone());
                            }
                        }
                        acked.push(l);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(30)).await,
                }
            }
            (acked, revoked_acked, attempted)
        }));
    }
    let kills = 50;
    for _ in 0..kills {
        let wait = rand::rng().random_range(50..400);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        b.kill_binary();
        b.spawn_binary().await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut revoked = BTreeSet::new();
    let mut attempted = BTreeSet::new();
    for c in clients {
        let (a, r, t) = c.await.unwrap();
        acked.extend(a);
        revoked.extend(r);
        attempted.extend(t);
    }
    // One reaper pass after the last restart: pending intents resolve at once.
    let settled = eventually(Duration::from_secs(20), || async {
        let mut admin = b.admin("admin").await;
        let pending = admin
            .list_leases(pb::ListLeasesRequest {
                states: vec![pb::LeaseState::Pending as i32],
                ..Default::default()
            })
            .await;
        matches!(pending, Ok(r) if r.get_ref().leases.is_empty())
    })
    .await;
    assert!(
        settled,
        "pending intents were not resolved after the last restart"
    );
    // ... and revocations cut off mid-way are finished at once after it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.kill_binary();
    let store = b.open_store().await;
    let live: BTreeSet<String> = store
        .list(&LeaseFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.username.to_string())
        .collect();
    let roles = b.broker_roles().await;
    println!(
        "crash loop: {kills} SIGKILLs, {} leases acknowledged, {} revocations acknowledged, {} live in store, {} roles in PostgreSQL",
        acked.len(),
        revoked.len(),
        live.len(),
        roles.len()
    );
    assert_eq!(roles, live, "broker-made roles differ from live leases");
    for l in &acked {
        let id = credbroker::lease::LeaseId::parse(&l.lease_id).unwrap();
        let stored = store
            .get(&id)
            .await
            .unwrap()
            .expect("an acknowledged lease is missing from the store");
        if revoked.contains(&l.lease_id) {
            assert_eq!(stored.state, credbroker::lease::LeaseState::Revoked);
            assert!(!roles.contains(&l.username));
        } else if !attempted.contains(&l.lease_id) {
            assert!(
                stored.state.is_live(),
                "lease {} acknowledged, never revoked, not expired, but {:?}",
                l.lease_id,
                stored.state
            );
            assert!(roles.contains(&l.username));
        }
    }
}

#[tokio::test]
async fn database_outage_fails_fast_and_the_reaper_catches_up_when_it_returns() {
    use credbroker_testkit::throwaway::{PostgresOptions, ThrowawayPostgres};
    assert!(
        credbroker_testkit::throwaway::postgres_binaries_present(),
        "PostgreSQL server binaries are missing: install them with `apt-get install -y postgresql`"
    );
    // A cluster of this test's own: it is stopped for 20 s.
    let mut pg = ThrowawayPostgres::start(PostgresOptions::default())
        .await
        .expect("throwaway PostgreSQL for the outage test");
    let mut b = TestBroker::prepare_on(&pg, &roles()).await;
    b.edit_config(|t| t.replace("[reaper]\n", "[reaper]\nmax_backoff = \"2s\"\n"));
    b.start_in_process().await;

    let mut leases = Vec::new();
    for _ in 0..5 {
        leases.push(
            issue(&b, "app", "short", 3)
                .await
                .expect("issue before outage"),
        );
    }
    pg.stop().await.unwrap();
    let down_at = Instant::now();

    let started = Instant::now();
    let err = issue(&b, "app", "ro", 0).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("main"),
        "the message names the database: {err:?}"
    );
    // connect_timeout is 3 s; the request must not hang past it.
    assert!(took < Duration::from_secs(5), "issue hung for {took:?}");
    println!(
        "during the outage, issue failed in {took:?}: {}",
        err.message()
    );

    // Leases fall due while the database is away.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(down_at.elapsed())).await;
    let mut admin = b.admin("admin").await;
    let waiting = admin
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases;
    let waiting: Vec<_> = waiting
        .into_iter()
        .filter(|w| leases.iter().any(|l| l.lease_id == w.lease_id))
        .collect();
    assert_eq!(waiting.len(), 5, "due leases are kept, not forgotten");
    let attempts: u32 = waiting.iter().map(|l| l.revoke_attempts).sum();
    assert!(attempts > 0, "the reaper did not try during the outage");
    assert!(waiting.iter().all(|l| !l.last_error.is_empty()));
    // The issue that failed left an intent: it must resolve too (below).

    pg.restart().await.unwrap();
    let back = Instant::now();
    let caught_up = eventually(Duration::from_secs(5), || async {
        let live = b
            .admin("admin")
            .await
            .list_leases(pb::ListLeasesRequest::default())
            .await
            .map(|r| r.into_inner().leases.len());
        matches!(live, Ok(0)) && b.broker_role_count().await == 0
    })
    .await;
    let recovery = back.elapsed();
    assert!(
        caught_up,
        "due leases not revoked within 5 s of the database's return"
    );
    println!(
        "outage: {} revocation attempts during 20 s down; all 5 due leases revoked {recovery:?} after the database returned",
        attempts
    );
    issue(&b, "app", "ro", 0)
        .await
        .expect("issue works again after the outage");
    b.stop().await;
}

#[tokio::test]
async fn generated_requests_never_panic_the_broker_or_create_a_role() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut b = TestBroker::start(&roles()).await;
    let before = b.broker_role_count().await;
    let mut app = b.client("app").await;
    // Text that tends to break things: quotes, separators, control and
    // bidi characters, names that are almost valid, and long runs.
    let text = prop_oneof![
        "\\PC{0,64}",
        "[ro'\";\\\\%*_{}\\x00\\n\u{202e}🦀]{0,32}",
        "(ro|short)[ '\";-]{1,4}(ro|short)?",
        "l_[a-z0-9'\";]{0,40}",
        (1usize..12_000).prop_map(|n| "r".repeat(n)),
        Just("ro".to_string()),
    ];
    let request = (
        text.clone(),
        prop_oneof![Just(0i64), -5i64..100_000, any::<i64>()],
        text,
    );
    let mut runner = TestRunner::deterministic();
    let mut issued = 0;
    for _ in 0..300 {
        let (role, ttl, lease_id) = request.new_tree(&mut runner).unwrap().current();
        match app
            .issue_lease(pb::IssueLeaseRequest {
                role: role.clone(),
                ttl_seconds: ttl,
            })
            .await
        {
            // Only a real role name with a valid TTL may succeed.
            Ok(l) => {
                assert!(role == "ro" || role == "short", "issued for {role:?}");
                issued += 1;
                app.revoke_lease(pb::RevokeLeaseRequest {
                    lease_id: l.into_inner().lease_id,
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            Err(e) => assert!(
                matches!(
                    e.code(),
                    Code::InvalidArgument | Code::NotFound | Code::ResourceExhausted
                ),
                "issue {role:.40?} ttl {ttl}: {e:?}"
            ),
        }
        let err = app
            .lookup_lease(pb::LookupLeaseRequest {
                lease_id: lease_id.clone(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err.code(), Code::InvalidArgument | Code::NotFound),
            "lookup {lease_id:.40?}: {err:?}"
        );
    }
    assert_eq!(
        b.broker_role_count().await,
        before,
        "a rejected or revoked request left a role"
    );
    println!("300 generated requests: {issued} valid issues (revoked), the rest refused cleanly");
    b.stop().await;
}

#[tokio::test]
async fn a_revocation_that_keeps_failing_is_visible_and_can_be_forced_off() {
    let mut b = TestBroker::prepare(&roles()).await;
    b.edit_config(|t| {
        t.replace(
            "[reaper]\n",
            "[reaper]\nfailing_after_attempts = 2\nmax_backoff = \"1s\"\n",
        )
    });
    // The role's owner, which inherits what a leased user owns, is dropped
    // by a DBA after the lease was issued: REASSIGN OWNED has nowhere to
    // put the objects, so every attempt fails until a human steps in (the
    // broker never falls back to dropping them).
    let blocker = unique("gone_owner");
    b.edit_config(|t| {
        t + &role(
            "owned",
            "main",
            "2s",
            "1m",
            "spiffe://credbroker.dev/ns/demo/*",
        )
        .replace("allowed", &format!("owner = \"{blocker}\"\nallowed"))
    });
    let su = b.superuser().await;
    su.batch_execute(&format!("CREATE ROLE \"{blocker}\" NOLOGIN"))
        .await
        .unwrap();
    b.start_in_process().await;
    let l = issue(&b, "app", "owned", 0).await.unwrap();
    su.batch_execute(&format!("DROP ROLE \"{blocker}\""))
        .await
        .unwrap();

    let failing = eventually(Duration::from_secs(15), || async {
        let r = b
            .admin("admin")
            .await
            .list_leases(pb::ListLeasesRequest {
                states: vec![pb::LeaseState::Failing as i32],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .leases;
        r.iter().any(|x| x.lease_id == l.lease_id)
    })
    .await;
    assert!(
        failing,
        "a revocation failing again and again is not marked failing"
    );

    let out = cli(
        &b,
        "admin",
        &["admin", "leases", "--state", "failing", "--format", "json"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["lease_id"] == l.lease_id.as_str())
        .expect("listed under --state failing");
    let text = row.to_string();
    assert!(
        text.contains("does not exist") && text.contains(&blocker),
        "the last error says why: {text}"
    );
    assert!(!text.contains(&l.password));
    // The login is already refused although the drop fails (NOLOGIN first).
    assert!(login(&b.db, &l.username, &l.password).await.is_err());

    let mut admin = b.admin("admin").await;
    let plain = admin_revoke_by(&b, Selector::LeaseId(l.lease_id.clone()), false).await;
    assert_eq!(plain.revoked, 0);
    assert_eq!(plain.failures.len(), 1, "{plain:?}");
    let forced = admin_revoke_by(&b, Selector::LeaseId(l.lease_id.clone()), true).await;
    assert_eq!(forced.revoked, 1, "{forced:?}");
    let live = admin
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert!(live.iter().all(|x| x.lease_id != l.lease_id));
    assert!(b
        .audit_records()
        .iter()
        .any(|r| r.lease_id.as_deref() == Some(&l.lease_id)
            && r.detail.as_deref().unwrap_or("").contains("force")));
    // Forgotten only because the database confirmed it cannot log in.
    assert!(login(&b.db, &l.username, &l.password).await.is_err());
    b.stop().await;
    su.batch_execute(&format!(
        "DROP OWNED BY \"{0}\"; DROP ROLE IF EXISTS \"{0}\"",
        l.username
    ))
    .await
    .unwrap();
}
