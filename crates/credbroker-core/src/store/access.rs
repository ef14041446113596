//! Just-in-time access requests as the store keeps them (`access` is the
//! lifecycle; re-exported there). One row per request; the request *is*
//! the grant once approved, so the grant id is the request id and a
//! lease's `grant_id` names it.
//!
//! Every change is a compare-and-set on `version` ([`AccessStore::update_access`]):
//! two approvers, two replicas, or the expiry loop racing an approval —
//! exactly one write wins, the other re-reads and decides again. That is
//! what makes "a grant's end is enforced by whichever replica sees it
//! first" safe: the replica whose `granted → ended` write wins revokes.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessState {
    /// Waiting for approvals, until `pending_until`.
    Pending,
    /// Approved (or break-glass): leases may be issued until `until`.
    Granted,
    /// An approver said no.
    Denied,
    /// Undecided at `pending_until`.
    Expired,
    /// A grant that ended (time reached or revoked), or a pending request
    /// withdrawn by its requester or revoked by an approver.
    Ended,
}

impl AccessState {
    pub const ALL: [AccessState; 5] = [
        AccessState::Pending,
        AccessState::Granted,
        AccessState::Denied,
        AccessState::Expired,
        AccessState::Ended,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AccessState::Pending => "pending",
            AccessState::Granted => "granted",
            AccessState::Denied => "denied",
            AccessState::Expired => "expired",
            AccessState::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        AccessState::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| Error::invalid(format!("unknown access request state {s:?}")))
    }
}

/// One approval: who, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub identity: String,
    pub at: DateTime<Utc>,
}

/// A request for just-in-time access, and the grant it becomes. Holds no
/// secret: the credentials are ordinary leases, issued later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    /// `ar_` and 26 characters of `[a-z0-9]`: also the grant id.
    pub id: String,
    /// The `[access.NAME]` policy it was made under.
    pub policy: String,
    pub roles: Vec<String>,
    pub requester: String,
    pub reason: String,
    /// How long the grant lasts once granted.
    pub duration_secs: u64,
    pub state: AccessState,
    pub break_glass: bool,
    pub created_at: DateTime<Utc>,
    pub pending_until: DateTime<Utc>,
    /// Distinct approvers, never the requester.
    pub approvals: Vec<Approval>,
    /// How many approvals the policy wanted when the request was made.
    pub approvals_needed: u32,
    /// Who denied it, and why.
    pub denied_by: Option<String>,
    pub deny_reason: Option<String>,
    pub granted_at: Option<DateTime<Utc>>,
    /// The grant's end: leases under it never outlive it.
    pub until: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub ended_by: Option<String>,
    pub end_reason: Option<String>,
    /// The leases of an ended grant have all been revoked (or handed to
    /// the revocation engine, whose claims and retries take it from
    /// there). Until then the expiry loop keeps finding the request due.
    pub leases_done: bool,
    /// Bumped by every write; the compare-and-set key.
    pub version: i64,
}

impl AccessRequest {
    /// When the expiry loop must look at this request next: the pending
    /// deadline, the grant's end, or (an ended grant whose leases are not
    /// yet all revoked) at once. None: nothing left to do.
    pub fn due_at(&self) -> Option<DateTime<Utc>> {
        match self.state {
            AccessState::Pending => Some(self.pending_until),
            AccessState::Granted => self.until,
            AccessState::Ended if !self.leases_done => {
                Some(self.ended_at.unwrap_or(self.created_at))
            }
            _ => None,
        }
    }

    /// A grant that covers `role` for `identity` at `now`.
    pub fn covers(&self, identity: &str, role: &str, now: DateTime<Utc>) -> bool {
        self.state == AccessState::Granted
            && self.requester == identity
            && self.roles.iter().any(|r| r == role)
            && self.until.is_some_and(|u| u > now)
    }

    /// The stored body (every field but `version`, which is a column).
    pub fn to_body(&self) -> Result<String> {
        serde_json::to_string(self).map_err(Error::internal)
    }

    pub fn from_body(body: &str, version: i64) -> Result<Self> {
        let mut r: AccessRequest = serde_json::from_str(body).map_err(|e| {
            Error::internal(format!("lease store: corrupt access request row: {e}"))
        })?;
        r.version = version;
        Ok(r)
    }
}

/// Which requests `list_access` returns: newest first.
#[derive(Debug, Clone, Default)]
pub struct AccessFilter {
    pub requester: Option<String>,
    /// Empty: every state.
    pub states: Vec<AccessState>,
    pub limit: Option<usize>,
}

impl AccessFilter {
    pub fn matches(&self, r: &AccessRequest) -> bool {
        self.requester.as_ref().is_none_or(|q| *q == r.requester)
            && (self.states.is_empty() || self.states.contains(&r.state))
    }
}

/// Most rows one listing returns.
pub const MAX_ACCESS_LIST: usize = 1_000;

/// Access requests and grants (`access`).
#[async_trait]
pub trait AccessStore: Send + Sync {
    /// Stores a new request (its `version` as given, normally 0).
    async fn insert_access(&self, r: &AccessRequest) -> Result<()>;

    async fn get_access(&self, id: &str) -> Result<Option<AccessRequest>>;

    /// Writes `r` with version `r.version + 1` if the stored row still has
    /// `r.version`; false (nothing written) when another write came first.
    async fn update_access(&self, r: &AccessRequest) -> Result<bool>;

    /// Newest first, at most `filter.limit` (capped at [`MAX_ACCESS_LIST`]).
    async fn list_access(&self, filter: &AccessFilter) -> Result<Vec<AccessRequest>>;

    /// Requests due at or before `now` (see [`AccessRequest::due_at`]),
    /// earliest first, at most `limit`.
    async fn access_due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<AccessRequest>>;
}

/// The SQL states list for a filter (fixed words, never caller text).
pub(crate) fn states_sql(states: &[AccessState]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}
