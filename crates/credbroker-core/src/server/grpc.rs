//! The gRPC services: turn requests into broker calls and results into
//! replies. Caller identity comes only from the verified peer certificate.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use crate::broker::{Broker, Selector};
use crate::error::Error;
use crate::gate::{Ask, Door, Pass, Target, Use};
use crate::identity::{Identity, MAX_SPIFFE_ID_LEN};
use crate::lease::{Lease, LeaseId, LeaseState};
use crate::lock::{Lock, LockId, LockTarget};
use crate::pb;
use crate::policy::IdentityPattern;
use crate::server::status::{revoke_failures, to_status};
use crate::store::LeaseFilter;

/// Longest TTL a request may name, before any role's limit applies:
/// anything beyond is surely a mistake, and keeps arithmetic far from
/// overflow.
const MAX_REQUEST_TTL_SECS: i64 = 366 * 24 * 3600;

/// Asks the gate (`crate::gate`) about a request before its handler runs:
/// the identity from the verified leaf certificate, the TCP peer address,
/// what the request does and to what. A refusal has been audited there.
pub(super) async fn gate<T>(
    broker: &Broker,
    door: Door,
    req: &Request<T>,
    action: &'static str,
    target: Target<'_>,
) -> Result<Pass, Status> {
    let leaf = req.peer_certs().and_then(|certs| certs.first().cloned());
    let identity = match leaf {
        Some(leaf) => Identity::from_cert_der(leaf.as_ref()),
        None => Err(Error::Unauthenticated(
            "a client certificate is required".into(),
        )),
    };
    let ask = Ask {
        door,
        peer: peer_ip(req),
        identity: identity.as_ref(),
        action,
        target,
    };
    crate::gate::admit(broker, ask).await.map_err(to_status)
}

/// The broker's answer as the reply shows it (`shown`), or its refusal
/// as a status: the last step of every handler.
pub(super) fn reply<T, R>(
    result: crate::Result<T>,
    shown: impl FnOnce(T) -> R,
) -> Result<Response<R>, Status> {
    result
        .map(|out| Response::new(shown(out)))
        .map_err(to_status)
}

/// An identity an admin selects leases by: canonical text with its kind.
fn identity_selector(v: String) -> Result<Option<Identity>, Status> {
    if v.len() > MAX_SPIFFE_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "identity is longer than {MAX_SPIFFE_ID_LEN} bytes"
        )));
    }
    if v.is_empty() {
        return Ok(None);
    }
    Identity::parse(&v).map(Some).map_err(to_status)
}

/// The caller's TCP peer address (what `allowed_networks` is checked
/// against); tonic records it for our TLS streams.
pub(super) fn peer_ip<T>(req: &Request<T>) -> Option<std::net::IpAddr> {
    req.remote_addr().map(|a| a.ip())
}

pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn state_to_pb(s: LeaseState) -> pb::LeaseState {
    match s {
        LeaseState::Pending => pb::LeaseState::Pending,
        LeaseState::Active => pb::LeaseState::Active,
        LeaseState::Draining => pb::LeaseState::Draining,
        LeaseState::Failing => pb::LeaseState::Failing,
        LeaseState::Revoked => pb::LeaseState::Revoked,
    }
}

pub fn state_from_pb(s: pb::LeaseState) -> Option<LeaseState> {
    match s {
        pb::LeaseState::Unspecified => None,
        pb::LeaseState::Pending => Some(LeaseState::Pending),
        pb::LeaseState::Active => Some(LeaseState::Active),
        pb::LeaseState::Draining => Some(LeaseState::Draining),
        pb::LeaseState::Failing => Some(LeaseState::Failing),
        pb::LeaseState::Revoked => Some(LeaseState::Revoked),
    }
}

fn ttl(seconds: i64) -> Result<Option<Duration>, Status> {
    optional_seconds("ttl_seconds", seconds)
}

/// A request's optional duration field: 0 means unset.
fn optional_seconds(field: &str, seconds: i64) -> Result<Option<Duration>, Status> {
    match seconds {
        0 => Ok(None),
        s if s < 0 => Err(Status::invalid_argument(format!(
            "{field} must not be negative"
        ))),
        s if s > MAX_REQUEST_TTL_SECS => Err(Status::invalid_argument(format!(
            "{field} is absurdly large"
        ))),
        s => Ok(Some(Duration::from_secs(s as u64))),
    }
}

fn lease_id(s: &str) -> Result<LeaseId, Status> {
    if s.is_empty() {
        return Err(Status::invalid_argument("lease_id is required"));
    }
    LeaseId::parse(s).map_err(to_status)
}

fn lease_reply(broker: &Broker, lease: &Lease, dsn: String, password: String) -> pb::Lease {
    let endpoint = broker.endpoint(&lease.database);
    pb::Lease {
        lease_id: lease.id.to_string(),
        role: lease.role.clone(),
        database: lease.database.clone(),
        kind: lease.kind.as_str().to_string(),
        username: lease.username.to_string(),
        password,
        dsn,
        host: endpoint
            .as_ref()
            .map(|e| e.host.clone())
            .unwrap_or_default(),
        port: endpoint
            .as_ref()
            .map(|e| u32::from(e.port))
            .unwrap_or_default(),
        database_name: endpoint.map(|e| e.database).unwrap_or_default(),
        issued_at: Some(ts(lease.issued_at)),
        expires_at: Some(ts(lease.expires_at)),
        max_expires_at: Some(ts(lease.max_expires_at)),
        renewable: lease.renewable(Utc::now()),
        identity: lease.identity.clone(),
        state: state_to_pb(lease.state) as i32,
    }
}

pub struct BrokerService {
    pub broker: Arc<Broker>,
}

impl BrokerService {
    /// The caller's identity, once the gate admitted it through the
    /// holders' door to do `action` to `target`.
    async fn admit<T>(
        &self,
        req: &Request<T>,
        action: &'static str,
        target: Target<'_>,
    ) -> Result<Identity, Status> {
        let pass = gate(&self.broker, DOOR, req, action, target).await?;
        Ok(pass.identity)
    }

    /// A lease as renew and lookup answer it: its DSN, never a password.
    fn known_lease(&self, lease: &Lease) -> pb::Lease {
        let dsn = self.broker.dsn_of(lease);
        lease_reply(&self.broker, lease, dsn, String::new())
    }
}

fn note_to_pb(n: &crate::watch::Note) -> pb::LeaseEvent {
    match n {
        crate::watch::Note::Lease(e) => event_to_pb(e),
        crate::watch::Note::Lock(e) => pb::LeaseEvent {
            kind: if e.placed {
                pb::LeaseEventKind::LockPlaced
            } else {
                pb::LeaseEventKind::LockLifted
            } as i32,
            expires_at: e.lock.expires_at.map(ts),
            actor: e.actor.clone(),
            reason: e.lock.reason.clone(),
            lock_id: e.lock.id.to_string(),
            lock_target: e.lock.target.to_string(),
            at: Some(ts(e.at)),
            ..Default::default()
        },
    }
}

fn event_to_pb(e: &crate::watch::LeaseEvent) -> pb::LeaseEvent {
    use crate::watch::EventKind;
    pb::LeaseEvent {
        kind: match e.kind {
            EventKind::Renewed => pb::LeaseEventKind::Renewed,
            EventKind::Revoked => pb::LeaseEventKind::Revoked,
            EventKind::Locked => pb::LeaseEventKind::Locked,
        } as i32,
        lease_id: e.lease_id.to_string(),
        identity: e.identity.clone(),
        role: e.role.clone(),
        database: e.database.clone(),
        expires_at: e.expires_at.map(ts),
        actor: e.actor.clone(),
        reason: e.reason.clone(),
        lock_id: e.lock_id.clone().unwrap_or_default(),
        at: Some(ts(e.at)),
        lock_target: String::new(),
    }
}

pub type EventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::LeaseEvent, Status>> + Send>>;

/// The holders' door.
const DOOR: Door = Door::GrpcBroker;

/// Wraps a gRPC service so that every audit record its requests write —
/// the gate's, the broker's, the revocation engine's — names its door in
/// `via`, as the HTTP doors' records do.
#[derive(Clone)]
pub struct Via<S> {
    inner: S,
    door: Door,
}

impl<S> Via<S> {
    pub fn new(door: Door, inner: S) -> Self {
        Via { inner, door }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Via<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Via<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Box::pin(crate::audit::via(self.door.as_str(), self.inner.call(req)))
    }
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerService {
    type WatchLeasesStream = EventStream;

    async fn watch_leases(
        &self,
        req: Request<pb::WatchLeasesRequest>,
    ) -> Result<Response<EventStream>, Status> {
        use tokio::sync::broadcast::error::RecvError;
        let r = req.get_ref();
        let requested = crate::watch::Scope {
            identity: bounded("identity", r.identity.clone())?,
            role: bounded("role", r.role.clone())?,
            database: bounded("database", r.database.clone())?,
        };
        let others = r.all
            || requested.identity.is_some()
            || requested.role.is_some()
            || requested.database.is_some();
        let target = if others {
            Target::Admin
        } else {
            Target::Own(Use::Obtain)
        };
        let who = self.admit(&req, "watch", target).await?;
        let scope = self
            .broker
            .watch_scope(&who, requested, others)
            .map_err(to_status)?;
        let hub = self.broker.watch().clone();
        let sub = hub.subscribe(who.as_str()).map_err(to_status)?;
        // The gate read the locks before this stream existed; a lock on
        // this identity stored in between (on any replica) may have ended
        // this identity's streams before this one was counted. Read them
        // again now that it is: a lock committed before this read refuses
        // here, one committed after ends the stream when its event comes.
        let locks = self
            .broker
            .store()
            .active_locks()
            .await
            .map_err(to_status)?;
        if let Some(lock) =
            crate::lock::first_match_subject(&locks, &crate::lock::Subject::identity(&who))
        {
            return Err(to_status(self.broker.refuse(
                who.as_str(),
                "watch",
                lock.refusal(),
            )));
        }
        tracing::debug!(identity = %who, "lease watch opened");
        // The subscription (and its slot) lives as long as the stream.
        let stream = futures::stream::unfold(Some((sub, 0usize)), move |state| {
            let scope = scope.clone();
            async move {
                // `after_end`: events read since the stream was ended, so
                // a busy hub cannot keep an ended stream alive (what was
                // queued when it ended, at most the buffer, still goes out).
                let (mut sub, mut after_end) = state?;
                let end = |sub: &crate::watch::Subscription| {
                    // Shutdown ends the stream cleanly; a lock on the
                    // watcher ends it with the lock's refusal.
                    let refusal = sub.lock_refusal().map(Status::permission_denied);
                    refusal.map(|s| (Err(s), None))
                };
                loop {
                    if sub.ended.is_cancelled() {
                        after_end += 1;
                        if after_end > crate::watch::BUFFER {
                            return end(&sub);
                        }
                    }
                    let got = tokio::select! {
                        // Events already queued go out first.
                        biased;
                        got = sub.rx.recv() => got,
                        _ = sub.ended.cancelled() => return end(&sub),
                    };
                    match got {
                        Ok(e) if scope.matches_note(&e) => {
                            return Some((Ok(note_to_pb(&e)), Some((sub, after_end))))
                        }
                        Ok(_) => continue,
                        Err(RecvError::Lagged(n)) => {
                            let s = Status::resource_exhausted(format!(
                                "this watch fell {n} events behind; resubscribe"
                            ));
                            return Some((Err(s), None));
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_static_credential(
        &self,
        req: Request<pb::GetStaticCredentialRequest>,
    ) -> Result<Response<pb::StaticCredential>, Status> {
        let name = req.get_ref().static_role.clone();
        let target = Target::StaticRole(&name);
        let who = self.admit(&req, "static_read", target).await?;
        reply(self.broker.static_credential(&who, &name).await, |c| {
            pb::StaticCredential {
                static_role: c.static_role.clone(),
                database: c.database.clone(),
                kind: c.kind.as_str().to_string(),
                username: c.username.clone(),
                password: c.password.expose().to_string(),
                dsn: c.dsn.clone(),
                host: c.endpoint.host.clone(),
                port: u32::from(c.endpoint.port),
                database_name: c.endpoint.database.clone(),
                generation: c.generation,
                rotated_at: Some(ts(c.rotated_at)),
                next_rotation_at: Some(ts(c.next_rotation_at)),
                valid_until: Some(ts(c.valid_until)),
            }
        })
    }

    async fn issue_lease(
        &self,
        req: Request<pb::IssueLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let peer = peer_ip(&req);
        let r = req.get_ref();
        let ttl = ttl(r.ttl_seconds)?;
        let who = self.admit(&req, "issue", Target::Role(&r.role)).await?;
        reply(
            self.broker.issue_from(&who, peer, &r.role, ttl).await,
            |issued| {
                lease_reply(
                    &self.broker,
                    &issued.lease,
                    issued.dsn.clone(),
                    issued.password.expose().to_string(),
                )
            },
        )
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let peer = peer_ip(&req);
        let r = req.get_ref();
        let id = lease_id(&r.lease_id)?;
        let ttl = ttl(r.ttl_seconds)?;
        let target = Target::Lease(&id, Use::Obtain);
        let who = self.admit(&req, "renew", target).await?;
        reply(
            self.broker.renew_from(&who, peer, &id, ttl).await,
            |lease| self.known_lease(&lease),
        )
    }

    async fn revoke_lease(
        &self,
        req: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        let id = lease_id(&req.get_ref().lease_id)?;
        let handover = req.get_ref().handover;
        let target = Target::Lease(&id, Use::GiveUp);
        let who = self.admit(&req, "revoke", target).await?;
        let revoked = if handover {
            self.broker.revoke_handover(&who, &id).await
        } else {
            self.broker.revoke(&who, &id).await
        };
        reply(revoked, |lease| pb::RevokeLeaseResponse {
            lease_id: lease.id.to_string(),
            state: state_to_pb(lease.state) as i32,
        })
    }

    async fn lookup_lease(
        &self,
        req: Request<pb::LookupLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let id = lease_id(&req.get_ref().lease_id)?;
        let target = Target::Lease(&id, Use::Read);
        let pass = gate(&self.broker, DOOR, &req, "lookup", target).await?;
        let lease = pass
            .lease
            .ok_or_else(|| Status::not_found(format!("no lease {id}")))?;
        Ok(Response::new(self.known_lease(&lease)))
    }
}

pub struct AdminService {
    pub broker: Arc<Broker>,
}

impl AdminService {
    /// The caller's identity, once the gate admitted it as an admin.
    async fn admin<T>(&self, req: &Request<T>, action: &'static str) -> Result<Identity, Status> {
        let pass = gate(&self.broker, Door::GrpcAdmin, req, action, Target::Admin).await?;
        Ok(pass.identity)
    }
}

fn static_info(s: &crate::static_roles::StaticStatus) -> pb::StaticRoleInfo {
    pb::StaticRoleInfo {
        static_role: s.name.clone(),
        database: s.database.clone(),
        users: s.users.clone(),
        current_user: s.current_user.clone().unwrap_or_default(),
        generation: s.generation,
        rotated_at: s.rotated_at.map(ts),
        next_rotation_at: s.next_rotation_at.map(ts),
        valid_until: s.valid_until.map(ts),
        previous_user: s.previous_user.clone().unwrap_or_default(),
        previous_retire_at: s.previous_retire_at.map(ts),
        pending: s.pending,
        last_error: s.last_error.clone().unwrap_or_default(),
    }
}

/// Most rows one ListLeases returns when the caller sets no limit.
const DEFAULT_LIST_LIMIT: usize = 10_000;

fn summary(l: &Lease) -> pb::LeaseSummary {
    pb::LeaseSummary {
        lease_id: l.id.to_string(),
        identity: l.identity.clone(),
        role: l.role.clone(),
        database: l.database.clone(),
        username: l.username.to_string(),
        state: state_to_pb(l.state) as i32,
        issued_at: Some(ts(l.issued_at)),
        expires_at: Some(ts(l.expires_at)),
        max_expires_at: Some(ts(l.max_expires_at)),
        revoke_attempts: l.revoke_attempts,
        last_error: l.last_error.clone().unwrap_or_default(),
        grant_id: l.grant_id.clone().unwrap_or_default(),
    }
}

pub fn lock_info(l: &Lock) -> pb::LockInfo {
    pb::LockInfo {
        lock_id: l.id.to_string(),
        kind: l.target.kind().to_string(),
        value: l.target.value().to_string(),
        reason: l.reason.clone(),
        created_by: l.created_by.clone(),
        created_at: Some(ts(l.created_at)),
        expires_at: l.expires_at.map(ts),
    }
}

fn lock_target(t: Option<pb::lock_request::Target>) -> Result<LockTarget, Status> {
    use pb::lock_request::Target as T;
    let nonempty = |field: &str, v: String| {
        bounded(field, v)?.ok_or_else(|| Status::invalid_argument(format!("{field} is empty")))
    };
    Ok(match t {
        Some(T::Identity(v)) => {
            let v = nonempty("identity", v)?;
            LockTarget::Identity(IdentityPattern::new(&v).map_err(|e| to_status(e.invalid()))?)
        }
        Some(T::Role(v)) => LockTarget::Role(nonempty("role", v)?),
        Some(T::StaticRole(v)) => LockTarget::StaticRole(nonempty("static_role", v)?),
        Some(T::Database(v)) => LockTarget::Database(nonempty("database", v)?),
        None => {
            return Err(Status::invalid_argument(
                "name what to lock: identity, role, static_role or database",
            ))
        }
    })
}

fn bounded(field: &str, s: String) -> Result<Option<String>, Status> {
    if s.len() > 1024 {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than 1024 bytes"
        )));
    }
    Ok((!s.is_empty()).then_some(s))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let who = self.admin(&req, "admin_list").await?;
        let r = req.into_inner();
        let mut states = Vec::new();
        for s in &r.states {
            let s = pb::LeaseState::try_from(*s)
                .map_err(|_| Status::invalid_argument("unknown lease state"))?;
            states.extend(state_from_pb(s));
        }
        if r.expiring_within_seconds < 0 || r.expiring_within_seconds > MAX_REQUEST_TTL_SECS {
            return Err(Status::invalid_argument(
                "expiring_within_seconds out of range",
            ));
        }
        let filter = LeaseFilter {
            role: bounded("role", r.role)?,
            database: bounded("database", r.database)?,
            identity: identity_selector(r.identity)?.map(|i| i.as_str().to_string()),
            states,
            expiring_before: (r.expiring_within_seconds > 0)
                .then(|| Utc::now() + chrono::Duration::seconds(r.expiring_within_seconds)),
            limit: Some(if r.limit == 0 {
                DEFAULT_LIST_LIMIT
            } else {
                r.limit as usize
            }),
            ..Default::default()
        };
        reply(self.broker.admin_list(&who, &filter).await, |leases| {
            pb::ListLeasesResponse {
                leases: leases.iter().map(summary).collect(),
            }
        })
    }

    async fn revoke_leases(
        &self,
        req: Request<pb::RevokeLeasesRequest>,
    ) -> Result<Response<pb::RevokeLeasesResponse>, Status> {
        let who = self.admin(&req, "admin_revoke").await?;
        let r = req.into_inner();
        use pb::revoke_leases_request::Selector as S;
        let selector = match r.selector {
            Some(S::LeaseId(id)) => Selector::Lease(lease_id(&id)?),
            Some(S::Role(v)) => Selector::Role(
                bounded("role", v)?.ok_or_else(|| Status::invalid_argument("role is empty"))?,
            ),
            Some(S::Database(v)) => Selector::Database(
                bounded("database", v)?
                    .ok_or_else(|| Status::invalid_argument("database is empty"))?,
            ),
            Some(S::Identity(v)) => Selector::Identity(
                identity_selector(v)?
                    .ok_or_else(|| Status::invalid_argument("identity is empty"))?,
            ),
            Some(S::All(true)) => Selector::All,
            Some(S::All(false)) | None => {
                return Err(Status::invalid_argument(
                    "name what to revoke: lease_id, role, database, identity or all",
                ))
            }
        };
        let mode = if r.force {
            crate::broker::Mode::Forced
        } else {
            crate::broker::Mode::UntilDropped
        };
        reply(
            self.broker.admin_revoke(&who, &selector, mode).await,
            |out| pb::RevokeLeasesResponse {
                revoked: out.revoked.len() as u32,
                failures: revoke_failures(out.failed),
            },
        )
    }

    async fn lock(
        &self,
        req: Request<pb::LockRequest>,
    ) -> Result<Response<pb::LockResponse>, Status> {
        let who = self.admin(&req, "lock").await?;
        let r = req.into_inner();
        let target = lock_target(r.target)?;
        let duration = optional_seconds("duration_seconds", r.duration_seconds)?;
        let locked = self
            .broker
            .admin_lock(&who, target, duration, r.reason, r.revoke)
            .await;
        reply(locked, |(lock, revoked)| {
            let revoked = revoked.unwrap_or_default();
            pb::LockResponse {
                lock: Some(lock_info(&lock)),
                revoked: revoked.revoked.len() as u32,
                failures: revoke_failures(revoked.failed),
            }
        })
    }

    async fn unlock(
        &self,
        req: Request<pb::UnlockRequest>,
    ) -> Result<Response<pb::UnlockResponse>, Status> {
        let who = self.admin(&req, "unlock").await?;
        let r = req.into_inner();
        if r.lock_id.is_empty() {
            return Err(Status::invalid_argument("lock_id is required"));
        }
        let id = LockId::parse(&r.lock_id).map_err(to_status)?;
        reply(self.broker.admin_unlock(&who, &id).await, |lock| {
            pb::UnlockResponse {
                lock: Some(lock_info(&lock)),
            }
        })
    }

    async fn list_locks(
        &self,
        req: Request<pb::ListLocksRequest>,
    ) -> Result<Response<pb::ListLocksResponse>, Status> {
        let who = self.admin(&req, "list_locks").await?;
        reply(self.broker.admin_locks(&who).await, |locks| {
            pb::ListLocksResponse {
                locks: locks.iter().map(lock_info).collect(),
            }
        })
    }

    async fn list_static_roles(
        &self,
        req: Request<pb::ListStaticRolesRequest>,
    ) -> Result<Response<pb::ListStaticRolesResponse>, Status> {
        let who = self.admin(&req, "static_roles").await?;
        reply(self.broker.admin_static_roles(&who).await, |list| {
            pb::ListStaticRolesResponse {
                static_roles: list.iter().map(static_info).collect(),
            }
        })
    }

    async fn rotate_static_role(
        &self,
        req: Request<pb::StaticRoleRequest>,
    ) -> Result<Response<pb::StaticRoleInfo>, Status> {
        let who = self.admin(&req, "static_rotate").await?;
        let name = req.into_inner().static_role;
        reply(self.broker.rotate_static(&who, &name).await, |s| {
            static_info(&s)
        })
    }

    async fn revoke_static_role(
        &self,
        req: Request<pb::StaticRoleRequest>,
    ) -> Result<Response<pb::StaticRoleInfo>, Status> {
        let who = self.admin(&req, "static_revoke").await?;
        let name = req.into_inner().static_role;
        reply(self.broker.revoke_static(&who, &name).await, |s| {
            static_info(&s)
        })
    }

    async fn rotate_root(
        &self,
        req: Request<pb::RotateRootRequest>,
    ) -> Result<Response<pb::RotateRootResponse>, Status> {
        let who = self.admin(&req, "rotate_root").await?;
        let database = req.into_inner().database;
        let rotated = self.broker.rotate_root(&who, &database).await;
        reply(rotated, |()| pb::RotateRootResponse {
            database,
            rotated_at: Some(ts(Utc::now())),
        })
    }

    async fn recover_static_role(
        &self,
        req: Request<pb::StaticRoleRequest>,
    ) -> Result<Response<pb::StaticRoleInfo>, Status> {
        let who = self.admin(&req, "static_abandon").await?;
        let name = req.into_inner().static_role;
        reply(self.broker.recover_static(&who, &name).await, |s| {
            static_info(&s)
        })
    }
}
