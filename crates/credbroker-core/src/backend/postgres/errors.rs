//! Driver errors as the broker's `Error`, and the cause of a failed
//! connection in the words an operator acts on.

use super::PostgresBackend;
use crate::error::Error;

impl PostgresBackend {
    /// Connection trouble as `Unavailable`, with its cause found by
    /// walking the error's `source()` chain: deadpool and tokio-postgres
    /// print only "db error" or "error connecting to server" on top. The
    /// text before the first ": " is what a caller sees (`server::status`);
    /// the rest, for the log and `check`, says where and why.
    /// The driver's (or the pool's) error is kept as the source: failing
    /// to connect quotes no statement.
    pub(super) fn unavailable<E>(&self, e: E) -> Error
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        self.unreachable("", e)
    }

    /// `unavailable`'s error, with `during` (`"what: "`, or nothing) before
    /// the cause.
    fn unreachable<E>(&self, during: &str, e: E) -> Error
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let cause = Cause::of(&e);
        let m = format!(
            "database {:?} is unreachable: {during}{} as {}: {}",
            self.config.name,
            cause.kind.as_str(),
            self.admin_location(),
            cause.detail
        );
        Error::unavailable_from(m, e)
    }

    /// Maps a driver error: connection trouble is `Unavailable` (retry),
    /// a database refusal is `Internal` with the server's message and
    /// SQLSTATE, which never hold our password (we never send one).
    ///
    /// The driver's error is kept as the source (its text adds the
    /// server's DETAIL and HINT), except for a syntax error (42601): our
    /// statements can hold a SCRAM verifier (`CREATE ROLE … PASSWORD`,
    /// `ALTER ROLE … PASSWORD`), and a syntax error's DETAIL/position may
    /// quote the statement around it — so that source is dropped and only
    /// the message below is kept.
    pub(super) fn db_error(&self, what: &str, e: tokio_postgres::Error) -> Error {
        match e.as_db_error() {
            Some(db) if db.code() == &tokio_postgres::error::SqlState::QUERY_CANCELED => {
                let m = format!(
                    "database {:?}: {what} timed out: {} (SQLSTATE {}) at {}",
                    self.config.name,
                    db.message(),
                    db.code().code(),
                    self.admin_location()
                );
                Error::unavailable_from(m, e)
            }
            Some(db) => {
                let m = format!(
                    "database {:?}: {what}: {} (SQLSTATE {}) as {}",
                    self.config.name,
                    db.message(),
                    db.code().code(),
                    self.admin_location()
                );
                if may_quote_statement(db.code()) {
                    Error::internal(m)
                } else {
                    Error::internal_from(m, e)
                }
            }
            None => self.unreachable(&format!("{what}: "), e),
        }
    }
}

/// Whether `e` is PostgreSQL's "tuple concurrently updated": a statement
/// lost a race on a shared catalog row and was rolled back whole.
pub fn lost_catalog_race(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::INTERNAL_ERROR
            && db.message() == "tuple concurrently updated"
    })
}

/// Whether a server error's text (DETAIL, position) may quote the statement
/// around it — and with it a SCRAM verifier: such an error is not kept as
/// a source (`PostgresBackend::db_error`).
fn may_quote_statement(code: &tokio_postgres::error::SqlState) -> bool {
    code == &tokio_postgres::error::SqlState::SYNTAX_ERROR
}

/// Why a connection failed, in the words an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CauseKind {
    Refused,
    TimedOut,
    Authentication,
    Tls,
    /// The server answered with an error that is not about logging in
    /// (no such database, too many connections, shutting down…).
    Server,
    Other,
}

impl CauseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CauseKind::Refused => "connection refused",
            CauseKind::TimedOut => "connection timed out",
            CauseKind::Authentication => "authentication failed",
            CauseKind::Tls => "TLS failed",
            CauseKind::Server => "refused by the server",
            CauseKind::Other => "connection failed",
        }
    }
}

/// The deepest cause of a driver error, found through `source()`.
#[derive(Debug, Clone)]
pub struct Cause {
    pub kind: CauseKind,
    /// The server's own message and SQLSTATE, or the OS error.
    pub detail: String,
    pub sqlstate: Option<String>,
}

impl Cause {
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Cause {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        let mut last = e.to_string();
        while let Some(err) = cur {
            if let Some(db) = err.downcast_ref::<tokio_postgres::error::DbError>() {
                let code = db.code().code();
                // Class 28: invalid authorization (wrong password, no
                // pg_hba.conf entry, role cannot log in).
                let kind = if code.starts_with("28") {
                    CauseKind::Authentication
                } else {
                    CauseKind::Server
                };
                return Cause {
                    kind,
                    detail: format!("{} (SQLSTATE {code})", db.message()),
                    sqlstate: Some(code.to_string()),
                };
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                let kind = match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => CauseKind::Refused,
                    std::io::ErrorKind::TimedOut => CauseKind::TimedOut,
                    _ => CauseKind::Other,
                };
                return Cause {
                    kind,
                    detail: io.to_string(),
                    sqlstate: None,
                };
            }
            if let Some(deadpool_postgres::PoolError::Timeout(t)) =
                err.downcast_ref::<deadpool_postgres::PoolError>()
            {
                return Cause {
                    kind: CauseKind::TimedOut,
                    detail: format!("no connection within the timeout ({t:?})"),
                    sqlstate: None,
                };
            }
            last = err.to_string();
            cur = err.source();
        }
        let kind = if last.contains("TLS") || last.contains("tls") || last.contains("certificate") {
            CauseKind::Tls
        } else if last.contains("timeout") || last.contains("timed out") {
            CauseKind::TimedOut
        } else {
            CauseKind::Other
        };
        Cause {
            kind,
            detail: last,
            sqlstate: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::error::Error;

    fn refused_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn backend(port: u16) -> super::PostgresBackend {
        super::PostgresBackend::new(&crate::testkit::database_config(
            crate::lease::BackendKind::Postgres,
            format!("postgres://admin@127.0.0.1:{port}/orders"),
        ))
        .unwrap()
    }

    /// Both boundaries of the backend keep the driver's error: the pool's
    /// (`client`) and tokio-postgres's (`db_error` without a server answer).
    #[tokio::test]
    async fn connection_errors_keep_their_source() {
        let port = refused_port();
        let b = backend(port);
        let e = b.client().await.expect_err("refused");
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("connection refused"), "{e}");
        let src = std::error::Error::source(&e).expect("source");
        assert!(
            src.downcast_ref::<deadpool_postgres::PoolError>().is_some(),
            "{src:?}"
        );

        let pg = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=a connect_timeout=2"),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("refused");
        let e = b.db_error("create role", pg);
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        let src = std::error::Error::source(&e).expect("source");
        assert!(src.downcast_ref::<tokio_postgres::Error>().is_some());
        // The log line says why, once.
        let line = crate::error::chain(&e).to_string();
        assert_eq!(line.matches("Connection refused").count(), 1, "{line}");
    }

    #[test]
    fn a_syntax_error_is_not_kept_as_a_source() {
        use tokio_postgres::error::SqlState;
        assert!(super::may_quote_statement(&SqlState::SYNTAX_ERROR));
        assert!(!super::may_quote_statement(&SqlState::DUPLICATE_OBJECT));
        assert!(!super::may_quote_statement(
            &SqlState::INSUFFICIENT_PRIVILEGE
        ));
    }
}
