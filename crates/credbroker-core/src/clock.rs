//! The one clock of the broker, the revocation engine, the reaper, the
//! in-memory store and the sidecar. The real one is the system's; the fast
//! tier's is tokio's (paused) time anchored to a wall-clock instant, so a
//! lease's whole timeline — renewals, rotation, grace, expiry, the reaper's
//! sleeps and backoff — runs in milliseconds with every deadline exact.
//! Sleeps are tokio's, so they follow it.
//!
//! The SQLite and PostgreSQL stores keep their own clocks (the system's;
//! PostgreSQL's `clock_timestamp()` in SQL) for claim expiry and locks:
//! production runs on `System` only.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    #[default]
    System,
    /// `wall` at `at`, advancing with tokio's clock.
    Tokio {
        wall: DateTime<Utc>,
        at: tokio::time::Instant,
    },
}

impl Clock {
    /// tokio's clock (paused in tests), starting now.
    pub fn tokio() -> Self {
        Clock::Tokio {
            wall: Utc::now(),
            at: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Tokio { wall, at } => *wall + delta(at.elapsed()),
        }
    }

    /// How long until `t`, for a sleep.
    pub fn until(&self, t: DateTime<Utc>) -> Duration {
        (t - self.now()).to_std().unwrap_or(Duration::ZERO)
    }
}

/// `d` as a chrono duration (a century at most, so it never overflows).
pub fn delta(d: Duration) -> TimeDelta {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    TimeDelta::from_std(d.min(CENTURY)).unwrap_or(TimeDelta::zero())
}
