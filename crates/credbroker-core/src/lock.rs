//! Locks: the incident button. A lock refuses issue and renew to every
//! lease it matches — an identity pattern, a role or a database — until it
//! is lifted or runs out. Locks live in the lease store, so every replica
//! enforces them from the moment one writes them. Nothing here knows gRPC
//! or SQL.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{is_random_id, random_id};
use crate::policy::IdentityPattern;

/// Longest reason an admin may give: it goes into every refusal and audit
/// record, so it stays a sentence, not a document.
pub const MAX_REASON_LEN: usize = 512;

/// Longest `--for`: a lock meant to last longer is a config change.
pub const MAX_LOCK_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A lock id: `k_` followed by 20 random characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockId(String);

impl LockId {
    pub fn generate() -> Self {
        LockId(random_id("k_", 20))
    }

    /// Parses caller text; only the shape we generate passes.
    pub fn parse(s: &str) -> Result<Self> {
        if is_random_id(s, "k_", 20) {
            Ok(LockId(s.to_string()))
        } else {
            Err(Error::invalid("malformed lock id"))
        }
    }

    /// Wraps a value read back from our own store.
    pub fn from_store(s: String) -> Self {
        LockId(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockId({})", self.0)
    }
}

/// What a lock refuses.
#[derive(Debug, Clone)]
pub enum LockTarget {
    /// Every identity the pattern matches: the same glob type as a role's
    /// `allowed`, so an admin writes what the config already uses.
    Identity(IdentityPattern),
    Role(String),
    /// A static role: its current password is not served while locked.
    StaticRole(String),
    Database(String),
}

/// What a request would obtain, as locks see it: who, and which role,
/// static role or database (None: not one of those).
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub identity: Option<&'a Identity>,
    pub role: Option<&'a str>,
    pub static_role: Option<&'a str>,
    pub database: Option<&'a str>,
}

impl<'a> Subject<'a> {
    /// Only an identity: a token, a watch, an admin call.
    pub fn identity(who: &'a Identity) -> Self {
        Subject {
            identity: Some(who),
            role: None,
            static_role: None,
            database: None,
        }
    }
}

impl LockTarget {
    /// Rebuilds a target from its stored (kind, value) pair.
    pub fn from_parts(kind: &str, value: &str) -> Result<Self> {
        match kind {
            "identity" => Ok(LockTarget::Identity(
                IdentityPattern::new(value).map_err(|e| e.config("stored lock"))?,
            )),
            "role" => Ok(LockTarget::Role(value.to_string())),
            "static_role" => Ok(LockTarget::StaticRole(value.to_string())),
            "database" => Ok(LockTarget::Database(value.to_string())),
            other => Err(Error::internal(format!("unknown lock kind {other:?}"))),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            LockTarget::Identity(_) => "identity",
            LockTarget::Role(_) => "role",
            LockTarget::StaticRole(_) => "static_role",
            LockTarget::Database(_) => "database",
        }
    }

    pub fn value(&self) -> &str {
        match self {
            LockTarget::Identity(p) => p.as_str(),
            LockTarget::Role(r) => r,
            LockTarget::StaticRole(r) => r,
            LockTarget::Database(d) => d,
        }
    }

    /// Whether a lease of `identity` on `role` / `database` is refused. A
    /// pattern matches identities of its own kind only (`policy.rs`).
    pub fn matches(&self, identity: &Identity, role: &str, database: &str) -> bool {
        self.matches_subject(&Subject {
            identity: Some(identity),
            role: Some(role),
            static_role: None,
            database: Some(database),
        })
    }

    /// Whether a request for `s` is refused.
    pub fn matches_subject(&self, s: &Subject<'_>) -> bool {
        match self {
            LockTarget::Identity(p) => s.identity.is_some_and(|i| p.matches(i)),
            LockTarget::Role(r) => s.role == Some(r.as_str()),
            LockTarget::StaticRole(r) => s.static_role == Some(r.as_str()),
            LockTarget::Database(d) => s.database == Some(d.as_str()),
        }
    }
}

impl fmt::Display for LockTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.value())
    }
}

/// A lock as stored. `expires_at` None: until unlocked.
#[derive(Debug, Clone)]
pub struct Lock {
    pub id: LockId,
    pub target: LockTarget,
    pub reason: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl Lock {
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }

    /// The refusal a locked caller gets (and the audit records): which lock
    /// and why, so whoever is refused knows whom to ask.
    pub fn refusal(&self) -> Error {
        let reason = if self.reason.is_empty() {
            "no reason given"
        } else {
            &self.reason
        };
        Error::denied(format!(
            "locked by an admin ({}, {}): {reason}",
            self.id, self.target
        ))
    }
}

/// What an admin asks for; the store sets the id's times on its own clock.
#[derive(Debug, Clone)]
pub struct NewLock {
    pub id: LockId,
    pub target: LockTarget,
    pub reason: String,
    pub created_by: String,
    /// None: until unlocked.
    pub duration: Option<Duration>,
}

/// Checks an admin's reason text: bounded, one line, no control characters
/// (it ends up in refusals, log lines and the audit chain).
pub fn check_reason(reason: &str) -> Result<()> {
    if reason.len() > MAX_REASON_LEN {
        return Err(Error::invalid(format!(
            "reason is longer than {MAX_REASON_LEN} bytes"
        )));
    }
    if reason.chars().any(|c| c.is_control()) {
        return Err(Error::invalid("reason must not contain control characters"));
    }
    Ok(())
}

/// The first of `locks` that refuses this lease, if any. The locks are the
/// store's active ones: expiry is judged by the store, on its clock, so
/// replicas with skewed clocks still agree on when a lock ends.
pub fn first_match<'l>(
    locks: &'l [Lock],
    identity: &Identity,
    role: &str,
    database: &str,
) -> Option<&'l Lock> {
    locks
        .iter()
        .find(|l| l.target.matches(identity, role, database))
}

/// The first of `locks` that refuses a request for `subject`, if any.
pub fn first_match_subject<'l>(locks: &'l [Lock], subject: &Subject<'_>) -> Option<&'l Lock> {
    locks.iter().find(|l| l.target.matches_subject(subject))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap()
    }

    fn lock(target: LockTarget, expires_at: Option<DateTime<Utc>>) -> Lock {
        Lock {
            id: LockId::generate(),
            target,
            reason: "leaked".into(),
            created_by: "a".into(),
            created_at: Utc::now(),
            expires_at,
        }
    }

    #[test]
    fn ids_round_trip_and_reject_other_shapes() {
        let id = LockId::generate();
        assert_eq!(LockId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "",
            "k_",
            "l_abcdefghijklmnopqrst",
            "k_ABCDEFGHIJKLMNOPQRST",
            "k_abc'",
        ] {
            assert!(LockId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn targets_match_what_they_name_and_nothing_else() {
        let now = Utc::now();
        let mut locks = vec![
            lock(
                LockTarget::Identity(IdentityPattern::new("spiffe://x/ns/shop/*").unwrap()),
                None,
            ),
            lock(LockTarget::Role("ro".into()), None),
            lock(
                LockTarget::Database("orders".into()),
                Some(now - chrono::Duration::seconds(1)),
            ),
        ];
        assert!(first_match(&locks, &id("spiffe://x/ns/shop/cart"), "other", "db").is_some());
        assert!(first_match(&locks, &id("spiffe://x/ns/shop/cart/x"), "other", "db").is_none());
        assert!(first_match(&locks, &id("spiffe://x/ns/a"), "ro", "db").is_some());
        assert!(first_match(&locks, &id("spiffe://x/ns/a"), "rw", "orders").is_some());
        assert!(!locks[2].is_active(now), "expired");
        locks.retain(|l| l.is_active(now));
        assert!(first_match(&locks, &id("spiffe://x/ns/a"), "rw", "orders").is_none());
        let err = locks[1].refusal().to_string();
        assert!(
            err.contains("leaked") && err.contains(locks[1].id.as_str()),
            "{err}"
        );
    }

    #[test]
    fn reasons_are_bounded_single_lines() {
        assert!(check_reason("INC-42: certificate leaked").is_ok());
        assert!(check_reason("a\nb").is_err());
        assert!(check_reason(&"x".repeat(MAX_REASON_LEN + 1)).is_err());
    }
}
