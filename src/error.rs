//! The one error type of the library. Every message here may reach a caller
//! or a log, so none may carry a secret: passwords never enter an `Error`.

/// What went wrong, classified by what the caller can do about it. The gRPC
/// layer maps each variant to one status code in one place
/// (`server::status`), so internals never decide what a caller sees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed: fix it and retry.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The caller is known but not allowed to do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No peer certificate, or one we cannot read an identity from.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The lease is in a state that does not allow this (e.g. renewing an
    /// expired lease).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A per-identity cap or rate limit was hit.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// A database or the lease store cannot be reached: retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected database answer. The detail is logged; the
    /// caller sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
    /// The configuration is invalid (exit code 64 at start-up).
    #[error("config: {0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    pub fn denied(msg: impl Into<String>) -> Self {
        Error::PermissionDenied(msg.into())
    }
    pub fn internal(msg: impl std::fmt::Display) -> Self {
        Error::Internal(msg.to_string())
    }
    pub fn unavailable(msg: impl std::fmt::Display) -> Self {
        Error::Unavailable(msg.to_string())
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
