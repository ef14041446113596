//! The one place where a library `Error` becomes a gRPC `Status`: the
//! error's [`Class`] picks the code, [`Error::for_caller`] the text (and
//! logs what it withholds), the same text every door shows.

use tonic::{Code, Status};

use crate::error::{Class, Error};
use crate::lease::LeaseId;
use crate::pb;

pub fn to_status(err: Error) -> Status {
    let caller = err.for_caller();
    Status::new(code(caller.class), caller.message)
}

/// Each class's gRPC code.
pub fn code(class: Class) -> Code {
    match class {
        Class::InvalidArgument => Code::InvalidArgument,
        Class::PermissionDenied => Code::PermissionDenied,
        Class::Unauthenticated => Code::Unauthenticated,
        Class::NotFound => Code::NotFound,
        Class::FailedPrecondition => Code::FailedPrecondition,
        Class::ResourceExhausted => Code::ResourceExhausted,
        Class::Unavailable => Code::Unavailable,
        Class::Internal => Code::Internal,
    }
}

/// A bulk revocation's failures for the reply: each one's caller text with
/// its class's words in front (the reply has no code per lease; its detail
/// was logged where it failed).
pub fn revoke_failures(failed: Vec<(LeaseId, Error)>) -> Vec<pb::RevokeFailure> {
    failed
        .into_iter()
        .map(|(id, error)| pb::RevokeFailure {
            lease_id: id.to_string(),
            error: error.caller().line(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{code, revoke_failures, to_status};
    use crate::error::{samples, Class, Error};

    /// gRPC agrees with the rule on every class: the code is the class's,
    /// the message is the caller text, nothing more.
    #[test]
    fn every_class_maps_by_the_rule() {
        for e in samples() {
            let caller = e.for_caller();
            let s = to_status(e.clone());
            assert_eq!(s.code(), code(caller.class), "{e}");
            assert_eq!(s.message(), caller.message, "{e}");
            assert!(!format!("{s:?}").contains("SOURCE-TEXT"), "{e}");
        }
        // Distinct codes: the mapping loses no class.
        let codes: std::collections::HashSet<_> = Class::ALL.iter().map(|c| code(*c)).collect();
        assert_eq!(codes.len(), Class::ALL.len());
    }

    /// A caller sees neither an `Internal`'s message nor its source, and of
    /// an `Unavailable` only the message's head.
    #[test]
    fn a_status_never_carries_the_source() {
        let s = to_status(Error::internal("lease store: insert"));
        assert_eq!(s.code(), tonic::Code::Internal);
        assert_eq!(s.message(), "internal error; see the broker's log");
        let s = to_status(Error::unavailable(
            "database \"orders\" is unreachable: authentication failed as a@10.0.0.1:5432/o: \
             password authentication failed for user \"a\" (SQLSTATE 28P01)",
        ));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(
            s.message(),
            "database \"orders\" is unreachable (details in the broker's log)"
        );
        let s = to_status(Error::unavailable("lease store is busy"));
        assert_eq!(s.message(), "lease store is busy");
        let s = to_status(Error::config("databases.orders: MySQL 5.6 is too old"));
        assert_eq!(s.code(), tonic::Code::Internal);
        assert_eq!(s.message(), "internal error; see the broker's log");
    }

    /// A revoke failure says what every door says of its error: the
    /// caller line, never the detail (it carried the full text before).
    #[test]
    fn revoke_failures_carry_the_caller_line() {
        let samples = samples();
        let failed = samples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    crate::lease::LeaseId::from_store(format!("lease-{i}")),
                    e.clone(),
                )
            })
            .collect();
        let out = revoke_failures(failed);
        for (f, e) in out.iter().zip(&samples) {
            assert_eq!(f.error, e.caller().line(), "{e}");
            assert!(!f.error.contains("10.0.0.1"), "{}", f.error);
        }
    }
}
