//! The one error type of the library, and **the one rule for what a caller
//! may see** of it. Every message here may reach a caller or a log, so none
//! may carry a secret: passwords never enter an `Error`.
//!
//! Nine classes, by what the caller can do about it. The classes that wrap
//! lower-layer failures — `Unavailable`, `Internal`, `Config` — hold a
//! [`Detail`]: the message (what `Display` prints, exactly as before) plus,
//! where it is safe, the driver's error as the *source*
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
//! ## What a caller sees
//!
//! Every door — gRPC (`server::status`), the Vault API
//! (`vault_api::envelope`), the console (`console::page`), and a bulk
//! revocation's per-lease failures — asks [`Error::for_caller`] and maps
//! only the [`Class`] to its own code; the text is the same everywhere:
//!
//! | error | class | caller text |
//! |---|---|---|
//! | the six request classes | the same | their message, no class prefix |
//! | `Unavailable` | Unavailable | the message up to its first ": " (`database "orders" is unreachable (details in the broker's log)`) |
//! | `Internal` | Internal | `internal error; see the broker's log` |
//! | `Config` | Internal | `internal error; see the broker's log` |
//!
//! `Config` reaching a caller is a *broker* problem — a backend the
//! operator set up wrong, a stored lock this build cannot read — never
//! the request's: the caller cannot fix it, and its text names files, URLs
//! and hosts. So it is an internal error to every caller (it was on gRPC
//! and the Vault API; the console answered 400 with the full text). At
//! start-up it stays `Config` (exit code 64, `cli`).
//!
//! Where the door's code is not words (an HTTP body, a revoke failure's
//! text) the door shows [`Caller::line`]: the class's words in front of
//! the same text (`permission denied: identity may not lease role "x"`),
//! which is what Vault's clients and the CLI print.
//!
//! Logs read the whole chain through [`chain`]; `for_caller` logs it
//! whenever it withholds something (an `Unavailable`'s tail, an
//! `Internal`'s or `Config`'s text), and callers never see a source.

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

/// What went wrong, classified by what the caller can do about it. What a
/// caller sees of it is decided here too ([`Error::for_caller`]); each door
/// only maps its [`Class`] to a code, so internals never decide it.
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
        // The class's words, as a caller line writes them (`Class::words`),
        // then the whole message; `Config` keeps its own name in a log.
        let words = match self {
            Error::Config(_) => "config",
            other => other.class().words(),
        };
        write!(f, "{words}: {}", self.message())
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
    /// The whole message, whatever the class: what `Display` prints after
    /// the class's words (a caller sees it only as `caller_message` says).
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidArgument(m)
            | Error::PermissionDenied(m)
            | Error::Unauthenticated(m)
            | Error::NotFound(m)
            | Error::FailedPrecondition(m)
            | Error::ResourceExhausted(m) => m,
            Error::Unavailable(d) | Error::Internal(d) | Error::Config(d) => d,
        }
    }

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

/// An error's class as every caller sees it: what each door maps to its
/// own code (gRPC code, HTTP status, console status). `Config` is
/// `Internal` here (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    NotFound,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Internal,
}

impl Class {
    /// Every class, for the doors' tests.
    pub const ALL: [Class; 8] = [
        Class::InvalidArgument,
        Class::PermissionDenied,
        Class::Unauthenticated,
        Class::NotFound,
        Class::FailedPrecondition,
        Class::ResourceExhausted,
        Class::Unavailable,
        Class::Internal,
    ];

    /// The class in words, as `Display` and [`Caller::line`] write it.
    pub fn words(self) -> &'static str {
        match self {
            Class::InvalidArgument => "invalid argument",
            Class::PermissionDenied => "permission denied",
            Class::Unauthenticated => "unauthenticated",
            Class::NotFound => "not found",
            Class::FailedPrecondition => "failed precondition",
            Class::ResourceExhausted => "resource exhausted",
            Class::Unavailable => "unavailable",
            Class::Internal => "internal error",
        }
    }
}

/// What a caller may see of an error: its class and one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub class: Class,
    pub message: String,
}

impl Caller {
    /// The text with the class's words in front, for a door whose code is
    /// not words: `permission denied: identity may not lease role "x"`.
    /// An internal error's text names its class already.
    pub fn line(&self) -> String {
        match self.class {
            Class::Internal => self.message.clone(),
            c => format!("{}: {}", c.words(), self.message),
        }
    }
}

/// An internal error's (and a `Config` error's) text for a caller.
pub const INTERNAL_CALLER_TEXT: &str = "internal error; see the broker's log";

/// What a caller learns of an `Unavailable`: the text before the first
/// ": " (`database "orders" is unreachable`), which names the database
/// but not its address, user or the server's words — those go to the log
/// (and to `credbroker check`), where the operator reads them.
fn unavailable_summary(m: &str) -> String {
    match m.split_once(": ") {
        Some((head, _)) => format!("{head} (details in the broker's log)"),
        None => m.to_string(),
    }
}

impl Error {
    /// The class a caller sees (`Config` is `Internal`).
    pub fn class(&self) -> Class {
        match self {
            Error::InvalidArgument(_) => Class::InvalidArgument,
            Error::PermissionDenied(_) => Class::PermissionDenied,
            Error::Unauthenticated(_) => Class::Unauthenticated,
            Error::NotFound(_) => Class::NotFound,
            Error::FailedPrecondition(_) => Class::FailedPrecondition,
            Error::ResourceExhausted(_) => Class::ResourceExhausted,
            Error::Unavailable(_) => Class::Unavailable,
            Error::Internal(_) | Error::Config(_) => Class::Internal,
        }
    }

    /// The text a caller may see, without the class (see the module doc's
    /// table). Pure: it logs nothing; a door uses [`Error::for_caller`].
    pub fn caller_message(&self) -> String {
        match self {
            Error::Unavailable(d) => unavailable_summary(d),
            Error::Internal(_) | Error::Config(_) => INTERNAL_CALLER_TEXT.to_string(),
            plain => plain.message().to_string(),
        }
    }

    /// The class and the caller text together; logs nothing (a bulk
    /// revocation's failures are logged where they happen).
    pub fn caller(&self) -> Caller {
        Caller {
            class: self.class(),
            message: self.caller_message(),
        }
    }

    /// What a caller may see, for a door to answer with. What the caller
    /// does not see — an `Unavailable`'s detail, an `Internal`'s or
    /// `Config`'s text, any source — is logged here with its whole chain.
    pub fn for_caller(&self) -> Caller {
        match self {
            Error::Unavailable(d) => tracing::warn!(error = %d.chain(), "unavailable"),
            Error::Internal(d) | Error::Config(d) => {
                tracing::error!(class = self.kind(), error = %d.chain(), "internal error")
            }
            _ => {}
        }
        self.caller()
    }
}

/// One error of every variant, holding a source and text a caller must not
/// see, for the doors' tests: each asserts its mapping agrees with
/// [`Error::for_caller`] on every one of these.
#[cfg(test)]
pub(crate) fn samples() -> Vec<Error> {
    #[derive(Debug)]
    struct Hidden;
    impl fmt::Display for Hidden {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("SOURCE-TEXT at 10.0.0.1:5432")
        }
    }
    impl std::error::Error for Hidden {}
    vec![
        Error::invalid("lease_id is required"),
        Error::denied("identity may not lease role \"x\""),
        Error::Unauthenticated("no client certificate".into()),
        Error::NotFound("no lease lease-1".into()),
        Error::FailedPrecondition("lease lease-1 has expired".into()),
        Error::ResourceExhausted("identity has 25 live leases".into()),
        Error::unavailable_from(
            "database \"orders\" is unreachable: auth failed as admin@10.0.0.1",
            Hidden,
        ),
        Error::unavailable("lease store is busy"),
        Error::internal_from("lease store: insert at 10.0.0.1", Hidden),
        Error::config_from("databases.orders: TLS to 10.0.0.1 failed", Hidden),
    ]
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
    /// what [`Error::for_caller`] logs for an `Unavailable` or `Internal`.
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

    /// The rule, one row per sample: class, caller text, caller line. No
    /// caller text holds a source's text or what follows an
    /// `Unavailable`'s first ": ".
    #[test]
    fn every_class_has_one_caller_text() {
        let internal = INTERNAL_CALLER_TEXT;
        let table: [(Class, &str, &str); 10] = [
            (
                Class::InvalidArgument,
                "lease_id is required",
                "invalid argument: lease_id is required",
            ),
            (
                Class::PermissionDenied,
                "identity may not lease role \"x\"",
                "permission denied: identity may not lease role \"x\"",
            ),
            (
                Class::Unauthenticated,
                "no client certificate",
                "unauthenticated: no client certificate",
            ),
            (
                Class::NotFound,
                "no lease lease-1",
                "not found: no lease lease-1",
            ),
            (
                Class::FailedPrecondition,
                "lease lease-1 has expired",
                "failed precondition: lease lease-1 has expired",
            ),
            (
                Class::ResourceExhausted,
                "identity has 25 live leases",
                "resource exhausted: identity has 25 live leases",
            ),
            (
                Class::Unavailable,
                "database \"orders\" is unreachable (details in the broker's log)",
                "unavailable: database \"orders\" is unreachable (details in the broker's log)",
            ),
            (
                Class::Unavailable,
                "lease store is busy",
                "unavailable: lease store is busy",
            ),
            (Class::Internal, internal, internal),
            // Config is internal to a caller (see the module doc).
            (Class::Internal, internal, internal),
        ];
        let samples = samples();
        assert_eq!(samples.len(), table.len());
        for (e, (class, message, line)) in samples.iter().zip(table) {
            let c = e.for_caller();
            assert_eq!(c.class, class, "{e}");
            assert_eq!(e.class(), class, "{e}");
            assert_eq!(c.message, message, "{e}");
            assert_eq!(e.caller_message(), message, "{e}");
            assert_eq!(c.line(), line, "{e}");
            assert!(!c.message.contains("SOURCE-TEXT") && !c.message.contains("10.0.0.1"));
            // A request class hides nothing: its line is its `Display`.
            if !matches!(class, Class::Unavailable | Class::Internal) {
                assert_eq!(e.to_string(), line);
            }
        }
        for class in Class::ALL {
            assert!(samples.iter().any(|e| e.class() == class), "{class:?}");
        }
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
