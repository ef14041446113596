//! Abuse: hostile and generated requests, a flooding identity, SIGTERM
//! in a burst — clear errors, nothing created, nobody starved.

use super::*;

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
        let stored = stored_lease(&store, &l.lease_id).await;
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
    let live = store_usernames(&store).await;
    assert_eq!(
        roles, live,
        "roles in PostgreSQL differ from live leases in the store"
    );
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
