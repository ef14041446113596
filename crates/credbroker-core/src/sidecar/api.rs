//! The three broker calls the sidecar makes, behind a trait: the loop in
//! `mod.rs` is tested against a fake broker on paused time (the fast tier),
//! and runs against the real one over mTLS gRPC ([`Connector`]).

use async_trait::async_trait;

use crate::pb;

use super::connect::Connector;

#[async_trait]
pub trait LeaseApi: Send + Sync {
    /// Called before each round of calls (the real one reloads rotated
    /// client certificates here).
    fn refresh(&mut self) {}

    async fn issue(&self, req: pb::IssueLeaseRequest) -> Result<pb::Lease, tonic::Status>;

    async fn renew(&self, req: pb::RenewLeaseRequest) -> Result<pb::Lease, tonic::Status>;

    async fn revoke(&self, req: pb::RevokeLeaseRequest) -> Result<(), tonic::Status>;

    /// Opens the broker's stream of events about our leases. A broker (or
    /// fake) without it answers `Unimplemented`, and the sidecar keeps to
    /// its schedule alone.
    async fn watch(&self) -> Result<EventStream, tonic::Status> {
        Err(tonic::Status::unimplemented("no lease events"))
    }
}

/// Events about our leases, as they happen.
pub type EventStream = futures::stream::BoxStream<'static, Result<pb::LeaseEvent, tonic::Status>>;

#[async_trait]
impl LeaseApi for Connector {
    fn refresh(&mut self) {
        Connector::refresh(self)
    }

    async fn issue(&self, req: pb::IssueLeaseRequest) -> Result<pb::Lease, tonic::Status> {
        self.client().issue_lease(req).await.map(|r| r.into_inner())
    }

    async fn renew(&self, req: pb::RenewLeaseRequest) -> Result<pb::Lease, tonic::Status> {
        self.client().renew_lease(req).await.map(|r| r.into_inner())
    }

    async fn revoke(&self, req: pb::RevokeLeaseRequest) -> Result<(), tonic::Status> {
        self.client().revoke_lease(req).await.map(|_| ())
    }

    async fn watch(&self) -> Result<EventStream, tonic::Status> {
        use futures::StreamExt;
        let stream = self
            .client()
            .watch_leases(pb::WatchLeasesRequest::default())
            .await?
            .into_inner();
        Ok(stream.boxed())
    }
}

/// Why a broker call failed, as far as retrying goes.
pub(crate) enum CallError {
    /// Unreachable, timed out, overloaded: try again later.
    Transient(String),
    /// The broker said no (expired, not allowed, unknown role…).
    Refused(tonic::Code, String),
}

impl CallError {
    pub(crate) fn text(&self) -> &str {
        match self {
            CallError::Transient(m) | CallError::Refused(_, m) => m,
        }
    }
}

pub(crate) fn classify(s: tonic::Status) -> CallError {
    use tonic::Code::*;
    let text = crate::client::describe(&s);
    match s.code() {
        Unavailable | DeadlineExceeded | Unknown | Internal | ResourceExhausted | Aborted
        | Cancelled => CallError::Transient(text),
        code => CallError::Refused(code, text),
    }
}
