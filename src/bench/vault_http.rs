//! The bench's HTTPS client for Vault-shaped APIs: credbroker's Vault API
//! (mTLS) and OpenBao (TLS and a token). One HTTP/1.1 connection per
//! caller, opened before the clock starts and kept alive, as a service's
//! Vault client keeps its connection; hyper's own connection API, so no
//! second HTTP stack enters the tree.

use std::path::Path;
use std::sync::Arc;

use http::{Method, Request, StatusCode};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

use crate::bench::io_err;
use credbroker::error::{Error, Result};

/// Largest answer read: a creds or login answer is well under 4 KiB.
const MAX_ANSWER: usize = 1 << 20;

/// TLS towards `ca`'s servers, presenting `identity` (certificate, key
/// PEM files) when given.
pub fn tls(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Arc<rustls::ClientConfig>> {
    credbroker::server::tls::install_crypto_provider();
    let pem = |p: &Path| std::fs::read(p).map_err(io_err("read PEM"));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem(ca)?) {
        roots
            .add(c.map_err(Error::internal)?)
            .map_err(Error::internal)?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(&pem(cert)?)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(Error::internal)?;
            let key = PrivateKeyDer::from_pem_slice(&pem(key)?).map_err(Error::internal)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(Error::internal)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// One kept-alive connection to `127.0.0.1:port`, with the token its
/// requests carry once set.
pub struct Conn {
    send: SendRequest<String>,
    port: u16,
    pub token: Option<String>,
}

impl Conn {
    pub async fn open(port: u16, tls: Arc<rustls::ClientConfig>) -> Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(io_err("connect"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("localhost").map_err(Error::internal)?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(io_err("TLS handshake"))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(Error::internal)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            send,
            port,
            token: None,
        })
    }

    /// One request; the status and the JSON answer (`null` when empty).
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, format!("localhost:{}", self.port));
        if let Some(t) = &self.token {
            req = req.header("X-Vault-Token", t);
        }
        let body = body.map(Value::to_string).unwrap_or_default();
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(body).map_err(Error::internal)?;
        self.send.ready().await.map_err(Error::internal)?;
        let resp = self.send.send_request(req).await.map_err(Error::internal)?;
        let status = resp.status();
        let bytes = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), MAX_ANSWER)
            .await
            .map_err(Error::internal)?;
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(Error::internal)?
        };
        Ok((status, json))
    }

    /// A call that must succeed (2xx); the answer, or Vault's `errors`.
    pub async fn ok(&mut self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let (status, json) = self.call(method.clone(), path, body).await?;
        if !status.is_success() {
            return Err(Error::internal(format!(
                "{method} {path}: {status}: {}",
                json.get("errors").unwrap_or(&json)
            )));
        }
        Ok(json)
    }

    /// Reads `<mount>/creds/<role>`, then revokes the lease: one cycle as
    /// a Vault client makes it.
    pub async fn creds_and_revoke(&mut self, mount: &str, role: &str) -> Result<()> {
        let lease = self
            .ok(Method::GET, &format!("/v1/{mount}/creds/{role}"), None)
            .await?;
        let id = lease
            .get("lease_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::internal("creds answer without a lease_id"))?
            .to_string();
        self.ok(
            Method::PUT,
            "/v1/sys/leases/revoke",
            Some(&serde_json::json!({ "lease_id": id })),
        )
        .await?;
        Ok(())
    }
}
