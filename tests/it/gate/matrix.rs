//! The door × control matrix: each control refuses on each door with that
//! door's code and one audit record, built from `Door::ALL` and
//! `Control::ALL`; and an admin outside `admin_networks` refused on the
//! holders' door too.

use super::*;

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
