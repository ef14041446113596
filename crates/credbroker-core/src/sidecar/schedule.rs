//! When the sidecar renews, re-issues and retries. Pure functions of lease
//! times and "now", so the timing is tested without clocks.
//!
//! The shape, for a lease issued at `I` with hard limit `H`:
//! - renew when about two thirds of the remaining lifetime has passed, so a
//!   failed renewal still leaves a third of the lease to retry in;
//! - re-issue (rotate) at `H - lead`, `lead = max(grace, (H - I) / 3)`, at most
//!   half the lease's life: the old credential then stays valid for the
//!   grace period while the application moves to the new one.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// The sidecar never acts on a lease more often than this, so a lease close
/// to its limit cannot make it spin.
pub const MIN_STEP: Duration = Duration::from_millis(200);

/// First retry delay after a failed broker call.
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest retry delay: an outage is noticed to be over within this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// The times of one lease, as the broker returned them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimes {
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub max_expires_at: DateTime<Utc>,
    pub renewable: bool,
}

/// What to do next with the current lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Renew(DateTime<Utc>),
    Rotate(DateTime<Utc>),
}

impl Step {
    pub fn at(self) -> DateTime<Utc> {
        match self {
            Step::Renew(t) | Step::Rotate(t) => t,
        }
    }
}

/// Durations from the command line are capped at a century, so adding one
/// to a timestamp cannot overflow.
pub use crate::clock::delta;

/// When a replacement lease is issued: before the hard limit by the grace
/// period (or a third of the lease's life, whichever is longer), but never
/// in the first half of its life.
pub fn rotate_at(t: &LeaseTimes, grace: Duration) -> DateTime<Utc> {
    let life = (t.max_expires_at - t.issued_at).max(TimeDelta::zero());
    let lead = delta(grace).max(life / 3).min(life / 2);
    t.max_expires_at - lead
}

/// The next step for a lease whose expiry was last set at `granted_at`
/// (issue or renewal). Renewing is pointless once the expiry reached the
/// hard limit, and a renewal due after the rotation never happens.
pub fn next_step(t: &LeaseTimes, granted_at: DateTime<Utc>, grace: Duration) -> Step {
    let rotate = rotate_at(t, grace);
    if !t.renewable || t.expires_at >= t.max_expires_at {
        return Step::Rotate(rotate);
    }
    let remaining = (t.expires_at - granted_at).max(TimeDelta::zero());
    let renew = (granted_at + remaining * 2 / 3).max(granted_at + delta(MIN_STEP));
    if renew < rotate {
        Step::Renew(renew)
    } else {
        Step::Rotate(rotate)
    }
}

/// When an old lease is revoked after its replacement was written at `now`:
/// after the grace period, or at once if it has already expired. Never
/// later than its hard limit, where the broker ends it anyway.
pub fn revoke_at(old: &LeaseTimes, now: DateTime<Utc>, grace: Duration) -> DateTime<Utc> {
    if old.expires_at <= now {
        now
    } else {
        (now + delta(grace)).min(old.max_expires_at)
    }
}

/// Jittered exponential backoff: the n-th retry (0-based) waits a random
/// time in [d/2, d], d = base·2ⁿ capped, so many sidecars restarted with
/// one broker do not retry in lockstep.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure and returns how long to wait before the retry.
    pub fn next_delay(&mut self) -> Duration {
        let d = Self::ceiling(self.failures);
        self.failures = self.failures.saturating_add(1);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// The upper bound of the n-th delay.
    pub fn ceiling(failures: u32) -> Duration {
        BACKOFF_BASE
            .saturating_mul(1u32 << failures.min(16))
            .min(BACKOFF_CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
    }

    fn times(issued: i64, expires: i64, max: i64) -> LeaseTimes {
        LeaseTimes {
            issued_at: at(issued),
            expires_at: at(expires),
            max_expires_at: at(max),
            renewable: true,
        }
    }

    const GRACE: Duration = Duration::from_secs(2);

    #[test]
    fn renews_at_two_thirds_of_the_remaining_lease() {
        let t = times(0, 3000, 8000);
        assert_eq!(next_step(&t, at(0), GRACE), Step::Renew(at(2000)));
        // Renewed at 2 s to 5 s: next at 2 s + 2/3·3 s.
        let t = times(0, 5000, 8000);
        assert_eq!(next_step(&t, at(2000), GRACE), Step::Renew(at(4000)));
    }

    #[test]
    fn rotates_before_the_hard_limit_instead_of_renewing_past_it() {
        // Life 8 s: lead max(2 s, 8/3 s) = 2.666 s → rotate at 5.333 s, which
        // comes before the renewal that would be due at 6 s.
        let t = times(0, 7000, 8000);
        assert_eq!(
            next_step(&t, at(4000), GRACE),
            Step::Rotate(at(8000) - TimeDelta::milliseconds(8000) / 3)
        );
        // At the hard limit already: nothing to renew.
        let t = times(0, 8000, 8000);
        assert_eq!(
            next_step(&t, at(6000), GRACE),
            Step::Rotate(at(8000) - TimeDelta::milliseconds(8000) / 3)
        );
        let mut t = times(0, 3000, 8000);
        t.renewable = false;
        assert_eq!(
            next_step(&t, at(0), GRACE),
            Step::Rotate(at(8000) - TimeDelta::milliseconds(8000) / 3)
        );
    }

    #[test]
    fn the_lead_is_the_grace_period_but_at_most_half_the_life() {
        let t = times(0, 60_000, 3_600_000);
        // A third of an hour (20 min) beats a 30 s grace.
        assert_eq!(rotate_at(&t, Duration::from_secs(30)), at(2_400_000));
        // A grace longer than half the life is cut to half.
        assert_eq!(rotate_at(&t, Duration::from_secs(3600)), at(1_800_000));
    }

    #[test]
    fn never_steps_faster_than_the_minimum() {
        let t = times(0, 7100, 60_000);
        assert_eq!(
            next_step(&t, at(7000), GRACE),
            Step::Renew(at(7000 + MIN_STEP.as_millis() as i64))
        );
    }

    #[test]
    fn old_leases_are_revoked_after_the_grace_or_at_once_when_expired() {
        let old = times(0, 7000, 8000);
        assert_eq!(revoke_at(&old, at(5333), GRACE), at(7333));
        assert_eq!(revoke_at(&old, at(7000), GRACE), at(7000));
        assert_eq!(revoke_at(&old, at(6500), GRACE), at(8000));
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        let mut b = Backoff::default();
        for n in 0..10 {
            let ceiling = Backoff::ceiling(n);
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{n}: {d:?} vs {ceiling:?}"
            );
        }
        assert_eq!(Backoff::ceiling(10), BACKOFF_CAP);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(b.next_delay() <= BACKOFF_BASE);
    }
}
