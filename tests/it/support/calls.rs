//! One broker call each, as the tests make them: issue, renew, look up,
//! read a static role; an admin's revoke, lock and listing.

use super::*;

/// An admin (`admin`) revokes one lease by id, at once.
pub async fn admin_revoke(b: &TestBroker, lease_id: &str) {
    let out = admin_revoke_by(b, Selector::LeaseId(lease_id.into()), false).await;
    assert_eq!(out.revoked, 1, "{out:?}");
}

/// An admin (`admin`) revokes what `selector` names, with `--force` or
/// without; the reply.
pub async fn admin_revoke_by(
    b: &TestBroker,
    selector: Selector,
    force: bool,
) -> pb::RevokeLeasesResponse {
    b.admin("admin")
        .await
        .revoke_leases(pb::RevokeLeasesRequest {
            selector: Some(selector),
            force,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Looks lease `lease_id` up as `who`.
pub async fn lookup(b: &TestBroker, who: &str, lease_id: &str) -> Result<pb::Lease, tonic::Status> {
    b.client(who)
        .await
        .lookup_lease(pb::LookupLeaseRequest {
            lease_id: lease_id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Renews lease `lease_id` for `ttl` seconds as its holder `who`.
pub async fn renew(
    b: &TestBroker,
    who: &str,
    lease_id: &str,
    ttl: i64,
) -> Result<pb::Lease, tonic::Status> {
    b.client(who)
        .await
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: lease_id.into(),
            ttl_seconds: ttl,
        })
        .await
        .map(|r| r.into_inner())
}

/// An admin (`admin`) locks `target` for `reason`; the lock placed.
pub async fn admin_lock(
    b: &TestBroker,
    target: pb::lock_request::Target,
    reason: &str,
) -> pb::LockInfo {
    admin_lock_with(
        b,
        pb::LockRequest {
            target: Some(target),
            reason: reason.into(),
            ..Default::default()
        },
    )
    .await
}

/// An admin (`admin`) places the lock `req` asks for; the lock placed.
pub async fn admin_lock_with(b: &TestBroker, req: pb::LockRequest) -> pb::LockInfo {
    b.admin("admin")
        .await
        .lock(req)
        .await
        .unwrap()
        .into_inner()
        .lock
        .expect("a placed lock")
}

pub async fn issue(
    b: &TestBroker,
    who: &str,
    role: &str,
    ttl: i64,
) -> Result<pb::Lease, tonic::Status> {
    b.client(who)
        .await
        .issue_lease(pb::IssueLeaseRequest {
            role: role.into(),
            ttl_seconds: ttl,
        })
        .await
        .map(|r| r.into_inner())
}

/// `n` issues of `role` (its default TTL) sent at once, in turn over
/// `clients`; their answers, in the order sent.
pub async fn issue_at_once(
    clients: &[pb::broker_client::BrokerClient<Channel>],
    role: &str,
    n: usize,
) -> Vec<Result<pb::Lease, tonic::Status>> {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let role = role.to_string();
            tokio::spawn(async move {
                c.issue_lease(pb::IssueLeaseRequest {
                    role,
                    ttl_seconds: 0,
                })
                .await
                .map(|r| r.into_inner())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    answers
}

/// Reads static role `static_role` as `who`.
pub async fn static_read(
    b: &TestBroker,
    who: &str,
    static_role: &str,
) -> Result<pb::StaticCredential, tonic::Status> {
    b.client(who)
        .await
        .get_static_credential(pb::GetStaticCredentialRequest {
            static_role: static_role.into(),
        })
        .await
        .map(|r| r.into_inner())
}

pub fn ts(t: &Option<prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    let t = t.as_ref().unwrap();
    chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap()
}
