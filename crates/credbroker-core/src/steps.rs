//! The steps of a lease — a broker step ("store: write intent", "audit:
//! append") or a backend statement ("create role", "drop user") — as
//! `tracing` spans: TRACE level, target [`TARGET`], the step's name in the
//! field `step`. `credbroker bench` installs a layer that sums their wall
//! time per step (src/bench/steps.rs) to say which part of a lease costs
//! what. Any other subscriber (a serving broker logs at INFO) leaves the
//! callsite disabled: the span is never built and the step runs as it is.

use std::future::Future;

use tracing::Instrument;

/// The target of every step span (and nothing else).
pub const TARGET: &str = "credbroker::step";

/// Whether `what` names a step of the broker's own ("store: …",
/// "database: …", "audit: …") rather than a part of one ("round: …" of a
/// shared revocation round, "statement: …", or a MySQL statement kind):
/// the broker's steps do not overlap, so they add up to the part of a
/// lease they account for.
pub fn is_broker_step(what: &str) -> bool {
    ["store: ", "database: ", "audit: "]
        .iter()
        .any(|p| what.starts_with(p))
}

/// The span of one step `what`; it ends when dropped (for code that is not
/// a future: `let _step = steps::span("audit: append").entered();`).
pub fn span(what: &'static str) -> tracing::Span {
    tracing::trace_span!(target: TARGET, "step", step = what)
}

/// Runs `fut` as step `what`: inside its span, or, with the span disabled,
/// as it is.
pub async fn timed<T>(what: &'static str, fut: impl Future<Output = T>) -> T {
    let span = span(what);
    if span.is_disabled() {
        return fut.await;
    }
    fut.instrument(span).await
}
