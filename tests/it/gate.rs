//! One gate for every request (invariant 9): every control refuses on every
//! door, and each refusal is one audit record naming the door. The matrix
//! is generated from the library's own lists (`gate::Door::ALL`,
//! `gate::Control::ALL`); `attempt` matches every (control, door) pair with
//! no wildcard, so a door or a control added without its cell does not
//! compile. Each cell runs against a real broker (in-process, real mTLS on
//! every listener, a real PostgreSQL) and proves three things: the
//! request is refused with that door's code, exactly one new audit record
//! says so (`denied`, `via` = the door), and nothing was created in the
//! database.

use std::collections::BTreeSet;
use std::time::Duration;

use credbroker::audit::{Outcome, Record};
use credbroker::gate::{Control, Door};
use credbroker::pb;
use credbroker_testkit::pki::ClientSpec;

use crate::support::{
    admin_lock, admin_lock_with, demo_role, https, issue, role, static_read, tls_connect,
    write_client, write_two_id_client, TestBroker, APP,
};

const ADMIN2: &str = "spiffe://credbroker.dev/dba/second";

/// What a door answered: its own code (gRPC code name or HTTP status).
#[derive(Debug)]
struct Answer {
    code: String,
    text: String,
}

impl Answer {
    /// An HTTP door's answer (see `https`): its status, or "none".
    fn http((code, text): (u16, String)) -> Answer {
        Answer {
            code: match code {
                0 => "none".into(),
                c => c.to_string(),
            },
            text,
        }
    }

    fn grpc<T>(r: Result<T, tonic::Status>) -> Answer {
        match r {
            Ok(_) => Answer {
                code: "OK".into(),
                text: String::new(),
            },
            Err(s) => Answer {
                code: format!("{:?}", s.code()),
                text: s.message().to_string(),
            },
        }
    }
}

/// A broker with every door open: gRPC, the Vault API and the console.
struct Doors {
    b: TestBroker,
    console: u16,
}

impl Doors {
    async fn start(roles: &str, head: &str) -> Doors {
        Self::start_with(roles, head, "").await
    }

    /// `head`: top-level keys; `server`: keys of `[server]`.
    async fn start_with(roles: &str, head: &str, server: &str) -> Doors {
        let mut b = TestBroker::prepare(roles).await;
        b.enable_vault_api("").await;
        let console = b.enable_console().await;
        if !head.is_empty() {
            b.edit_config(|t| format!("{head}\n{t}"));
        }
        if !server.is_empty() {
            b.server_keys(server);
        }
        // More identities than the dev set: a second admin (to be locked
        // by the first) and a certificate that yields no identity.
        write_client(&b, "admin2", &ClientSpec::spiffe(ADMIN2));
        write_two_id_client(&b, "two");
        b.start_in_process().await;
        Doors { b, console }
    }

    fn vault(&self) -> u16 {
        self.b.vault_port.unwrap()
    }

    async fn vault_login(&self, who: &str) -> Result<String, Answer> {
        let a = Answer::http(
            https(
                &self.b,
                self.vault(),
                who,
                "PUT",
                "/v1/auth/cert/login",
                &[],
                "{}",
            )
            .await,
        );
        if a.code != "200" {
            return Err(a);
        }
        let body = a.text.split_once("\r\n\r\n").unwrap().1;
        // A chunked body: the JSON object is the line that starts with `{`.
        let json = body.lines().find(|l| l.starts_with('{')).unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        Ok(v["auth"]["client_token"].as_str().unwrap().to_string())
    }

    async fn vault_call(
        &self,
        who: &str,
        token: &str,
        method: &str,
        path: &str,
        body: &str,
    ) -> Answer {
        Answer::http(
            https(
                &self.b,
                self.vault(),
                who,
                method,
                path,
                &[("X-Vault-Token", token)],
                body,
            )
            .await,
        )
    }

    async fn console_get(&self, who: &str) -> Answer {
        Answer::http(https(&self.b, self.console, who, "GET", "/", &[], "").await)
    }
}

/// What one cell expects: the door's code for a refusal, and the audit
/// record's identity and action.
struct Expect {
    /// The door's code; alternatives separated by `|`.
    code: &'static str,
    identity: String,
    action: &'static str,
    /// The record's `via` when it is not the door's own: a connection is
    /// refused by its listener, before any door is known.
    listener: Option<&'static str>,
}

fn refused(code: &'static str, identity: &str, action: &'static str) -> Expect {
    Expect {
        code,
        identity: identity.to_string(),
        action,
        listener: None,
    }
}

/// Each identity's share of a listener in the quota cells' broker.
const SHARE: usize = 3;

/// The control's setup, shared by its four doors.
async fn broker_for(control: Control) -> Doors {
    let roles = role("ro", "{db}", "5m", "10m", APP) + &role("open", "{db}", "5m", "10m", APP);
    // People's access to `ro` (the Access door): `app` may ask, any
    // admin approves.
    let roles = format!(
        "{roles}[access.people]\nroles = [\"ro\"]\nrequesters = [\"{APP}\"]\n\
         approvers = [\"spiffe://credbroker.dev/dba/*\"]\napprovals = 1\nmax_duration = \"1h\"\n\
         reason = \"optional\"\n\n"
    );
    match control {
        Control::Identity | Control::Lock | Control::Policy => Doors::start(&roles, "").await,
        Control::Network => {
            // Admin calls only from a network no test runs on; role `ro`
            // only from there too.
            let roles = roles.replacen(
                "[roles.ro]\n",
                "[roles.ro]\nallowed_networks = [\"10.99.99.0/24\"]\n",
                1,
            );
            Doors::start(&roles, "admin_networks = [\"10.99.99.0/24\"]").await
        }
        Control::Quota => {
            // One issue per identity and role, then a long wait; and a
            // small share of each listener per identity.
            let roles = roles.replace(
                "max_ttl = \"10m\"\n",
                "max_ttl = \"10m\"\nissue_rate = 0.001\nissue_burst = 1\n",
            );
            let share = format!("max_connections_per_identity = {SHARE}");
            Doors::start_with(&roles, "", &share).await
        }
    }
}

/// Runs the request of one cell, after whatever it needs first; returns
/// the door's answer and what the refusal must look like. Every pair is
/// listed: a new door or control does not compile until it has its cell.
async fn attempt(d: &Doors, control: Control, door: Door) -> (Answer, Expect) {
    let b = &d.b;
    match (control, door) {
        // A certificate with two SPIFFE IDs yields no identity; the record
        // names the peer address.
        (Control::Identity, Door::GrpcBroker) => (
            Answer::grpc(issue(b, "two", "ro", 0).await),
            refused("Unauthenticated", "unauthenticated:127.0.0.1", "issue"),
        ),
        (Control::Identity, Door::GrpcAdmin) => (
            Answer::grpc(
                b.admin("two")
                    .await
                    .list_leases(pb::ListLeasesRequest::default())
                    .await,
            ),
            refused("Unauthenticated", "unauthenticated:127.0.0.1", "admin_list"),
        ),
        (Control::Identity, Door::VaultApi) => (
            d.vault_login("two").await.expect_err("login refused"),
            refused("403", "unauthenticated:127.0.0.1", "vault_login"),
        ),
        (Control::Identity, Door::GrpcAccess) => (
            Answer::grpc(
                access(b, "two")
                    .list(pb::ListAccessRequest::default())
                    .await,
            ),
            refused(
                "Unauthenticated",
                "unauthenticated:127.0.0.1",
                "access_list",
            ),
        ),
        (Control::Identity, Door::Console) => (
            d.console_get("two").await,
            refused("403", "unauthenticated:127.0.0.1", "console_view"),
        ),

        // An admin acting on another identity's lease through the holders'
        // door is an admin call: `admin_networks` holds there too.
        (Control::Network, Door::GrpcBroker) => {
            let lease = issue(b, "app", "open", 0).await.unwrap();
            let r = b
                .client("admin")
                .await
                .revoke_lease(pb::RevokeLeaseRequest {
                    lease_id: lease.lease_id.clone(),
                    ..Default::default()
                })
                .await;
            (
                Answer::grpc(r),
                refused(
                    "PermissionDenied",
                    "spiffe://credbroker.dev/dba/oncall",
                    "revoke",
                ),
            )
        }
        (Control::Network, Door::GrpcAdmin) => (
            Answer::grpc(
                b.admin("admin")
                    .await
                    .list_leases(pb::ListLeasesRequest::default())
                    .await,
            ),
            refused(
                "PermissionDenied",
                "spiffe://credbroker.dev/dba/oncall",
                "admin_list",
            ),
        ),
        (Control::Network, Door::VaultApi) => {
            let lease = issue(b, "app", "open", 0).await.unwrap();
            let token = d.vault_login("admin").await.unwrap();
            let body = format!(
                "{{\"lease_id\":\"database/creds/open/{}\"}}",
                lease.lease_id
            );
            (
                d.vault_call("admin", &token, "PUT", "/v1/sys/leases/revoke", &body)
                    .await,
                refused("403", "spiffe://credbroker.dev/dba/oncall", "revoke"),
            )
        }
        // A person asks for a role from outside its `allowed_networks`:
        // a grant could not be used from there (no `admin_networks`:
        // people are not admins).
        (Control::Network, Door::GrpcAccess) => (
            Answer::grpc(access_request(b, "app", "ro").await),
            refused("PermissionDenied", APP, "access_request"),
        ),
        (Control::Network, Door::Console) => (
            d.console_get("admin").await,
            refused("403", "spiffe://credbroker.dev/dba/oncall", "console_view"),
        ),

        // Locks: the holder is locked out of leases and Vault tokens, a
        // locked admin out of admin calls and the console.
        (Control::Lock, Door::GrpcBroker) => {
            lock_identity(b, APP).await;
            (
                Answer::grpc(issue(b, "app", "ro", 0).await),
                refused("PermissionDenied", APP, "issue"),
            )
        }
        (Control::Lock, Door::GrpcAdmin) => {
            lock_identity(b, ADMIN2).await;
            (
                Answer::grpc(
                    b.admin("admin2")
                        .await
                        .list_leases(pb::ListLeasesRequest::default())
                        .await,
                ),
                refused("PermissionDenied", ADMIN2, "admin_list"),
            )
        }
        (Control::Lock, Door::VaultApi) => {
            lock_identity(b, APP).await;
            (
                d.vault_login("app").await.expect_err("login refused"),
                refused("403", APP, "vault_login"),
            )
        }
        (Control::Lock, Door::GrpcAccess) => {
            lock_identity(b, APP).await;
            (
                Answer::grpc(access_request(b, "app", "ro").await),
                refused("PermissionDenied", APP, "access_request"),
            )
        }
        (Control::Lock, Door::Console) => {
            lock_identity(b, ADMIN2).await;
            (
                d.console_get("admin2").await,
                refused("403", ADMIN2, "console_view"),
            )
        }

        // Policy: `allowed` of the role, `admins`.
        (Control::Policy, Door::GrpcBroker) => (
            Answer::grpc(issue(b, "other", "ro", 0).await),
            refused(
                "PermissionDenied",
                "spiffe://credbroker.dev/ns/demo/other",
                "issue",
            ),
        ),
        (Control::Policy, Door::GrpcAdmin) => (
            Answer::grpc(
                b.admin("app")
                    .await
                    .list_leases(pb::ListLeasesRequest::default())
                    .await,
            ),
            refused("PermissionDenied", APP, "admin_list"),
        ),
        (Control::Policy, Door::VaultApi) => {
            let token = d.vault_login("other").await.unwrap();
            (
                d.vault_call("other", &token, "GET", "/v1/database/creds/ro", "")
                    .await,
                refused("403", "spiffe://credbroker.dev/ns/demo/other", "issue"),
            )
        }
        (Control::Policy, Door::GrpcAccess) => (
            Answer::grpc(access_request(b, "other", "ro").await),
            refused(
                "PermissionDenied",
                "spiffe://credbroker.dev/ns/demo/other",
                "access_request",
            ),
        ),
        (Control::Policy, Door::Console) => (
            d.console_get("app").await,
            refused("403", APP, "console_view"),
        ),

        // Quotas: the issue rate per identity and role.
        (Control::Quota, Door::GrpcBroker) => {
            issue(b, "app", "ro", 0).await.unwrap();
            (
                Answer::grpc(issue(b, "app", "ro", 0).await),
                refused("ResourceExhausted", APP, "issue"),
            )
        }
        (Control::Quota, Door::VaultApi) => {
            let token = d.vault_login("app").await.unwrap();
            let first = d
                .vault_call("app", &token, "GET", "/v1/database/creds/open", "")
                .await;
            assert_eq!(first.code, "200", "{}", first.text);
            (
                d.vault_call("app", &token, "GET", "/v1/database/creds/open", "")
                    .await,
                refused("429", APP, "issue"),
            )
        }
        // An admin's share of a listener: the connections it holds are
        // served, one more is refused, by the listener (so the record's
        // `via` is the listener's: the gRPC one serves two doors).
        (Control::Quota, Door::GrpcAdmin) => {
            let mut held = Vec::new();
            for _ in 0..SHARE {
                let mut c = b.admin("admin2").await;
                c.list_leases(pb::ListLeasesRequest::default())
                    .await
                    .unwrap();
                held.push(c);
            }
            let r = b
                .admin("admin2")
                .await
                .list_leases(pb::ListLeasesRequest::default())
                .await;
            drop(held);
            // The connection closes right after its handshake; the client
            // reports it as one of these, depending on timing.
            let mut e = refused("Unavailable|Cancelled|Unknown", ADMIN2, "connection");
            e.listener = Some("grpc");
            (Answer::grpc(r), e)
        }
        // A person's share of the gRPC listener, as the admin's above;
        // another identity, since the listener's refusal log folds one
        // identity's refusals within 10 s into one later record.
        (Control::Quota, Door::GrpcAccess) => {
            let mut held = Vec::new();
            for _ in 0..SHARE {
                let mut c = access(b, "other");
                c.list(pb::ListAccessRequest::default()).await.unwrap();
                held.push(c);
            }
            let r = access(b, "other")
                .list(pb::ListAccessRequest::default())
                .await;
            drop(held);
            let mut e = refused(
                "Unavailable|Cancelled|Unknown",
                "spiffe://credbroker.dev/ns/demo/other",
                "connection",
            );
            e.listener = Some("grpc");
            (Answer::grpc(r), e)
        }
        (Control::Quota, Door::Console) => {
            let mut held = Vec::new();
            for _ in 0..SHARE {
                held.push(tls_connect(b, d.console, "admin2").await);
            }
            // The listener counts a connection once its handshake is over
            // on the server's side too.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let a = d.console_get("admin2").await;
            drop(held);
            (a, refused("503", ADMIN2, "connection"))
        }
    }
}

/// The `Access` service as `who`.
fn access(b: &TestBroker, who: &str) -> pb::access_client::AccessClient<tonic::transport::Channel> {
    b.env.client(&b.addr, who).access().unwrap()
}

async fn access_request(
    b: &TestBroker,
    who: &str,
    role: &str,
) -> Result<tonic::Response<pb::AccessRequestInfo>, tonic::Status> {
    access(b, who)
        .request(pb::AccessRequestRequest {
            roles: vec![role.into()],
            reason: "INC-31 gate matrix".into(),
            ..Default::default()
        })
        .await
}

async fn lock_identity(b: &TestBroker, pattern: &str) {
    let locks = b
        .admin("admin")
        .await
        .list_locks(pb::ListLocksRequest {})
        .await
        .unwrap()
        .into_inner()
        .locks;
    if locks.iter().any(|l| l.value == pattern) {
        return;
    }
    admin_lock(
        b,
        pb::lock_request::Target::Identity(pattern.into()),
        "INC-25 gate matrix",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_every_control_refuses_on_every_door_and_audits_it() {
    let mut failures = Vec::new();
    for control in Control::ALL {
        let d = broker_for(control).await;
        for door in Door::ALL {
            let cell = format!("{} × {}", control.as_str(), door.as_str());
            let roles_before: BTreeSet<String> = d.b.broker_roles().await;
            let records_before = d.b.audit_records().len();
            let (answer, expect) = attempt(&d, control, door).await;
            // Setup steps (an issue, a login, a lock) may write records
            // and users of their own; the refused request is the last.
            let records: Vec<Record> = d.b.audit_records();
            let last = records.last();
            let roles_after = d.b.broker_roles().await;
            if !expect.code.split('|').any(|c| c == answer.code) {
                failures.push(format!(
                    "{cell}: answered {} not {}: {}",
                    answer.code,
                    expect.code,
                    answer.text.lines().last().unwrap_or_default()
                ));
                continue;
            }
            let Some(r) = last.filter(|_| records.len() > records_before) else {
                failures.push(format!("{cell}: no audit record"));
                continue;
            };
            let ok = r.outcome == Outcome::Denied
                && r.identity == expect.identity
                && r.action == expect.action
                && r.via.as_deref() == Some(expect.listener.unwrap_or(door.as_str()));
            if !ok {
                failures.push(format!(
                    "{cell}: last record {} {} {:?} via {:?}, expected {} {} denied via {}",
                    r.identity,
                    r.action,
                    r.outcome,
                    r.via,
                    expect.identity,
                    expect.action,
                    expect.listener.unwrap_or(door.as_str())
                ));
            }
            // Exactly one record for the refusal: no other denied record
            // of this action was written by this cell.
            let denied = records[records_before..]
                .iter()
                .filter(|x| x.outcome == Outcome::Denied)
                .count();
            if denied != 1 {
                failures.push(format!("{cell}: {denied} denied records, not 1"));
            }
            // A refusal creates nothing: any new role belongs to the
            // cell's setup (an issue it made first), none to the refusal.
            let new: Vec<_> = roles_after.difference(&roles_before).collect();
            let setup_issues = records[records_before..]
                .iter()
                .filter(|x| x.action == "issue" && x.outcome == Outcome::Ok)
                .count();
            if new.len() != setup_issues {
                failures.push(format!(
                    "{cell}: {} new database roles, {} issued in setup",
                    new.len(),
                    setup_issues
                ));
            }
        }
        let mut b = d.b;
        b.stop().await;
    }
    assert!(
        failures.is_empty(),
        "cells failed:\n{}",
        failures.join("\n")
    );
}

/// Issue 25 item 2, from the holders' side too: the admin's revoke through
/// `Broker.RevokeLease` from outside `admin_networks` left the role in
/// place (the lease is still active and logs in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_an_admin_outside_admin_networks_cannot_use_the_holder_door() {
    let roles = role("open", "{db}", "5m", "10m", APP);
    let d = Doors::start(&roles, "admin_networks = [\"10.99.99.0/24\"]").await;
    let b = &d.b;
    let lease = issue(b, "app", "open", 0).await.unwrap();
    let mut admin = b.client("admin").await;
    let revoke = admin
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: lease.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(revoke.code(), tonic::Code::PermissionDenied, "{revoke:?}");
    assert!(revoke.message().contains("admin_networks"), "{revoke:?}");
    let renew = admin
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease.lease_id.clone(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(renew.code(), tonic::Code::PermissionDenied, "{renew:?}");
    let lookup = admin
        .lookup_lease(pb::LookupLeaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(lookup.code(), tonic::Code::PermissionDenied, "{lookup:?}");
    // The credential still works: nothing was revoked.
    assert!(b.role_exists(&lease.username).await);
    crate::support::login(&b.db, &lease.username, &lease.password)
        .await
        .unwrap();
    // The holder itself still can.
    b.client("app")
        .await
        .lookup_lease(pb::LookupLeaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap();
    let records = b.audit_records();
    for action in ["revoke", "renew", "lookup"] {
        assert!(
            records.iter().any(|r| r.action == action
                && r.identity == "spiffe://credbroker.dev/dba/oncall"
                && r.outcome == Outcome::Denied
                && r.via.as_deref() == Some("grpc_broker")),
            "no denied {action} audited"
        );
    }
    // Lookups are audited when allowed too (invariant 6).
    assert!(records
        .iter()
        .any(|r| r.action == "lookup" && r.identity == APP && r.outcome == Outcome::Ok));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut b = d.b;
    b.stop().await;
}

/// Issue 25 item 1: a lock locks static roles too. An identity lock and a
/// database lock refuse `GetStaticCredential` and `static-creds` (audited
/// as denied, on each door), a static role can be locked by name, and its
/// `--revoke` replaces the passwords already read, so the one the holder
/// kept stops logging in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_locks_cover_static_role_reads_on_grpc_and_the_vault_api() {
    let (mut b, _users) = crate::static_roles::pg_static(2, "1h", "").await;
    b.enable_vault_api("").await;
    b.start_in_process().await;
    let d = Doors { b, console: 0 };
    let b = &d.b;
    let read = || static_read(b, "app", "st");
    let dref = &d;
    let vault_read = move |token: String| async move {
        dref.vault_call("app", &token, "GET", "/v1/database/static-creds/st", "")
            .await
    };
    let held = read().await.unwrap();
    crate::support::login(&b.db, &held.username, &held.password)
        .await
        .unwrap();
    let token = d.vault_login("app").await.unwrap();
    assert_eq!(vault_read(token.clone()).await.code, "200");

    let lock = |target: pb::lock_request::Target, revoke: bool| async move {
        let req = pb::LockRequest {
            target: Some(target),
            reason: "INC-25".into(),
            revoke,
            ..Default::default()
        };
        admin_lock_with(b, req).await.lock_id
    };
    let unlock = |lock_id: String| async move {
        b.admin("admin")
            .await
            .unlock(pb::UnlockRequest { lock_id })
            .await
            .unwrap();
    };
    use pb::lock_request::Target as T;

    // The identity: both doors refuse, and the Vault API refuses a new token.
    let id = lock(T::Identity(APP.into()), false).await;
    let e = read().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("INC-25"), "{e:?}");
    assert_eq!(vault_read(token.clone()).await.code, "403");
    assert!(d.vault_login("app").await.is_err());
    unlock(id).await;
    assert_eq!(vault_read(token.clone()).await.code, "200");

    // The database.
    let id = lock(T::Database("main".into()), false).await;
    assert_eq!(
        read().await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    assert_eq!(vault_read(token.clone()).await.code, "403");
    unlock(id).await;

    // The static role by name, with --revoke: the password already read
    // stops working at once.
    let id = lock(T::StaticRole("st".into()), true).await;
    assert_eq!(
        read().await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    assert_eq!(vault_read(token.clone()).await.code, "403");
    assert!(
        crate::support::login(&b.db, &held.username, &held.password)
            .await
            .is_err(),
        "the static password read before the lock still logs in"
    );
    unlock(id).await;
    let fresh = read().await.unwrap();
    assert_ne!(fresh.password, held.password);
    crate::support::login(&b.db, &fresh.username, &fresh.password)
        .await
        .unwrap();

    // Each refusal is one denied record, naming its door.
    let records = b.audit_records();
    let denied = |via: &str| {
        records
            .iter()
            .filter(|r| {
                r.action == "static_read"
                    && r.outcome == Outcome::Denied
                    && r.via.as_deref() == Some(via)
            })
            .count()
    };
    assert_eq!(denied("grpc_broker"), 3, "gRPC static reads refused");
    assert_eq!(denied("vault_api"), 3, "Vault static reads refused");
    // A static role cannot be locked by a typo.
    let e = b
        .admin("admin")
        .await
        .lock(pb::LockRequest {
            target: Some(T::StaticRole("nope".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let mut b = d.b;
    b.stop().await;
}

/// Issues `n` leases of `role` as `app` at once while an admin locks `app`
/// with `--revoke` in the middle of them; returns how many issues
/// succeeded. Used on PostgreSQL here and on MariaDB in `mysql.rs`.
pub(crate) async fn race_issues_against_lock_revoke(b: &TestBroker, role: &str, n: usize) -> usize {
    let mut issues = Vec::new();
    for i in 0..n {
        let client = b.client("app").await;
        let role = role.to_string();
        issues.push(tokio::spawn(async move {
            // Spread the issues over the lock's whole run.
            tokio::time::sleep(Duration::from_millis((i % 10) as u64 * 3)).await;
            let mut c = client;
            c.issue_lease(pb::IssueLeaseRequest {
                role,
                ttl_seconds: 0,
            })
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let race = pb::LockRequest {
        target: Some(pb::lock_request::Target::Identity(APP.into())),
        reason: "INC-25 race".into(),
        revoke: true,
        ..Default::default()
    };
    admin_lock_with(b, race).await;
    let mut ok = 0;
    for t in issues {
        if t.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    ok
}

/// The broker's live leases' user names (pending, active, failing).
pub(crate) async fn live_usernames(b: &TestBroker) -> BTreeSet<String> {
    let live = pb::ListLeasesRequest {
        states: vec![
            pb::LeaseState::Pending as i32,
            pb::LeaseState::Active as i32,
            pb::LeaseState::Failing as i32,
        ],
        ..Default::default()
    };
    b.list_as("admin", live)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.username)
        .collect()
}

/// Issue 25 item 6 on real PostgreSQL: 50 issues racing `lock --revoke`.
/// Afterwards no broker-made role exists whose lease is not live — and
/// since the lock revoked every lease it found and refuses the rest, none
/// exists at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_fifty_issues_racing_lock_revoke_leave_no_role_behind_a_dead_lease() {
    let mut b = TestBroker::start(&role("ro", "{db}", "5m", "10m", APP)).await;
    let issued = race_issues_against_lock_revoke(&b, "ro", 50).await;
    let last = std::sync::Mutex::new((BTreeSet::new(), BTreeSet::new()));
    let (bref, lref) = (&b, &last);
    let settled = crate::support::eventually(Duration::from_secs(30), move || async move {
        let roles = bref.broker_roles().await;
        let live = live_usernames(bref).await;
        let ok = roles.is_subset(&live) && live.is_empty();
        *lref.lock().unwrap() = (roles, live);
        ok
    })
    .await;
    let last = last.into_inner().unwrap();
    assert!(
        settled,
        "{issued} of 50 issued; roles in the database {:?}, live leases {:?}",
        last.0, last.1
    );
    b.stop().await;
}

/// A lock covers watch streams: the locked identity's open stream gets
/// the lock's own event first, then ends with the lock's refusal, and a
/// new watch is refused (audited). Another identity's stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_an_identity_lock_ends_the_identitys_open_watch_streams() {
    let roles = demo_role("ro", "5m", "10m");
    let mut b = TestBroker::start(&roles).await;
    let held = issue(&b, "app", "ro", 0).await.unwrap();
    let mut mine = b
        .client("app")
        .await
        .watch_leases(pb::WatchLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut theirs = b
        .client("other")
        .await
        .watch_leases(pb::WatchLeasesRequest::default())
        .await
        .unwrap()
        .into_inner();
    lock_identity(&b, APP).await;
    let e = next_within_2s(&mut mine).await.unwrap().unwrap().unwrap();
    assert_eq!(
        (e.kind, e.lease_id.as_str()),
        (pb::LeaseEventKind::Locked as i32, held.lease_id.as_str()),
        "the lock's own event is delivered first: {e:?}"
    );
    let end = next_within_2s(&mut mine)
        .await
        .expect("the stream ended within 2 s");
    let err = end.expect_err("ended with the lock's refusal");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("INC-25 gate matrix"), "{err:?}");
    let again = b
        .client("app")
        .await
        .watch_leases(pb::WatchLeasesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");
    // The other identity's stream is untouched: it still hears its own.
    let other_lease = issue(&b, "other", "ro", 0).await.unwrap();
    b.client("other")
        .await
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: other_lease.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = next_within_2s(&mut theirs).await.unwrap().unwrap().unwrap();
    assert_eq!(e.lease_id, other_lease.lease_id);
    assert!(b.audit_records().iter().any(|r| r.action == "watch"
        && r.identity == APP
        && r.outcome == Outcome::Denied
        && r.via.as_deref() == Some("grpc_broker")));
    b.stop().await;
}

async fn next_within_2s(
    s: &mut tonic::Streaming<pb::LeaseEvent>,
) -> Result<Result<Option<pb::LeaseEvent>, tonic::Status>, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(2), s.message()).await
}
