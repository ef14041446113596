//! Vault's response shapes: the envelope every answer comes in, the
//! `auth` object of a login, `{"errors": [...]}`, and **the one place** a
//! credbroker `Error` becomes a Vault status code.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::Serialize;

use crate::error::{Class, Error};

/// The envelope of every Vault response with a body. Fields Vault sends
/// as `null` are `None` here, never left out: some clients (vaultrs)
/// require every key.
#[derive(Serialize)]
pub struct Envelope<D: Serialize> {
    pub request_id: String,
    pub lease_id: String,
    pub renewable: bool,
    pub lease_duration: u64,
    pub data: Option<D>,
    /// Response wrapping is not served: always null.
    pub wrap_info: Option<()>,
    pub warnings: Option<Vec<String>>,
    pub auth: Option<Auth>,
}

impl<D: Serialize> Envelope<D> {
    /// An answer carrying `data` and no lease.
    pub fn data(data: D) -> Self {
        Envelope {
            request_id: request_id(),
            lease_id: String::new(),
            renewable: false,
            lease_duration: 0,
            data: Some(data),
            wrap_info: None,
            warnings: None,
            auth: None,
        }
    }
}

impl Envelope<()> {
    /// An answer about a lease (renew): no data.
    pub fn lease(lease_id: String, renewable: bool, ttl: u64, warnings: Vec<String>) -> Self {
        Envelope {
            request_id: request_id(),
            lease_id,
            renewable,
            lease_duration: ttl,
            data: None,
            wrap_info: None,
            warnings: (!warnings.is_empty()).then_some(warnings),
            auth: None,
        }
    }

    /// A login or token renewal: the `auth` object, no data.
    pub fn auth(auth: Auth, warnings: Vec<String>) -> Self {
        Envelope {
            request_id: request_id(),
            lease_id: String::new(),
            renewable: false,
            lease_duration: 0,
            data: None,
            wrap_info: None,
            warnings: (!warnings.is_empty()).then_some(warnings),
            auth: Some(auth),
        }
    }
}

impl<D: Serialize> IntoResponse for Envelope<D> {
    fn into_response(self) -> Response {
        json(StatusCode::OK, &self)
    }
}

/// Vault's `auth` object. `client_token` is the secret: it goes to the
/// caller in this body and nowhere else (not to logs, audit or store).
#[derive(Serialize)]
pub struct Auth {
    pub client_token: String,
    pub accessor: String,
    pub policies: Vec<String>,
    pub token_policies: Vec<String>,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub lease_duration: u64,
    pub renewable: bool,
    pub entity_id: String,
    pub token_type: &'static str,
    pub orphan: bool,
}

/// A Vault error answer: a status code and `{"errors": [...]}`.
#[derive(Debug)]
pub struct VaultError {
    pub status: StatusCode,
    pub message: String,
}

impl VaultError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        VaultError {
            status,
            message: message.into(),
        }
    }

    /// A path this listener does not serve.
    pub fn unsupported_path() -> Self {
        Self::new(StatusCode::NOT_FOUND, "unsupported path")
    }
}

/// The one mapping of credbroker's error classes to Vault's codes: the
/// class picks the status, [`Error::for_caller`] the text (the same every
/// door shows), written as [`Caller::line`](crate::error::Caller::line) — the class's words in front,
/// as Vault's clients print and match them (`permission denied: …`).
/// Vault answers 403 for every token or permission problem, so both
/// `Unauthenticated` and `PermissionDenied` are 403.
impl From<Error> for VaultError {
    fn from(err: Error) -> Self {
        let caller = err.for_caller();
        VaultError::new(status(caller.class), caller.line())
    }
}

/// Each class's HTTP status on the Vault API.
pub fn status(class: Class) -> StatusCode {
    match class {
        Class::InvalidArgument | Class::FailedPrecondition => StatusCode::BAD_REQUEST,
        Class::PermissionDenied | Class::Unauthenticated => StatusCode::FORBIDDEN,
        Class::NotFound => StatusCode::NOT_FOUND,
        Class::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Class::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Class::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for VaultError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Errors {
            errors: Vec<String>,
        }
        json(
            self.status,
            &Errors {
                errors: vec![self.message],
            },
        )
    }
}

pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => {
            tracing::error!(error = %crate::error::chain(&e), "cannot serialize a vault api response");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"errors":["internal error; see the broker's log"]}"#,
            )
                .into_response()
        }
    }
}

/// A random request id in UUID form, as Vault's are: clients log it, and
/// some parse it.
pub fn request_id() -> String {
    let b: [u8; 16] = rand::rng().random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Seconds as Go's `time.Duration` prints them (`1h0m0s`, `59m58s`,
/// `45s`): the form of Vault's warning texts, which clients match on.
pub fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Vault's warning when a requested TTL went past what the lease or token
/// may have, word for word.
pub fn capped_warning(requested: u64, granted: u64) -> String {
    format!(
        "TTL of \"{}\" exceeded the effective max_ttl of \"{}\"; TTL value is capped accordingly",
        go_duration(requested),
        go_duration(granted)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_go_does() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(45), "45s");
        assert_eq!(go_duration(3598), "59m58s");
        assert_eq!(go_duration(3600), "1h0m0s");
        assert_eq!(go_duration(7325), "2h2m5s");
        assert_eq!(
            capped_warning(7200, 3598),
            "TTL of \"2h0m0s\" exceeded the effective max_ttl of \"59m58s\"; TTL value is capped accordingly"
        );
    }

    #[test]
    fn each_error_kind_has_its_vault_code_and_internals_stay_inside() {
        let code = |e: Error| VaultError::from(e).status.as_u16();
        assert_eq!(code(Error::invalid("x")), 400);
        assert_eq!(code(Error::FailedPrecondition("x".into())), 400);
        assert_eq!(code(Error::denied("x")), 403);
        assert_eq!(code(Error::Unauthenticated("x".into())), 403);
        assert_eq!(code(Error::NotFound("x".into())), 404);
        assert_eq!(code(Error::ResourceExhausted("x".into())), 429);
        assert_eq!(code(Error::unavailable("x")), 503);
        assert_eq!(code(Error::internal("x")), 500);
        assert_eq!(code(Error::config("x")), 500);
        let e = VaultError::from(Error::internal("password=hunter2 at 10.0.0.1"));
        assert!(!e.message.contains("hunter2"), "{}", e.message);
        let e = VaultError::from(Error::unavailable(
            "database \"orders\" is unreachable: auth failed as admin@10.0.0.1",
        ));
        assert!(
            e.message.contains("\"orders\"") && !e.message.contains("10.0.0.1"),
            "{}",
            e.message
        );
        let e = VaultError::from(Error::denied("identity may not lease role \"x\""));
        assert!(e.message.starts_with("permission denied"), "{}", e.message);
    }

    /// The Vault API agrees with the rule on every class: the status is the
    /// class's, the text the caller line.
    #[test]
    fn every_class_maps_by_the_rule() {
        for e in crate::error::samples() {
            let caller = e.for_caller();
            let v = VaultError::from(e.clone());
            assert_eq!(v.status, status(caller.class), "{e}");
            assert_eq!(v.message, caller.line(), "{e}");
            assert!(v.message.ends_with(&caller.message), "{e}");
            assert!(!v.message.contains("SOURCE-TEXT"), "{e}");
        }
    }

    #[test]
    fn request_ids_look_like_uuids() {
        let id = request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert_ne!(id, request_id());
    }
}
