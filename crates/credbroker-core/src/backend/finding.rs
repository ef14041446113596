//! One line of `credbroker check`'s report. It lives in `backend`, below
//! [`crate::check`], because the backends write findings (`postgres::check`,
//! `mysql::check`) and `check` gathers them into its report: `backend` must
//! not import `check` (ARCHITECTURE.md, "Architecture invariant: layers").
//! `check` re-exports both types, so `check::Finding` still names them.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One line of the report. Never holds a secret: messages come from
/// certificates, catalogs and server errors about the admin role.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    /// What was checked: `tls.cert`, `database orders`, `role orders-ro`…
    pub scope: String,
    pub message: String,
    /// What to do about it (warnings and errors).
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(scope: &str, message: impl Into<String>) -> Self {
        Finding {
            level: Level::Ok,
            scope: scope.to_string(),
            message: message.into(),
            fix: None,
        }
    }
    pub fn warning(scope: &str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            level: Level::Warning,
            scope: scope.to_string(),
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
    pub fn error(scope: &str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            level: Level::Error,
            scope: scope.to_string(),
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What a database's check returns when it cannot go on: the findings so
/// far and `error`, and no list of the broker's users (so `check` names
/// none as orphans).
pub fn stopped(mut found: Vec<Finding>, error: Finding) -> (Vec<Finding>, Option<Vec<String>>) {
    found.push(error);
    (found, None)
}

/// A database's `admin_url` that does not parse, or names TLS parameters
/// the broker cannot use.
pub fn bad_admin_url(scope: &str, e: impl std::fmt::Display) -> Finding {
    Finding::error(scope, format!("admin_url: {e}"), "fix admin_url")
}

/// The admin password the config names (none: the URL's own, or no
/// password), or the error that says how to provide it.
pub fn admin_password(
    db: &crate::config::DatabaseConfig,
    scope: &str,
) -> Result<Option<crate::lease::Password>, Finding> {
    super::read_admin_password(db).map_err(|e| {
        Finding::error(
            scope,
            e.to_string(),
            "create the password file (mode 0600) or set the variable the config names",
        )
    })
}
