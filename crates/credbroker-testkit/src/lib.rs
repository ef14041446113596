//! credbroker's dev and test kit: what the integration tests, `credbroker
//! bench` and `credbroker demo` set up around a broker, and nothing a
//! serving broker needs (ARCHITECTURE.md, "Crates").
//!
//! - [`pki`]: a dev CA and the certificates it signs (`credbroker pki dev`,
//!   the tests' client and server certificates).
//! - [`throwaway`]: disposable PostgreSQL and MariaDB servers started from
//!   the installed binaries, stopped and removed on drop.
//! - [`devenv`]: a whole dev set-up (certificates, config, a throwaway
//!   database) for `demo`, the tests and the bench.

#![forbid(unsafe_code)]

pub mod devenv;
pub mod pki;
pub mod throwaway;
