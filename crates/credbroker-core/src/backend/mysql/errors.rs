//! Driver errors as the broker's: connection trouble is `Unavailable`,
//! naming the cause mysql_async hides behind "Input/output error"; a
//! refusal is `Internal` with the server's words, except a syntax error's,
//! which quotes the statement and with it a password hash.

use super::MysqlBackend;
use crate::error::Error;

/// MySQL error codes we act on.
pub(super) mod code {
    /// `ER_NO_SUCH_THREAD`: the session ended before we could kill it.
    pub const NO_SUCH_THREAD: u16 = 1094;
    /// `ER_EVENT_DOES_NOT_EXIST`: the failsafe already fired or was never made.
    pub const EVENT_DOES_NOT_EXIST: u16 = 1539;
    /// `ER_PARSE_ERROR`: its message quotes our statement, hash included.
    pub const PARSE_ERROR: u16 = 1064;
    /// `ER_CANNOT_USER_REFERENCED_AS_DEFINER` (MySQL 8.0.22+): `DROP USER`
    /// of an account that is still some object's DEFINER.
    pub const REFERENCED_AS_DEFINER: u16 = 4006;
    /// Server going away or refusing sessions: worth a retry, not a bug.
    pub const UNAVAILABLE: [u16; 6] = [1040, 1053, 1203, 1205, 1927, 3024];
}

impl MysqlBackend {
    /// Connection trouble as `Unavailable`, naming the database key, the
    /// admin's `user@host:port` and the cause found through `source()`
    /// (refused, timed out, TLS, authentication, or the server's words):
    /// mysql_async on its own prints "Input/output error: Input/output
    /// error". The text before the first ": " is all a caller sees.
    pub(super) fn unavailable<E: std::fmt::Display + 'static>(&self, e: &E) -> Error {
        Error::unavailable(self.unreachable(e))
    }

    /// [`Self::unavailable`] of a driver error, kept as the source:
    /// connection trouble quotes no statement.
    pub(super) fn unavailable_from(&self, e: mysql_async::Error) -> Error {
        Error::unavailable_from(self.unreachable(&e), e)
    }

    /// The message of [`Self::unavailable`].
    fn unreachable<E: std::fmt::Display + 'static>(&self, e: &E) -> String {
        let at = url::Url::parse(&self.config.admin_url)
            .map(|u| {
                format!(
                    "{}@{}:{}",
                    u.username(),
                    u.host_str().unwrap_or("localhost"),
                    u.port().unwrap_or(3306)
                )
            })
            .unwrap_or_else(|_| "?".to_string());
        let (kind, detail) = match (e as &dyn std::any::Any).downcast_ref::<mysql_async::Error>() {
            Some(err) => {
                let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
                let mut found = ("connection failed", err.to_string());
                while let Some(c) = cur {
                    if let Some(s) = c.downcast_ref::<mysql_async::ServerError>() {
                        // 1045 ER_ACCESS_DENIED_ERROR, 1044 ER_DBACCESS_DENIED_ERROR,
                        // 1698 ER_ACCESS_DENIED_NO_PASSWORD_ERROR.
                        let kind = if [1044, 1045, 1698].contains(&s.code) {
                            "authentication failed"
                        } else {
                            "refused by the server"
                        };
                        found = (
                            kind,
                            format!("{} (error {}, SQLSTATE {})", s.message, s.code, s.state),
                        );
                        break;
                    }
                    if let Some(io) = c.downcast_ref::<std::io::Error>() {
                        let kind = match io.kind() {
                            std::io::ErrorKind::ConnectionRefused => "connection refused",
                            std::io::ErrorKind::TimedOut => "connection timed out",
                            _ => "connection failed",
                        };
                        found = (kind, io.to_string());
                        break;
                    }
                    if c.to_string().starts_with("TLS error") {
                        found = ("TLS failed", c.to_string());
                    }
                    cur = c.source();
                }
                found
            }
            None => ("connection failed", e.to_string()),
        };
        format!(
            "database {:?} is unreachable: {kind} as {at}: {detail}",
            self.config.name
        )
    }

    /// Maps a driver error: connection trouble is `Unavailable`; a refusal
    /// is `Internal` with the server's message. A syntax error's message
    /// quotes the statement (and so a password hash): that one is withheld,
    /// and so is the driver's error — it is *not* kept as the source, whose
    /// text is that very message. Every other server error is kept: its
    /// text (code, SQLSTATE, message) is what our message already says.
    pub(super) fn db_error(&self, what: &str, e: mysql_async::Error) -> Error {
        let name = &self.config.name;
        match &e {
            mysql_async::Error::Server(s) if code::UNAVAILABLE.contains(&s.code) => {
                let m = format!(
                    "database {name:?} is unavailable: {what}: {} (error {})",
                    s.message, s.code
                );
                Error::unavailable_from(m, e)
            }
            mysql_async::Error::Server(s) if s.code == code::PARSE_ERROR => Error::internal(format!(
                "database {name:?}: {what}: syntax error ({}); the server's message is withheld because it quotes the statement",
                s.code
            )),
            mysql_async::Error::Server(s) => {
                let m = format!(
                    "database {name:?}: {what}: {} (error {}, SQLSTATE {})",
                    s.message, s.code, s.state
                );
                Error::internal_from(m, e)
            }
            mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => {
                let m = self.unreachable(&e).replacen(
                    " is unreachable: ",
                    &format!(" is unreachable: {what}: "),
                    1,
                );
                Error::unavailable_from(m, e)
            }
            // URL and other errors: the message has their text; nothing
            // more to keep.
            other => Error::internal(format!("database {name:?}: {what}: {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::code;
    use crate::error::Error;

    fn backend(port: u16) -> super::MysqlBackend {
        super::MysqlBackend::new(&crate::testkit::database_config(
            crate::lease::BackendKind::Mysql,
            format!("mysql://admin@127.0.0.1:{port}/"),
        ))
        .unwrap()
    }

    fn server(code: u16, message: &str) -> mysql_async::Error {
        mysql_async::Error::Server(mysql_async::ServerError {
            code,
            message: message.into(),
            state: "42000".into(),
        })
    }

    fn source(e: &Error) -> Option<&mysql_async::Error> {
        std::error::Error::source(e).and_then(|s| s.downcast_ref::<mysql_async::Error>())
    }

    #[test]
    fn a_syntax_error_keeps_neither_its_text_nor_its_source() {
        let b = backend(3306);
        let hash = "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19";
        let e = b.db_error(
            "create user",
            server(
                code::PARSE_ERROR,
                &format!("You have an error in your SQL syntax; near 'AS '{hash}'' at line 1"),
            ),
        );
        assert!(matches!(e, Error::Internal(_)), "{e}");
        assert!(std::error::Error::source(&e).is_none());
        for text in [
            e.to_string(),
            format!("{e:?}"),
            crate::error::chain(&e).to_string(),
        ] {
            assert!(!text.contains(hash), "{text}");
        }
    }

    #[test]
    fn server_errors_keep_their_source() {
        let b = backend(3306);
        let e = b.db_error("drop user", server(1396, "Operation DROP USER failed"));
        assert!(matches!(e, Error::Internal(_)), "{e}");
        assert!(matches!(source(&e), Some(mysql_async::Error::Server(s)) if s.code == 1396));
        let e = b.db_error("create user", server(1205, "Lock wait timeout exceeded"));
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(source(&e).is_some());
    }

    #[tokio::test]
    async fn a_refused_connection_keeps_its_source() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let b = backend(port);
        let e = b.conn().await.expect_err("refused");
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("connection refused"), "{e}");
        assert!(source(&e).is_some(), "{e:?}");
    }
}
