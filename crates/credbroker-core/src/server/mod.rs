//! The network face: gRPC (Broker, Admin, Access, health, reflection) over our own
//! mTLS acceptor, HTTP/1.1 over the same acceptor for the HTTP APIs
//! (`https.rs`), and a plain-HTTP listener for `/metrics` and `/healthz`.

pub mod access;
pub mod grpc;
pub mod http;
pub mod https;
pub mod shares;
pub mod status;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::gate::Door;
use crate::pb;

pub use tls::SharedTls;

/// Serves until `shutdown` completes, then stops accepting and lets
/// in-flight requests finish (the caller bounds how long it waits).
pub async fn serve_grpc(
    broker: Arc<Broker>,
    access: Arc<crate::access::Access>,
    listener: TcpListener,
    tls: SharedTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let max_age = broker.config().server.max_connection_age;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::broker_server::BrokerServer<grpc::BrokerService>>()
        .await;
    health_reporter
        .set_serving::<pb::admin_server::AdminServer<grpc::AdminService>>()
        .await;
    health_reporter
        .set_serving::<pb::access_server::AccessServer<access::AccessService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::internal(format!("reflection: {e}")))?;
    // Admitted within the listener's shares: one identity or source past
    // its share has its new connections closed, nobody else's.
    let incoming = ReceiverStream::new(tls::incoming(
        listener,
        tls,
        shares::ListenerOptions::of("grpc", &broker),
        tls::Alpn::H2,
    ));
    tonic::transport::Server::builder()
        // A client whose certificate was revoked must handshake again.
        .max_connection_age(max_age)
        .max_connection_age_grace(Duration::from_secs(30))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .timeout(Duration::from_secs(60))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(grpc::Via::new(
            Door::GrpcBroker,
            pb::broker_server::BrokerServer::new(grpc::BrokerService {
                broker: broker.clone(),
            }),
        ))
        .add_service(grpc::Via::new(
            Door::GrpcAdmin,
            pb::admin_server::AdminServer::new(grpc::AdminService { broker }),
        ))
        .add_service(grpc::Via::new(
            Door::GrpcAccess,
            pb::access_server::AccessServer::new(access::AccessService { access }),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::unavailable(format!("gRPC server: {e}")))
}
