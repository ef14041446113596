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
        Error::Unavailable(m) => Status::unavailable(m),
        Error::Internal(m) | Error::Config(m) => {
            tracing::error!(error = %m, "internal error");
            Status::new(Code::Internal, "internal error; see the broker's log")
        }
    }
}
