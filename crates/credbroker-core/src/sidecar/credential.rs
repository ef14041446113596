//! One leased credential as the sidecar holds it: the secrets in
//! zeroizing buffers, the broker's times, and our clock's offset from the
//! broker's.

use chrono::{DateTime, TimeDelta, Utc};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::lease::Password;
use crate::pb;

use super::schedule::LeaseTimes;

/// One leased credential. `Debug` leaves the secrets out.
pub struct Credential {
    pub lease_id: String,
    pub kind: String,
    pub username: String,
    pub password: Password,
    /// The broker's connection URI; it carries the password.
    pub dsn: Zeroizing<String>,
    pub host: String,
    pub port: u32,
    pub database: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub max_expires_at: DateTime<Utc>,
    pub renewable: bool,
    /// Our clock minus the broker's, estimated when the lease was issued.
    /// The times above are the broker's (they go into the file as they are);
    /// scheduling uses them shifted by this, so a skewed clock on either side
    /// does not make the sidecar renew late. Estimated from when the request
    /// was *sent*, so any error makes us act early, never late.
    pub clock_offset: TimeDelta,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("lease_id", &self.lease_id)
            .field("username", &self.username)
            .field("expires_at", &self.expires_at)
            .field("max_expires_at", &self.max_expires_at)
            .finish_non_exhaustive()
    }
}

pub(crate) fn time(t: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    t.as_ref()
        .and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
}

pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Credential {
    /// Takes the secrets out of an IssueLease reply (to a request sent at
    /// `sent_at` by our clock); the reply's copies are wiped.
    pub fn from_reply(mut l: pb::Lease, sent_at: DateTime<Utc>) -> Result<Self> {
        let (Some(issued_at), Some(expires_at), Some(max_expires_at)) = (
            time(&l.issued_at),
            time(&l.expires_at),
            time(&l.max_expires_at),
        ) else {
            l.password.zeroize();
            l.dsn.zeroize();
            return Err(Error::internal("broker reply without lease times"));
        };
        Ok(Credential {
            password: Password::from_secret(std::mem::take(&mut l.password)),
            dsn: Zeroizing::new(std::mem::take(&mut l.dsn)),
            lease_id: l.lease_id,
            kind: l.kind,
            username: l.username,
            host: l.host,
            port: l.port,
            database: l.database_name,
            clock_offset: sent_at - issued_at,
            issued_at,
            expires_at,
            max_expires_at,
            renewable: l.renewable,
        })
    }

    /// The lease's times on our clock, for scheduling.
    pub fn times(&self) -> LeaseTimes {
        LeaseTimes {
            issued_at: self.local(self.issued_at),
            expires_at: self.local(self.expires_at),
            max_expires_at: self.local(self.max_expires_at),
            renewable: self.renewable,
        }
    }

    /// A broker timestamp on our clock.
    pub fn local(&self, broker_time: DateTime<Utc>) -> DateTime<Utc> {
        broker_time + self.clock_offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_without_times_are_refused_and_debug_hides_secrets() {
        let mut l = pb::Lease {
            lease_id: "l_x".into(),
            username: "u".into(),
            password: "hunter2hunter2".into(),
            dsn: "postgresql://u:hunter2hunter2@h:1/d".into(),
            ..Default::default()
        };
        let sent = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        assert!(Credential::from_reply(l.clone(), sent).is_err());
        let t = Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        });
        l.issued_at = t;
        l.expires_at = t;
        l.max_expires_at = t;
        let c = Credential::from_reply(l, sent).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(c.password.expose(), "hunter2hunter2");
    }

    #[test]
    fn scheduling_runs_on_our_clock_even_when_the_brokers_differs() {
        let broker = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0);
        let l = pb::Lease {
            issued_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
            expires_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_060,
                nanos: 0,
            }),
            max_expires_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_300,
                nanos: 0,
            }),
            ..Default::default()
        };
        // Our clock is 90 s behind the broker's.
        let sent = broker(-90).unwrap();
        let c = Credential::from_reply(l, sent).unwrap();
        assert_eq!(
            c.expires_at,
            broker(60).unwrap(),
            "the file shows the broker's time"
        );
        let t = c.times();
        assert_eq!(t.issued_at, sent);
        assert_eq!(t.expires_at, broker(-30).unwrap());
        assert_eq!(t.max_expires_at, broker(210).unwrap());
    }
}
