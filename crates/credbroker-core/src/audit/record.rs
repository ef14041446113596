//! What an audit record holds: the `Event` a caller hands the log, the
//! `Record` written (and read back), its `Outcome`, and the `via` scope
//! that marks the records of one front end's requests. Apart from the
//! writer so the many callers that only build events read only this.

use serde::{Deserialize, Serialize};

/// What happened, as the caller or reaper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Denied,
    Error,
}

/// One audit event. Never holds a password: there is no field for one.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub identity: String,
    pub action: &'static str,
    pub role: Option<String>,
    pub database: Option<String>,
    pub lease_id: Option<String>,
    pub username: Option<String>,
    pub outcome: Option<Outcome>,
    /// Error kind or a short explanation; never a secret.
    pub detail: Option<String>,
    /// Objects the revoked user owned, handed to `reassigned_to`.
    pub objects_reassigned: Option<u64>,
    pub reassigned_to: Option<String>,
    /// The just-in-time access request (and grant) this record belongs
    /// to: its request, approvals, denial, grant start and end, and every
    /// lease under the grant carry it (`access`).
    pub request_id: Option<String>,
}

tokio::task_local! {
    pub(super) static VIA: &'static str;
}

/// Runs `fut` with every audit record it writes marked `"via": api`.
/// A scope rather than a parameter: the records of one request are
/// written deep in the broker and the revocation engine, which need not
/// know which front end called them.
pub async fn via<F: std::future::Future>(api: &'static str, fut: F) -> F::Output {
    VIA.scope(api, fut).await
}

/// The front end of the request this task serves, if any: to be carried
/// by work handed to another task (a shared revocation round).
pub fn current_via() -> Option<&'static str> {
    VIA.try_with(|v| *v).ok()
}

/// Runs `f` with the records it writes marked `via` (none: as they are).
pub fn in_via<R>(via: Option<&'static str>, f: impl FnOnce() -> R) -> R {
    match via {
        Some(v) => VIA.sync_scope(v, f),
        None => f(),
    }
}

impl Event {
    pub fn new(identity: impl Into<String>, action: &'static str) -> Self {
        Event {
            identity: identity.into(),
            action,
            ..Default::default()
        }
    }
}

/// A record as written (and as read back by `verify`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub ts: String,
    pub identity: String,
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub database: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lease_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub username: Option<String>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub objects_reassigned: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reassigned_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_id: Option<String>,
    /// The API a request came through, when not gRPC (`vault_api`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub via: Option<String>,
    pub prev: String,
}
