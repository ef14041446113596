//! Who hears of access events: a small trait the lifecycle calls on every
//! request, approval, denial, break-glass, grant end and request expiry.
//! The default only logs; the webhook (HTTP POST with retries) plugs in
//! behind the same trait, per policy's `notify` URL.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::store::AccessRequest;

/// Receives one JSON event per access step. Must not block: a slow
/// receiver queues or drops, it never holds up a request.
pub trait AccessNotifier: Send + Sync {
    /// `event` is [`body`]'s shape. `notify` is the policy's URL, when
    /// it has one.
    fn notify(&self, notify: Option<&url::Url>, event: Value);
}

/// Logs each event (target `credbroker::access`): the default.
pub struct LogNotifier;

impl AccessNotifier for LogNotifier {
    fn notify(&self, notify: Option<&url::Url>, event: Value) {
        tracing::info!(
            target: "credbroker::access",
            notify = notify.map(webhook_origin).unwrap_or_default(),
            event = %event,
            "access event"
        );
    }
}

/// A webhook URL as logs may show it: scheme, host and port. Chat
/// webhooks carry their secret in the path or query, never logged.
fn webhook_origin(u: &url::Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{}://{h}:{p}", u.scheme()),
        (Some(h), None) => format!("{}://{h}", u.scheme()),
        _ => u.scheme().to_string(),
    }
}

/// What a serving broker uses: logs each event, and posts it to the
/// policy's `notify` webhook when it has one (`notify::Webhooks`: one
/// queue per URL, retried with backoff, never blocking the request that
/// made the event). A URL the notifier cannot use (bad CA file, say) is
/// a warning, not a refused request: the audit log has the event anyway.
pub struct WebhookNotifier {
    hooks: std::sync::Arc<crate::notify::Webhooks>,
}

impl WebhookNotifier {
    pub fn new(hooks: std::sync::Arc<crate::notify::Webhooks>) -> Self {
        WebhookNotifier { hooks }
    }
}

impl AccessNotifier for WebhookNotifier {
    fn notify(&self, notify: Option<&url::Url>, event: Value) {
        LogNotifier.notify(notify, event.clone());
        let Some(url) = notify else { return };
        match self.hooks.get(url.as_str()) {
            Ok(hook) => {
                hook.send(event);
            }
            Err(e) => tracing::warn!(
                target: "credbroker::access",
                webhook = %webhook_origin(url),
                error = %e,
                "access event not sent to its webhook"
            ),
        }
    }
}

/// The kinds of event, as their `event` field says them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requested,
    Approved,
    Denied,
    BreakGlass,
    GrantEnded,
    RequestExpired,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Requested => "access.requested",
            Kind::Approved => "access.approved",
            Kind::Denied => "access.denied",
            Kind::BreakGlass => "access.break_glass",
            Kind::GrantEnded => "access.grant_ended",
            Kind::RequestExpired => "access.request_expired",
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// An event's JSON body. Holds what a team's chat needs to know — never a
/// secret: a request carries none (credentials are leases, issued later
/// and never described here). `reason` is the request's, or the
/// denial's / revoke's for those events.
pub fn body(kind: Kind, r: &AccessRequest, actor: &str, reason: &str, at: DateTime<Utc>) -> Value {
    json!({
        "event": kind.as_str(),
        "request_id": r.id,
        "policy": r.policy,
        "roles": r.roles,
        "requester": r.requester,
        "actor": actor,
        "reason": reason,
        "at": rfc3339(at),
        "until": r.until.map(rfc3339),
        "state": r.state.as_str(),
        "approvals": r.approvals.len(),
        "approvals_needed": r.approvals_needed,
        "break_glass": r.break_glass,
    })
}

/// Records every event it is handed: for tests.
#[derive(Default)]
pub struct Recorder(pub std::sync::Mutex<Vec<(Option<String>, Value)>>);

impl Recorder {
    /// The `event` fields so far, in order.
    pub fn kinds(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, v)| v["event"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

impl AccessNotifier for Recorder {
    fn notify(&self, notify: Option<&url::Url>, event: Value) {
        self.0
            .lock()
            .unwrap()
            .push((notify.map(|u| u.to_string()), event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_url_is_logged_as_its_origin_only() {
        for (url, want) in [
            (
                "https://chat.example.org/hooks/T0K3N?key=s3cr3t",
                "https://chat.example.org",
            ),
            ("http://127.0.0.1:8080/hooks/T0K3N", "http://127.0.0.1:8080"),
        ] {
            let shown = webhook_origin(&url::Url::parse(url).unwrap());
            assert_eq!(shown, want);
            assert!(!shown.contains("T0K3N") && !shown.contains("s3cr3t"));
        }
    }
}
