//! Is each database reachable? The backend's own preflight (a pooled
//! connection and a catalog query; on MySQL also the event scheduler),
//! bounded by a short timeout and cached for a few seconds, so a page
//! refreshed by several on-calls during an outage neither waits long nor
//! piles connection attempts on a database that is struggling.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::Backend;

/// How long one probe may take before the database counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a probe's answer is reused.
pub const PROBE_CACHE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub enum Reach {
    /// Answered in `took`, with the backend's warnings (no failsafe, …).
    Up {
        took: Duration,
        warnings: Vec<String>,
    },
    /// The error's caller line (`Error::for_caller`, which logs the rest)
    /// or the timeout.
    Down(String),
}

#[derive(Default)]
pub struct Probes {
    cache: Mutex<HashMap<String, (Instant, Reach)>>,
}

impl Probes {
    /// The cached answer for `backend`, or a fresh probe.
    pub async fn reach(&self, backend: &dyn Backend) -> Reach {
        let name = backend.name().to_string();
        if let Some((at, r)) = self.lock().get(&name) {
            if at.elapsed() < PROBE_CACHE {
                return r.clone();
            }
        }
        let start = Instant::now();
        let r = match tokio::time::timeout(PROBE_TIMEOUT, backend.preflight()).await {
            Ok(Ok(warnings)) => Reach::Up {
                took: start.elapsed(),
                warnings,
            },
            Ok(Err(e)) => Reach::Down(e.for_caller().line()),
            Err(_) => Reach::Down(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
        };
        self.lock().insert(name, (Instant::now(), r.clone()));
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Reach)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
