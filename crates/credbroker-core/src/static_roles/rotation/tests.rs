//! The rotation state machine over the fast tier's broker (memory store,
//! fake databases): overlap, resumption, audit-first, recovery, replicas.

use super::*;
use crate::identity::Identity;
use crate::store::memory::MemoryStore;
use crate::store::StaticStore;
use crate::testkit::{admin, app, Kit, APP};

fn statics(users: &str) -> String {
    format!(
        "[static_roles.orders]\ndatabase = \"main\"\nallowed = [\"{APP}\"]\n\
         rotation_period = \"1h\"\nusers = {users}\n\n"
    )
}

fn kit(users: &str) -> Kit {
    let kit = Kit::with_statics(&statics(users));
    for u in ["app_a", "app_b", "app"] {
        kit.server.add_static_user(u);
    }
    kit
}

async fn read(kit: &Kit) -> crate::static_roles::StaticCredential {
    kit.broker
        .static_credential(&app(), "orders")
        .await
        .unwrap()
}

/// One step for `orders`, as the loop takes it.
async fn step(kit: &Kit) -> Result<Option<StaticState>> {
    let role = kit.broker.config().static_roles["orders"].clone();
    kit.broker
        .static_rotator()
        .step(&role, Force::None, SYSTEM)
        .await
}

async fn due_step(kit: &Kit) {
    kit.store.make_static_due("orders");
    kit.broker.static_rotator().tick().await;
}

fn logs_in(kit: &Kit, c: &crate::static_roles::StaticCredential) -> bool {
    kit.server
        .static_logs_in(&c.username, c.password.expose(), Utc::now())
}

#[tokio::test]
async fn alternating_users_keep_the_previous_password_for_the_overlap_then_retire_it() {
    let kit = kit("[\"app_a\", \"app_b\"]");
    let first = read(&kit).await;
    assert_eq!((first.username.as_str(), first.generation), ("app_a", 1));
    assert!(logs_in(&kit, &first));
    let hour = chrono::Duration::hours(1);
    assert_eq!(
        first.valid_until,
        first.rotated_at + hour + hour,
        "period + overlap"
    );

    due_step(&kit).await;
    let second = read(&kit).await;
    assert_eq!((second.username.as_str(), second.generation), ("app_b", 2));
    assert!(logs_in(&kit, &second));
    assert!(
        logs_in(&kit, &first),
        "the previous password works for the overlap"
    );
    let st = kit.store.static_get("orders").await.unwrap().unwrap();
    assert_eq!(st.previous.as_ref().unwrap().user, "app_a");

    // The overlap ends (and, overlap = period, the next rotation is due).
    due_step(&kit).await;
    assert!(!logs_in(&kit, &first), "retired: a password nobody knows");
    assert_eq!(kit.server.static_user("app_a").unwrap().sessions_ended, 1);
    let third = read(&kit).await;
    assert_eq!((third.username.as_str(), third.generation), ("app_a", 3));
    assert!(logs_in(&kit, &third) && logs_in(&kit, &second));
    assert_ne!(third.password.expose(), first.password.expose());

    let actions: Vec<String> = kit.audit().into_iter().map(|r| r.action).collect();
    assert_eq!(actions.iter().filter(|a| *a == "static_rotate").count(), 3);
    let metrics = kit.broker.metrics().encode();
    assert!(
        metrics.contains(
            "credbroker_static_rotations_total{static_role=\"orders\",kind=\"rotate\"} 3"
        ),
        "{metrics}"
    );
    assert_eq!(actions.iter().filter(|a| *a == "static_retire").count(), 1);
    assert_eq!(actions.iter().filter(|a| *a == "static_read").count(), 3);
    // No password anywhere in the audit log or the stored state.
    let log = std::fs::read_to_string(kit.audit_path()).unwrap();
    let stored = format!("{:?}", kit.store.static_list().await.unwrap());
    for c in [&first, &second, &third] {
        assert!(!log.contains(c.password.expose()) && !stored.contains(c.password.expose()));
        assert!(!format!("{c:?}").contains(c.password.expose()));
    }
}

#[tokio::test]
async fn a_rotation_cut_off_after_the_database_changed_is_finished_by_the_next_step() {
    let kit = kit("[\"app_a\", \"app_b\"]");
    let first = read(&kit).await;
    // The broker "dies" right after the database took app_b's new
    // password: its claim is lost before the commit.
    let store = kit.store.clone();
    kit.server.after_next_static_set(move || {
        store.steal_static_claim(
            "orders",
            "another-replica",
            Utc::now() + chrono::Duration::seconds(60),
        );
    });
    kit.store.make_static_due("orders");
    let e = step(&kit).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    let st = kit.store.static_get("orders").await.unwrap().unwrap();
    assert_eq!(
        st.pending.as_ref().unwrap().user,
        "app_b",
        "the intent is stored"
    );
    assert_eq!(st.current.as_ref().unwrap().user, "app_a", "not committed");
    // Readers meanwhile keep the committed credential, which works.
    let during = kit.broker.static_credential(&app(), "orders").await;
    assert!(during.is_ok_and(|c| c.username == "app_a" && logs_in(&kit, &c)));
    // The claim runs out; the next step resumes and commits.
    kit.store.steal_static_claim(
        "orders",
        "another-replica",
        Utc::now() - chrono::Duration::seconds(1),
    );
    kit.broker.static_rotator().tick().await;
    let after = read(&kit).await;
    assert_eq!((after.username.as_str(), after.generation), ("app_b", 2));
    assert!(
        logs_in(&kit, &after),
        "the served password is the database's"
    );
    assert!(logs_in(&kit, &first));
    let resumed = kit
        .audit()
        .into_iter()
        .filter(|r| r.detail.as_deref().is_some_and(|d| d.contains("resumed")))
        .count();
    assert_eq!(resumed, 1);
}

#[tokio::test]
async fn a_database_away_leaves_the_intent_pending_and_the_old_credential_served() {
    let kit = kit("[\"app_a\", \"app_b\"]");
    let first = read(&kit).await;
    kit.server.set_unavailable(true);
    kit.store.make_static_due("orders");
    kit.broker.static_rotator().tick().await;
    let st = kit.store.static_get("orders").await.unwrap().unwrap();
    assert!(st.pending.is_some() && st.last_error.is_some(), "{st:?}");
    let still = read(&kit).await;
    assert_eq!(still.username, "app_a");
    assert_eq!(still.password.expose(), first.password.expose());
    kit.server.set_unavailable(false);
    step(&kit).await.unwrap();
    let after = read(&kit).await;
    assert_eq!(after.username, "app_b");
    assert!(logs_in(&kit, &after));
    assert_eq!(
        kit.broker
            .metrics()
            .static_failures
            .get_or_create(&crate::metrics::StaticLabels {
                static_role: "orders".into(),
                kind: "step".into()
            })
            .get(),
        2,
        "the tick's and the reader's"
    );
}

#[tokio::test]
async fn a_rotation_whose_audit_record_cannot_be_written_is_neither_applied_nor_committed() {
    // Single-user mode: a database change without its commit would
    // leave readers with a password the database no longer has.
    let kit = kit("[\"app\"]");
    let first = read(&kit).await;
    let before = kit.store.static_get("orders").await.unwrap().unwrap();
    kit.broker.audit().fail_writes(true);
    due_step(&kit).await;
    let st = kit.store.static_get("orders").await.unwrap().unwrap();
    assert_eq!(
        (st.generation, &st.current),
        (1, &before.current),
        "committed without its audit record"
    );
    assert_eq!(st.pending.as_ref().map(|p| p.generation), Some(2));
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("audit")),
        "{st:?}"
    );
    assert!(
        logs_in(&kit, &first),
        "the database changed: the served password is no longer the database's"
    );
    // The audit log works again: the next step finishes the rotation,
    // audited.
    kit.broker.audit().fail_writes(false);
    step(&kit).await.unwrap();
    let second = read(&kit).await;
    assert_eq!(second.generation, 2);
    assert!(logs_in(&kit, &second) && !logs_in(&kit, &first));
    assert!(kit.audit().iter().any(|r| r.action == "static_rotate"
        && r.outcome == Outcome::Ok
        && r.detail
            .as_deref()
            .is_some_and(|d| d.contains("generation=2 "))));
}

#[tokio::test]
async fn a_pending_rotation_sealed_under_another_key_is_abandoned_and_rotated_afresh_by_an_admin() {
    let kit = kit("[\"app_a\", \"app_b\"]");
    let first = read(&kit).await;
    // A replica with another sealing key left an intent behind.
    let other = Sealer::from_bytes(&[9u8; 32]).unwrap();
    let claim = Claim {
        owner: "other-replica".into(),
        until: Utc::now() + chrono::Duration::seconds(60),
    };
    let mut st = kit
        .store
        .static_claim("orders", &claim)
        .await
        .unwrap()
        .unwrap();
    st.pending = Some(Pending {
        kind: PendingKind::Rotate,
        user: "app_b".into(),
        sealed: other
            .seal("orders", "app_b", 2, &Password::generate())
            .unwrap(),
        generation: 2,
        valid_until: Utc::now() + chrono::Duration::hours(2),
    });
    assert!(kit.store.static_save(&st, "other-replica").await.unwrap());
    kit.store
        .static_release("orders", "other-replica")
        .await
        .unwrap();
    // No step can finish it: each fails naming the key mismatch, while
    // readers keep the committed credential.
    for _ in 0..2 {
        let e = step(&kit).await.unwrap_err();
        assert!(
            matches!(&e, Error::FailedPrecondition(m) if m.contains(other.key_id())),
            "{e}"
        );
    }
    let still = read(&kit).await;
    assert_eq!(still.generation, 1);
    assert!(logs_in(&kit, &first));
    // Only an admin may abandon it.
    let e = kit
        .broker
        .recover_static(&app(), "orders")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
    let status = kit.broker.recover_static(&admin(), "orders").await.unwrap();
    assert_eq!(
        (
            status.current_user.as_deref(),
            status.generation,
            status.pending
        ),
        (Some("app_b"), 2, false)
    );
    let after = read(&kit).await;
    assert!(
        logs_in(&kit, &after) && logs_in(&kit, &first),
        "overlap kept"
    );
    let audit = kit.audit();
    let abandoned = audit
        .iter()
        .find(|r| r.action == "static_abandon" && r.outcome == Outcome::Ok)
        .expect("the abandon is audited");
    assert_eq!(abandoned.identity, crate::testkit::ADMIN);
    assert!(abandoned
        .detail
        .as_deref()
        .is_some_and(|d| d.contains("generation 2") && d.contains(other.key_id())));
    assert!(audit.iter().any(|r| r.action == "static_abandon"
        && r.outcome == Outcome::Denied
        && r.identity == crate::testkit::APP));
}

#[tokio::test]
async fn single_user_mode_replaces_the_one_password_at_every_rotation() {
    let kit = kit("[\"app\"]");
    let first = read(&kit).await;
    due_step(&kit).await;
    let second = read(&kit).await;
    assert_eq!((second.username.as_str(), second.generation), ("app", 2));
    assert!(logs_in(&kit, &second));
    assert!(
        !logs_in(&kit, &first),
        "Vault's mode: the old password is gone at once"
    );
    assert_eq!(kit.server.static_user("app").unwrap().sessions_ended, 0);
}

#[tokio::test]
async fn only_allowed_identities_read_and_only_admins_rotate_or_revoke() {
    let kit = kit("[\"app_a\", \"app_b\"]");
    let other = Identity::from_trusted("spiffe://credbroker.dev/ns/demo/other");
    let b = &kit.broker;
    // A stranger reads, anyone reads a role that does not exist, the app
    // rotates: each refused, none rotates anything.
    let refused = [
        b.static_credential(&other, "orders").await.err(),
        b.static_credential(&app(), "nope").await.err(),
        b.rotate_static(&app(), "orders").await.err(),
    ];
    assert!(
        matches!(
            &refused,
            [
                Some(Error::PermissionDenied(_)),
                Some(Error::NotFound(_)),
                Some(Error::PermissionDenied(_))
            ]
        ),
        "{refused:?}"
    );
    let denied = kit
        .audit()
        .into_iter()
        .filter(|r| r.outcome == Outcome::Denied)
        .count();
    assert_eq!(denied, 2);
    assert!(
        kit.server.static_user("app_a").unwrap().password.is_none(),
        "nothing rotated"
    );
}

#[tokio::test]
async fn admin_revoke_retires_both_users_and_serves_a_new_credential() {
    let kit = kit("[\"app_a\", \"app_b\"]");
    let first = read(&kit).await;
    let status = kit.broker.rotate_static(&admin(), "orders").await.unwrap();
    assert_eq!(status.current_user.as_deref(), Some("app_b"));
    let second = read(&kit).await;
    let status = kit.broker.revoke_static(&admin(), "orders").await.unwrap();
    assert_eq!(status.previous_user, None);
    let third = read(&kit).await;
    assert_eq!(third.username, "app_a");
    assert!(logs_in(&kit, &third));
    assert!(!logs_in(&kit, &first) && !logs_in(&kit, &second));
    assert!(kit.server.static_user("app_b").unwrap().sessions_ended >= 1);
    let listed = kit.broker.admin_static_roles(&admin()).await.unwrap();
    assert_eq!(listed[0].generation, 3);
    assert!(kit
        .audit()
        .iter()
        .any(|r| r.action == "static_revoke" && r.identity == crate::testkit::ADMIN));
}

#[tokio::test]
async fn two_replicas_rotate_once_per_period() {
    let store = Arc::new(MemoryStore::new());
    let server = crate::backend::fake::FakeServer::new();
    let a = Kit::with_statics_on(
        &statics("[\"app_a\", \"app_b\"]"),
        store.clone(),
        server.clone(),
    );
    let b = Kit::with_statics_on(
        &statics("[\"app_a\", \"app_b\"]"),
        store.clone(),
        server.clone(),
    );
    server.add_static_user("app_a");
    server.add_static_user("app_b");
    let who = app();
    let (x, y) = tokio::join!(
        a.broker.static_credential(&who, "orders"),
        b.broker.static_credential(&who, "orders")
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(
        (x.generation, x.password.expose()),
        (y.generation, y.password.expose())
    );
    store.make_static_due("orders");
    tokio::join!(
        a.broker.static_rotator().tick(),
        b.broker.static_rotator().tick()
    );
    a.broker.static_rotator().tick().await;
    b.broker.static_rotator().tick().await;
    let sets = server
        .calls()
        .iter()
        .filter(|c| c.starts_with("static_set"))
        .count();
    assert_eq!(sets, 2, "{:?}", server.calls());
    assert_eq!(
        store
            .static_get("orders")
            .await
            .unwrap()
            .unwrap()
            .generation,
        2
    );
}
