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
//!
//! Every answer carries `Cache-Control: no-store` (a layer here, not per
//! handler).

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
    let router = routes::router(broker, config).layer(axum::middleware::map_response(no_store));
    https::serve(router, listener, tls, options, shutdown).await
}

/// On every answer of this API, whatever the handler or the outcome:
/// `creds`, `static-creds` and a login carry secrets, and nothing on the
/// way (a proxy, a client's HTTP cache) may keep them. `Pragma` for
/// HTTP/1.0 caches.
async fn no_store(mut resp: axum::response::Response) -> axum::response::Response {
    use axum::http::{header, HeaderValue};
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}
