//! Quoting, in one place, for the invariant that only broker-made names
//! and operator config reach SQL, always quoted.

use crate::backend::UserRef;

/// A single-quoted string literal. Backslashes are doubled for the default
/// SQL mode; every value we quote is a broker-made name, a validated host
/// pattern, a hash or a schema name read from the server, none with a
/// backslash (`definer::scope_of` checks the schema names), so
/// `NO_BACKSLASH_ESCAPES` cannot change its meaning.
pub(super) fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A back-quoted identifier.
pub(super) fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// Broker-made names as a quoted, comma-separated list.
pub(super) fn lits(names: &[&str]) -> String {
    names.iter().map(|n| lit(n)).collect::<Vec<_>>().join(", ")
}

/// `'user'@'host'`: what `{{name}}` becomes in a grant.
pub fn account(username: &str, host: &str) -> String {
    format!("{}@{}", lit(username), lit(host))
}

pub(super) fn host_of(user: &UserRef) -> &str {
    if user.host.is_empty() {
        "%"
    } else {
        &user.host
    }
}
