//! Path and method → handler. One fallback handler does the routing, so
//! every answer — an unknown path, a wrong method, a body too large — is
//! Vault's JSON, never axum's plain text; and every handler runs in an
//! audit scope that marks its records `"via":"vault_api"`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body as HttpBody;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use chrono::Utc;
use serde_json::json;

use super::envelope::{capped_warning, request_id, Auth, Envelope, VaultError};
use super::params::{Body, LeaseRef};
use super::token::{self, ttl_secs, Session};
use crate::audit::{Event, Outcome};
use crate::broker::Broker;
use crate::config::VaultApiConfig;
use crate::error::Error;
use crate::gate::{Ask, Door, Pass, Target, Use};
use crate::lease::{truncate_ms, LeaseState};
use crate::server::https::Peer;

/// What audit records written by this API say in `via`.
pub const VIA: &str = "vault_api";
/// Largest request body read; Vault requests are a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

struct Api {
    broker: Arc<Broker>,
    config: VaultApiConfig,
    /// Stable for the life of the process, as Vault's is for a cluster.
    cluster_id: String,
}

type Reply = Result<Response, VaultError>;

pub fn router(broker: Arc<Broker>, config: VaultApiConfig) -> Router {
    let api = Arc::new(Api {
        broker,
        config,
        cluster_id: request_id(),
    });
    Router::new().fallback(dispatch).with_state(api)
}

async fn dispatch(
    State(api): State<Arc<Api>>,
    Extension(peer): Extension<Peer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: HttpBody,
) -> Response {
    let bytes = match read_body(body).await {
        Ok(b) => b,
        Err(e) => {
            // Refused before routing: still one audit record (invariant 6).
            let who = match &peer.identity {
                Ok(i) => i.as_str().to_string(),
                Err(_) => format!("unauthenticated:{}", peer.addr.ip()),
            };
            let err = Error::invalid(e.message.clone());
            crate::audit::in_via(Some(VIA), || api.broker.refuse(&who, "vault_request", err));
            return e.into_response();
        }
    };
    let req = Request {
        api: &api,
        peer: &peer,
        headers: &headers,
        bytes: &bytes,
    };
    let reply = crate::audit::via(VIA, route(&req, &method, uri.path())).await;
    reply.unwrap_or_else(IntoResponse::into_response)
}

/// Past this much an oversized body is no longer read to the end: the
/// connection is closed with the answer instead.
const MAX_DRAIN: usize = 1024 * 1024;

/// The request body, at most `MAX_BODY`. An oversized one is read on (up
/// to `MAX_DRAIN`) and dropped before the 413 goes out: answering while
/// the client still sends makes the close look like a broken connection
/// to it ("EOF occurred in violation of protocol"), not like Vault's JSON.
async fn read_body(body: HttpBody) -> Result<Vec<u8>, VaultError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| {
            VaultError::new(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            )
        })?;
        seen += chunk.len();
        if seen <= MAX_BODY {
            out.extend_from_slice(&chunk);
        } else if seen > MAX_DRAIN {
            break;
        }
    }
    if seen > MAX_BODY {
        return Err(VaultError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY} bytes"),
        ));
    }
    Ok(out)
}

struct Request<'a> {
    api: &'a Api,
    peer: &'a Peer,
    headers: &'a HeaderMap,
    bytes: &'a [u8],
}

impl Request<'_> {
    fn body(&self) -> Result<Body, VaultError> {
        Ok(Body::parse(self.bytes)?)
    }

    /// The request's token, checked (`token::authenticate`), then the
    /// gate's decision on `target`.
    async fn session(
        &self,
        action: &'static str,
        target: Target<'_>,
    ) -> Result<Session, VaultError> {
        let s = self.authenticate(action).await?;
        self.admit(&s, action, target).await?;
        Ok(s)
    }

    async fn authenticate(&self, action: &'static str) -> Result<Session, VaultError> {
        let cache = self.api.config.token_cache;
        Ok(token::authenticate(&self.api.broker, self.peer, self.headers, action, cache).await?)
    }

    /// The gate, for a caller whose token was checked.
    async fn admit(
        &self,
        s: &Session,
        action: &'static str,
        target: Target<'_>,
    ) -> Result<Pass, VaultError> {
        let ask = Ask {
            door: Door::VaultApi,
            peer: Some(self.peer.addr.ip()),
            identity: Ok(&s.identity),
            action,
            target,
        };
        Ok(crate::gate::admit(&self.api.broker, ask).await?)
    }
}

/// Vault treats PUT and POST alike.
fn is_write(m: &Method) -> bool {
    m == Method::PUT || m == Method::POST
}

async fn route(req: &Request<'_>, method: &Method, path: &str) -> Reply {
    let Some(path) = path.strip_prefix("/v1/") else {
        return Err(VaultError::unsupported_path());
    };
    let path = path.trim_end_matches('/');
    let mount = req.api.config.mount.as_str();
    let read = method == Method::GET;
    let head = method == Method::HEAD;
    let write = is_write(method);
    let wrong_method = || {
        Err(VaultError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "unsupported operation",
        ))
    };
    match path {
        "sys/health" if read || head => return health(req),
        "sys/health" => return wrong_method(),
        "auth/cert/login" if write => return login(req).await,
        "auth/token/lookup-self" if read || write => return lookup_self(req).await,
        "auth/token/renew-self" if write => return renew_self(req).await,
        "auth/token/revoke-self" if write => return revoke_self(req).await,
        "sys/leases/renew" if write => return renew(req, None).await,
        "sys/leases/revoke" if write => return revoke(req, None).await,
        "sys/leases/lookup" if write => return lookup(req).await,
        "auth/cert/login"
        | "auth/token/lookup-self"
        | "auth/token/renew-self"
        | "auth/token/revoke-self"
        | "sys/leases/renew"
        | "sys/leases/revoke"
        | "sys/leases/lookup" => return wrong_method(),
        _ => {}
    }
    // Paths that carry a lease id (which holds slashes) or a name.
    let tail = |prefixes: &[&'static str]| prefixes.iter().find_map(|p| path.strip_prefix(p));
    if let Some(id) = tail(&["sys/leases/renew/", "sys/renew/"]) {
        return if write {
            renew(req, Some(id)).await
        } else {
            wrong_method()
        };
    }
    if let Some(id) = tail(&["sys/leases/revoke/", "sys/revoke/"]) {
        return if write {
            revoke(req, Some(id)).await
        } else {
            wrong_method()
        };
    }
    if let Some(p) = path.strip_prefix("sys/internal/ui/mounts/") {
        return if read {
            ui_mount(req, p).await
        } else {
            wrong_method()
        };
    }
    if let Some(rest) = path.strip_prefix(mount).and_then(|r| r.strip_prefix('/')) {
        if let Some(role) = rest.strip_prefix("creds/").filter(|r| !r.contains('/')) {
            return if read {
                creds(req, role).await
            } else {
                wrong_method()
            };
        }
        if let Some(name) = rest
            .strip_prefix("static-creds/")
            .filter(|r| !r.contains('/'))
        {
            return if read {
                static_creds(req, name).await
            } else {
                wrong_method()
            };
        }
    }
    Err(VaultError::unsupported_path())
}

/// `sys/health`: always the answer of an active, unsealed Vault while
/// the broker serves. Needs no token (load balancers call it).
fn health(req: &Request<'_>) -> Reply {
    Ok(super::envelope::json(
        StatusCode::OK,
        &json!({
            "initialized": true,
            "sealed": false,
            "standby": false,
            "performance_standby": false,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": Utc::now().timestamp(),
            // A Vault version clients accept, with credbroker's as build
            // metadata (semver allows it).
            "version": concat!("1.15.0+credbroker.", env!("CARGO_PKG_VERSION")),
            "cluster_name": "credbroker",
            "cluster_id": req.api.cluster_id,
        }),
    ))
}

/// `sys/internal/ui/mounts/<path>`: Vault Agent and consul-template ask
/// which engine serves a path before reading it. Only the database mount
/// exists here.
async fn ui_mount(req: &Request<'_>, path: &str) -> Reply {
    req.session("vault_mounts", Target::Own(Use::Read)).await?;
    let mount = &req.api.config.mount;
    if path != mount.as_str() && !path.starts_with(&format!("{mount}/")) {
        return Err(VaultError::new(
            StatusCode::NOT_FOUND,
            format!("no mount serves this path; the database mount is {mount:?}"),
        ));
    }
    Ok(Envelope::data(json!({
        "accessor": format!("database_{}", &req.api.cluster_id[..8]),
        "config": {"default_lease_ttl": 0, "force_no_cache": false, "max_lease_ttl": 0},
        "description": "credbroker dynamic database credentials",
        "external_entropy_access": false,
        "local": false,
        "options": null,
        "path": format!("{mount}/"),
        "seal_wrap": false,
        "type": "database",
        "uuid": req.api.cluster_id,
    }))
    .into_response())
}

/// `auth/cert/login`: the certificate is the credential; a token bound
/// to it comes back (made, capped and audited in `token::login`).
async fn login(req: &Request<'_>) -> Reply {
    let broker = &req.api.broker;
    let ask = Ask {
        door: Door::VaultApi,
        peer: Some(req.peer.addr.ip()),
        identity: req.peer.identity.as_ref(),
        action: token::LOGIN,
        target: Target::Own(Use::Obtain),
    };
    let who = crate::gate::admit(broker, ask).await?.identity;
    let token::Login {
        token,
        stored,
        name,
    } = token::login(broker, req.peer, &who, req.bytes, &req.api.config).await?;
    let ttl = req.api.config.token_ttl;
    let mut metadata = BTreeMap::new();
    metadata.insert("identity".to_string(), who.as_str().to_string());
    metadata.insert("cert_name".to_string(), name);
    metadata.insert("cert_sha256".to_string(), stored.cert_sha256.clone());
    let auth = Auth {
        client_token: token.expose().to_string(),
        accessor: stored.accessor,
        policies: vec!["default".into()],
        token_policies: vec!["default".into()],
        metadata,
        lease_duration: ttl.as_secs(),
        renewable: true,
        entity_id: String::new(),
        token_type: "service",
        orphan: true,
    };
    Ok(Envelope::auth(auth, vec![]).into_response())
}

/// `auth/token/lookup-self`: the token's own record (hvac's
/// `is_authenticated` calls it).
async fn lookup_self(req: &Request<'_>) -> Reply {
    let s = req
        .session("vault_token_lookup", Target::Own(Use::Read))
        .await?;
    let t = &s.token;
    let now = Utc::now();
    // The token itself, as Vault answers: its holder just presented it.
    let id = token::presented(req.headers).unwrap_or_default();
    Ok(Envelope::data(json!({
        "accessor": t.accessor,
        "creation_time": t.issued_at.timestamp(),
        "creation_ttl": req.api.config.token_ttl.as_secs(),
        "display_name": "cert",
        "entity_id": "",
        "expire_time": t.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "explicit_max_ttl": req.api.config.token_max_ttl.as_secs(),
        "id": id.as_str(),
        "identity_policies": null,
        "issue_time": t.issued_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "meta": {"identity": t.identity},
        "num_uses": 0,
        "orphan": true,
        "path": "auth/cert/login",
        "policies": ["default"],
        "renewable": true,
        "ttl": ttl_secs(t.expires_at, now),
        "type": "service",
    }))
    .into_response())
}

/// `auth/token/renew-self`: `increment` (default `token_ttl`) from now,
/// never past login + `token_max_ttl`.
async fn renew_self(req: &Request<'_>) -> Reply {
    let s = req
        .session("vault_token_renew", Target::Own(Use::Obtain))
        .await?;
    let cfg = &req.api.config;
    let requested = req.body()?.duration("increment")?.unwrap_or(cfg.token_ttl);
    let now = truncate_ms(Utc::now());
    let hard = s.token.issued_at
        + chrono::Duration::from_std(cfg.token_max_ttl).map_err(Error::internal)?;
    let wanted = now + chrono::Duration::from_std(requested).map_err(Error::internal)?;
    let expires_at = wanted.min(hard);
    let broker = &req.api.broker;
    if !broker.tokens().renew(&s.token, expires_at).await? {
        // Evicted or revoked since the check: refused, and audited.
        let err = Error::denied("invalid token");
        return Err(broker
            .refuse(s.identity.as_str(), "vault_token_renew", err)
            .into());
    }
    let granted = ttl_secs(expires_at, now);
    let mut warnings = vec![];
    if requested.as_secs() > granted {
        warnings.push(capped_warning(requested.as_secs(), granted));
    }
    let mut e = Event::new(s.identity.as_str(), "vault_token_renew");
    e.outcome = Some(Outcome::Ok);
    e.detail = Some(format!("accessor={}; ttl={granted}s", s.token.accessor));
    broker.audit().append(e)?;
    let auth = Auth {
        // Vault's renew-self does not repeat the token either.
        client_token: String::new(),
        accessor: s.token.accessor.clone(),
        policies: vec!["default".into()],
        token_policies: vec!["default".into()],
        metadata: BTreeMap::from([("identity".to_string(), s.token.identity.clone())]),
        lease_duration: granted,
        renewable: expires_at < hard,
        entity_id: String::new(),
        token_type: "service",
        orphan: true,
    };
    Ok(Envelope::auth(auth, warnings).into_response())
}

/// `auth/token/revoke-self`: revokes every lease the token created, then
/// the token. A lease that cannot be revoked now (database away) fails
/// the request and keeps the token, so the client can try again.
async fn revoke_self(req: &Request<'_>) -> Reply {
    let s = req
        .session("vault_token_revoke", Target::Own(Use::GiveUp))
        .await?;
    let broker = &req.api.broker;
    let revoked = broker.tokens().revoke(&s.identity, &s.token).await?;
    let mut e = Event::new(s.identity.as_str(), "vault_token_revoke");
    e.outcome = Some(Outcome::Ok);
    e.detail = Some(format!("accessor={}; leases={revoked}", s.token.accessor));
    broker.audit().append(e)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `<mount>/creds/<role>`: a new lease with the role's default TTL.
async fn creds(req: &Request<'_>, role: &str) -> Reply {
    let s = req.session("issue", Target::Role(role)).await?;
    let broker = &req.api.broker;
    // Linked to the token as it becomes active (`broker::tokens`).
    let issued = broker
        .tokens()
        .issue(
            &s.identity,
            Some(req.peer.addr.ip()),
            role,
            &s.token.accessor,
        )
        .await?;
    let lease = &issued.lease;
    let now = Utc::now();
    let mount = &req.api.config.mount;
    let body = Envelope {
        request_id: request_id(),
        lease_id: LeaseRef::new(&lease.role, &lease.id).to_vault(mount),
        renewable: lease.renewable(now),
        lease_duration: ttl_secs(lease.expires_at, now),
        data: Some(json!({
            "username": lease.username.as_str(),
            "password": issued.password.expose(),
        })),
        wrap_info: None,
        warnings: None,
        auth: None,
    };
    Ok(body.into_response())
}

/// `<mount>/static-creds/<name>`: a static role's current credential in
/// Vault's shape (`username`, `password`, `last_vault_rotation`,
/// `rotation_period`, `ttl` until the next rotation). No lease: the broker
/// rotates it; clients re-read after `ttl`.
async fn static_creds(req: &Request<'_>, name: &str) -> Reply {
    let s = req.session("static_read", Target::StaticRole(name)).await?;
    let broker = &req.api.broker;
    let cred = broker.static_credential(&s.identity, name).await?;
    let period = broker
        .config()
        .static_roles
        .get(name)
        .map(|r| r.rotation_period.as_secs())
        .unwrap_or_default();
    Ok(Envelope::data(json!({
        "username": cred.username,
        "password": cred.password.expose(),
        "last_vault_rotation": cred.rotated_at.to_rfc3339(),
        "rotation_period": period,
        "ttl": ttl_secs(cred.next_rotation_at, Utc::now()),
    }))
    .into_response())
}

/// The lease a request names, in its body (`lease_id`) or its path.
fn lease_ref(
    req: &Request<'_>,
    body: &Body,
    in_path: Option<&str>,
) -> Result<LeaseRef, VaultError> {
    let text = match in_path {
        Some(p) => p.to_string(),
        // Vault's own field name; `url_lease_id` is its path twin.
        None => body.string("lease_id")?.unwrap_or_default(),
    };
    Ok(LeaseRef::parse(&req.api.config.mount, &text)?)
}

/// The gate's decision on the named lease, and the lease as it read it; a
/// role that does not match the name is "no such lease".
async fn owned(
    req: &Request<'_>,
    s: &Session,
    r: &LeaseRef,
    action: &'static str,
    what: Use,
) -> Result<crate::lease::Lease, VaultError> {
    let pass = req.admit(s, action, Target::Lease(&r.id, what)).await?;
    match pass.lease {
        Some(lease) if lease.role == r.role => Ok(lease),
        _ => {
            let err = Error::NotFound(format!("no lease {}", r.id));
            Err(req
                .api
                .broker
                .refuse(s.identity.as_str(), action, err)
                .into())
        }
    }
}

/// `sys/leases/renew`: `increment` (default: the role's default TTL) from
/// now, capped at the lease's hard limit with Vault's warning.
async fn renew(req: &Request<'_>, in_path: Option<&str>) -> Reply {
    let s = req.authenticate("renew").await?;
    let body = req.body()?;
    let r = lease_ref(req, &body, in_path)?;
    let increment = body.duration("increment")?;
    let lease = owned(req, &s, &r, "renew", Use::Obtain).await?;
    let broker = &req.api.broker;
    let config = broker.config();
    // A role gone from the config: the broker refuses the renewal itself.
    let role = config.role(&lease.role);
    let requested = increment.or(role.map(|r| r.default_ttl));
    // Over the role's max_ttl Vault caps rather than refuses; so do we.
    let asked = match (requested, role) {
        (Some(d), Some(role)) => Some(d.min(role.max_ttl)),
        (d, _) => d,
    };
    let renewed = broker
        .renew_from(&s.identity, Some(req.peer.addr.ip()), &r.id, asked)
        .await?;
    let now = Utc::now();
    let granted = ttl_secs(renewed.expires_at, now);
    let mut warnings = vec![];
    // One second of slack: the renewal took some time itself.
    if let Some(req_secs) = requested.map(|d| d.as_secs()) {
        if req_secs > granted + 1 {
            warnings.push(capped_warning(req_secs, granted));
        }
    }
    let envelope = Envelope::lease(
        r.to_vault(&req.api.config.mount),
        renewed.renewable(now),
        granted,
        warnings,
    );
    Ok(envelope.into_response())
}

/// `sys/leases/revoke`: ends the lease now — the user dropped and its
/// open sessions terminated — and answers 204.
async fn revoke(req: &Request<'_>, in_path: Option<&str>) -> Reply {
    let s = req.authenticate("revoke").await?;
    let body = req.body()?;
    let r = lease_ref(req, &body, in_path)?;
    owned(req, &s, &r, "revoke", Use::GiveUp).await?;
    req.api.broker.revoke(&s.identity, &r.id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `sys/leases/lookup`: Vault's view of one lease.
async fn lookup(req: &Request<'_>) -> Reply {
    let s = req.authenticate("lookup").await?;
    let body = req.body()?;
    let r = lease_ref(req, &body, None)?;
    let lease = owned(req, &s, &r, "lookup", Use::Read).await?;
    if lease.state == LeaseState::Revoked {
        return Err(Error::NotFound(format!("lease {} was revoked", r.id)).into());
    }
    let now = Utc::now();
    let rfc = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    Ok(Envelope::data(json!({
        "id": r.to_vault(&req.api.config.mount),
        "issue_time": rfc(lease.issued_at),
        "expire_time": rfc(lease.expires_at),
        // Not recorded in the store (the audit log has each renewal).
        "last_renewal": null,
        "renewable": lease.renewable(now),
        "ttl": ttl_secs(lease.expires_at, now),
    }))
    .into_response())
}
