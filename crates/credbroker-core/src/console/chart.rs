//! The overview's per-minute bar charts, as numbers an SVG template draws:
//! rendered on the server, no chart library, no script, nothing fetched.

use crate::rate_history::Minute;

/// Drawing area of one chart, in SVG user units.
pub const WIDTH: u32 = 600;
pub const HEIGHT: u32 = 80;

pub struct Bar {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    /// The tooltip: minute and count.
    pub label: String,
}

pub struct Chart {
    pub title: String,
    pub total: u64,
    pub peak: u64,
    pub bars: Vec<Bar>,
    pub from: String,
    pub to: String,
}

/// A chart of one series (`pick`) over the minutes given, oldest first.
pub fn chart(title: &str, minutes: &[Minute], pick: impl Fn(&Minute) -> u64) -> Chart {
    let values: Vec<u64> = minutes.iter().map(&pick).collect();
    let peak = values.iter().copied().max().unwrap_or(0);
    let slot = WIDTH / (minutes.len().max(1) as u32);
    let bars = minutes
        .iter()
        .zip(&values)
        .enumerate()
        .map(|(i, (m, &v))| {
            // Scaled to the hour's peak; a non-zero minute is at least one
            // unit high so it never disappears next to a spike.
            let height = if peak == 0 {
                0
            } else {
                ((v * HEIGHT as u64).div_ceil(peak) as u32).min(HEIGHT)
            };
            Bar {
                x: i as u32 * slot,
                y: HEIGHT - height,
                width: slot.saturating_sub(1).max(1),
                height,
                label: format!("{}: {v}", m.start.format("%H:%M")),
            }
        })
        .collect();
    let fmt = |m: Option<&Minute>| {
        m.map(|m| m.start.format("%H:%MZ").to_string())
            .unwrap_or_default()
    };
    Chart {
        title: title.to_string(),
        total: values.iter().sum(),
        peak,
        bars,
        from: fmt(minutes.first()),
        to: fmt(minutes.last()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Duration};

    #[test]
    fn bars_scale_to_the_peak_and_keep_small_minutes_visible() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let minutes: Vec<Minute> = [0u64, 1, 100, 50]
            .iter()
            .enumerate()
            .map(|(i, &n)| Minute {
                start: t0 + Duration::minutes(i as i64),
                issued: n,
                revoked: 0,
            })
            .collect();
        let c = chart("issued", &minutes, |m| m.issued);
        assert_eq!((c.total, c.peak), (151, 100));
        let h: Vec<u32> = c.bars.iter().map(|b| b.height).collect();
        assert_eq!(h, vec![0, 1, HEIGHT, HEIGHT / 2]);
        assert!(c.bars.iter().all(|b| b.y + b.height == HEIGHT));
        assert_eq!(c.bars[3].x, 3 * (WIDTH / 4));
        let empty = chart("revoked", &minutes, |m| m.revoked);
        assert!(empty.bars.iter().all(|b| b.height == 0));
    }
}
