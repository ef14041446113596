//! Webhook notifications: JSON events POSTed to a team's chat or pager,
//! for the access flow (requests, approvals, break-glass, grant ends).
//!
//! What it guarantees:
//! - **Never blocks the caller.** [`Webhook::send`] puts the event on a
//!   bounded queue and returns; one task per distinct URL delivers. A full
//!   queue drops its *oldest* event (the newest says most about now),
//!   logged and counted (`outcome="dropped"`).
//! - **At least once, with an event id.** Every event gets an id when sent
//!   (`ev_` + 26 random characters), carried in the `Idempotency-Key`
//!   header of every attempt, so a receiver that saw an attempt whose
//!   answer was lost can recognise the retry.
//! - **Bounded.** Connection errors, timeouts, 5xx and 429 are retried with
//!   exponential backoff and jitter (never sooner than a `Retry-After`);
//!   other statuses are not (a 4xx will not heal by itself, and a redirect
//!   is not followed: it could carry the URL's token elsewhere). Each
//!   attempt has its own timeout; an event not delivered within
//!   `give_up_after` is logged and counted as `failed`. On shutdown the
//!   queue gets a short, bounded time to drain ([`Webhooks::shutdown`]).
//!
//! What it sends: the JSON value it is given, as it is. It adds nothing
//! and reads nothing from it, so it cannot put a secret into a body; the
//! caller (the access flow) guarantees that what it hands over holds none.
//!
//! Webhook URLs often carry a token in their path or query (Slack, Teams,
//! Mattermost). So nothing here ever logs, counts or returns a URL beyond
//! its scheme, host and port ([`Target::label`]); errors name the same.
//!
//! HTTPS is rustls on the ring provider (the tree's one), trusting the
//! Mozilla roots compiled in by `webpki-roots`, or — for a chat server on
//! an internal CA — only the certificates of a configured CA file.

#[cfg(test)]
mod tests;
mod transport;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use self::transport::{Target, EVENT_ID_HEADER, USER_AGENT};
use crate::error::Result;
use crate::metrics::Metrics;

/// How long [`Webhooks::shutdown`] waits for queues to drain by default:
/// long enough for a reachable receiver to take what is queued, short
/// enough that a dead one does not hold a broker's restart.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// How a webhook delivers. The defaults suit a chat server on the
/// internet; tests shrink the times.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Events waiting per URL; beyond it the oldest is dropped. Events are
    /// rare (a person asking for access), so a full queue means the
    /// receiver has been away for a long time.
    pub queue_capacity: usize,
    /// One attempt: connect, TLS, request and the status line.
    pub attempt_timeout: Duration,
    /// From the first attempt, how long one event is retried before it is
    /// given up (and counted `failed`). It also bounds how long one
    /// unreachable receiver holds the events queued behind it.
    pub give_up_after: Duration,
    /// The first retry's delay; each next one doubles, up to `backoff_max`.
    pub backoff_first: Duration,
    pub backoff_max: Duration,
    /// PEM certificates to trust *instead of* the public roots, for a
    /// receiver on an internal CA.
    pub ca_file: Option<PathBuf>,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        WebhookOptions {
            queue_capacity: 1000,
            attempt_timeout: Duration::from_secs(10),
            give_up_after: Duration::from_secs(300),
            backoff_first: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            ca_file: None,
        }
    }
}

/// The delay before retry number `retry` (1 for the first): exponential
/// from `first`, capped at `max`, with "equal jitter" — half of it fixed,
/// half random — so retries spread out but never come back at once.
pub fn backoff(first: Duration, max: Duration, retry: u32) -> Duration {
    let exp = first.saturating_mul(1u32 << retry.saturating_sub(1).min(20));
    let full = exp.min(max);
    let half = full / 2;
    let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
    half + Duration::from_millis(jitter)
}

/// Tells the worker how one attempt went.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// A 2xx.
    Delivered,
    /// Worth another try: a connection error, a timeout, a 5xx or a 429,
    /// with the receiver's `Retry-After` when it sent one.
    Retry {
        why: String,
        retry_after: Option<Duration>,
    },
    /// Not worth another: any other status.
    Refused { status: u16 },
}

/// One attempt to deliver an event: the real one is [`transport::HttpTransport`];
/// the fast tier scripts answers to test the retry rules on paused time.
#[async_trait::async_trait]
pub(crate) trait Transport: Send + Sync + 'static {
    async fn post(&self, event: &Event) -> Attempt;
}

/// An event as queued: its id and its serialized body.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub id: String,
    pub body: String,
}

fn event_id() -> String {
    crate::lease::random_id("ev_", 26)
}

/// The queue of one URL.
struct Queue {
    events: VecDeque<Event>,
    closed: bool,
}

struct Shared {
    label: String,
    capacity: usize,
    queue: Mutex<Queue>,
    wake: tokio::sync::Notify,
    /// Cancelled when the shutdown's flush time is over: the worker stops
    /// mid-attempt or mid-sleep.
    stop: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn count(&self, outcome: &str) {
        self.metrics.notification(&self.label, outcome);
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A webhook: a handle to one URL's queue and delivery task. Clones share
/// them; when the last is dropped the task delivers what is queued and
/// ends, so a forgotten webhook leaves no task behind.
#[derive(Clone)]
pub struct Webhook {
    shared: Arc<Shared>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
    _last: Arc<CloseOnDrop>,
}

struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.queue().closed = true;
        self.0.wake.notify_one();
    }
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The label, never the URL: its path may hold a token.
        f.debug_struct("Webhook")
            .field("target", &self.shared.label)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// Checks `url` (http or https, no user info) and `options.ca_file`,
    /// and spawns the delivery task. Must run inside a tokio runtime.
    /// Errors name the URL's scheme and host only.
    pub fn start(url: &str, options: WebhookOptions, metrics: Arc<Metrics>) -> Result<Webhook> {
        let target = Target::parse(url)?;
        let http = transport::HttpTransport::new(target, &options)?;
        let label = http.target().label();
        if !http.target().is_https() && !http.target().is_loopback() {
            tracing::warn!(
                webhook = %label,
                "webhook over plain http: events cross the network unencrypted"
            );
        }
        Ok(Self::spawn(label, http, options, metrics))
    }

    pub(crate) fn spawn(
        label: String,
        transport: impl Transport,
        options: WebhookOptions,
        metrics: Arc<Metrics>,
    ) -> Webhook {
        let shared = Arc::new(Shared {
            label,
            capacity: options.queue_capacity.max(1),
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                closed: false,
            }),
            wake: tokio::sync::Notify::new(),
            stop: CancellationToken::new(),
            metrics,
        });
        let task = tokio::spawn(run(shared.clone(), transport, options));
        Webhook {
            _last: Arc::new(CloseOnDrop(shared.clone())),
            shared,
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    /// `scheme://host[:port]`: what logs and metrics call this webhook.
    pub fn label(&self) -> &str {
        &self.shared.label
    }

    /// Queues `event` for delivery and returns its id at once; never
    /// waits. When the queue is full the oldest event is dropped (logged,
    /// counted); after shutdown the event itself is.
    pub fn send(&self, event: serde_json::Value) -> String {
        let event = Event {
            id: event_id(),
            body: event.to_string(),
        };
        let id = event.id.clone();
        let dropped = {
            let mut q = self.shared.queue();
            if q.closed {
                Some(event)
            } else {
                let oldest = if q.events.len() >= self.shared.capacity {
                    q.events.pop_front()
                } else {
                    None
                };
                q.events.push_back(event);
                oldest
            }
        };
        if let Some(lost) = dropped {
            self.shared.count("dropped");
            tracing::warn!(
                webhook = %self.shared.label,
                event = %lost.id,
                "webhook queue full or closed: event dropped"
            );
        }
        self.shared.wake.notify_one();
        id
    }

    /// Events waiting (not counting one being delivered).
    pub fn queued(&self) -> usize {
        self.shared.queue().events.len()
    }

    /// Stops taking events, gives the queue up to `flush` to drain, then
    /// stops the task; what is left is dropped (logged, counted).
    pub async fn shutdown(&self, flush: Duration) {
        self.shared.queue().closed = true;
        self.shared.wake.notify_one();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut task) = task else { return };
        if tokio::time::timeout(flush, &mut task).await.is_err() {
            self.shared.stop.cancel();
            let _ = task.await;
        }
    }
}

/// The delivery task: one event at a time, in order, each until delivered,
/// refused or given up.
async fn run(shared: Arc<Shared>, transport: impl Transport, options: WebhookOptions) {
    loop {
        let next = {
            let mut q = shared.queue();
            match q.events.pop_front() {
                Some(e) => Some(e),
                None if q.closed => return,
                None => None,
            }
        };
        let Some(event) = next else {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = shared.stop.cancelled() => return,
            }
            continue;
        };
        if !deliver(&shared, &transport, &options, &event).await {
            // Stopped mid-delivery at shutdown: this event and the rest
            // are lost, and said so.
            let mut lost = vec![event.id];
            lost.extend(shared.queue().events.drain(..).map(|e| e.id));
            for _ in &lost {
                shared.count("dropped");
            }
            tracing::warn!(
                webhook = %shared.label,
                events = ?lost,
                "shutdown: webhook events not delivered in time, dropped"
            );
            return;
        }
    }
}

/// Delivers one event with retries. False when stopped by shutdown.
async fn deliver(
    shared: &Shared,
    transport: &impl Transport,
    options: &WebhookOptions,
    event: &Event,
) -> bool {
    let give_up = Instant::now() + options.give_up_after;
    let mut attempts: u32 = 0;
    loop {
        attempts += 1;
        let left = give_up.saturating_duration_since(Instant::now());
        let budget = options
            .attempt_timeout
            .min(left.max(Duration::from_millis(1)));
        let outcome = tokio::select! {
            _ = shared.stop.cancelled() => return false,
            r = tokio::time::timeout(budget, transport.post(event)) => r.unwrap_or_else(|_| Attempt::Retry {
                why: format!("no answer within {}", humantime::format_duration(budget)),
                retry_after: None,
            }),
        };
        let (why, retry_after) = match outcome {
            Attempt::Delivered => {
                shared.count("delivered");
                tracing::debug!(webhook = %shared.label, event = %event.id, attempts, "webhook delivered");
                return true;
            }
            Attempt::Refused { status } => {
                shared.count("failed");
                tracing::warn!(
                    webhook = %shared.label,
                    event = %event.id,
                    status,
                    "webhook refused the event (not retried: only connection errors, 5xx and 429 are)"
                );
                return true;
            }
            Attempt::Retry { why, retry_after } => (why, retry_after),
        };
        // Never sooner than the receiver asked, never a tight loop when it
        // asks for 0.
        let delay = backoff(options.backoff_first, options.backoff_max, attempts)
            .max(retry_after.unwrap_or_default());
        if Instant::now() + delay >= give_up {
            shared.count("failed");
            tracing::warn!(
                webhook = %shared.label,
                event = %event.id,
                attempts,
                error = %why,
                "webhook event given up after {}",
                humantime::format_duration(options.give_up_after)
            );
            return true;
        }
        shared.count("retried");
        tracing::info!(
            webhook = %shared.label,
            event = %event.id,
            attempts,
            error = %why,
            "webhook delivery failed, retrying in {:?}",
            delay
        );
        tokio::select! {
            _ = shared.stop.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Checks what `options` name before any event needs them (the CA file:
/// readable, PEM, at least one certificate), so a broker with a broken
/// `server.webhook_ca_file` stops at start with the reason rather than
/// losing its first notification.
pub fn check_options(options: &WebhookOptions) -> Result<()> {
    if options.ca_file.is_some() {
        transport::client_config(options)?;
    }
    Ok(())
}

/// Every webhook of a broker, one per distinct URL however many access
/// policies name it, so their events stay in one order and one queue.
pub struct Webhooks {
    options: WebhookOptions,
    metrics: Arc<Metrics>,
    hooks: Mutex<HashMap<String, Webhook>>,
}

impl Webhooks {
    pub fn new(options: WebhookOptions, metrics: Arc<Metrics>) -> Self {
        Webhooks {
            options,
            metrics,
            hooks: Mutex::new(HashMap::new()),
        }
    }

    /// The webhook for `url`, started on first use.
    pub fn get(&self, url: &str) -> Result<Webhook> {
        let mut hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hooks.get(url) {
            return Ok(h.clone());
        }
        let h = Webhook::start(url, self.options.clone(), self.metrics.clone())?;
        hooks.insert(url.to_string(), h.clone());
        Ok(h)
    }

    /// Flushes every webhook at once, for at most `flush` in all.
    pub async fn shutdown(&self, flush: Duration) {
        let hooks: Vec<Webhook> = self
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        futures::future::join_all(hooks.iter().map(|h| h.shutdown(flush))).await;
    }
}
