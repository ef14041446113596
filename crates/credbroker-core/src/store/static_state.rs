//! A static role's rotation state as the store keeps it. Here, in `store`,
//! because the store persists it and the rotation (`crate::static_roles`,
//! above the store) reads and writes it: `store` must not import
//! `static_roles` (ARCHITECTURE.md, "Architecture invariant: layers").
//! `static_roles` re-exports these types.

use chrono::{DateTime, Utc};

/// What the store remembers of one static role. The passwords in it are
/// sealed (`static_roles::Sealer`); nothing here is secret without the key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StaticState {
    pub role: String,
    /// Generation of `current`; every rotation adds one.
    pub generation: u64,
    pub current: Option<CurrentUser>,
    pub next_rotation_at: Option<DateTime<Utc>>,
    /// The user rotated away from, still valid until its overlap ends.
    pub previous: Option<PreviousUser>,
    /// A rotation written down before the database heard of it: re-applied
    /// (idempotent) and committed by whoever claims the role next.
    pub pending: Option<Pending>,
    /// The last failure, free of secrets; cleared by a success.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentUser {
    pub user: String,
    pub sealed: String,
    pub rotated_at: DateTime<Utc>,
    pub valid_until: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousUser {
    pub user: String,
    /// End of its overlap: sessions ended, password replaced.
    pub retire_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingKind {
    /// A scheduled or admin rotation.
    Rotate,
    /// An incident: both users retired first, then a fresh password.
    Revoke,
}

impl PendingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PendingKind::Rotate => "rotate",
            PendingKind::Revoke => "revoke",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "rotate" => Some(PendingKind::Rotate),
            "revoke" => Some(PendingKind::Revoke),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub kind: PendingKind,
    pub user: String,
    pub sealed: String,
    pub generation: u64,
    pub valid_until: DateTime<Utc>,
}
