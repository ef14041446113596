//! The retry, drop and shutdown rules on paused time with a scripted
//! transport; then the real HTTP path against receivers on 127.0.0.1
//! (`receiver.rs`).

mod receiver;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::transport::{classify, retry_after};
use super::*;

/// `outcome`'s count over every webhook.
pub(super) fn count(m: &Metrics, outcome: &str) -> u64 {
    let text = m.encode();
    text.lines()
        .filter(|l| {
            l.starts_with("credbroker_notifications_total{")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Answers each attempt with the next scripted answer (then `Delivered`),
/// noting when each came and for which event. With `gate`, an attempt
/// first waits for it to open.
#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<Attempt>>>,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl Script {
    fn new(answers: Vec<Attempt>) -> Self {
        Script {
            answers: Arc::new(Mutex::new(answers.into())),
            ..Default::default()
        }
    }

    /// A script whose every attempt first waits for a permit of the
    /// returned gate (it has none yet).
    fn gated() -> (Self, Arc<tokio::sync::Semaphore>) {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let script = Script {
            gate: Some(gate.clone()),
            ..Script::new(vec![])
        };
        (script, gate)
    }

    fn seen(&self) -> Vec<(Instant, String)> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl Transport for Script {
    async fn post(&self, event: &Event) -> Attempt {
        self.seen
            .lock()
            .unwrap()
            .push((Instant::now(), event.id.clone()));
        self.arrived.notify_one();
        if let Some(gate) = &self.gate {
            let _ = gate.acquire().await;
        }
        self.answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Attempt::Delivered)
    }
}

/// Webhook `test` over `script` with the default options, and the
/// metrics it counts in.
fn spawn(script: &Script) -> (Webhook, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let hook = Webhook::spawn("test".into(), script.clone(), options(), metrics.clone());
    (hook, metrics)
}

fn unavailable() -> Attempt {
    Attempt::Retry {
        why: "status 503".into(),
        retry_after: None,
    }
}

fn options() -> WebhookOptions {
    WebhookOptions {
        queue_capacity: 4,
        attempt_timeout: Duration::from_secs(10),
        give_up_after: Duration::from_secs(300),
        backoff_first: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        ca_file: None,
    }
}

/// Polls (on paused time: advancing it) until `done`.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never happened: {what}");
}

#[test]
fn backoff_doubles_up_to_the_cap_with_half_of_it_random() {
    let (first, max) = (Duration::from_secs(1), Duration::from_secs(60));
    for retry in 1..=40u32 {
        let full = Duration::from_secs(1u64 << (retry - 1).min(20)).min(max);
        for _ in 0..50 {
            let d = backoff(first, max, retry);
            assert!(
                d >= full / 2 && d <= full,
                "retry {retry}: {d:?} of {full:?}"
            );
        }
    }
    // Jitter: 50 draws of the 8 s step are not all equal.
    let draws: std::collections::BTreeSet<_> = (0..50).map(|_| backoff(first, max, 4)).collect();
    assert!(draws.len() > 1);
}

#[test]
fn retry_after_takes_seconds_or_a_date_and_ignores_the_rest() {
    let now = chrono::DateTime::parse_from_rfc2822("Mon, 07 Dec 2026 08:00:00 GMT")
        .unwrap()
        .with_timezone(&chrono::Utc);
    assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
    assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
    assert_eq!(
        retry_after("Mon, 07 Dec 2026 08:01:30 GMT", now),
        Some(Duration::from_secs(90))
    );
    assert_eq!(
        retry_after("Mon, 07 Dec 2026 07:00:00 GMT", now),
        Some(Duration::ZERO),
        "a date in the past: now"
    );
    assert_eq!(retry_after("soon", now), None);
    assert_eq!(retry_after("-5", now), None);
}

#[test]
fn statuses_decide_delivered_retried_or_refused() {
    let none = http::HeaderMap::new();
    assert!(matches!(classify(200, &none), Attempt::Delivered));
    assert!(matches!(classify(204, &none), Attempt::Delivered));
    for s in [500, 502, 503, 504, 429] {
        assert!(
            matches!(
                classify(s, &none),
                Attempt::Retry {
                    retry_after: None,
                    ..
                }
            ),
            "{s}"
        );
    }
    for s in [400, 401, 403, 404, 410, 422, 301, 302, 101] {
        assert!(
            matches!(classify(s, &none), Attempt::Refused { status } if status == s),
            "{s}"
        );
    }
    let mut h = http::HeaderMap::new();
    h.insert(http::header::RETRY_AFTER, "7".parse().unwrap());
    assert!(matches!(
        classify(429, &h),
        Attempt::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(7)
    ));
}

#[test]
fn targets_show_scheme_and_host_only_and_bad_urls_are_refused_without_echo() {
    let t = Target::parse("https://hooks.example.org/services/T0/B0/S3CRETTOKEN?x=y").unwrap();
    assert_eq!(t.label(), "https://hooks.example.org");
    assert!(!format!("{t:?}").contains("S3CRET"));
    let t = Target::parse("http://127.0.0.1:8080/hook/S3CRETTOKEN").unwrap();
    assert_eq!(t.label(), "http://127.0.0.1:8080");
    assert!(t.is_loopback() && !t.is_https());
    assert_eq!(
        Target::parse("https://[::1]:9/S3CRETTOKEN")
            .unwrap()
            .label(),
        "https://[::1]:9"
    );
    for (bad, says) in [
        ("ftp://example.org/S3CRETTOKEN", "expected http or https"),
        ("https://user:S3CRETTOKEN@example.org/x", "user info"),
        ("not a url S3CRETTOKEN", "not a valid URL"),
        ("unix:/S3CRETTOKEN", "expected http or https"),
    ] {
        let e = Target::parse(bad).unwrap_err().to_string();
        assert!(e.contains(says), "{bad}: {e}");
        assert!(!e.contains("S3CRETTOKEN"), "{bad}: {e}");
    }
}

#[tokio::test(start_paused = true)]
async fn retries_with_growing_backoff_then_delivers() {
    let script = Script::new(vec![unavailable(), unavailable(), unavailable()]);
    let (hook, metrics) = spawn(&script);
    let id = hook.send(serde_json::json!({"event": "request"}));
    until("delivered", || count(&metrics, "delivered") == 1).await;
    let seen = script.seen();
    assert_eq!(seen.len(), 4);
    assert!(
        seen.iter().all(|(_, e)| *e == id),
        "one id on every attempt"
    );
    for (i, pair) in seen.windows(2).enumerate() {
        let gap = pair[1].0 - pair[0].0;
        let full = Duration::from_secs(1 << i);
        assert!(gap >= full / 2 && gap <= full, "retry {}: {gap:?}", i + 1);
    }
    assert_eq!(count(&metrics, "retried"), 3);
    assert_eq!(count(&metrics, "failed"), 0);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_receiver_is_given_up_within_the_bound() {
    let metrics = Arc::new(Metrics::new());
    let always: Vec<Attempt> = (0..1000).map(|_| unavailable()).collect();
    let script = Script::new(always);
    let opts = WebhookOptions {
        give_up_after: Duration::from_secs(120),
        backoff_max: Duration::from_secs(20),
        ..options()
    };
    let hook = Webhook::spawn("test".into(), script.clone(), opts, metrics.clone());
    let start = Instant::now();
    let first = hook.send(serde_json::json!({"n": 1}));
    until("first given up", || count(&metrics, "failed") == 1).await;
    let seen = script.seen();
    let first_attempts: Vec<_> = seen.iter().filter(|(_, e)| *e == first).collect();
    let last = first_attempts.last().unwrap().0;
    assert!(
        last - start <= Duration::from_secs(120),
        "no attempt after the bound"
    );
    assert!(first_attempts.len() >= 6, "{}", first_attempts.len());
    assert_eq!(
        count(&metrics, "retried"),
        first_attempts.len() as u64 - 1,
        "one count per retry"
    );
    // The next event is tried, the receiver's state not held against it.
    let second = hook.send(serde_json::json!({"n": 2}));
    until("second tried", || {
        script.seen().iter().any(|(_, e)| *e == second)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_one_past_the_bound_gives_up_at_once() {
    let script = Script::new(vec![Attempt::Retry {
        why: "status 429".into(),
        retry_after: Some(Duration::from_secs(45)),
    }]);
    let (hook, metrics) = spawn(&script);
    hook.send(serde_json::json!({}));
    until("delivered", || count(&metrics, "delivered") == 1).await;
    let seen = script.seen();
    assert!(seen[1].0 - seen[0].0 >= Duration::from_secs(45));
    assert!(seen[1].0 - seen[0].0 < Duration::from_secs(47));

    // Asked to come back after the give-up bound: given up now, not
    // retried early against the receiver's wish.
    let script = Script::new(vec![Attempt::Retry {
        why: "status 503".into(),
        retry_after: Some(Duration::from_secs(3600)),
    }]);
    let (hook, metrics) = spawn(&script);
    let start = Instant::now();
    hook.send(serde_json::json!({}));
    until("failed", || count(&metrics, "failed") == 1).await;
    assert!(Instant::now() - start < Duration::from_secs(5));
    assert_eq!(script.seen().len(), 1);
    assert_eq!(count(&metrics, "retried"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_not_retried() {
    let script = Script::new(vec![Attempt::Refused { status: 400 }]);
    let (hook, metrics) = spawn(&script);
    hook.send(serde_json::json!({}));
    until("failed", || count(&metrics, "failed") == 1).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(script.seen().len(), 1);
    assert_eq!(count(&metrics, "retried"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_attempt_times_out_and_is_retried() {
    let (script, gate) = Script::gated();
    let (hook, metrics) = spawn(&script);
    hook.send(serde_json::json!({}));
    until("two attempts", || script.seen().len() >= 2).await;
    let seen = script.seen();
    // attempt_timeout (10 s), then the first backoff (0.5–1 s).
    let gap = seen[1].0 - seen[0].0;
    assert!(
        gap >= Duration::from_millis(10_500) && gap <= Duration::from_secs(11),
        "{gap:?}"
    );
    gate.add_permits(1000);
    until("delivered", || count(&metrics, "delivered") == 1).await;
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_drops_the_oldest_and_send_never_waits() {
    let (script, gate) = Script::gated();
    let (hook, metrics) = spawn(&script);
    let first = hook.send(serde_json::json!({"n": 0}));
    script.arrived.notified().await;
    // The worker holds `first`; the queue (4) takes 6 more, dropping 2,
    // each send returning at once (no time passes).
    let before = Instant::now();
    let ids: Vec<String> = (1..=6)
        .map(|n| hook.send(serde_json::json!({"n": n})))
        .collect();
    assert_eq!(Instant::now(), before);
    assert_eq!(hook.queued(), 4);
    assert_eq!(count(&metrics, "dropped"), 2);
    gate.add_permits(1000);
    until("delivered", || count(&metrics, "delivered") == 5).await;
    let order: Vec<String> = script.seen().into_iter().map(|(_, e)| e).collect();
    let mut expect = vec![first];
    expect.extend(ids[2..].iter().cloned());
    assert_eq!(order, expect, "the two oldest queued were the ones dropped");
}

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_what_it_can_within_its_bound_then_drops_the_rest() {
    // A receiver that takes events: shutdown returns once they are in.
    let script = Script::new(vec![unavailable()]);
    let (hook, metrics) = spawn(&script);
    for n in 0..3 {
        hook.send(serde_json::json!({ "n": n }));
    }
    let start = Instant::now();
    hook.shutdown(Duration::from_secs(5)).await;
    assert!(Instant::now() - start < Duration::from_secs(5));
    assert_eq!(count(&metrics, "delivered"), 3);
    hook.send(serde_json::json!({"late": true}));
    assert_eq!(count(&metrics, "dropped"), 1, "sent after shutdown");

    // A receiver that is down: shutdown takes its bound, not the give-up
    // time, and counts what it leaves.
    let script = Script::new((0..1000).map(|_| unavailable()).collect());
    let (hook, metrics) = spawn(&script);
    for n in 0..3 {
        hook.send(serde_json::json!({ "n": n }));
    }
    let start = Instant::now();
    hook.shutdown(Duration::from_secs(5)).await;
    let took = Instant::now() - start;
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(count(&metrics, "dropped"), 3);
    assert_eq!(count(&metrics, "delivered") + count(&metrics, "failed"), 0);
}

#[tokio::test(start_paused = true)]
async fn webhooks_start_one_task_per_distinct_url() {
    let metrics = Arc::new(Metrics::new());
    let hooks = Webhooks::new(options(), metrics.clone());
    let a = hooks.get("http://127.0.0.1:9/a/T0KEN").unwrap();
    let a2 = hooks.get("http://127.0.0.1:9/a/T0KEN").unwrap();
    let b = hooks.get("http://127.0.0.1:9/b/T0KEN").unwrap();
    assert!(Arc::ptr_eq(&a.shared, &a2.shared));
    assert!(!Arc::ptr_eq(&a.shared, &b.shared));
    assert!(hooks.get("gopher://x/").is_err());
    hooks.shutdown(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn dropping_the_last_handle_delivers_the_queue_then_ends_the_task() {
    let script = Script::new(vec![unavailable()]);
    let (hook, metrics) = spawn(&script);
    let clone = hook.clone();
    hook.send(serde_json::json!({"n": 1}));
    clone.send(serde_json::json!({"n": 2}));
    drop(hook);
    drop(clone);
    // The task holds the transport (the script's `seen`) until it ends.
    until("task ended", || Arc::strong_count(&script.seen) == 1).await;
    assert_eq!(count(&metrics, "delivered"), 2);
    assert_eq!(count(&metrics, "dropped"), 0);
}

/// A broken CA file is found at start (the daemon calls this), naming the
/// file; none set, or a real CA, passes.
#[test]
fn check_options_refuses_a_ca_file_that_is_not_certificates() {
    let dir = tempfile::tempdir().unwrap();
    assert!(check_options(&WebhookOptions::default()).is_ok());
    let missing = dir.path().join("missing.pem");
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    for path in [missing, bad] {
        let e = check_options(&WebhookOptions {
            ca_file: Some(path.clone()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
    }
    let ca = credbroker_testkit::pki::DevCa::generate("chat CA").unwrap();
    let good = dir.path().join("ca.pem");
    std::fs::write(&good, ca.cert_pem()).unwrap();
    assert!(check_options(&WebhookOptions {
        ca_file: Some(good),
        ..Default::default()
    })
    .is_ok());
}
