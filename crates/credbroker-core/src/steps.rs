//! Wall time per step of a lease — a broker step ("store: write intent",
//! "audit") or a backend statement ("create role", "drop user") — summed
//! process-wide: what the bench prints to say which part of a lease costs
//! what. Off unless the bench turns it on, so a serving broker pays one
//! relaxed atomic load per step and nothing else.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static STEPS: Mutex<BTreeMap<&'static str, (u64, Duration)>> = Mutex::new(BTreeMap::new());

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

/// Starts (or stops) recording.
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Adds one step of kind `what` that took `took`.
pub fn record(what: &'static str, took: Duration) {
    if !on() {
        return;
    }
    let mut m = STEPS.lock().unwrap_or_else(|p| p.into_inner());
    let e = m.entry(what).or_default();
    e.0 += 1;
    e.1 += took;
}

/// Runs `fut`, recording its wall time as `what`.
pub async fn timed<T>(what: &'static str, fut: impl Future<Output = T>) -> T {
    if !on() {
        return fut.await;
    }
    let started = Instant::now();
    let out = fut.await;
    record(what, started.elapsed());
    out
}

/// Every kind so far: (count, total time). `take` also resets them.
pub fn snapshot(take: bool) -> BTreeMap<&'static str, (u64, Duration)> {
    let mut m = STEPS.lock().unwrap_or_else(|p| p.into_inner());
    if take {
        std::mem::take(&mut *m)
    } else {
        m.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_only_while_enabled() {
        // One test touches the global, so parallel tests cannot interleave.
        enable(false);
        timed("t: off", async {}).await;
        assert!(!snapshot(false).contains_key("t: off"));
        enable(true);
        timed("t: on", tokio::time::sleep(Duration::from_millis(2))).await;
        record("t: on", Duration::from_millis(1));
        let (n, took) = snapshot(false)["t: on"];
        enable(false);
        assert_eq!(n, 2);
        assert!(took >= Duration::from_millis(3), "{took:?}");
    }
}
