//! Static roles: existing database users whose passwords the broker
//! rotates, for applications that cannot take a new user name per lease.
//!
//! Alternating users (two users with the same privileges): each rotation
//! sets a fresh password on the user *not* in use and makes it current, so
//! the previous password keeps working for `overlap`; then the previous
//! user's sessions are ended and its password replaced by one nobody
//! knows. Single-user mode (one user) is Vault's: every rotation breaks
//! whatever still holds the old password.
//!
//! - [`config`]: `[static_roles.NAME]` validation;
//! - [`seal`]: the AEAD that keeps the current password readable by every
//!   replica without plaintext at rest;
//! - [`rotation`]: the state machine — intent in the store, then the
//!   database, then commit — and the loop that runs it once per period on
//!   one replica.
//!
//! The database enforces expiry: a password is set with `VALID UNTIL` /
//! a failsafe event at rotation + period + overlap (≤ 2 periods), so a dead
//! broker leaves nothing valid for long.

/// `[static_roles.NAME]` validation lives in `config` (below this module);
/// this name keeps `static_roles::config::…` paths working.
pub use crate::config::static_roles as config;
pub mod rotation;
pub mod seal;

use chrono::{DateTime, Utc};

use crate::lease::Password;

/// The rotation state the store keeps lives in `store` (below this
/// module); re-exported so `static_roles::StaticState` still names it.
pub use crate::store::static_state::{
    CurrentUser, Pending, PendingKind, PreviousUser, StaticState,
};
pub use config::StaticRoleConfig;
pub use rotation::Rotator;
pub use seal::Sealer;

/// A static role's credential as a reader gets it. `Debug` leaves the
/// secrets out.
pub struct StaticCredential {
    pub static_role: String,
    pub database: String,
    pub kind: crate::lease::BackendKind,
    pub username: String,
    pub password: Password,
    /// Connection string with the password in it.
    pub dsn: String,
    pub endpoint: crate::backend::Endpoint,
    pub generation: u64,
    pub rotated_at: DateTime<Utc>,
    /// When the next rotation is planned: re-read then.
    pub next_rotation_at: DateTime<Utc>,
    /// When the database stops accepting this password on its own.
    pub valid_until: DateTime<Utc>,
}

impl std::fmt::Debug for StaticCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredential")
            .field("static_role", &self.static_role)
            .field("username", &self.username)
            .field("generation", &self.generation)
            .field("next_rotation_at", &self.next_rotation_at)
            .finish_non_exhaustive()
    }
}

/// A static role as `admin static-roles` shows it.
#[derive(Debug, Clone)]
pub struct StaticStatus {
    pub name: String,
    pub database: String,
    pub users: Vec<String>,
    pub current_user: Option<String>,
    pub generation: u64,
    pub rotated_at: Option<DateTime<Utc>>,
    pub next_rotation_at: Option<DateTime<Utc>>,
    pub valid_until: Option<DateTime<Utc>>,
    pub previous_user: Option<String>,
    pub previous_retire_at: Option<DateTime<Utc>>,
    pub pending: bool,
    pub last_error: Option<String>,
}

/// The sealed values of `st` that `sealer` cannot open — "current" and/or
/// "pending" — each with the error that says why (another key's id names
/// both ids and the fix). For `check` and the start-up warnings: a
/// mismatch found before a reader or the rotation loop runs into it.
pub fn unopenable(sealer: &Sealer, st: &StaticState) -> Vec<(&'static str, crate::error::Error)> {
    let mut out = Vec::new();
    if let Some(c) = &st.current {
        if let Err(e) = sealer.open(&st.role, &c.user, st.generation, &c.sealed) {
            out.push(("current", e));
        }
    }
    if let Some(p) = &st.pending {
        if let Err(e) = sealer.open(&st.role, &p.user, p.generation, &p.sealed) {
            out.push(("pending", e));
        }
    }
    out
}
