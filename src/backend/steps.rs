//! Wall time per backend statement kind ("create failsafe event", "drop
//! user", …), summed process-wide: what the bench prints to say which step
//! of a lease costs what. One uncontended lock per statement, next to a
//! database round trip.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

static STEPS: Mutex<BTreeMap<&'static str, (u64, Duration)>> = Mutex::new(BTreeMap::new());

/// Adds one statement of kind `what` that took `took`.
pub fn record(what: &'static str, took: Duration) {
    let mut m = STEPS.lock().unwrap_or_else(|p| p.into_inner());
    let e = m.entry(what).or_default();
    e.0 += 1;
    e.1 += took;
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
