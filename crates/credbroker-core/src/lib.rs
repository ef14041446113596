//! credbroker's core: short-lived, audited database credentials for
//! services that prove who they are with a client certificate. Everything
//! `credbroker serve` runs; the command line and the bench are the
//! `credbroker` binary crate's, the throwaway servers and the dev CA
//! `credbroker-testkit`'s (ARCHITECTURE.md, "Crates").
//!
//! A lease travels: [`server`] (mTLS, gRPC) → [`identity`] → [`broker`]
//! (policy, TTLs, limits) → [`store`] (intent first) → [`backend`] (the
//! database user) → [`audit`]. The [`reaper`] ends what expires. Read
//! ARCHITECTURE.md for the invariants these modules keep.
//!
//! Modules:
//! - [`config`]: TOML → validated types; the only place config text is read.
//! - [`error`]: the one error type; its class decides what each door says.
//! - [`clock`]: the one clock (the system's, or paused time in the fast tier).
//! - [`identity`], [`policy`]: who the caller is, and what it may lease.
//! - [`lease`]: ids, broker-made user names, zeroizing passwords, states.
//! - [`gate`]: every request, whatever its door, admitted or refused here
//!   (identity, networks, policy, locks) before a handler runs.
//! - [`broker`]: issue / renew / revoke / admin; no gRPC types inside.
//! - [`revocation`]: the one engine that ends leases, whoever asks.
//! - [`access`]: just-in-time access for people: requests, approvals,
//!   grants that admit their requester to the lease path until they end.
//! - [`limits`]: per-identity rate limits.
//! - [`lock`]: admin locks that refuse issue and renew (the incident button).
//! - [`backend`]: the database trait; PostgreSQL and MySQL/MariaDB implementations.
//! - [`connstr`]: PostgreSQL connection strings as libpq takes them (several
//!   hosts, key=value), checked key by key for the store and the databases.
//! - [`dbtls`]: TLS to the databases and the store: libpq/MySQL URL
//!   parameters → rustls (ring) client configs, start-up warnings.
//! - [`scram`]: SCRAM-SHA-256 verifiers, so no plaintext reaches PostgreSQL.
//! - [`store`]: the lease store trait; SQLite (one broker) and PostgreSQL
//!   (replicas) implementations.
//! - [`static_roles`]: existing users whose passwords the broker rotates
//!   (alternating users), sealed in the store, read by `GetStaticCredential`.
//! - [`reaper`]: expiry-ordered, batched, retrying revocation; orphan sweep.
//! - [`pruner`]: deletes revoked rows past `store.retention`, in batches.
//! - [`audit`]: hash-chained JSON lines and their verification.
//! - [`metrics`]: Prometheus counters and gauges.
//! - [`notify`]: webhook notifications (JSON POSTs to a chat or pager):
//!   bounded queues, at-least-once with an event id, never blocking.
//! - [`server`]: tonic services, the TLS acceptor, the error → status map.
//! - [`console`]: the admins' web console (HTTPS, server-rendered pages).
//! - [`rate_history`]: issuance and revocation per minute over the last
//!   hour, in memory, for the console's charts.
//! - [`check`]: `credbroker check`, what a broker needs from its
//!   surroundings, verified (certificates, store, databases, privileges).
//! - [`daemon`]: wires the parts together for `serve`, `demo` and tests.
//! - [`client`]: the mTLS gRPC client the CLI commands share.
//! - [`watch`]: lease events (renewed, revoked, locked) for `WatchLeases`;
//!   [`relay`] carries them between replicas through the PostgreSQL store.
//! - [`token_cache`]: the Vault API's verified tokens in memory (by hash,
//!   bounded), forgotten on revoke, eviction, renewal, locks and relayed events.
//! - [`sidecar`]: keeps a credential file fresh for an application.
//! - [`vault_api`]: HashiCorp Vault's database-credentials HTTP API, so
//!   Vault clients switch by changing their address.
//! - [`hardening`]: core dumps off for the commands that hold secrets.
//! - [`fsutil`]: secret files written atomically, mode 0600, through a
//!   fresh temporary file renamed over the target.
//! - [`steps`]: the lease path's steps as `tracing` spans (TRACE, target
//!   `credbroker::step`), which `credbroker bench` sums per step; off at
//!   the callsite under any other subscriber.

#![forbid(unsafe_code)]

pub mod access;
pub mod audit;
pub mod backend;
pub mod broker;
pub mod check;
pub mod client;
pub mod clock;
pub mod config;
pub mod connstr;
pub mod console;
pub mod daemon;
pub mod dbtls;
pub mod error;
pub mod fsutil;
pub mod gate;
pub mod hardening;
pub mod identity;
pub mod lease;
pub mod limits;
pub mod lock;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod pruner;
pub mod rate_history;
pub mod reaper;
pub mod relay;
pub mod revocation;
pub mod scram;
pub mod server;
pub mod sidecar;
pub mod static_roles;
pub mod steps;
pub mod store;
#[cfg(test)]
mod testkit;
pub mod token_cache;
pub mod vault_api;
pub mod watch;

/// Code generated from `proto/credbroker/v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("credbroker.v1");

    /// For gRPC server reflection, so `grpcurl` can list and call the API.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("credbroker_descriptor");
}

/// `Debug` for generated types that carry a secret (build.rs skips prost's).
mod pb_debug;

pub use error::{Error, Result};
