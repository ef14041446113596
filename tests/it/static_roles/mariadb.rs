//! Static roles on the shared MariaDB: alternating users through the
//! sidecar, the failsafe events and policy with the broker gone,
//! single-user mode, created users with their owner as default role.

use std::time::Duration;

use mysql_async::prelude::Queryable;

use super::*;

/// Users made by the "DBA" on the shared MariaDB and a broker for them.
async fn maria_static(
    users: usize,
    period: &str,
    extra: &str,
) -> (TestBroker, Vec<String>, String) {
    let b = TestBroker::prepare("").await;
    let schema = unique("sts");
    let base = &unique("ms")[..14];
    let names: Vec<String> = ["a", "b"][..users]
        .iter()
        .map(|s| format!("{base}_{s}"))
        .collect();
    let mut root = maria_root().await;
    root.query_drop(format!(
        "CREATE DATABASE `{schema}`; CREATE TABLE `{schema}`.orders (id INT PRIMARY KEY)"
    ))
    .await
    .unwrap();
    for u in &names {
        root.query_drop(format!(
            "CREATE USER '{u}'@'%' ACCOUNT LOCK; GRANT SELECT ON `{schema}`.* TO '{u}'@'%'"
        ))
        .await
        .unwrap();
    }
    let section = b.maria_section("maria", &schema);
    b.edit_config(|t| t + &section);
    configure(&b, "maria", &names, period, extra);
    (b, names, schema)
}

/// `maria_static`, started in process.
async fn maria_started(
    users: usize,
    period: &str,
    extra: &str,
) -> (TestBroker, Vec<String>, String) {
    let (mut b, names, schema) = maria_static(users, period, extra).await;
    b.start_in_process().await;
    (b, names, schema)
}

async fn maria_login(
    schema: &str,
    user: &str,
    password: &str,
) -> Result<mysql_async::Conn, String> {
    mysql_async::Conn::new(maria_opts(Some((user, password)), Some(schema)))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn static_mariadb_alternating_users_through_rotations_via_the_sidecar() {
    let (mut b, users, schema) = maria_started(2, "2s", "").await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::started(&b, dir.path()).await;
    let (first_user, first_password) = sidecar.credential().unwrap();
    let mut held = maria_login(&schema, &first_user, &first_password)
        .await
        .unwrap();
    let s2 = schema.clone();
    let my_login = move |u: String, p: String| {
        let schema = s2.clone();
        async move {
            let c = maria_login(&schema, &u, &p).await?;
            let _ = c.disconnect().await;
            Ok(())
        }
    };
    let (rotated, o) = watch(
        &sidecar,
        my_login,
        4,
        Duration::from_secs(16),
        "static MariaDB",
    )
    .await;
    assert!(rotated, "fewer than 3 rotations: {:?}", o.switches);
    assert!(o.failures.is_empty(), "refused logins: {:?}", o.failures);
    for (i, (_, u)) in o.switches.iter().enumerate() {
        assert_eq!(u, &users[i % 2]);
    }
    drop(o);
    assert!(maria_login(&schema, &first_user, &first_password)
        .await
        .is_err());
    assert!(
        held.query_drop("SELECT 1").await.is_err(),
        "the first user's session outlived its overlap"
    );
    b.stop().await;
}

#[tokio::test]
async fn static_mariadb_failsafe_and_policy_without_the_broker() {
    let (mut b, users, schema) = maria_started(2, "2s", "overlap = \"1s\"").await;
    let e = read(&b, "other").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let (first, second) = two_generations(&b).await;
    assert_eq!(second.username, users[1]);
    maria_login(&schema, &second.username, &second.password)
        .await
        .unwrap();
    let held = maria_login(&schema, &second.username, &second.password)
        .await
        .unwrap();
    b.stop().await;
    // The failsafe events fire at valid_until (≤ 3 s after the rotation),
    // on the server's own clock, with the broker gone.
    let gone = eventually(Duration::from_secs(8), || async {
        maria_login(&schema, &first.username, &first.password)
            .await
            .is_err()
            && maria_login(&schema, &second.username, &second.password)
                .await
                .is_err()
    })
    .await;
    assert!(gone, "a static user still logs in with the broker gone");
    let mut held = held;
    assert!(
        held.query_drop("SELECT 1").await.is_err(),
        "the failsafe kills sessions"
    );
}

#[tokio::test]
async fn static_mariadb_single_user_mode() {
    let (mut b, users, schema) = maria_started(1, "2s", "").await;
    let (first, second) = two_generations(&b).await;
    assert_eq!(second.username, users[0]);
    maria_login(&schema, &second.username, &second.password)
        .await
        .unwrap();
    assert!(maria_login(&schema, &first.username, &first.password)
        .await
        .is_err());
    b.stop().await;
}

/// `create = true` on MariaDB: both users made (locked until their first
/// rotation) with the grants and the owner as their default role.
#[tokio::test]
async fn static_mariadb_created_users_have_the_owner_as_default_role() {
    let b = TestBroker::prepare("").await;
    let schema = unique("stc");
    let base = &unique("mc")[..14];
    let owner = format!("{base}_own");
    let mut root = maria_root().await;
    root.query_drop(format!(
        "CREATE DATABASE `{schema}`; CREATE TABLE `{schema}`.orders (id INT PRIMARY KEY); \
         CREATE TABLE `{schema}`.payroll (id INT); CREATE ROLE `{owner}`; \
         GRANT SELECT ON `{schema}`.payroll TO `{owner}`"
    ))
    .await
    .unwrap();
    let section = b.maria_section("maria", &schema);
    b.edit_config(|t| t + &section);
    let users = vec![format!("{base}_a"), format!("{base}_b")];
    configure(
        &b,
        "maria",
        &users,
        "1h",
        &format!(
            "create = true\nowner = \"{owner}\"\ngrants = [\"GRANT SELECT ON `{schema}`.orders TO {{{{name}}}}\"]"
        ),
    );
    let mut b = b;
    b.start_in_process().await;
    let c = read(&b, "app").await.unwrap();
    assert_eq!(c.username, users[0]);
    let mut conn = maria_login(&schema, &c.username, &c.password)
        .await
        .unwrap();
    conn.query_drop("SELECT * FROM orders").await.unwrap();
    conn.query_drop("SELECT * FROM payroll")
        .await
        .expect("the owner's privileges by default");
    let role: Option<String> = conn.query_first("SELECT CURRENT_ROLE()").await.unwrap();
    assert_eq!(role.as_deref(), Some(owner.as_str()));
    let other: Option<u64> = root
        .exec_first(
            "SELECT COUNT(*) FROM mysql.user WHERE User = ?",
            (users[1].as_str(),),
        )
        .await
        .unwrap();
    assert_eq!(other, Some(1), "the second user is made too");
    b.stop().await;
}
