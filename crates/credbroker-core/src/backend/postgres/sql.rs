//! Statement pieces several concerns share: the ACL lock, `VALID UNTIL`
//! literals, NOLOGIN, ending sessions by role name, quoted name lists.

use chrono::{DateTime, Utc};
use postgres_protocol::escape::{escape_identifier, escape_literal};

/// Serializes the broker's privilege changes within one database, across
/// all replicas: PostgreSQL updates an object's ACL in place without a row
/// lock, so two concurrent `GRANT`s on the same table (or a grant racing a
/// `DROP OWNED`) fail with "tuple concurrently updated". A transaction-scoped
/// advisory lock is released at commit or rollback, so it cannot leak.
pub(super) const ACL_LOCK: &str = "SELECT pg_advisory_xact_lock(27950820906314347)";

/// Whether a grant statement may rewrite an object's ACL: anything but a
/// plain role membership (`GRANT role[, …] TO …`, no `ON`).
pub(super) fn rewrites_an_acl(grant: &str) -> bool {
    let words: Vec<String> = grant
        .split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect();
    words.first().map(String::as_str) != Some("GRANT") || words.iter().any(|w| w == "ON")
}

/// `VALID UNTIL` literal: an explicit UTC timestamp, so the server's
/// `timezone` setting cannot shift a credential's expiry.
pub(super) fn pg_timestamp(t: DateTime<Utc>) -> String {
    escape_literal(&t.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string())
}

/// `ALTER ROLE … NOLOGIN` for each role, sent as one batch.
pub(super) fn nologin_sql<S: AsRef<str>>(names: &[S]) -> String {
    names
        .iter()
        .map(|u| format!("ALTER ROLE {} NOLOGIN;", escape_identifier(u.as_ref())))
        .collect()
}

/// Ends every session of the named roles (the careful paths; the fast one
/// looks roles up by name first, see `revoke_fast`).
pub(super) const TERMINATE_BY_NAME: &str =
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1)";

pub(super) fn idents(users: &[&str]) -> String {
    users
        .iter()
        .map(|u| escape_identifier(u))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::rewrites_an_acl;

    #[test]
    fn only_object_privileges_take_the_acl_lock() {
        assert!(rewrites_an_acl("GRANT SELECT ON orders TO {{name}}"));
        assert!(rewrites_an_acl("grant usage\non schema app to {{name}}"));
        assert!(rewrites_an_acl("ALTER ROLE {{name}} SET search_path = app"));
        assert!(!rewrites_an_acl("GRANT app_reader TO {{name}}"));
        assert!(!rewrites_an_acl("grant a, b to {{name}}"));
    }
}
