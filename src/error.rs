//! The one error type of the library. Every message here may reach a caller
//! or a log, so none may carry a secret: passwords never enter an `Error`.
//!
//! Nine classes, by what the caller can do about it; `server::status` maps
//! each to one gRPC code (and `vault_api::envelope` to one HTTP status). The
//! classes that wrap lower-layer failures — `Unavailable`, `Internal`,
//! `Config` — hold a [`Detail`]: the message (what `Display` prints, exactly
//! as before) plus, where it is safe, the driver's error as the *source*
//! (`std::error::Error::source()` on the `Error`), shared through an `Arc`
//! so that `Error: Clone` (revocation hands one error to many leases)
//! copies nothing and loses nothing.
//!
//! What a source may be: only an error whose `Display` and `Debug` hold no
//! secret. The drivers' errors do not quote our parameters, but MySQL's
//! syntax error quotes the statement, and a statement can hold a password
//! hash or a SCRAM verifier: the boundaries that send such statements keep
//! only their sanitised message for those (`backend::mysql::errors`,
//! `backend::postgres::db_error`). `Detail`'s `Debug` prints the message
//! and only the *type* of its source, never the source's text.
//!
//! Logs read the whole chain through [`chain`]; callers never see a source
//! (`server::status` sends an `Internal`'s generic text and an
//! `Unavailable`'s message up to its first ": ").

use std::fmt;
use std::sync::Arc;

/// A source error, shared so that `Error` stays `Clone`.
pub type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The payload of the classes that wrap lower-layer failures: the message,
/// and the error that caused it when it is safe to keep.
#[derive(Clone)]
pub struct Detail {
    message: String,
    source: Option<Source>,
    /// The source's type, for `Debug` (which must not print its text).
    source_type: &'static str,
}

impl Detail {
    pub fn new(message: impl fmt::Display) -> Self {
        Detail {
            message: message.to_string(),
            source: None,
            source_type: "",
        }
    }

    /// A message caused by `source`. Only for sources whose text holds no
    /// secret (see the module doc).
    pub fn with_source<E>(message: impl fmt::Display, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Detail {
            message: message.to_string(),
            source: Some(Arc::new(source)),
            source_type: std::any::type_name::<E>(),
        }
    }

    /// A message caused by a source shared with other errors (one failed
    /// commit answering every writer of its batch). `source()` downcasts to
    /// `E`, not to the `Arc`.
    pub fn with_shared_source<E>(message: impl fmt::Display, source: Arc<E>) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Detail {
            message: message.to_string(),
            source: Some(source),
            source_type: std::any::type_name::<E>(),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }

    /// The same cause under another message (a caller adding where it
    /// happened, `format!("static role {r:?}: {m}")`).
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        Detail {
            message: f(self.message),
            ..self
        }
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The message as `String`'s `Debug` prints it, then the source's type —
/// never its text, which `Display` does not print either.
impl fmt::Debug for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.message, f)?;
        if self.source.is_some() {
            write!(f, " (source: {})", self.source_type)?;
        }
        Ok(())
    }
}

/// Reads as the message, so `m.contains(..)`, `m.starts_with(..)` work on
/// a matched payload as they did on the `String`.
impl std::ops::Deref for Detail {
    type Target = str;
    fn deref(&self) -> &str {
        &self.message
    }
}

impl From<String> for Detail {
    fn from(message: String) -> Self {
        Detail::new(message)
    }
}

impl From<&str> for Detail {
    fn from(message: &str) -> Self {
        Detail::new(message)
    }
}

/// What went wrong, classified by what the caller can do about it. The gRPC
/// layer maps each variant to one status code in one place
/// (`server::status`), so internals never decide what a caller sees.
#[derive(Debug, Clone)]
pub enum Error {
    /// The request itself is malformed: fix it and retry.
    InvalidArgument(String),
    /// The caller is known but not allowed to do this.
    PermissionDenied(String),
    /// No peer certificate, or one we cannot read an identity from.
    Unauthenticated(String),
    NotFound(String),
    /// The lease is in a state that does not allow this (e.g. renewing an
    /// expired lease).
    FailedPrecondition(String),
    /// A per-identity cap or rate limit was hit.
    ResourceExhausted(String),
    /// A database or the lease store cannot be reached: retry later.
    Unavailable(Detail),
    /// A bug or an unexpected database answer. The detail is logged; the
    /// caller sees a generic message.
    Internal(Detail),
    /// The configuration is invalid (exit code 64 at start-up).
    Config(Detail),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::PermissionDenied(m) => write!(f, "permission denied: {m}"),
            Error::Unauthenticated(m) => write!(f, "unauthenticated: {m}"),
            Error::NotFound(m) => write!(f, "not found: {m}"),
            Error::FailedPrecondition(m) => write!(f, "failed precondition: {m}"),
            Error::ResourceExhausted(m) => write!(f, "resource exhausted: {m}"),
            Error::Unavailable(d) => write!(f, "unavailable: {d}"),
            Error::Internal(d) => write!(f, "internal error: {d}"),
            Error::Config(d) => write!(f, "config: {d}"),
        }
    }
}

/// `source()` is the kept driver error itself (not the `Detail`), so
/// `e.source()?.downcast_ref::<tokio_postgres::Error>()` works.
impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.detail().and_then(Detail::source)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    pub fn denied(msg: impl Into<String>) -> Self {
        Error::PermissionDenied(msg.into())
    }
    pub fn internal(msg: impl fmt::Display) -> Self {
        Error::Internal(Detail::new(msg))
    }
    pub fn unavailable(msg: impl fmt::Display) -> Self {
        Error::Unavailable(Detail::new(msg))
    }
    pub fn config(msg: impl fmt::Display) -> Self {
        Error::Config(Detail::new(msg))
    }
    /// `Internal` caused by `source` (whose text must hold no secret).
    pub fn internal_from<E>(msg: impl fmt::Display, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error::Internal(Detail::with_source(msg, source))
    }
    /// `Unavailable` caused by `source` (whose text must hold no secret).
    pub fn unavailable_from<E>(msg: impl fmt::Display, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error::Unavailable(Detail::with_source(msg, source))
    }
    /// `Config` caused by `source` (whose text must hold no secret).
    pub fn config_from<E>(msg: impl fmt::Display, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error::Config(Detail::with_source(msg, source))
    }

    /// The payload of a class that can carry a source.
    pub fn detail(&self) -> Option<&Detail> {
        match self {
            Error::Unavailable(d) | Error::Internal(d) | Error::Config(d) => Some(d),
            _ => None,
        }
    }

    /// A short machine-readable label, used in audit records and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::PermissionDenied(_) => "permission_denied",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::NotFound(_) => "not_found",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::ResourceExhausted(_) => "resource_exhausted",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
            Error::Config(_) => "config",
        }
    }
}

/// An error and its sources for a log line: `Display` joins them with
/// ": ", skipping a source whose text is already in what came before (the
/// drivers' errors often repeat their cause), so the line says why once.
pub struct Chain<'a> {
    head: String,
    first: Option<&'a (dyn std::error::Error + 'static)>,
}

/// `e` and its sources, for `tracing::warn!(error = %chain(&e), ..)`.
pub fn chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> Chain<'a> {
    Chain {
        head: e.to_string(),
        first: e.source(),
    }
}

impl Detail {
    /// The message and its sources, without the class's name in front:
    /// what `server::status` logs for an `Unavailable` or `Internal`.
    pub fn chain(&self) -> Chain<'_> {
        Chain {
            head: self.message.clone(),
            first: self.source(),
        }
    }
}

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut seen = self.head.clone();
        let mut cur = self.first;
        // Bounded: a source chain is short, but a cycle must not hang a log.
        for _ in 0..16 {
            let Some(s) = cur else { break };
            let text = s.to_string();
            if !text.is_empty() && !seen.contains(&text) {
                seen.push_str(": ");
                seen.push_str(&text);
            }
            cur = s.source();
        }
        f.write_str(&seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Leaf(&'static str, Option<Box<Leaf>>);
    impl fmt::Display for Leaf {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Leaf {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn display_is_unchanged_and_source_is_kept() {
        let e = Error::unavailable_from(
            "lease store unreachable: x",
            Leaf("connection refused", None),
        );
        assert_eq!(e.to_string(), "unavailable: lease store unreachable: x");
        let src = std::error::Error::source(&e).expect("source");
        assert!(src.downcast_ref::<Leaf>().is_some());
        assert_eq!(Error::internal("boom").to_string(), "internal error: boom");
        assert_eq!(Error::config("bad").to_string(), "config: bad");
        assert!(std::error::Error::source(&Error::internal("boom")).is_none());
        // Clone shares the source instead of flattening it.
        let c = e.clone();
        assert!(std::error::Error::source(&c).is_some());
        assert!(matches!(c, Error::Unavailable(ref m) if m.contains("unreachable")));
    }

    #[test]
    fn debug_names_the_source_type_not_its_text() {
        let e = Error::internal_from("lease store: insert", Leaf("SECRET-TEXT", None));
        let d = format!("{e:?}");
        assert!(d.contains("lease store: insert"), "{d}");
        assert!(d.contains("Leaf"), "{d}");
        assert!(!d.contains("SECRET-TEXT"), "{d}");
        assert_eq!(format!("{:?}", Error::internal("x")), "Internal(\"x\")");
    }

    #[test]
    fn chain_joins_sources_once() {
        let e = Error::unavailable_from(
            "store: error connecting to server",
            Leaf(
                "error connecting to server",
                Some(Box::new(Leaf("Connection refused (os error 111)", None))),
            ),
        );
        assert_eq!(
            chain(&e).to_string(),
            "unavailable: store: error connecting to server: Connection refused (os error 111)"
        );
        assert_eq!(
            chain(&Error::internal("x")).to_string(),
            "internal error: x"
        );
    }

    #[test]
    fn map_message_keeps_the_source() {
        let Error::Internal(d) = Error::internal_from("m", Leaf("why", None)) else {
            unreachable!()
        };
        let d = d.map_message(|m| format!("static role \"r\": {m}"));
        assert_eq!(d.message(), "static role \"r\": m");
        assert!(d.source().is_some());
    }
}
