//! TLS from the broker to its databases and to the PostgreSQL store.
//!
//! Operators paste the connection strings they already have, so the TLS
//! settings are libpq's URL parameters (`sslmode`, `sslrootcert`,
//! `sslcert`, `sslkey`) for PostgreSQL and the `mysql` client's
//! (`ssl-mode`, `ssl-ca`, `ssl-cert`, `ssl-key`) for MySQL/MariaDB. The
//! drivers understand only some of them (tokio-postgres rejects
//! `verify-full` and every path parameter), so they are taken out of the
//! URL here and turned into a rustls client configuration on the ring
//! provider, the one crypto provider in the tree.
//!
//! Modes follow libpq: `disable` never encrypts; `prefer` (libpq's default,
//! and ours for PostgreSQL) encrypts when the server offers it and checks
//! nothing; `require` insists on TLS, and with `sslrootcert` also checks
//! the chain, as libpq does; `verify-ca` checks the chain; `verify-full`
//! also the host name (or IP address) in the URL.
//!
//! One file per concern: `params.rs` reads the TLS parameters out of a URL
//! (and writes the query a leased DSN carries), `connect.rs` turns them
//! into the drivers' TLS configurations (rustls for PostgreSQL, mysql_async's
//! `SslOpts`), `diagnose.rs` says what the operator is told: why a
//! handshake failed, and the start-up warning for unverified TLS.

mod connect;
mod diagnose;
mod params;
#[cfg(test)]
mod tests;

pub use connect::{client_config, mysql_ssl_opts, postgres_connector, provider};
pub use diagnose::{is_loopback, tls_failure, url_warning, weak_tls_warning};
pub use params::{
    client_query, is_path_key, is_tls_key, normalize_url, split_url, tls_params, Dialect, RootCert,
    SslMode, TlsParams, TlsSetupError,
};
