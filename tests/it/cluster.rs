//! Two replicas on one PostgreSQL store, as behind a load balancer (issue
//! 28): a lock placed on one refuses on the other at once and ends its
//! watch streams; the relay's lost `LISTEN` connection catches up from the
//! event table; a console form served by one replica is accepted by the
//! other, and the charts say they count one replica. Each replica is a
//! full `Daemon` of its own (own hub, relay, console, audit log, port).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credbroker::pb;
use credbroker::relay::LISTENER;

use crate::ha::use_pg_store;
use crate::support::*;

/// `b`'s config without the section `header` (and what follows it, as
/// the test helpers append it last), for a replica that binds its own.
fn drop_section(b: &TestBroker, header: &str) {
    b.edit_config(|t| t[..t.find(&format!("\n{header}")).unwrap()].to_string());
}

async fn watch(b: &TestBroker, who: &str, all: bool) -> tonic::Streaming<pb::LeaseEvent> {
    b.client(who)
        .await
        .watch_leases(pb::WatchLeasesRequest {
            all,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Reads `s` until an event `want` accepts (skipping others) or `within`
/// passes; the events read, the last the wanted one.
async fn until(
    s: &mut tonic::Streaming<pb::LeaseEvent>,
    within: Duration,
    want: impl Fn(&pb::LeaseEvent) -> bool,
) -> Vec<pb::LeaseEvent> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline, s.message()).await;
        let e = match next {
            Ok(Ok(Some(e))) => e,
            other => panic!("no wanted event within {within:?}: {other:?}; read {seen:?}"),
        };
        let done = want(&e);
        seen.push(e);
        if done {
            return seen;
        }
    }
}

async fn vault_token(b: &TestBroker) -> String {
    let (code, raw) = https(
        b,
        b.vault_port.unwrap(),
        "app",
        "POST",
        "/v1/auth/cert/login",
        &[("Content-Type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(code, 200, "{raw}");
    let body = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["auth"]["client_token"].as_str().unwrap().to_string()
}

/// A Vault API GET with a token: the status and answer.
async fn vault_get(b: &TestBroker, token: &str, path: &str) -> (u16, String) {
    let port = b.vault_port.unwrap();
    https(b, port, "app", "GET", path, &[("X-Vault-Token", token)], "").await
}
fn denied_by(r: Result<impl std::fmt::Debug, tonic::Status>, lock_id: &str, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e:?}");
    assert!(e.message().contains(lock_id), "{what}: {e:?}");
}

/// An identity lock placed through replica A: replica B refuses that
/// identity's IssueLease, RenewLease, static read and Vault API calls at
/// once (every replica reads the locks from the store on every call; none
/// caches them), and B's watch stream of that identity hears the lock's
/// `Locked` event and ends with its refusal; admins' streams on both
/// replicas hear LOCK_PLACED. Lifted through B, A admits again at once
/// and A's admin stream hears LOCK_LIFTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_on_replica_a_refuses_on_b_at_once_and_ends_bs_watch_streams() {
    let (mut a, _users) = crate::static_roles::pg_static(2, "1h", "").await;
    a.edit_config(|t| t + &role("ro", "main", "1m", "10m", APP));
    use_pg_store(&a, cluster(), "60s").await;
    a.enable_vault_api("").await;
    a.start_in_process().await;
    let mut b = a.replica();
    drop_section(&b, "[vault_api]");
    b.enable_vault_api("").await;
    b.start_in_process().await;

    // Before: B serves the identity on every door.
    let held = issue(&b, "app", "ro", 0).await.unwrap();
    let token = vault_token(&b).await;
    let (code, raw) = vault_get(&b, &token, "/v1/database/creds/ro").await;
    assert_eq!(code, 200, "{raw}");
    assert!(
        eventually(Duration::from_secs(20), || async {
            static_read(&b, "app", "st").await.is_ok()
        })
        .await,
        "the static role is never served"
    );
    let mut mine_b = watch(&b, "app", false).await;
    let mut all_b = watch(&b, "admin", true).await;
    let mut all_a = watch(&a, "admin", true).await;

    let sent = Instant::now();
    let lock = admin_lock(
        &a,
        pb::lock_request::Target::Identity(APP.into()),
        "INC-28 cluster",
    )
    .await;
    let locked = Instant::now();
    let id = lock.lock_id.as_str();

    // B refuses at once: no wait, no retry.
    denied_by(issue(&b, "app", "ro", 0).await, id, "issue on B");
    let refused_after = locked.elapsed();
    denied_by(renew(&b, "app", &held.lease_id, 0).await, id, "renew on B");
    denied_by(static_read(&b, "app", "st").await, id, "static read on B");
    // (Reading one's own token, lookup-self, obtains nothing: locks leave
    // it alone on every replica, by the gate's rules.)
    for path in ["/v1/database/creds/ro", "/v1/database/static-creds/st"] {
        let (code, raw) = vault_get(&b, &token, path).await;
        assert_eq!(code, 403, "{path} on B: {raw}");
        assert!(raw.contains(id), "{path} on B: {raw}");
    }
    let (code, raw) = https(
        &b,
        b.vault_port.unwrap(),
        "app",
        "POST",
        "/v1/auth/cert/login",
        &[],
        "{}",
    )
    .await;
    assert_eq!(code, 403, "a Vault login on B: {raw}");

    // B's stream of that identity: its leases' Locked events (the one
    // issued over gRPC and the one over the Vault API), then the end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut locked_leases = Vec::new();
    let err = loop {
        match tokio::time::timeout_at(deadline, mine_b.message()).await {
            Ok(Ok(Some(e))) => {
                assert_eq!(e.kind, pb::LeaseEventKind::Locked as i32, "{e:?}");
                assert_eq!(e.lock_id, id, "{e:?}");
                locked_leases.push(e.lease_id);
            }
            Ok(Err(status)) => break status,
            other => panic!(
                "B's stream of the locked identity did not end with a refusal within 10 s: {other:?}"
            ),
        }
    };
    let ended_after = locked.elapsed();
    assert!(locked_leases.contains(&held.lease_id), "{locked_leases:?}");
    assert_eq!(locked_leases.len(), 2, "{locked_leases:?}");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("INC-28 cluster"), "{err:?}");
    // And B refuses a new stream of it.
    let again = b
        .client("app")
        .await
        .watch_leases(pb::WatchLeasesRequest::default())
        .await
        .expect_err("a new watch of a locked identity on B");
    assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");

    // Admins on both replicas hear of the lock itself.
    for (name, s) in [("B", &mut all_b), ("A", &mut all_a)] {
        let got = until(s, Duration::from_secs(10), |e| {
            e.kind == pb::LeaseEventKind::LockPlaced as i32
        })
        .await;
        let e = got.last().unwrap();
        assert_eq!(e.lock_id, id, "{name}");
        assert_eq!(e.lock_target, format!("identity {APP}"), "{name}");
        assert_eq!(e.reason, "INC-28 cluster", "{name}");
        assert!(e.lease_id.is_empty(), "{name}: {e:?}");
    }

    // Lifted through B: A admits again at once.
    b.admin("admin")
        .await
        .unlock(pb::UnlockRequest {
            lock_id: id.to_string(),
        })
        .await
        .unwrap();
    issue(&a, "app", "ro", 0)
        .await
        .expect("issue on A after the unlock on B");
    renew(&a, "app", &held.lease_id, 0)
        .await
        .expect("renew on A after the unlock");
    static_read(&a, "app", "st")
        .await
        .expect("static read on A after the unlock");
    let (code, raw) = vault_get(&a, &token, "/v1/database/creds/ro").await;
    assert_eq!(code, 200, "Vault creds on A after the unlock: {raw}");
    for (name, s) in [("A", &mut all_a), ("B", &mut all_b)] {
        let got = until(s, Duration::from_secs(10), |e| {
            e.kind == pb::LeaseEventKind::LockLifted as i32
        })
        .await;
        assert_eq!(got.last().unwrap().lock_id, id, "{name}");
    }
    eprintln!(
        "LOCK ACROSS REPLICAS: lock placed on A (call took {:.0} ms); B refused the identity \
         {:.0} ms after the lock call returned; B's watch stream of it ended {:.0} ms after",
        locked.duration_since(sent).as_secs_f64() * 1000.0,
        refused_after.as_secs_f64() * 1000.0,
        ended_after.as_secs_f64() * 1000.0
    );
    b.stop().await;
    a.stop().await;
}

/// The relay's `LISTEN` connections are killed over and over
/// (`pg_terminate_backend`, found by `application_name`) while replica A
/// renews a lease 20 times: B's relay reconnects each time and reads the
/// event table from the last row it saw, so B's watcher gets every one of
/// the 20 renewals, each once, in order. Catch-up, not a "resync" event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listen_connection_catches_up_from_the_event_table() {
    const RENEWALS: usize = 20;
    let mut a = TestBroker::prepare(&role("ro", "{db}", "1m", "10m", APP)).await;
    let store_db = use_pg_store(&a, cluster(), "60s").await;
    a.start_in_process().await;
    let mut b = a.replica();
    b.start_in_process().await;
    let held = issue(&a, "app", "ro", 0).await.unwrap();
    let mut mine_b = watch(&b, "app", false).await;

    let store = cluster().connect(&store_db).await.unwrap();
    let listeners = || async {
        store
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = $2",
                &[&LISTENER, &store_db],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert!(
        eventually(Duration::from_secs(10), || async { listeners().await == 2 }).await,
        "each replica listens on one connection named {LISTENER}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = tokio::spawn({
        let (stop, kills, db) = (stop.clone(), kills.clone(), store_db.clone());
        async move {
            let c = cluster().connect(&db).await.unwrap();
            while !stop.load(Ordering::SeqCst) {
                let n = c
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = $1 AND datname = $2",
                        &[&LISTENER, &db],
                    )
                    .await
                    .unwrap()
                    .len();
                kills.fetch_add(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let mut renewed = Vec::new();
    for i in 0..RENEWALS {
        let l = renew(&a, "app", &held.lease_id, 60 + i as i64)
            .await
            .unwrap();
        renewed.push(ts(&l.expires_at));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    killer.await.unwrap();
    let stopped = Instant::now();
    let kills = kills.load(Ordering::SeqCst);
    assert!(
        kills >= 4,
        "the listeners were killed {kills} times: too few to test anything"
    );

    let mut got = Vec::new();
    while got.len() < RENEWALS {
        let e = tokio::time::timeout(Duration::from_secs(20), mine_b.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "B's watcher got {} of {RENEWALS} renewals within 20 s of the last kill",
                    got.len()
                )
            })
            .unwrap()
            .expect("the stream stays open");
        assert_eq!(e.kind, pb::LeaseEventKind::Renewed as i32, "{e:?}");
        assert_eq!(e.lease_id, held.lease_id);
        got.push(ts(&e.expires_at));
    }
    let caught_up = stopped.elapsed();
    // Each once, in order: the expiries are the renewals' own.
    let ms = |v: &[chrono::DateTime<chrono::Utc>]| -> Vec<i64> {
        v.iter().map(|t| t.timestamp_millis()).collect()
    };
    assert_eq!(ms(&got), ms(&renewed));
    let extra = tokio::time::timeout(Duration::from_millis(1500), mine_b.message()).await;
    assert!(extra.is_err(), "an event delivered twice: {extra:?}");
    assert!(
        eventually(Duration::from_secs(10), || async { listeners().await == 2 }).await,
        "the relays listen again"
    );
    eprintln!(
        "RELAY CATCH-UP: {kills} LISTEN connections killed during {RENEWALS} renewals on A; \
         B's watcher had all {RENEWALS}, in order, once each, {:.0} ms after the last kill \
         (0: every one had arrived while the kills went on)",
        caught_up.as_secs_f64() * 1000.0
    );
    b.stop().await;
    a.stop().await;
}

/// The token in a console page's forms.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no CSRF field in {page}"));
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

/// The console behind a load balancer: the revoke form fetched from
/// replica A is posted to replica B and accepted (one CSRF key for both,
/// kept in the store); a tampered token is refused by both and changes
/// nothing. The charts say "this replica" and count only its own issues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_form_from_replica_a_is_accepted_by_replica_b() {
    let mut a = TestBroker::prepare(&role("ro", "{db}", "5m", "10m", APP)).await;
    let store_db = use_pg_store(&a, cluster(), "60s").await;
    let port_a = a.enable_console().await;
    a.start_in_process().await;
    let mut b = a.replica();
    drop_section(&b, "[console]");
    let port_b = b.enable_console().await;
    b.start_in_process().await;
    wait_port(port_a).await;
    wait_port(port_b).await;

    let kept = issue(&a, "app", "ro", 0).await.unwrap();
    let target = issue(&a, "app", "ro", 0).await.unwrap();
    let (code, page_a) = https(&a, port_a, "admin", "GET", "/leases", &[], "").await;
    assert_eq!(code, 200, "{page_a}");
    let token = csrf_of(&page_a);
    let (_, page_b) = https(&b, port_b, "admin", "GET", "/leases", &[], "").await;
    assert_eq!(csrf_of(&page_b), token, "one key for both replicas");

    let form = |csrf: &str| {
        format!(
            "lease_id={}&back=%2Fleases&confirmed=yes&csrf={csrf}",
            target.lease_id
        )
    };
    let post = |port: u16, body: String| {
        let b = &b;
        async move {
            https(
                b,
                port,
                "admin",
                "POST",
                "/leases/revoke",
                &[("Content-Type", "application/x-www-form-urlencoded")],
                &body,
            )
            .await
        }
    };
    let last = token.chars().last().unwrap();
    let tampered = format!(
        "{}{}",
        &token[..token.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    for port in [port_a, port_b] {
        let (code, raw) = post(port, form(&tampered)).await;
        assert_eq!(code, 403, "a tampered token on port {port}: {raw}");
        assert!(raw.contains("CSRF"), "{raw}");
    }
    assert!(
        b.role_exists(&target.username).await,
        "a refused form changed nothing"
    );

    let (code, raw) = post(port_b, form(&token)).await;
    assert_eq!(code, 200, "A's form posted to B: {raw}");
    assert!(raw.contains("1 lease revoked"), "{raw}");
    assert!(!b.role_exists(&target.username).await, "revoked through B");
    assert!(
        b.role_exists(&kept.username).await,
        "the other lease is kept"
    );

    // One key in the store, made by whichever replica asked first.
    let store = cluster().connect(&store_db).await.unwrap();
    let keys: i64 = one_value(&store, "SELECT count(*) FROM credbroker_keys", &[]).await;
    assert_eq!(keys, 1);

    // The charts: per replica, and they say so.
    let (_, over_a) = https(&a, port_a, "admin", "GET", "/", &[], "").await;
    let (_, over_b) = https(&b, port_b, "admin", "GET", "/", &[], "").await;
    for (page, issued, revoked) in [(&over_a, 2, 0), (&over_b, 0, 1)] {
        assert!(
            page.contains(&format!(
                "Leases issued per minute, this replica: <strong>{issued}</strong>"
            )),
            "{page}"
        );
        assert!(
            page.contains(&format!(
                "Leases revoked per minute, this replica: <strong>{revoked}</strong>"
            )),
            "{page}"
        );
        assert!(page.contains("each replica charts only the requests it served"));
    }
    b.stop().await;
    a.stop().await;
}
