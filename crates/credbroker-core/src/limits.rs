//! Per-identity issue rate limits (token buckets), so a leaked client
//! certificate cannot fill a database with users.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets idle this long are forgotten, bounding memory under churn of
/// identities.
const IDLE_FORGET_SECS: f64 = 600.0;

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<(String, String), Bucket>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// Takes one token from the bucket of (role, identity), refilled at
    /// `rate` per second up to `burst`. False when empty.
    pub fn try_acquire(&self, role: &str, identity: &str, rate: f64, burst: u32) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| now.duration_since(b.last).as_secs_f64() < IDLE_FORGET_SECS);
        }
        let b = buckets
            .entry((role.to_string(), identity.to_string()))
            .or_insert(Bucket {
                tokens: f64::from(burst),
                last: now,
            });
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(f64::from(burst));
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_per_identity() {
        let l = RateLimiter::default();
        assert!((0..3).all(|_| l.try_acquire("r", "a", 0.001, 3)));
        assert!(!l.try_acquire("r", "a", 0.001, 3));
        assert!(
            l.try_acquire("r", "b", 0.001, 3),
            "another identity has its own bucket"
        );
    }
}
