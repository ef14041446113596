//! The part of HashiCorp Vault's HTTP API that Vault clients (hvac,
//! vaultrs, Spring Cloud Vault, Vault Agent, consul-template…) call for
//! dynamic database credentials, served with credbroker's semantics
//! behind it: the caller is its client certificate (mTLS, required), its
//! leases are the same leases the gRPC API issues (policy, limits,
//! verifier-only passwords, session-ending revocation, audit with
//! `"via":"vault_api"`).
//!
//! - `routes.rs`: path and method → handler; every answer is JSON.
//! - `token.rs`: tokens from `auth/cert/login`, bound to identity and
//!   certificate, stored as hashes.
//! - `params.rs`: request bodies, lease ids, increments.
//! - `envelope.rs`: Vault's response shapes and the one error mapping.

mod envelope;
mod params;
mod routes;
mod token;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::config::VaultApiConfig;
use crate::server::{https, SharedTls};

/// Serves the Vault API on `listener` until `shutdown`. `config` is the
/// `[vault_api]` section read at start: like the address, its mount and
/// token lifetimes need a restart to change.
pub async fn serve(
    broker: Arc<Broker>,
    config: VaultApiConfig,
    listener: TcpListener,
    tls: SharedTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let options = https::ListenerOptions::of("vault_api", &broker);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, mount = %config.mount, "vault api listening");
    }
    let router = routes::router(broker, config);
    https::serve(router, listener, tls, options, shutdown).await
}
