//! Revocation never destroys data on MySQL/MariaDB: what a leased user
//! defined (views, routines, triggers, events) gets a new definer before
//! the user goes, whoever ends the lease; where the drop cannot run the
//! account is locked and its sessions killed all the same.

use std::time::Duration;

use credbroker::pb;
use credbroker::pb::revoke_leases_request::Selector;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::*;
use crate::support::{admin_revoke_by, eventually};

/// A role whose users may create tables, views, routines, triggers and
/// events in `schema`; `owner` inherits them.
fn ddl_role(name: &str, schema: &str, ttl: &str, owner: Option<&str>) -> String {
    let owner = owner
        .map(|o| format!("owner = \"{o}\"\n"))
        .unwrap_or_default();
    format!(
        "[roles.{name}]\ndatabase = \"main\"\ndefault_ttl = \"{ttl}\"\nmax_ttl = \"1h\"\n\
         allowed = [\"{APP}\"]\n{owner}grants = [\"GRANT SELECT, INSERT, CREATE, CREATE VIEW, SHOW VIEW, \
         CREATE ROUTINE, ALTER ROUTINE, EXECUTE, TRIGGER, EVENT ON `{schema}`.* TO {{{{name}}}}\"]\n\n"
    )
}

/// What a migration leaves behind: a table with rows and, all defined by
/// the leased user, a view, a function, a procedure, a trigger and an
/// event (5 objects with a DEFINER).
async fn create_objects(c: &mut Conn, tag: &str) {
    for sql in [
        format!("CREATE TABLE {tag}_t (id INT PRIMARY KEY, v TEXT)"),
        format!("INSERT INTO {tag}_t VALUES (1, 'one'), (2, 'two')"),
        format!("CREATE TABLE {tag}_log (id INT)"),
        format!("CREATE VIEW {tag}_v AS SELECT id, v FROM {tag}_t WHERE id > 0"),
        format!(
            "CREATE FUNCTION {tag}_n() RETURNS INT READS SQL DATA RETURN (SELECT COUNT(*) FROM {tag}_t)"
        ),
        format!(
            "CREATE PROCEDURE {tag}_add(IN x INT) MODIFIES SQL DATA \
             BEGIN INSERT INTO {tag}_t VALUES (x, 'proc'); END"
        ),
        format!(
            "CREATE TRIGGER {tag}_tr AFTER INSERT ON {tag}_t FOR EACH ROW INSERT INTO {tag}_log VALUES (NEW.id)"
        ),
        format!(
            "CREATE EVENT {tag}_ev ON SCHEDULE EVERY 1 DAY STARTS CURRENT_TIMESTAMP + INTERVAL 1 DAY \
             DO DELETE FROM {tag}_log WHERE id < 0"
        ),
    ] {
        c.query_drop(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Definers of the objects `create_objects(tag)` made, as `user@host`.
async fn definers(root: &mut Conn, schema: &str, tag: &str) -> Vec<String> {
    let like = format!("{tag}!_%");
    root.exec(
        "SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ? AND TABLE_NAME LIKE ? ESCAPE '!' \
         UNION ALL SELECT DEFINER FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = ? AND ROUTINE_NAME LIKE ? ESCAPE '!' \
         UNION ALL SELECT DEFINER FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = ? AND TRIGGER_NAME LIKE ? ESCAPE '!' \
         UNION ALL SELECT DEFINER FROM information_schema.EVENTS WHERE EVENT_SCHEMA = ? AND EVENT_NAME LIKE ? ESCAPE '!'",
        (schema, &like, schema, &like, schema, &like, schema, &like),
    )
    .await
    .unwrap()
}

/// The objects of `tag` work after their definer is gone, for root and for
/// `reader` (another account), and each is defined by `definer`.
async fn assert_objects_work(t: &Target, schema: &str, tag: &str, definer: &str, reader: &Target2) {
    let mut root = t.root().await;
    let found = definers(&mut root, schema, tag).await;
    assert_eq!(found.len(), 5, "objects of {tag}: {found:?}");
    for d in &found {
        assert!(
            d.eq_ignore_ascii_case(definer),
            "{tag}: definer {d}, wanted {definer}"
        );
    }
    let rows: Option<u64> = root
        .query_first(format!("SELECT COUNT(*) FROM `{schema}`.{tag}_v"))
        .await
        .unwrap_or_else(|e| panic!("view {tag}_v as root: {e}"));
    assert!(rows.unwrap_or(0) >= 2);
    // The procedure runs, its insert fires the trigger.
    let id = 100 + rand::random::<u16>() as i64;
    root.query_drop(format!("CALL `{schema}`.{tag}_add({id})"))
        .await
        .unwrap_or_else(|e| panic!("procedure {tag}_add: {e}"));
    let logged: Option<u64> = root
        .query_first(format!(
            "SELECT COUNT(*) FROM `{schema}`.{tag}_log WHERE id = {id}"
        ))
        .await
        .unwrap();
    assert_eq!(logged, Some(1), "trigger {tag}_tr did not fire");
    let mut other = login(&reader.target, schema, &reader.user, &reader.password)
        .await
        .expect("reader login");
    let via_view: Vec<(i64, String)> = other
        .query(format!("SELECT id, v FROM {tag}_v ORDER BY id"))
        .await
        .unwrap_or_else(|e| panic!("view {tag}_v as another user: {e}"));
    assert!(via_view.iter().any(|(i, _)| *i == id), "{via_view:?}");
    let n: Option<i64> = other
        .query_first(format!("SELECT {tag}_n()"))
        .await
        .unwrap_or_else(|e| panic!("function {tag}_n as another user: {e}"));
    assert_eq!(n, Some(via_view.len() as i64));
}

/// Another account on the server, to use objects as someone else.
struct Target2 {
    target: Target,
    user: String,
    password: String,
}

async fn reader_account(t: &Target, schema: &str) -> Target2 {
    let user = unique("rd")[..18].to_string();
    let password = credbroker::lease::Password::generate().expose().to_string();
    t.root()
        .await
        .query_drop(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'; \
             GRANT SELECT, EXECUTE ON `{schema}`.* TO '{user}'@'%'"
        ))
        .await
        .unwrap();
    Target2 {
        target: t.clone(),
        user,
        password,
    }
}

/// An account that owns nothing but inherits what leased users define:
/// locked (nobody logs in as it), with the rights its objects need.
async fn owner_account(t: &Target, schema: &str, owner: &str) {
    t.root()
        .await
        .query_drop(format!(
            "CREATE USER '{owner}'@'%' ACCOUNT LOCK; \
             GRANT SELECT, INSERT, EXECUTE, TRIGGER ON `{schema}`.* TO '{owner}'@'%'"
        ))
        .await
        .unwrap();
}

/// What a leased user defined outlives it: revoked (objects to the role's
/// owner) and expired (objects to the admin, the role having no owner),
/// the view answers for root and for another account, the routines run,
/// the trigger fires; the login is refused, the open session is gone, and
/// the audit record says how many objects moved to whom.
#[tokio::test]
async fn mysql_objects_a_leased_user_defines_outlive_revoke_and_expiry() {
    let t = local().await;
    let owner = unique("own")[..18].to_string();
    let mut b = MyBroker::prepare(&t, |s| {
        ddl_role("maker", s, "5m", Some(&owner)) + &ddl_role("adhoc", s, "2s", None)
    })
    .await;
    owner_account(&t, &b.schema, &owner).await;
    let reader = reader_account(&t, &b.schema).await;
    b.start_in_process().await;
    let mut root = t.root().await;
    let admin = t.current_user().await;

    // Revoked by its holder: everything goes to the owner.
    let lease = b.issue("maker", 300).await.unwrap();
    let mut c = b.login(&lease).await.expect("leased login");
    create_objects(&mut c, "rev").await;
    let mut idle = b.login(&lease).await.expect("second session");
    b.revoke(&lease).await;
    assert!(
        t.user_hosts(&lease.username).await.is_empty(),
        "user not dropped"
    );
    assert!(
        idle.query_drop("SELECT 1").await.is_err(),
        "session survived"
    );
    assert!(c.query_drop("SELECT 1").await.is_err(), "session survived");
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(access_denied(&refused), "{refused}");
    assert_objects_work(&t, &b.schema, "rev", &format!("{owner}@%"), &reader).await;
    let rec = audit_of(&b, &lease).expect("revocation record");
    assert_eq!(rec.objects_reassigned, Some(5), "{rec:?}");
    assert_eq!(
        rec.reassigned_to.as_deref(),
        Some(format!("{owner}@%").as_str())
    );

    // Expired and reaped; the role has no owner, so the admin inherits.
    let lease = b.issue("adhoc", 2).await.unwrap();
    let mut c = b.login(&lease).await.expect("leased login");
    create_objects(&mut c, "exp").await;
    let gone = b.reaped_within(&lease, Duration::from_secs(20)).await;
    assert!(gone, "expired user {} still exists", lease.username);
    assert!(
        c.query_drop("SELECT 1").await.is_err(),
        "session survived expiry"
    );
    assert_objects_work(&t, &b.schema, "exp", &admin, &reader).await;
    let rec = audit_of(&b, &lease).expect("reap record");
    assert_eq!(rec.action, "reap");
    assert_eq!(rec.objects_reassigned, Some(5), "{rec:?}");
    assert_eq!(rec.reassigned_to.as_deref(), Some(admin.as_str()));

    b.finish().await;
    root.query_drop(format!(
        "DROP USER '{owner}'@'%'; DROP USER '{}'@'%'",
        reader.user
    ))
    .await
    .unwrap();
}

/// Revocations that run at once share one definer lookup: each still
/// hands exactly its own objects to the admin, and says so in its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_concurrent_revocations_each_move_their_own_definers() {
    let t = local().await;
    let b = MyBroker::start(&t, |s| ddl_role("maker", s, "5m", None)).await;
    let mut root = t.root().await;
    let admin = t.current_user().await;
    let mut leases = Vec::new();
    for i in 0..6 {
        let lease = b.issue("maker", 300).await.unwrap();
        let mut c = b.login(&lease).await.expect("leased login");
        // Lease i defines i + 1 views.
        for v in 0..=i {
            c.query_drop(format!("CREATE VIEW cc_{i}_{v} AS SELECT id FROM orders"))
                .await
                .unwrap();
        }
        leases.push(lease);
    }
    let revokes = leases.iter().map(|l| b.revoke(l));
    futures::future::join_all(revokes).await;
    for (i, lease) in leases.iter().enumerate() {
        assert!(
            t.user_hosts(&lease.username).await.is_empty(),
            "user {i} not dropped"
        );
        let rec = audit_of(&b, lease).expect("revocation record");
        assert_eq!(
            rec.objects_reassigned,
            Some(i as u64 + 1),
            "lease {i}: {rec:?}"
        );
        let definers: Vec<String> = root
            .exec(
                "SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ? AND TABLE_NAME LIKE ?",
                (&b.schema, format!("cc\\_{i}\\_%")),
            )
            .await
            .unwrap();
        assert_eq!(definers.len(), i + 1, "lease {i}'s views");
        assert!(
            definers.iter().all(|d| d == &admin),
            "lease {i}: {definers:?}"
        );
    }
    b.finish().await;
}

/// A DBA widens one lease by hand after issue (outside the broker) and the
/// user makes a view with it: the revocation still hands the view to the
/// admin, so it keeps working. (The broker never decides from the role's
/// grants that a user defines nothing.)
#[tokio::test]
async fn mysql_a_privilege_granted_by_hand_after_issue_still_gets_its_objects_moved() {
    let t = local().await;
    let mut b = MyBroker::prepare(&t, reader).await;
    let reader = reader_account(&t, &b.schema).await;
    b.start_in_process().await;
    let mut root = t.root().await;
    let admin = t.current_user().await;

    // A DBA widens one lease by hand; the user makes a view with it.
    let widened = b.issue("reader", 0).await.unwrap();
    root.query_drop(format!(
        "GRANT CREATE VIEW, SHOW VIEW ON `{}`.* TO '{}'@'%'",
        b.schema, widened.username
    ))
    .await
    .unwrap();
    let mut c = b.login(&widened).await.expect("leased login");
    c.query_drop("CREATE VIEW hand_v AS SELECT id FROM orders")
        .await
        .expect("the hand-granted privilege works");
    drop(c);
    b.revoke(&widened).await;
    assert!(
        t.user_hosts(&widened.username).await.is_empty(),
        "user not dropped"
    );
    let definer: Option<String> = root
        .exec_first(
            "SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = 'hand_v'",
            (&b.schema,),
        )
        .await
        .unwrap();
    assert_eq!(
        definer.as_deref(),
        Some(admin.as_str()),
        "the view's definer was not moved"
    );
    let mut other = login(&t.clone(), &b.schema, &reader.user, &reader.password)
        .await
        .expect("reader login");
    let n: Vec<i64> = other
        .query("SELECT id FROM hand_v")
        .await
        .expect("the view works after its definer's lease was revoked");
    assert_eq!(n, vec![1]);
    let rec = audit_of(&b, &widened).expect("revocation record");
    assert_eq!(rec.objects_reassigned, Some(1), "{rec:?}");
    b.stop().await;
}

/// The definer lookup reads views, triggers and routines only in the
/// schemas the user's grants reach: here a schema-level grant on two
/// schemas (their names have `_`, a wildcard in such a grant) and a
/// table-level one on a third. A view in each of the first two, a
/// procedure in the second and a trigger in the third: all four move to
/// the admin and keep working.
#[tokio::test]
async fn mysql_objects_in_every_schema_a_lease_is_granted_on_get_their_definer_moved() {
    let t = local().await;
    let second = t.fresh_schema().await;
    let third = t.fresh_schema().await;
    let b = MyBroker::start(&t, |s| {
        format!(
            "[roles.wide]\ndatabase = \"main\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\n\
             allowed = [\"{APP}\"]\ngrants = [\
             \"GRANT SELECT, CREATE VIEW, SHOW VIEW ON `{s}`.* TO {{{{name}}}}\", \
             \"GRANT SELECT, CREATE VIEW, SHOW VIEW, CREATE ROUTINE ON `{second}`.* TO {{{{name}}}}\", \
             \"GRANT SELECT, INSERT, TRIGGER ON `{third}`.orders TO {{{{name}}}}\"]\n\n"
        )
    })
    .await;
    let admin = t.current_user().await;
    let lease = b.issue("wide", 300).await.unwrap();
    let mut c = b.login(&lease).await.expect("leased login");
    for sql in [
        "CREATE VIEW wide_v AS SELECT id FROM orders".to_string(),
        format!("CREATE VIEW `{second}`.wide_v AS SELECT item FROM `{second}`.orders"),
        format!("CREATE PROCEDURE `{second}`.wide_p() SELECT COUNT(*) FROM `{second}`.orders"),
        format!(
            "CREATE TRIGGER `{third}`.wide_tr BEFORE INSERT ON `{third}`.orders \
             FOR EACH ROW SET NEW.item = UPPER(NEW.item)"
        ),
    ] {
        c.query_drop(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    drop(c);
    b.revoke(&lease).await;
    assert!(
        t.user_hosts(&lease.username).await.is_empty(),
        "user not dropped"
    );
    let rec = audit_of(&b, &lease).expect("revocation record");
    assert_eq!(rec.objects_reassigned, Some(4), "{rec:?}");
    assert_eq!(rec.reassigned_to.as_deref(), Some(admin.as_str()));
    let mut root = t.root().await;
    for (schema, n) in [(&b.schema, 1), (&second, 2), (&third, 1)] {
        let d = definers(&mut root, schema, "wide").await;
        assert_eq!(d, vec![admin.clone(); n], "objects in {schema}");
    }
    let item: Option<String> = root
        .query_first(format!("SELECT item FROM `{second}`.wide_v"))
        .await
        .expect("the view in the second schema answers");
    assert_eq!(item.as_deref(), Some("coffee"));
    let n: Option<i64> = root
        .query_first(format!("CALL `{second}`.wide_p()"))
        .await
        .expect("the procedure runs with its new definer");
    assert_eq!(n, Some(1));
    root.query_drop(format!("INSERT INTO `{third}`.orders VALUES (7, 'tea')"))
        .await
        .expect("the trigger runs with its new definer");
    let item: Option<String> = root
        .query_first(format!("SELECT item FROM `{third}`.orders WHERE id = 7"))
        .await
        .unwrap();
    assert_eq!(item.as_deref(), Some("TEA"), "the trigger did not fire");
    b.finish().await;
    root.query_drop(format!("DROP DATABASE `{second}`; DROP DATABASE `{third}`"))
        .await
        .unwrap();
}

/// A lease with a global privilege, and one with a role, are looked up in
/// every schema: an admin (SET USER) made each of them the definer of a
/// view in a schema they hold no grant of their own on, and both views
/// still move to the admin.
#[tokio::test]
async fn mysql_a_lease_with_a_global_privilege_or_a_role_is_looked_up_everywhere() {
    let t = local().await;
    let elsewhere = t.fresh_schema().await;
    let b = MyBroker::start(&t, reader).await;
    let admin = t.current_user().await;
    let global = b.issue("reader", 300).await.unwrap();
    let member = b.issue("reader", 300).await.unwrap();
    let role = unique("cbrole")[..18].to_string();
    let mut root = t.root().await;
    root.query_drop(format!(
        "GRANT PROCESS ON *.* TO '{g}'@'%'; \
         CREATE ROLE '{role}'; GRANT SELECT ON `{elsewhere}`.* TO '{role}'; \
         GRANT '{role}' TO '{m}'@'%'; \
         CREATE DEFINER = '{g}'@'%' VIEW `{elsewhere}`.global_v AS SELECT item FROM `{elsewhere}`.orders; \
         CREATE DEFINER = '{m}'@'%' VIEW `{elsewhere}`.member_v AS SELECT item FROM `{elsewhere}`.orders",
        g = global.username,
        m = member.username,
    ))
    .await
    .unwrap();
    for (lease, view) in [(&global, "global_v"), (&member, "member_v")] {
        b.revoke(lease).await;
        assert!(
            t.user_hosts(&lease.username).await.is_empty(),
            "user not dropped"
        );
        let rec = audit_of(&b, lease).expect("revocation record");
        assert_eq!(rec.objects_reassigned, Some(1), "{view}: {rec:?}");
        let definer: Option<String> = root
            .exec_first(
                "SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (&elsewhere, view),
            )
            .await
            .unwrap();
        assert_eq!(definer.as_deref(), Some(admin.as_str()), "{view}");
        let item: Option<String> = root
            .query_first(format!("SELECT item FROM `{elsewhere}`.{view}"))
            .await
            .unwrap_or_else(|e| panic!("{view} broke: {e}"));
        assert_eq!(item.as_deref(), Some("coffee"));
    }
    b.finish().await;
    root.query_drop(format!("DROP ROLE '{role}'; DROP DATABASE `{elsewhere}`"))
        .await
        .unwrap();
}

/// The drop cannot run (the role's owner account does not exist, so the
/// view's definer cannot move): the account is locked and its sessions
/// gone all the same, the lease is `failing` with the reason, the view
/// is untouched; `admin revoke --force` then forgets the lease because
/// the lock is verified, leaving the locked account in place.
#[tokio::test]
async fn mysql_lock_and_kill_hold_when_the_drop_cannot_run() {
    let t = local().await;
    let ghost = unique("ghost")[..18].to_string();
    let mut b = MyBroker::prepare(&t, |s| ddl_role("maker", s, "5m", Some(&ghost))).await;
    b.edit_config(|c| {
        c.replace(
            "max_backoff = \"1s\"\n",
            "max_backoff = \"1s\"\nfailing_after_attempts = 1\n",
        )
    });
    b.start_in_process().await;
    let lease = b.issue("maker", 300).await.unwrap();
    let mut c = b.login(&lease).await.expect("leased login");
    create_objects(&mut c, "lk").await;
    let mut idle = b.login(&lease).await.expect("second session");

    let err = b.revoke_as("app", &lease.lease_id).await.unwrap_err();
    // The caller learns it will be retried; the reason is the operator's
    // (admin leases, the log), not the caller's.
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("will be retried"), "{err:?}");
    let listed = b
        .admin()
        .await
        .list_leases(pb::ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases;
    let why = &listed
        .iter()
        .find(|l| l.lease_id == lease.lease_id)
        .expect("still listed")
        .last_error;
    assert!(
        why.contains("DEFINER") && why.contains("does not exist"),
        "{why:?}"
    );
    assert!(
        idle.query_drop("SELECT 1").await.is_err(),
        "session survived"
    );
    assert!(c.query_drop("SELECT 1").await.is_err(), "session survived");
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(locked_out(&refused), "{refused}");
    assert!(t.is_locked(&lease.username).await);
    assert_eq!(t.user_hosts(&lease.username).await, vec!["%".to_string()]);
    let failing = eventually(Duration::from_secs(10), || async {
        b.state(&lease).await == pb::LeaseState::Failing
    })
    .await;
    assert!(failing, "lease not failing");
    // Nothing was half-moved or broken: the view still answers.
    let mut root = t.root().await;
    let rows: Option<u64> = root
        .query_first(format!("SELECT COUNT(*) FROM `{}`.lk_v", b.schema))
        .await
        .unwrap();
    assert_eq!(rows, Some(2));

    let r = admin_revoke_by(&b, Selector::LeaseId(lease.lease_id.clone()), true).await;
    assert_eq!(r.revoked, 1, "{r:?}");
    assert_eq!(b.state(&lease).await, pb::LeaseState::Revoked);
    // Forgotten by the broker, dead in the database.
    assert!(t.is_locked(&lease.username).await);
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(locked_out(&refused), "{refused}");

    b.finish().await;
    root.query_drop(format!("DROP USER '{}'@'%'", lease.username))
        .await
        .unwrap();
}

/// `--force` refuses when the lock cannot be verified: here the admin
/// account may not read mysql.global_priv. The lease stays tracked (and
/// the account locked anyway).
#[tokio::test]
async fn mysql_force_refuses_without_a_verified_lock() {
    let t = local().await;
    let ghost = unique("ghost")[..18].to_string();
    let mut b = MyBroker::prepare(&t, |s| ddl_role("maker", s, "5m", Some(&ghost))).await;
    let admin = b.limited_admin("%").await;
    b.start_in_process().await;
    let lease = b.issue("maker", 300).await.unwrap();
    let mut c = b.login(&lease).await.expect("leased login");
    c.query_drop("CREATE VIEW fr_v AS SELECT 1 AS one")
        .await
        .unwrap();
    let r = admin_revoke_by(&b, Selector::LeaseId(lease.lease_id.clone()), true).await;
    assert_eq!(r.revoked, 0, "{r:?}");
    assert!(
        r.failures
            .iter()
            .any(|f| f.error.contains("could not be verified") && f.error.contains("global_priv")),
        "{r:?}"
    );
    assert_ne!(b.state(&lease).await, pb::LeaseState::Revoked);
    assert!(c.query_drop("SELECT 1").await.is_err(), "session survived");
    assert!(t.is_locked(&lease.username).await);
    let refused = b.login(&lease).await.map(|_| ()).unwrap_err();
    assert!(locked_out(&refused), "{refused}");

    b.finish().await;
    t.root()
        .await
        .query_drop(format!(
            "DROP USER '{}'@'%'; DROP USER '{admin}'@'%'",
            lease.username
        ))
        .await
        .unwrap();
}

/// The failsafe with no broker: at expiry a user that defined a view is
/// locked and its session killed (dropping it would break the view); one
/// that defined nothing is dropped. When the broker returns, its reaper
/// moves the view's definer and drops the first one too.
#[tokio::test]
async fn mysql_failsafe_locks_a_definer_and_drops_the_rest_after_broker_sigkill() {
    let db = throwaway().await;
    let t = target_of(&db);
    let mut b = MyBroker::prepare(&t, |s| ddl_role("maker", s, "4s", None)).await;
    b.spawn_binary().await;
    let definer = b.issue("maker", 4).await.unwrap();
    let plain = b.issue("maker", 4).await.unwrap();
    let mut d = b.login(&definer).await.expect("leased login");
    d.query_drop("CREATE TABLE fs_t (id INT); INSERT INTO fs_t VALUES (1), (2)")
        .await
        .unwrap();
    d.query_drop("CREATE VIEW fs_v AS SELECT id FROM fs_t")
        .await
        .unwrap();
    let mut p = b.login(&plain).await.expect("leased login");
    p.query_drop("SELECT 1").await.unwrap();
    b.kill_binary();

    let expiry = crate::support::ts(&definer.expires_at);
    let within = (expiry + chrono::Duration::seconds(4) - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    let fired = eventually(within, || async {
        t.user_hosts(&plain.username).await.is_empty() && t.is_locked(&definer.username).await
    })
    .await;
    assert!(fired, "the failsafe did not lock/drop by the expiry");
    assert_eq!(
        t.user_hosts(&definer.username).await,
        vec!["%".to_string()],
        "a definer must stay (locked) until its objects have a new definer"
    );
    let refused = b.login(&definer).await.map(|_| ()).unwrap_err();
    assert!(locked_out(&refused), "{refused}");
    assert!(b.login(&plain).await.is_err());
    for s in [&mut d, &mut p] {
        assert!(cut(s).await, "the failsafe left a session running");
    }
    let mut root = t.root().await;
    let view = format!("SELECT COUNT(*) FROM `{}`.fs_v", b.schema);
    let rows: Option<u64> = root.query_first(view.as_str()).await.unwrap();
    assert_eq!(rows, Some(2), "the view broke");

    // The broker returns: the reaper moves the definer and drops the user.
    b.spawn_binary().await;
    let done = t
        .dropped_within(&definer.username, Duration::from_secs(20))
        .await;
    assert!(done, "the reaper did not finish the revocation");
    let rows: Option<u64> = root.query_first(view.as_str()).await.unwrap();
    assert_eq!(rows, Some(2), "the view broke after the reaper");
    b.kill_binary();
    b.drop_schema().await;
}
