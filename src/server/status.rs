//! The one place where a library `Error` becomes a gRPC `Status`.
//! Internal details are logged here and replaced by a generic message.

use tonic::{Code, Status};

use crate::error::Error;

pub fn to_status(err: Error) -> Status {
    match err {
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        Error::PermissionDenied(m) => Status::permission_denied(m),
        Error::Unauthenticated(m) => Status::unauthenticated(m),
        Error::NotFound(m) => Status::not_found(m),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::ResourceExhausted(m) => Status::resource_exhausted(m),
        // The log gets the message and its sources (`error::chain`); the
        // caller only the message's head, or nothing of it.
        Error::Unavailable(ref m) => {
            tracing::warn!(error = %m.chain(), "unavailable");
            Status::unavailable(public_summary(m))
        }
        Error::Internal(ref m) | Error::Config(ref m) => {
            tracing::error!(error = %m.chain(), "internal error");
            Status::new(Code::Internal, "internal error; see the broker's log")
        }
    }
}

/// What a caller learns of an `Unavailable`: the text before the first
/// ": " (`database "orders" is unreachable`), which names the database
/// but not its address, user or the server's words — those go to the log
/// (and to `credbroker check`), where the operator reads them.
pub(crate) fn public_summary(m: &str) -> String {
    match m.split_once(": ") {
        Some((head, _)) => format!("{head} (details in the broker's log)"),
        None => m.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{public_summary, to_status};
    use crate::error::Error;

    #[derive(Debug)]
    struct Secretish;
    impl std::fmt::Display for Secretish {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("SOURCE-TEXT at 10.0.0.1:5432")
        }
    }
    impl std::error::Error for Secretish {}

    /// A caller sees neither an `Internal`'s message nor its source, and of
    /// an `Unavailable` only the message's head.
    #[test]
    fn a_status_never_carries_the_source() {
        let s = to_status(Error::internal_from("lease store: insert", Secretish));
        assert_eq!(s.code(), tonic::Code::Internal);
        assert_eq!(s.message(), "internal error; see the broker's log");
        let s = to_status(Error::unavailable_from(
            "database \"orders\" is unreachable: connection refused",
            Secretish,
        ));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(
            s.message(),
            "database \"orders\" is unreachable (details in the broker's log)"
        );
        let s = to_status(Error::unavailable_from("lease store is busy", Secretish));
        assert_eq!(s.message(), "lease store is busy");
        assert!(!format!("{s:?}").contains("SOURCE-TEXT"));
    }

    #[test]
    fn unavailable_keeps_the_database_and_drops_the_detail() {
        let m = "database \"orders\" is unreachable: authentication failed as a@10.0.0.1:5432/o: \
                 password authentication failed for user \"a\" (SQLSTATE 28P01)";
        let s = public_summary(m);
        assert_eq!(
            s,
            "database \"orders\" is unreachable (details in the broker's log)"
        );
        assert_eq!(public_summary("lease store is busy"), "lease store is busy");
    }
}
