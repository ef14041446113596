//! Just-in-time access for people (issue 31), end to end: an in-process
//! broker with real mTLS (a certificate per person from the dev CA), a
//! real throwaway PostgreSQL, the real CLI where a person would use it.
//! Request → two approvals of a 2-of-3 policy → a lease under the grant →
//! a session as that credential → the grant revoked → the session ended
//! and a new login refused; a grant ending at its time (break-glass);
//! every refusal audited and changing nothing; locks winning each step.

use std::time::Duration;

use credbroker::audit::{Outcome, Record};
use credbroker::pb;
use credbroker_testkit::pki::ClientSpec;
use tonic::transport::Channel;

use crate::support::*;

const ALICE: &str = "spiffe://credbroker.dev/user/alice";
const DBA1: &str = "spiffe://credbroker.dev/user/dba-1";
const DBA2: &str = "spiffe://credbroker.dev/user/dba-2";

/// The 2-of-3 policy the tests share (three `dba-*` certificates exist),
/// and a quick one whose requests expire in two seconds.
const POLICIES_TEMPLATE: &str = r#"
[access.orders-incident]
roles = ["ro"]
requesters = ["spiffe://credbroker.dev/user/*"]
approvers = ["spiffe://credbroker.dev/user/dba-*"]
approvals = 2
max_duration = "4h"
reason = "required"
pending_for = "30m"
break_glass = ["spiffe://credbroker.dev/user/oncall-*"]
notify = "{hook}"

[access.quick]
roles = ["ro"]
requesters = ["spiffe://credbroker.dev/user/alice"]
approvers = ["spiffe://credbroker.dev/user/dba-*"]
approvals = 1
max_duration = "1h"
pending_for = "2s"
"#;

/// The policies, the 2-of-3 one notifying `hook`.
fn policies(hook: &Hook) -> String {
    POLICIES_TEMPLATE.replace("{hook}", &hook.url)
}

/// A team's chat as the broker meets it: a local HTTP receiver that keeps
/// every JSON body posted to it, in order. Its URL carries a secret in
/// the path, as chat webhooks do (the broker must never log it).
#[derive(Clone)]
struct Hook {
    url: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

async fn hook() -> Hook {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/hooks/{token}",
        axum::routing::post(move |body: String| {
            let kept = kept.clone();
            async move {
                let v = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
                kept.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Hook {
        url: format!("http://127.0.0.1:{port}/hooks/s3cr3t-hook-token"),
        bodies,
    }
}

impl Hook {
    fn events(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// A broker with roles `ro` (for APP, and people through grants) and
/// `rw` (no policy grants it), the policies, and people's certificates.
async fn start() -> TestBroker {
    start_with_hook().await.0
}

async fn start_with_hook() -> (TestBroker, Hook) {
    let hook = hook().await;
    let policies = policies(&hook);
    let roles = role("ro", "{db}", "5m", "1h", APP) + &role("rw", "{db}", "5m", "1h", APP);
    let mut b = TestBroker::prepare(&roles).await;
    b.edit_config(|t| format!("{t}\n{policies}"));
    for who in ["alice", "dba-1", "dba-2", "dba-3", "oncall-1"] {
        write_client(
            &b,
            who,
            &ClientSpec::spiffe(&format!("spiffe://credbroker.dev/user/{who}")),
        );
    }
    b.start_in_process().await;
    (b, hook)
}

fn acc(b: &TestBroker, who: &str) -> pb::access_client::AccessClient<Channel> {
    b.env.client(&b.addr, who).access().unwrap()
}

async fn request(
    b: &TestBroker,
    who: &str,
    reason: &str,
    secs: i64,
    policy: &str,
) -> Result<pb::AccessRequestInfo, tonic::Status> {
    acc(b, who)
        .request(pb::AccessRequestRequest {
            roles: vec!["ro".into()],
            reason: reason.into(),
            duration_seconds: secs,
            policy: policy.into(),
            break_glass: false,
        })
        .await
        .map(|r| r.into_inner())
}

async fn approve(
    b: &TestBroker,
    who: &str,
    id: &str,
) -> Result<pb::AccessRequestInfo, tonic::Status> {
    acc(b, who)
        .approve(pb::AccessRequestId {
            request_id: id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get(b: &TestBroker, id: &str) -> pb::AccessRequestInfo {
    acc(b, "admin")
        .get(pb::AccessRequestId {
            request_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn records_of(b: &TestBroker, id: &str) -> Vec<Record> {
    b.audit_records()
        .into_iter()
        .filter(|r| r.request_id.as_deref() == Some(id))
        .collect()
}

fn stdout(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

async fn lock(b: &TestBroker, target: pb::lock_request::Target) -> String {
    admin_lock(b, target, "INC-31 access test").await.lock_id
}

async fn unlock(b: &TestBroker, lock_id: String) {
    b.admin("admin")
        .await
        .unlock(pb::UnlockRequest { lock_id })
        .await
        .unwrap();
}

/// The whole flow as people run it, through the CLI: request, two
/// approvals (the requester's own refused), a lease under the grant, a
/// session as that credential; `access revoke` then ends the session
/// and the user, and every step is audited under the request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_request_two_approvals_lease_then_revoke_ends_sessions() {
    let (b, hook) = start_with_hook().await;
    // No grant yet: a person is not a service.
    let e = issue(&b, "alice", "ro", 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    let out = stdout(
        &cli(
            &b,
            "alice",
            &[
                "access",
                "request",
                "--role",
                "ro",
                "--reason",
                "INC-4711: orders stuck",
                "--for",
                "30m",
                "--format",
                "json",
            ],
        )
        .await,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["request_id"].as_str().unwrap().to_string();
    assert_eq!(v["state"], "pending", "{out}");
    assert_eq!(v["approvals_needed"], 2);
    // What people see (printed for `--nocapture`: the flow as it reads).
    let shown = stdout(&cli(&b, "alice", &["access", "show", &id]).await);
    assert!(
        shown.contains("waiting") && shown.contains("0/2"),
        "{shown}"
    );
    println!("$ credbroker access show {id}   # alice, after `access request`\n{shown}");

    // What an approver sees.
    let listed = stdout(&cli(&b, "dba-1", &["access", "list", "--pending"]).await);
    assert!(
        listed.contains(&id) && listed.contains("INC-4711"),
        "{listed}"
    );
    println!("$ credbroker access list --pending   # dba-1\n{listed}");

    // The requester never approves its own.
    let own = approve(&b, "alice", &id).await.unwrap_err();
    assert_eq!(own.code(), tonic::Code::PermissionDenied, "{own:?}");
    let one = stdout(&cli(&b, "dba-1", &["access", "approve", &id]).await);
    assert!(one.contains("pending") && one.contains("1/2"), "{one}");
    println!("$ credbroker access approve {id}   # dba-1\n{one}");
    let again = approve(&b, "dba-1", &id).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    assert!(
        issue(&b, "alice", "ro", 0).await.is_err(),
        "one approval is not a grant"
    );
    let two = stdout(&cli(&b, "dba-2", &["access", "approve", &id]).await);
    assert!(
        two.contains("granted") && two.contains("lease issue --role ro"),
        "{two}"
    );
    println!("$ credbroker access approve {id}   # dba-2\n{two}");
    let granted = get(&b, &id).await;
    let until = ts(&granted.until);

    // The grant covers `ro` only; the lease never outlives the grant.
    let e = issue(&b, "alice", "rw", 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let lease = issue(&b, "alice", "ro", 3600).await.unwrap();
    assert!(
        ts(&lease.max_expires_at) <= until,
        "clamped to the grant's end"
    );
    assert!(ts(&lease.expires_at) <= until);
    let listing = b.admin_leases().await;
    let row = listing
        .iter()
        .find(|l| l.lease_id == lease.lease_id)
        .unwrap();
    assert_eq!(row.grant_id, id, "admin leases shows the grant");
    let table = stdout(&cli(&b, "admin", &["admin", "leases"]).await);
    assert!(table.contains(&format!("(grant {id})")), "{table}");
    println!("$ credbroker admin leases\n{table}");

    let session = login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap();
    session
        .simple_query("SELECT count(*) FROM orders")
        .await
        .unwrap();

    // A third approver ends it.
    let revoking = std::time::Instant::now();
    let ended = stdout(
        &cli(
            &b,
            "dba-3",
            &["access", "revoke", &id, "--reason", "incident over"],
        )
        .await,
    );
    assert!(
        ended.contains("ended") && ended.contains("incident over"),
        "{ended}"
    );
    println!("$ credbroker access revoke {id} --reason \"incident over\"   # dba-3\n{ended}");
    assert!(
        eventually(Duration::from_secs(20), || async {
            session.simple_query("SELECT 1").await.is_err()
        })
        .await,
        "the session as the granted credential was ended"
    );
    println!(
        "measured: `access revoke` to the session's end, as seen by its holder: {} ms",
        revoking.elapsed().as_millis()
    );
    let refused = login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap_err();
    assert!(!refused.is_empty());
    assert!(!b.role_exists(&lease.username).await, "the user is gone");
    let e = issue(&b, "alice", "ro", 0).await.unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::PermissionDenied,
        "no grant, no lease"
    );

    // Every step, linked by the request id, in the hash-chained log.
    let actions: Vec<String> = records_of(&b, &id)
        .iter()
        .filter(|r| r.outcome == Outcome::Ok)
        .map(|r| r.action.clone())
        .collect();
    for want in [
        "access_request",
        "access_approve",
        "access_grant",
        "issue",
        "access_revoke",
        "grant_revoke",
        "access_grant_end",
    ] {
        assert!(actions.iter().any(|a| a == want), "{want} in {actions:?}");
    }
    assert_eq!(actions.iter().filter(|a| *a == "access_approve").count(), 2);
    let denied: Vec<Record> = records_of(&b, &id)
        .into_iter()
        .filter(|r| r.outcome == Outcome::Denied)
        .collect();
    assert!(
        denied
            .iter()
            .any(|r| r.identity == ALICE && r.action == "access_approve"),
        "the self-approval is audited: {denied:?}"
    );
    assert!(denied
        .iter()
        .all(|r| r.via.as_deref() == Some("grpc_access")));
    let verdict = credbroker::audit::verify_files(std::slice::from_ref(&b.env.audit_path)).unwrap();
    assert!(
        matches!(verdict, credbroker::audit::Verdict::Intact { .. }),
        "{verdict:?}"
    );

    // The policy's webhook heard each step, in order, as JSON, with no
    // password in it (what logs show of its URL: access::notify's tests).
    assert!(
        eventually(Duration::from_secs(20), || async {
            hook.events()
                .iter()
                .any(|e| e["event"] == "access.grant_ended")
        })
        .await,
        "the grant's end reached the webhook: {:?}",
        hook.events()
    );
    let events = hook.events();
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e["request_id"] == id.as_str())
        .map(|e| e["event"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        [
            "access.requested",
            "access.approved",
            "access.approved",
            "access.grant_ended"
        ],
        "{events:?}"
    );
    let approved = events
        .iter()
        .find(|e| e["event"] == "access.approved")
        .unwrap();
    assert_eq!(approved["requester"], ALICE);
    assert_eq!(approved["actor"], DBA1);
    let text = serde_json::to_string(&events).unwrap();
    assert!(
        !text.contains(lease.password.as_str()),
        "no password in a notification"
    );
}

/// Break-glass grants at once (marked in the audit), and a grant ends at
/// its time by itself: the session under it is ended and the login
/// refused, with no one revoking anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_grants_at_once_and_the_grant_ends_at_its_time() {
    let (b, hook) = start_with_hook().await;
    let bg = |who: &str| {
        let mut c = acc(&b, who);
        async move {
            c.request(pb::AccessRequestRequest {
                roles: vec!["ro".into()],
                reason: "INC-5000: orders down, no DBA awake".into(),
                duration_seconds: 12,
                break_glass: true,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        }
    };
    let e = bg("alice").await.unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::PermissionDenied,
        "alice is no break-glass identity"
    );
    let g = bg("oncall-1").await.unwrap();
    assert_eq!(g.state, "granted");
    assert!(g.break_glass);
    let lease = issue(&b, "oncall-1", "ro", 0).await.unwrap();
    assert!(ts(&lease.max_expires_at) <= ts(&g.until));
    let session = login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap();
    session.simple_query("SELECT 1").await.unwrap();

    assert!(
        eventually(Duration::from_secs(60), || async {
            get(&b, &g.request_id).await.state == "ended"
        })
        .await,
        "the grant ended at its time"
    );
    let ended = get(&b, &g.request_id).await;
    println!(
        "measured: grant ended {} ms after its time",
        (ts(&ended.ended_at) - ts(&g.until)).num_milliseconds()
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            session.simple_query("SELECT 1").await.is_err()
        })
        .await,
        "its session was ended"
    );
    assert!(login(&b.db, &lease.username, &lease.password)
        .await
        .is_err());
    // The grant's end is audited after its leases are revoked (their
    // sessions ended first): wait for the record, do not race it.
    assert!(
        eventually(Duration::from_secs(20), || async {
            records_of(&b, &g.request_id)
                .iter()
                .any(|r| r.action == "access_grant_end" && r.identity == "credbroker:system")
        })
        .await,
        "the grant's end was audited by the system"
    );
    let recs = records_of(&b, &g.request_id);
    let glass = recs
        .iter()
        .find(|r| r.action == "access_break_glass")
        .expect("break-glass audited");
    assert!(glass
        .detail
        .as_deref()
        .unwrap_or("")
        .contains("break_glass"));
    assert!(recs.iter().any(|r| r.action == "access_grant"));
    assert!(recs
        .iter()
        .any(|r| r.action == "access_grant_end" && r.identity == "credbroker:system"));
    let e = issue(&b, "oncall-1", "ro", 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // The team heard of it: break-glass always notifies, then the end.
    assert!(
        eventually(Duration::from_secs(20), || async {
            hook.events().iter().any(|e| {
                e["request_id"] == g.request_id.as_str() && e["event"] == "access.grant_ended"
            })
        })
        .await,
        "{:?}",
        hook.events()
    );
    let kinds: Vec<String> = hook
        .events()
        .iter()
        .filter(|e| e["request_id"] == g.request_id.as_str())
        .map(|e| e["event"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(kinds, ["access.break_glass", "access.grant_ended"]);
    let glass = hook
        .events()
        .into_iter()
        .find(|e| e["event"] == "access.break_glass")
        .unwrap();
    assert_eq!(glass["break_glass"], true);
    assert_eq!(glass["requester"], "spiffe://credbroker.dev/user/oncall-1");
}

/// Each bad input: a clear refusal, audited, nothing stored or changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_audited_and_changes_nothing() {
    let b = start().await;
    // Served once: the broker's own start record is written by then, so
    // the counts below see only the refusals.
    acc(&b, "admin")
        .list(pb::ListAccessRequest::default())
        .await
        .unwrap();
    let long = "x".repeat(501);
    let cases: Vec<(&str, &str, i64, &str, tonic::Code, &str)> = vec![
        (
            "alice",
            "",
            1800,
            "",
            tonic::Code::InvalidArgument,
            "a reason is required",
        ),
        (
            "alice",
            &long,
            1800,
            "",
            tonic::Code::InvalidArgument,
            "at most 500",
        ),
        (
            "alice",
            "INC-1",
            5 * 3600,
            "",
            tonic::Code::InvalidArgument,
            "longer than access policy",
        ),
        (
            "app",
            "INC-1",
            1800,
            "",
            tonic::Code::PermissionDenied,
            "may not request",
        ),
        (
            "alice",
            "INC-1",
            1800,
            "nope",
            tonic::Code::NotFound,
            "no access policy",
        ),
    ];
    for (who, reason, secs, policy, code, text) in cases {
        let before = b.audit_records().len();
        let e = request(&b, who, reason, secs, policy).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(text), "{} lacks {text:?}", e.message());
        let recs = b.audit_records();
        assert_eq!(recs.len(), before + 1, "one record for the refusal");
        let last = recs.last().unwrap();
        assert_eq!(last.action, "access_request");
        assert_ne!(last.outcome, Outcome::Ok);
    }
    // A role no policy grants.
    let e = acc(&b, "alice")
        .request(pb::AccessRequestRequest {
            roles: vec!["rw".into()],
            reason: "INC-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("no access policy grants"), "{e:?}");
    let all = acc(&b, "admin")
        .list(pb::ListAccessRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert!(all.is_empty(), "nothing stored: {all:?}");

    // Approvals by someone not listed; a denial, then no approval.
    let r = request(&b, "alice", "INC-2", 1800, "").await.unwrap();
    let e = approve(&b, "app", &r.request_id).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("not an approver"), "{e:?}");
    let e = approve(&b, "dba-1", "ar_nonsense").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let denied = stdout(
        &cli(
            &b,
            "dba-1",
            &[
                "access",
                "deny",
                &r.request_id,
                "--reason",
                "use the replica",
            ],
        )
        .await,
    );
    assert!(
        denied.contains("denied by") && denied.contains("use the replica"),
        "{denied}"
    );
    let e = approve(&b, "dba-2", &r.request_id).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("denied, not pending"), "{e:?}");
    assert_eq!(get(&b, &r.request_id).await.approvals.len(), 0, "unchanged");
    assert!(issue(&b, "alice", "ro", 0).await.is_err());

    // An undecided request expires; approving it then is refused.
    let q = request(&b, "alice", "INC-7", 1800, "quick").await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            get(&b, &q.request_id).await.state == "expired"
        })
        .await,
        "the undecided request expired"
    );
    let e = approve(&b, "dba-1", &q.request_id).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    // Stored as expired, then audited: wait for the record.
    assert!(
        eventually(Duration::from_secs(20), || async {
            records_of(&b, &q.request_id)
                .iter()
                .any(|r| r.action == "access_expire" && r.outcome == Outcome::Ok)
        })
        .await,
        "the expiry was audited"
    );
    let recs = records_of(&b, &q.request_id);
    assert!(recs
        .iter()
        .any(|r| r.action == "access_approve" && r.outcome != Outcome::Ok));
    assert_eq!(get(&b, &q.request_id).await.state, "expired");
}

/// Locks win: a locked identity cannot request, approve or use a grant;
/// a lock on the role suspends the grant (unlocked, it works again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_refuse_each_step_and_suspend_grants() {
    let b = start().await;
    let alice_lock = lock(&b, pb::lock_request::Target::Identity(ALICE.into())).await;
    let e = request(&b, "alice", "INC-3", 1800, "").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    unlock(&b, alice_lock).await;

    let r = request(&b, "alice", "INC-3", 1800, "").await.unwrap();
    let dba_lock = lock(&b, pb::lock_request::Target::Identity(DBA1.into())).await;
    let e = approve(&b, "dba-1", &r.request_id).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    unlock(&b, dba_lock).await;
    approve(&b, "dba-2", &r.request_id).await.unwrap();
    approve(&b, "dba-3", &r.request_id).await.unwrap();
    assert_eq!(get(&b, &r.request_id).await.state, "granted");
    issue(&b, "alice", "ro", 60).await.unwrap();

    // A role lock suspends the grant; it is not ended.
    let role_lock = lock(&b, pb::lock_request::Target::Role("ro".into())).await;
    let e = issue(&b, "alice", "ro", 60).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    unlock(&b, role_lock).await;
    issue(&b, "alice", "ro", 60).await.unwrap();
    // A database lock likewise, and a lock on the person.
    let db_lock = lock(&b, pb::lock_request::Target::Database("main".into())).await;
    assert!(issue(&b, "alice", "ro", 60).await.is_err());
    unlock(&b, db_lock).await;
    let alice_lock = lock(&b, pb::lock_request::Target::Identity(ALICE.into())).await;
    assert!(issue(&b, "alice", "ro", 60).await.is_err());
    unlock(&b, alice_lock).await;
    assert_eq!(get(&b, &r.request_id).await.state, "granted");
    let _ = DBA2;
}

/// Two replicas on one PostgreSQL store: a request made on A is approved
/// on B, used on A, and revoked on B — which ends A's lease and its
/// session (the grant, like leases and locks, lives in the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_requests_and_grants_through_the_store() {
    let roles = role("ro", "{db}", "5m", "1h", APP);
    let mut a = TestBroker::prepare(&roles).await;
    crate::ha::use_pg_store(&a, cluster(), "5s").await;
    let policies = policies(&hook().await);
    a.edit_config(|t| format!("{t}\n{policies}"));
    for who in ["alice", "dba-1", "dba-2"] {
        write_client(
            &a,
            who,
            &ClientSpec::spiffe(&format!("spiffe://credbroker.dev/user/{who}")),
        );
    }
    let mut b = a.replica();
    a.start_in_process().await;
    b.start_in_process().await;
    wait_port(b.port).await;

    let r = request(&a, "alice", "INC-6: replicas", 1800, "")
        .await
        .unwrap();
    approve(&b, "dba-1", &r.request_id).await.unwrap();
    let g = approve(&b, "dba-2", &r.request_id).await.unwrap();
    assert_eq!(g.state, "granted");
    let lease = issue(&a, "alice", "ro", 600).await.unwrap();
    let session = login(&a.db, &lease.username, &lease.password)
        .await
        .unwrap();
    session.simple_query("SELECT 1").await.unwrap();
    acc(&b, "dba-1")
        .revoke(pb::RevokeAccessRequest {
            request_id: r.request_id.clone(),
            reason: "replica test".into(),
        })
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            session.simple_query("SELECT 1").await.is_err()
        })
        .await,
        "A's session ended by B's revoke"
    );
    assert!(login(&a.db, &lease.username, &lease.password)
        .await
        .is_err());
    let e = issue(&a, "alice", "ro", 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    b.stop().await;
    a.stop().await;
}

/// MariaDB too: a lease under a grant is a MySQL account whose sessions
/// end and whose login is refused when the grant is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_grant_revoke_ends_the_session_and_the_account() {
    use mysql_async::prelude::Queryable;
    let t = crate::mysql::local().await;
    let mut b =
        crate::mysql::MyBroker::prepare(&t, |s| crate::mysql::role("ro", s, "5m", "1h", None))
            .await;
    let policies = policies(&hook().await);
    b.edit_config(|c| format!("{c}\n{policies}"));
    for who in ["alice", "dba-1", "dba-2"] {
        write_client(
            &b,
            who,
            &ClientSpec::spiffe(&format!("spiffe://credbroker.dev/user/{who}")),
        );
    }
    b.start_in_process().await;
    let r = request(&b, "alice", "INC-8: MariaDB", 1800, "")
        .await
        .unwrap();
    approve(&b, "dba-1", &r.request_id).await.unwrap();
    approve(&b, "dba-2", &r.request_id).await.unwrap();
    let lease = issue(&b, "alice", "ro", 600).await.unwrap();
    assert_eq!(lease.kind, "mysql");
    let mut conn = crate::mysql::login(&t, &b.schema, &lease.username, &lease.password)
        .await
        .unwrap();
    conn.query_drop("SELECT 1").await.unwrap();
    acc(&b, "dba-1")
        .revoke(pb::RevokeAccessRequest {
            request_id: r.request_id.clone(),
            reason: "done".into(),
        })
        .await
        .unwrap();
    let mut cut = false;
    for _ in 0..200 {
        if conn.query_drop("SELECT 1").await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cut, "the session as the granted account was ended");
    assert!(
        crate::mysql::login(&t, &b.schema, &lease.username, &lease.password)
            .await
            .is_err(),
        "the account refuses logins"
    );
    b.drop_schema().await;
}
