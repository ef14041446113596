//! The bench's step table: a `tracing` layer that sums the wall time of
//! every lease step span (`credbroker::steps`: TRACE, target
//! `credbroker::step`) by step name. Only `credbroker bench` installs it
//! (cli/mod.rs); the table lives in the layer, and the bench reads it back
//! through the process's subscriber ([`take`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::filter::{FilterFn, Filtered};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Per step: how many, and their total wall time.
pub type Table = BTreeMap<String, (u64, Duration)>;

/// The layer. Clones share one table.
#[derive(Clone, Default)]
pub struct StepTimes {
    table: Arc<Mutex<Table>>,
}

/// Kept in a step span's extensions from its start to its close.
struct Started {
    step: String,
    at: Instant,
}

/// The `step` field's value.
#[derive(Default)]
struct StepField(Option<String>);

impl tracing::field::Visit for StepField {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "step" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "step" && self.0.is_none() {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl StepTimes {
    /// The layer behind a filter that lets only step spans through, so it
    /// turns on nothing else (the log keeps its own filter).
    pub fn filtered<S>(self) -> Filtered<Self, FilterFn, S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        self.with_filter(FilterFn::new(|m| {
            m.target() == credbroker::steps::TARGET && m.is_span()
        }))
    }

    /// Every step so far, and a fresh table from now on.
    pub fn take(&self) -> Table {
        std::mem::take(&mut *self.table.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl<S> Layer<S> for StepTimes
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut step = StepField::default();
        attrs.record(&mut step);
        if let (Some(step), Some(span)) = (step.0, ctx.span(id)) {
            span.extensions_mut().insert(Started {
                step,
                at: Instant::now(),
            });
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(started) = ctx
            .span(&id)
            .and_then(|s| s.extensions_mut().remove::<Started>())
        else {
            return;
        };
        let took = started.at.elapsed();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let e = table.entry(started.step).or_default();
        e.0 += 1;
        e.1 += took;
    }
}

/// Takes the table of the [`StepTimes`] layer in this process's subscriber
/// (empty when none is installed: only `credbroker bench` installs it).
pub fn take() -> Table {
    tracing::dispatcher::get_default(|d| {
        d.downcast_ref::<StepTimes>()
            .map(StepTimes::take)
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    /// One test, in this order: the callsite's interest is cached per
    /// process, and a second dispatcher alive at the same time (a parallel
    /// test's) would turn "never" into "ask each time".
    #[tokio::test]
    async fn a_step_is_disabled_for_a_serving_broker_and_summed_by_the_bench() {
        {
            // A serving broker's subscriber: INFO, no step layer.
            let log = tracing_subscriber::fmt::layer()
                .with_writer(std::io::sink)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
            let _default =
                tracing::subscriber::set_default(tracing_subscriber::registry().with(log));
            assert!(credbroker::steps::span("store: off").is_disabled());
            assert_eq!(credbroker::steps::timed("store: off", async { 7 }).await, 7);
            assert!(take().is_empty());
        }

        // The bench's: the step layer beside the log.
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        let subscriber = tracing_subscriber::registry()
            .with(log)
            .with(StepTimes::default().filtered());
        let _default = tracing::subscriber::set_default(subscriber);
        credbroker::steps::timed("store: on", tokio::time::sleep(Duration::from_millis(2))).await;
        {
            let _step = credbroker::steps::span("store: on").entered();
            std::thread::sleep(Duration::from_millis(1));
        }
        credbroker::steps::timed("audit: append", async {}).await;
        // Not a step: another target's span, at any level.
        tracing::error_span!("store: on").in_scope(|| ());
        let table = take();
        let (n, took) = table["store: on"];
        assert_eq!(n, 2, "{table:?}");
        assert!(took >= Duration::from_millis(3), "{took:?}");
        assert_eq!(table["audit: append"].0, 1, "{table:?}");
        assert_eq!(table.len(), 2, "{table:?}");
        assert!(take().is_empty(), "take resets");
    }
}
