//! One MySQL/MariaDB server, many users: several `[databases.*]` of one
//! broker and two brokers whose prefixes nest keep each other's users
//! through their sweeps; issues racing a lock leave no user behind.

use std::time::Duration;

use credbroker::pb;
use credbroker::pb::revoke_leases_request::Selector;
use mysql_async::prelude::Queryable;

use super::*;
use crate::support::{admin_revoke_by, eventually};

/// Several `[databases.*]` on one server and two brokers whose prefixes
/// nest (`qNN_` and `qNN_b_`): user lists are per server, so each sweep
/// sees every one of these users, and must drop none that a lease of
/// *any* of its databases accounts for, nor any the other broker made.
/// Fast sweeps; after several of them every lease still logs in and no
/// `drop_orphan` record exists. Then a user in the first broker's exact
/// shape that no lease accounts for is dropped.
#[tokio::test]
async fn mysql_two_databases_and_two_brokers_on_one_server_keep_their_users() {
    let t = local().await;
    let base = format!("q{:02x}_", rand::random::<u8>());
    let nested = format!("{base}b_");
    let second_schema = t.fresh_schema().await;

    // Broker A: `main` over 127.0.0.1 and `second` over `localhost`, one
    // server, two schemas.
    let mut a = MyBroker::prepare(&t, reader).await;
    let second = a
        .env
        .mysql_database("second", t.port, &second_schema, Some(&t.password))
        .unwrap()
        .replace("@127.0.0.1:", "@localhost:");
    let old = a.prefix.clone();
    a.edit_config(|c| {
        c.replace(
            &format!("name_prefix = \"{old}\""),
            &format!("name_prefix = \"{base}\""),
        ) + &second
            + &format!(
                "[roles.other]\ndatabase = \"second\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\n\
                 allowed = [\"{APP}\"]\ngrants = [\"GRANT SELECT ON `{second_schema}`.orders TO {{{{name}}}}\"]\n"
            )
    });
    a.prefix = base.clone();
    // Broker B: its own store, a prefix that starts with A's.
    let mut b = MyBroker::prepare(&t, reader).await;
    let old = b.prefix.clone();
    b.edit_config(|c| {
        c.replace(
            &format!("name_prefix = \"{old}\""),
            &format!("name_prefix = \"{nested}\""),
        )
    });
    b.prefix = nested.clone();
    a.start_in_process().await;
    b.start_in_process().await;

    let mut leases = Vec::new();
    for _ in 0..2 {
        let l = a.issue("reader", 300).await.unwrap();
        assert!(l.username.starts_with(&base) && !l.username.starts_with(&nested));
        leases.push((&a, a.schema.clone(), l));
        let l = a.issue("other", 300).await.unwrap();
        assert_eq!(l.database, "second");
        leases.push((&a, second_schema.clone(), l));
        let l = b.issue("reader", 300).await.unwrap();
        assert!(l.username.starts_with(&nested), "{}", l.username);
        leases.push((&b, b.schema.clone(), l));
    }
    // Sweeps run every second; a suspect is dropped on its second sighting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for (broker, schema, l) in &leases {
        let mut c = login(&t, schema, &l.username, &l.password)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "lease {} of {} no longer logs in: {e}",
                    l.username, broker.prefix
                )
            });
        c.query_drop("SELECT item FROM orders").await.unwrap();
        assert_eq!(broker.state(l).await, pb::LeaseState::Active);
    }
    for broker in [&a, &b] {
        let swept: Vec<_> = broker
            .audit_records()
            .into_iter()
            .filter(|r| r.action == "drop_orphan")
            .collect();
        assert!(swept.is_empty(), "{} swept {swept:?}", broker.prefix);
    }

    // A user in A's exact shape that no lease accounts for goes; the view
    // it defined stays, now defined by the admin account.
    let orphan = format!("{base}reader_{}", &unique("")[1..17]);
    let mut root = t.root().await;
    root.query_drop(format!(
        "CREATE USER '{orphan}'@'%'; GRANT SELECT ON `{s}`.* TO '{orphan}'@'%'; \
         CREATE DEFINER = '{orphan}'@'%' VIEW `{s}`.orphan_v AS SELECT item FROM `{s}`.orders",
        s = a.schema
    ))
    .await
    .unwrap();
    let admin: Option<String> = root.query_first("SELECT CURRENT_USER()").await.unwrap();
    let swept = t.dropped_within(&orphan, Duration::from_secs(15)).await;
    assert!(swept, "orphan {orphan} was not swept");
    // The record follows the drop: wait for it too.
    let record = || {
        a.audit_records()
            .into_iter()
            .find(|r| r.action == "drop_orphan" && r.username.as_deref() == Some(orphan.as_str()))
    };
    eventually(Duration::from_secs(5), || async { record().is_some() }).await;
    let rec = record();
    let rec = rec.unwrap_or_else(|| panic!("no drop_orphan record for {orphan}"));
    assert_eq!(rec.objects_reassigned, Some(1), "{rec:?}");
    assert_eq!(rec.reassigned_to, admin);
    let item: Option<String> = root
        .query_first(format!("SELECT item FROM `{}`.orphan_v", a.schema))
        .await
        .expect("the swept user's view still answers");
    assert_eq!(item.as_deref(), Some("coffee"));
    for (_, schema, l) in &leases {
        login(&t, schema, &l.username, &l.password)
            .await
            .expect("a lease's user went with the orphan");
    }

    assert_eq!(
        admin_revoke_by(&a, Selector::All(true), false)
            .await
            .revoked,
        4
    );
    assert_eq!(
        admin_revoke_by(&b, Selector::All(true), false)
            .await
            .revoked,
        2
    );
    a.finish().await;
    b.finish().await;
    let _ = t
        .root()
        .await
        .query_drop(format!("DROP DATABASE IF EXISTS `{second_schema}`"))
        .await;
}

/// Issue 25 item 6 on real MariaDB: 50 issues racing `lock --revoke`.
/// Afterwards no broker-made user exists whose lease is not live (the
/// lock revoked all it found and refuses the rest: none at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_fifty_issues_racing_lock_revoke_leave_no_user_behind_a_dead_lease() {
    let t = local().await;
    let b = MyBroker::start(&t, |s| role("ro", s, "5m", "10m", None)).await;
    let issued = crate::gate::race_issues_against_lock_revoke(&b, "ro", 50).await;
    let mut settled = false;
    let mut last = Default::default();
    for _ in 0..300 {
        let users = t.users_with_prefix(&b.prefix).await;
        let live = crate::gate::live_usernames(&b).await;
        settled = users.is_subset(&live) && live.is_empty();
        last = (users, live);
        if settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        settled,
        "{issued} of 50 issued; users in the database {:?}, live leases {:?}",
        last.0, last.1
    );
    b.finish().await;
}
