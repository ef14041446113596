//! One broker call each, as the tests make them: issue; an admin's revoke.

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

pub fn ts(t: &Option<prost_types::Timestamp>) -> chrono::DateTime<chrono::Utc> {
    let t = t.as_ref().unwrap();
    chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap()
}
