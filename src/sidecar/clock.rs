//! The sidecar's clock. The real one is the system's; the fast tier's is
//! tokio's (paused) time anchored to a wall-clock instant, so a whole
//! lease's timeline — renewals, rotation, grace, expiry — runs in
//! milliseconds with every deadline exact.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::schedule::delta;

#[derive(Debug, Clone, Copy)]
pub enum Clock {
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
