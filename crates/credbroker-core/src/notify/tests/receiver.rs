//! The real HTTP path: webhooks delivering to receivers on 127.0.0.1:0
//! (hyper servers started by the test, plain and TLS with a dev CA), in
//! real time with short backoffs and generous waits.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::count;
use crate::metrics::Metrics;
use crate::notify::{Webhook, WebhookOptions, EVENT_ID_HEADER};

/// What the receiver saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    user_agent: String,
    content_type: String,
    path: String,
    body: serde_json::Value,
    at: std::time::Instant,
}

/// How the receiver answers the next request; `200` once the script ends.
enum Reply {
    Status(u16),
    RetryAfter(u16, &'static str),
    /// Waits for a permit, then 200.
    Hold(Arc<Semaphore>),
}

#[derive(Clone)]
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

impl Receiver {
    async fn start(script: Vec<Reply>, tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(listener, script, tls)
    }

    fn on(
        listener: TcpListener,
        script: Vec<Reply>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Receiver {
        let r = Receiver {
            port: listener.local_addr().unwrap().port(),
            seen: Default::default(),
            script: Arc::new(Mutex::new(script.into())),
        };
        let state = r.clone();
        tokio::spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let state = state.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        // A handshake the client aborts (an unknown CA)
                        // is simply not served.
                        Some(a) => {
                            if let Ok(s) = a.accept(tcp).await {
                                state.serve(s).await;
                            }
                        }
                        None => state.serve(tcp).await,
                    }
                });
            }
        });
        r
    }

    async fn serve<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(self, io: S) {
        let service = hyper::service::service_fn(move |req| self.clone().answer(req));
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .await;
    }

    async fn answer(self, req: Request<Incoming>) -> Result<Response<String>, Infallible> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let (id, user_agent, content_type) = (
            header(EVENT_ID_HEADER),
            header("user-agent"),
            header("content-type"),
        );
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let body = axum::body::to_bytes(axum::body::Body::new(req.into_body()), 1 << 20)
            .await
            .unwrap_or_default();
        self.seen.lock().unwrap().push(Seen {
            id,
            user_agent,
            content_type,
            path,
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            at: std::time::Instant::now(),
        });
        let reply = self.script.lock().unwrap().pop_front();
        let mut resp = Response::builder();
        let status = match reply {
            None => 200,
            Some(Reply::Status(s)) => s,
            Some(Reply::RetryAfter(s, after)) => {
                resp = resp.header("retry-after", after);
                s
            }
            Some(Reply::Hold(gate)) => {
                let _ = gate.acquire().await;
                200
            }
        };
        Ok(resp.status(status).body(String::new()).unwrap())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

fn options() -> WebhookOptions {
    WebhookOptions {
        queue_capacity: 16,
        attempt_timeout: Duration::from_secs(5),
        // Generous: a loaded CI machine must not turn a retry into a
        // give-up.
        give_up_after: Duration::from_secs(60),
        backoff_first: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ca_file: None,
    }
}

/// Polls every 20 ms for up to 30 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < end, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_event_arrives_as_a_json_post_with_its_id_and_user_agent() {
    let rx = Receiver::start(vec![], None).await;
    let metrics = Arc::new(Metrics::new());
    let hook = Webhook::start(
        &rx.url("/hooks/T0KEN?channel=db"),
        options(),
        metrics.clone(),
    )
    .unwrap();
    let event = serde_json::json!({"event": "access.requested", "request": "ar_1", "role": "orders-readonly"});
    let id = hook.send(event.clone());
    until("delivered", || count(&metrics, "delivered") == 1).await;
    let seen = rx.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.id, id);
    assert!(id.starts_with("ev_") && id.len() == 29, "{id}");
    assert_eq!(s.body, event, "sent as given");
    assert_eq!(s.content_type, "application/json");
    assert_eq!(
        s.user_agent,
        format!("credbroker/{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(s.path, "/hooks/T0KEN?channel=db");
    assert_eq!(hook.label(), format!("http://127.0.0.1:{}", rx.port));
    assert!(metrics.encode().contains(&format!(
        "credbroker_notifications_total{{webhook=\"http://127.0.0.1:{}\",outcome=\"delivered\"}} 1",
        rx.port
    )));
}

#[tokio::test]
async fn a_503_is_retried_with_the_same_event_id() {
    let rx = Receiver::start(vec![Reply::Status(503), Reply::Status(502)], None).await;
    let metrics = Arc::new(Metrics::new());
    let hook = Webhook::start(&rx.url("/h"), options(), metrics.clone()).unwrap();
    let id = hook.send(serde_json::json!({"n": 1}));
    until("delivered", || count(&metrics, "delivered") == 1).await;
    let seen = rx.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.id == id), "{seen:?}");
    assert_eq!(count(&metrics, "retried"), 2);
}

#[tokio::test]
async fn a_429_waits_its_retry_after() {
    let rx = Receiver::start(vec![Reply::RetryAfter(429, "1")], None).await;
    let metrics = Arc::new(Metrics::new());
    let hook = Webhook::start(&rx.url("/h"), options(), metrics.clone()).unwrap();
    hook.send(serde_json::json!({}));
    until("delivered", || count(&metrics, "delivered") == 1).await;
    let seen = rx.seen();
    assert_eq!(seen.len(), 2);
    // The backoff alone would be 25–50 ms.
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_secs(1), "{gap:?}");
}

#[tokio::test]
async fn a_400_is_not_retried_and_the_next_event_still_goes() {
    let rx = Receiver::start(vec![Reply::Status(400)], None).await;
    let metrics = Arc::new(Metrics::new());
    let hook = Webhook::start(&rx.url("/h"), options(), metrics.clone()).unwrap();
    let refused = hook.send(serde_json::json!({"n": 1}));
    until("failed", || count(&metrics, "failed") == 1).await;
    let next = hook.send(serde_json::json!({"n": 2}));
    until("delivered", || count(&metrics, "delivered") == 1).await;
    let ids: Vec<String> = rx.seen().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![refused, next], "the refused event was sent once");
    assert_eq!(count(&metrics, "retried"), 0);
}

#[tokio::test]
async fn a_receiver_that_is_down_then_up_gets_the_event() {
    // A port nobody listens on (bound, then let go), listened on later.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let metrics = Arc::new(Metrics::new());
    let hook = Webhook::start(
        &format!("http://127.0.0.1:{port}/h"),
        options(),
        metrics.clone(),
    )
    .unwrap();
    let id = hook.send(serde_json::json!({"n": 1}));
    until("retried twice", || count(&metrics, "retried") >= 2).await;
    assert_eq!(count(&metrics, "delivered"), 0);
    let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .await
        .unwrap();
    let rx = Receiver::on(listener, vec![], None);
    until("delivered", || count(&metrics, "delivered") == 1).await;
    let seen = rx.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].id, id);
}

#[tokio::test]
async fn a_full_queue_counts_its_drops_and_keeps_the_newest() {
    let gate = Arc::new(Semaphore::new(0));
    let rx = Receiver::start(vec![Reply::Hold(gate.clone())], None).await;
    let metrics = Arc::new(Metrics::new());
    let hook = Webhook::start(
        &rx.url("/h"),
        WebhookOptions {
            queue_capacity: 2,
            attempt_timeout: Duration::from_secs(30),
            ..options()
        },
        metrics.clone(),
    )
    .unwrap();
    let first = hook.send(serde_json::json!({"n": 0}));
    until("first held", || rx.seen().len() == 1).await;
    let ids: Vec<String> = (1..=4)
        .map(|n| hook.send(serde_json::json!({ "n": n })))
        .collect();
    assert_eq!(count(&metrics, "dropped"), 2);
    gate.add_permits(1);
    until("delivered", || count(&metrics, "delivered") == 3).await;
    let got: Vec<String> = rx.seen().into_iter().map(|s| s.id).collect();
    assert_eq!(got, vec![first, ids[2].clone(), ids[3].clone()]);
}

fn tls_server(ca: &credbroker_testkit::pki::DevCa) -> Arc<rustls::ServerConfig> {
    let pair = ca
        .server_cert(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
        .unwrap();
    let chain = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(crate::dbtls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

#[tokio::test]
async fn https_to_a_receiver_on_an_internal_ca() {
    let ca = credbroker_testkit::pki::DevCa::generate("webhook test CA").unwrap();
    let rx = Receiver::start(vec![], Some(tls_server(&ca))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let metrics = Arc::new(Metrics::new());
    let with_ca = WebhookOptions {
        ca_file: Some(ca_file.clone()),
        ..options()
    };
    let by_name = Webhook::start(
        &format!("https://localhost:{}/hooks/T0KEN", rx.port),
        with_ca.clone(),
        metrics.clone(),
    )
    .unwrap();
    let by_ip = Webhook::start(
        &format!("https://127.0.0.1:{}/hooks/T0KEN", rx.port),
        with_ca,
        metrics.clone(),
    )
    .unwrap();
    let a = by_name.send(serde_json::json!({"via": "name"}));
    let b = by_ip.send(serde_json::json!({"via": "ip"}));
    until("both delivered", || count(&metrics, "delivered") == 2).await;
    let mut ids: Vec<String> = rx.seen().into_iter().map(|s| s.id).collect();
    ids.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(ids, want);

    // On the public roots the dev CA is unknown: retried (it may be a
    // certificate mid-renewal), then given up; nothing reached the receiver.
    let metrics = Arc::new(Metrics::new());
    let public = Webhook::start(
        &format!("https://localhost:{}/hooks/T0KEN", rx.port),
        WebhookOptions {
            give_up_after: Duration::from_secs(1),
            ..options()
        },
        metrics.clone(),
    )
    .unwrap();
    public.send(serde_json::json!({}));
    until("given up", || count(&metrics, "failed") == 1).await;
    assert!(count(&metrics, "retried") >= 1);
    assert_eq!(rx.seen().len(), 2);

    // A CA file that is missing or holds no certificate: refused at start.
    for bad in [dir.path().join("missing.pem"), dir.path().join("empty.pem")] {
        std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
        let e = Webhook::start(
            "https://localhost:1/h",
            WebhookOptions {
                ca_file: Some(bad.clone()),
                ..options()
            },
            metrics.clone(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("webhook ca_file"), "{e}");
    }
}

/// A `tracing` writer into a shared buffer, for reading back the logs.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Retried, refused, delivered and given-up events, to a URL with a token
/// in its path and query: the receiver's port, the hook's `Debug`, the
/// metrics.
async fn log_every_outcome() -> (u16, String, Arc<Metrics>) {
    let rx = Receiver::start(
        vec![
            Reply::Status(503),
            Reply::RetryAfter(429, "0"),
            Reply::Status(404),
        ],
        None,
    )
    .await;
    let metrics = Arc::new(Metrics::new());
    let hook = Webhook::start(
        &rx.url("/hooks/S3CRETPATH?token=S3CRETQUERY"),
        options(),
        metrics.clone(),
    )
    .unwrap();
    hook.send(serde_json::json!({"n": 1}));
    until("refused", || count(&metrics, "failed") == 1).await;
    hook.send(serde_json::json!({"n": 2}));
    until("delivered", || count(&metrics, "delivered") == 1).await;
    let down = Webhook::start(
        "http://127.0.0.1:1/hooks/S3CRETPATH?token=S3CRETQUERY",
        WebhookOptions {
            give_up_after: Duration::from_millis(300),
            ..options()
        },
        metrics.clone(),
    )
    .unwrap();
    down.send(serde_json::json!({}));
    until("given up", || count(&metrics, "failed") == 2).await;
    (rx.port, format!("{hook:?}"), metrics)
}

#[tokio::test]
async fn logs_name_scheme_and_host_never_the_path_or_query() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // This test's runtime is single-threaded, so the delivery task logs
    // on this thread, into this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    // tracing caches each log line's interest when the line is first hit;
    // a first hit on another test's thread, racing this subscriber's
    // registration, can cache "nobody listens". So one pass hits every
    // line, the cache is rebuilt with this subscriber in it, and the
    // second pass is the one read.
    log_every_outcome().await;
    tracing::callsite::rebuild_interest_cache();
    logs.0.lock().unwrap().clear();
    let (port, hook, metrics) = log_every_outcome().await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains(&format!("http://127.0.0.1:{port}")), "{text}");
    assert!(text.contains("retrying"), "{text}");
    assert!(text.contains("refused the event"), "{text}");
    assert!(text.contains("given up"), "{text}");
    assert!(!text.contains("S3CRET"), "{text}");
    assert!(!hook.contains("S3CRET"), "{hook}");
    assert!(!metrics.encode().contains("S3CRET"));
}
