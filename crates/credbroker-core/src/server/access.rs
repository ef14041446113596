//! gRPC `credbroker.v1.Access`: people's requests, approvals and grants.
//! Each call passes the gate first (`Door::GrpcAccess`): the identity
//! from the certificate; identity locks on what asks for or grants access
//! (request, approve, deny); reads and revokes never locked. Who may do
//! what under a policy is decided by `access`, which audits its refusals.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::grpc::{gate, peer_ip, reply, ts};
use crate::access::{Access, AccessRequest, NewRequest};
use crate::gate::{Door, Target, Use};
use crate::identity::Identity;
use crate::pb;

const DOOR: Door = Door::GrpcAccess;

/// Longest duration a request may name before any policy's limit.
const MAX_DURATION_SECS: i64 = 366 * 24 * 3600;

/// Most roles one request may name.
const MAX_ROLES: usize = 16;

pub struct AccessService {
    pub access: Arc<Access>,
}

impl AccessService {
    /// Every call's gate: this door, the caller's own request (`what` it
    /// does with it), the identity the certificate proves — or the
    /// refusal, audited by the gate.
    async fn admit<T>(
        &self,
        req: &Request<T>,
        action: &'static str,
        what: Use,
    ) -> Result<Identity, Status> {
        let pass = gate(self.access.broker(), DOOR, req, action, Target::Own(what)).await?;
        Ok(pass.identity)
    }
}

/// A request as the answer shows it, or the access module's refusal.
fn answer(r: crate::Result<AccessRequest>) -> Result<Response<pb::AccessRequestInfo>, Status> {
    reply(r, |out| info(&out))
}

pub fn info(r: &AccessRequest) -> pb::AccessRequestInfo {
    pb::AccessRequestInfo {
        request_id: r.id.clone(),
        policy: r.policy.clone(),
        roles: r.roles.clone(),
        requester: r.requester.clone(),
        reason: r.reason.clone(),
        duration_seconds: r.duration_secs as i64,
        state: r.state.as_str().to_string(),
        break_glass: r.break_glass,
        created_at: Some(ts(r.created_at)),
        pending_until: Some(ts(r.pending_until)),
        approvals: r
            .approvals
            .iter()
            .map(|a| pb::AccessApproval {
                identity: a.identity.clone(),
                at: Some(ts(a.at)),
            })
            .collect(),
        approvals_needed: r.approvals_needed,
        denied_by: r.denied_by.clone().unwrap_or_default(),
        deny_reason: r.deny_reason.clone().unwrap_or_default(),
        granted_at: r.granted_at.map(ts),
        until: r.until.map(ts),
        ended_at: r.ended_at.map(ts),
        ended_by: r.ended_by.clone().unwrap_or_default(),
        end_reason: r.end_reason.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl pb::access_server::Access for AccessService {
    async fn request(
        &self,
        req: Request<pb::AccessRequestRequest>,
    ) -> Result<Response<pb::AccessRequestInfo>, Status> {
        let peer = peer_ip(&req);
        let r = req.get_ref();
        let action = if r.break_glass {
            "access_break_glass"
        } else {
            "access_request"
        };
        let who = self.admit(&req, action, Use::Obtain).await?;
        if r.roles.len() > MAX_ROLES || r.roles.iter().any(|x| x.len() > 64) {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_ROLES} roles of at most 64 bytes each"
            )));
        }
        if r.duration_seconds < 0 || r.duration_seconds > MAX_DURATION_SECS {
            return Err(Status::invalid_argument("duration_seconds is out of range"));
        }
        let new = NewRequest {
            roles: r.roles.clone(),
            policy: (!r.policy.is_empty()).then(|| r.policy.clone()),
            reason: r.reason.clone(),
            duration: (r.duration_seconds > 0)
                .then(|| std::time::Duration::from_secs(r.duration_seconds as u64)),
            break_glass: r.break_glass,
        };
        answer(self.access.request(&who, peer, new).await)
    }

    async fn list(
        &self,
        req: Request<pb::ListAccessRequest>,
    ) -> Result<Response<pb::ListAccessResponse>, Status> {
        let who = self.admit(&req, "access_list", Use::Read).await?;
        reply(self.access.list(&who, req.get_ref().pending).await, |out| {
            pb::ListAccessResponse {
                requests: out.iter().map(info).collect(),
            }
        })
    }

    async fn get(
        &self,
        req: Request<pb::AccessRequestId>,
    ) -> Result<Response<pb::AccessRequestInfo>, Status> {
        let who = self.admit(&req, "access_get", Use::Read).await?;
        answer(self.access.get(&who, &req.get_ref().request_id).await)
    }

    async fn approve(
        &self,
        req: Request<pb::AccessRequestId>,
    ) -> Result<Response<pb::AccessRequestInfo>, Status> {
        let who = self.admit(&req, "access_approve", Use::Obtain).await?;
        answer(self.access.approve(&who, &req.get_ref().request_id).await)
    }

    async fn deny(
        &self,
        req: Request<pb::DenyAccessRequest>,
    ) -> Result<Response<pb::AccessRequestInfo>, Status> {
        let who = self.admit(&req, "access_deny", Use::Obtain).await?;
        let r = req.get_ref();
        answer(self.access.deny(&who, &r.request_id, &r.reason).await)
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeAccessRequest>,
    ) -> Result<Response<pb::AccessRequestInfo>, Status> {
        let who = self.admit(&req, "access_revoke", Use::GiveUp).await?;
        let r = req.get_ref();
        answer(self.access.revoke(&who, &r.request_id, &r.reason).await)
    }
}
