//! Issuance and revocation counts per minute over the last hour, in memory,
//! for the console's charts. Prometheus counters answer the same question
//! only with a Prometheus server to ask; an on-call with nothing but a
//! browser still gets the last hour from the broker itself.
//!
//! A ring of 60 one-minute buckets, each stamped with its minute: a bucket
//! whose stamp is older than an hour is stale and reads as zero, so a quiet
//! broker needs no timer to clear it. Per process: replicas chart their own
//! traffic.

use std::sync::Mutex;

use chrono::{DateTime, Utc};

/// Buckets kept: one hour of minutes.
pub const MINUTES: usize = 60;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// Minutes since the epoch this bucket counts; stale when not current.
    minute: i64,
    issued: u64,
    revoked: u64,
}

/// One minute of the last hour, as charted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Minute {
    pub start: DateTime<Utc>,
    pub issued: u64,
    pub revoked: u64,
}

pub struct RateHistory {
    ring: Mutex<[Bucket; MINUTES]>,
}

impl Default for RateHistory {
    fn default() -> Self {
        RateHistory {
            ring: Mutex::new([Bucket::default(); MINUTES]),
        }
    }
}

impl RateHistory {
    pub fn issued(&self, at: DateTime<Utc>) {
        self.bump(at, |b| b.issued += 1);
    }

    pub fn revoked(&self, at: DateTime<Utc>) {
        self.bump(at, |b| b.revoked += 1);
    }

    fn bump(&self, at: DateTime<Utc>, f: impl FnOnce(&mut Bucket)) {
        let minute = at.timestamp().div_euclid(60);
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut ring[minute.rem_euclid(MINUTES as i64) as usize];
        if b.minute != minute {
            *b = Bucket {
                minute,
                ..Bucket::default()
            };
        }
        f(b);
    }

    /// The 60 minutes up to and including `now`'s, oldest first; minutes
    /// with nothing recorded are zeros.
    pub fn last_hour(&self, now: DateTime<Utc>) -> Vec<Minute> {
        let current = now.timestamp().div_euclid(60);
        let ring = *self.ring.lock().unwrap_or_else(|p| p.into_inner());
        (current - MINUTES as i64 + 1..=current)
            .map(|m| {
                let b = ring[m.rem_euclid(MINUTES as i64) as usize];
                let (issued, revoked) = if b.minute == m {
                    (b.issued, b.revoked)
                } else {
                    (0, 0)
                };
                Minute {
                    start: DateTime::from_timestamp(m * 60, 0).unwrap_or_default(),
                    issued,
                    revoked,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn counts_land_in_their_minute_and_age_out_after_an_hour() {
        let h = RateHistory::default();
        h.issued(at(0));
        h.issued(at(59));
        h.revoked(at(60));
        let hour = h.last_hour(at(61));
        assert_eq!(hour.len(), MINUTES);
        let last = hour[MINUTES - 1];
        let before = hour[MINUTES - 2];
        assert_eq!((before.issued, before.revoked), (2, 0));
        assert_eq!((last.issued, last.revoked), (0, 1));
        assert!(hour
            .windows(2)
            .all(|w| w[1].start - w[0].start == Duration::minutes(1)));
        assert_eq!(hour.iter().map(|m| m.issued).sum::<u64>(), 2);

        // An hour later the same slots are reused and the old counts gone.
        let later = at(60 * 60 + 5);
        h.issued(later);
        let hour = h.last_hour(later);
        assert_eq!(hour.iter().map(|m| m.issued).sum::<u64>(), 1);
        assert_eq!(
            hour.iter().map(|m| m.revoked).sum::<u64>(),
            1,
            "minute 1 is still within the hour"
        );
        let much_later = h.last_hour(at(3 * 60 * 60));
        assert!(much_later.iter().all(|m| m.issued == 0 && m.revoked == 0));
    }
}
