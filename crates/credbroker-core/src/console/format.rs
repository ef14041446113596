//! How the pages write times and durations: UTC always (an on-call and a
//! DBA in two time zones read the same text), and a relative hint.

use chrono::{DateTime, Utc};

/// `2026-12-01 16:30:05Z`.
pub fn utc(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

/// `in 4m 10s`, `3h 2m ago`.
pub fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (t - now).num_seconds();
    let span = short(secs.unsigned_abs());
    if secs >= 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// Two units at most: `45s`, `4m 10s`, `3h 2m`, `2d 5h`.
pub fn short(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_and_spans_short() {
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        assert_eq!(utc(t), "2027-01-15 08:00:00Z");
        assert_eq!(relative(t + chrono::Duration::seconds(250), t), "in 4m 10s");
        assert_eq!(
            relative(t - chrono::Duration::seconds(3 * 3600 + 120), t),
            "3h 2m ago"
        );
        assert_eq!(short(45), "45s");
        assert_eq!(short(2 * 86_400 + 5 * 3600 + 7), "2d 5h");
    }
}
