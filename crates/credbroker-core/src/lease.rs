//! Domain types of a lease. Nothing here knows gRPC, SQL or TOML.

use std::fmt;

use chrono::{DateTime, Utc};
use rand::Rng;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Alphabet for broker-made names and ids: lowercase letters and digits only,
/// so a name never needs quoting to be safe (we quote anyway) and survives
/// every database's identifier rules and case folding.
const NAME_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn random_string(len: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

/// A broker-made id: `prefix`, then `len` random characters of
/// [`NAME_ALPHABET`] (lease, lock, access request and webhook event ids).
pub(crate) fn random_id(prefix: &str, len: usize) -> String {
    format!("{prefix}{}", random_string(len, NAME_ALPHABET))
}

/// Whether caller text has the exact shape [`random_id`] makes for
/// `prefix` and `len`: such an id never carries anything else into the
/// store or a log line.
pub(crate) fn is_random_id(s: &str, prefix: &str, len: usize) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|t| t.len() == len && t.bytes().all(|b| NAME_ALPHABET.contains(&b)))
}

/// A lease id: `l_` followed by 26 random characters (~134 bits).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct LeaseId(String);

impl LeaseId {
    pub fn generate() -> Self {
        LeaseId(random_id("l_", 26))
    }

    /// Parses caller text. Only the exact shape we generate is accepted, so a
    /// lease id never carries anything else into the store or a log line.
    pub fn parse(s: &str) -> Result<Self> {
        if is_random_id(s, "l_", 26) {
            Ok(LeaseId(s.to_string()))
        } else {
            Err(Error::invalid("malformed lease id"))
        }
    }

    /// Wraps a value read back from our own store.
    pub fn from_store(s: String) -> Self {
        LeaseId(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({})", self.0)
    }
}

/// Why a lease ended; goes into the audit record and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its holder asked.
    Requested,
    Admin,
    Expired,
    /// A pending intent whose issuer died or failed.
    AbandonedIntent,
    /// An admin's `lock --revoke`: ended with the lock that refuses more.
    Locked,
    /// A routine handover's end: the replaced lease drained (its idle
    /// sessions ended as they went idle) and is now dropped, at its last
    /// session's end or at the drain deadline (`revocation::drain`).
    Handover,
    /// The just-in-time access grant it was issued under ended (its time,
    /// or `access revoke`): every lease under it goes, sessions included.
    GrantEnded,
}

impl Reason {
    /// The audit action.
    pub fn action(self) -> &'static str {
        self.labels().0
    }

    /// The `reason` label of `credbroker_revoked_total`.
    pub fn label(self) -> &'static str {
        self.labels().1
    }

    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Reason::Requested => ("revoke", "requested"),
            Reason::Admin => ("admin_revoke", "admin"),
            Reason::Expired => ("reap", "expired"),
            Reason::AbandonedIntent => ("resolve_intent", "abandoned_intent"),
            Reason::Locked => ("lock_revoke", "locked"),
            Reason::Handover => ("handover_revoke", "handover"),
            Reason::GrantEnded => ("grant_revoke", "grant_ended"),
        }
    }
}

/// Longest user name we make: MySQL 8 allows 32 characters, MariaDB 80,
/// PostgreSQL 63 bytes. Staying within 32 fits all of them.
pub const MAX_USERNAME_LEN: usize = 32;

/// Random characters in a user name: 36^16 ≈ 2^82, so collisions do not
/// happen in practice; the store's unique index is the backstop.
const USERNAME_RANDOM_LEN: usize = 16;

/// A database user name made by the broker: `{prefix}{role fragment}_{random}`.
/// Never caller text.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Username(String);

impl Username {
    /// `prefix` must already be validated by the config (safe alphabet, short).
    /// The role fragment helps a DBA reading `pg_roles`; it is cut to fit.
    pub fn generate(prefix: &str, role: &str) -> Self {
        let room = MAX_USERNAME_LEN - prefix.len() - 1 - USERNAME_RANDOM_LEN;
        let fragment: String = role
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            .take(room.min(8))
            .collect();
        Username(format!(
            "{prefix}{fragment}_{}",
            random_string(USERNAME_RANDOM_LEN, NAME_ALPHABET)
        ))
    }

    /// Wraps a value read back from our own store or database listing.
    pub fn from_store(s: String) -> Self {
        Username(s)
    }

    /// Whether `name` has the shape of a name this broker makes with `prefix`.
    /// The orphan sweep only ever drops names that pass this.
    pub fn is_broker_made(prefix: &str, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(prefix) else {
            return false;
        };
        let Some((fragment, random)) = rest.rsplit_once('_') else {
            return false;
        };
        name.len() <= MAX_USERNAME_LEN
            && random.len() == USERNAME_RANDOM_LEN
            && random.bytes().all(|b| NAME_ALPHABET.contains(&b))
            && fragment.bytes().all(|b| NAME_ALPHABET.contains(&b))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Username({})", self.0)
    }
}

/// Password characters: letters and digits only, so the password can go into
/// a URI, a key=value DSN or a shell env file without escaping.
const PASSWORD_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// 40 characters of a 62-letter alphabet ≈ 238 bits: far beyond brute force,
/// which is why the broker's SCRAM verifier needs no key stretching.
const PASSWORD_LEN: usize = 40;

/// A generated password. The buffer is wiped on drop; `Debug` and `Display`
/// never show it. Reading it takes an explicit `expose()`.
#[derive(Clone)]
pub struct Password(Zeroizing<String>);

impl Password {
    pub fn generate() -> Self {
        Password(Zeroizing::new(random_string(
            PASSWORD_LEN,
            PASSWORD_ALPHABET,
        )))
    }

    /// Wraps a secret read from elsewhere (a password file, a server reply).
    pub fn from_secret(s: String) -> Self {
        Password(Zeroizing::new(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Where a lease is in its life. Only `Revoked` means the database user is
/// known to be gone; every other state is "live" for bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Intent written; the database user may or may not exist yet.
    Pending,
    Active,
    /// Replaced by its holder's handover: logins refused, idle sessions
    /// ended as they go idle, busy ones left to finish until `due_at` (the
    /// drain deadline), when the lease is revoked in full — by the drain
    /// task, or by the reaper should the broker have died meanwhile.
    Draining,
    /// Revocation failed repeatedly; retried on a slow schedule.
    Failing,
    Revoked,
}

impl LeaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Pending => "pending",
            LeaseState::Active => "active",
            LeaseState::Draining => "draining",
            LeaseState::Failing => "failing",
            LeaseState::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(LeaseState::Pending),
            "active" => Ok(LeaseState::Active),
            "draining" => Ok(LeaseState::Draining),
            "failing" => Ok(LeaseState::Failing),
            "revoked" => Ok(LeaseState::Revoked),
            other => Err(Error::invalid(format!("unknown lease state {other:?}"))),
        }
    }

    pub fn is_live(self) -> bool {
        self != LeaseState::Revoked
    }
}

/// Which database engine a lease's user lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Postgres,
    Mysql,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Postgres => "postgres",
            BackendKind::Mysql => "mysql",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "postgres" | "postgresql" => Ok(BackendKind::Postgres),
            "mysql" | "mariadb" => Ok(BackendKind::Mysql),
            other => Err(Error::config(format!(
                "unknown database kind {other:?} (expected \"postgres\" or \"mysql\")"
            ))),
        }
    }
}

/// One lease as the store keeps it. Holds everything revocation needs
/// (database, user name, user host), so a lease can be revoked even after its
/// role has been removed from the configuration. Never holds the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub role: String,
    pub database: String,
    pub kind: BackendKind,
    pub username: Username,
    /// MySQL account host part (`'%'`, `10.0.0.%`); empty for PostgreSQL.
    pub user_host: String,
    pub identity: String,
    pub state: LeaseState,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub max_expires_at: DateTime<Utc>,
    /// When the reaper should next look at this lease: the expiry for an
    /// active lease, the intent deadline for a pending one, the next retry
    /// for a failing revocation, "now" for a requested revocation.
    pub due_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoke_attempts: u32,
    /// The last revocation error, already free of secrets.
    pub last_error: Option<String>,
    /// The just-in-time access grant (`access`; its request id) the lease
    /// was issued under, if any: ending the grant revokes it.
    pub grant_id: Option<String>,
}

impl Lease {
    pub fn renewable(&self, now: DateTime<Utc>) -> bool {
        self.state == LeaseState::Active
            && self.expires_at > now
            && self.expires_at < self.max_expires_at
    }
}

/// Rounds a time to whole milliseconds: what the stores keep, so a lease read
/// back compares equal to the one written.
pub fn truncate_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_fit_every_engine_and_are_recognised() {
        for role in [
            "orders-readonly",
            "",
            "ÄÖÜ💥'; drop",
            "a_very_long_role_name_indeed",
        ] {
            let u = Username::generate("cb_", role);
            assert!(u.as_str().len() <= MAX_USERNAME_LEN, "{u}");
            assert!(Username::is_broker_made("cb_", u.as_str()), "{u}");
            assert!(u
                .as_str()
                .bytes()
                .all(|b| b == b'_' || NAME_ALPHABET.contains(&b)));
        }
        assert!(!Username::is_broker_made("cb_", "cb_app"));
        assert!(!Username::is_broker_made("cb_", "postgres"));
        assert!(!Username::is_broker_made("cb_", "cb_x_ABCDEFGHIJKLMNOP"));
    }

    #[test]
    fn lease_ids_round_trip_and_reject_other_text() {
        let id = LeaseId::generate();
        assert_eq!(LeaseId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "",
            "l_",
            "x'; drop table leases; --",
            &"l_".repeat(14),
            "L_AAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(LeaseId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_debug_is_redacted() {
        let p = Password::generate();
        assert_eq!(p.expose().len(), PASSWORD_LEN);
        assert!(!format!("{p:?}").contains(p.expose()));
    }
}
