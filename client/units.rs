//! Human units for terminal output: W, °C, MHz, GiB, and a sparkline.
//!
//! JSON output never goes through here; it carries exact numbers (see
//! `record`). A value the GPU does not report prints as "-", never as 0.

use std::time::Duration;

/// Printed for a value the GPU does not report.
pub const ABSENT: &str = "-";

pub fn celsius(c: Option<u32>) -> String {
    c.map_or_else(|| ABSENT.to_owned(), |c| format!("{c} °C"))
}

/// Milliwatts as whole watts when ≥ 100 W, else one decimal.
pub fn watts_value(mw: u32) -> String {
    let w = f64::from(mw) / 1000.0;
    if w >= 100.0 {
        format!("{w:.0}")
    } else {
        format!("{w:.1}")
    }
}

pub fn watts(mw: Option<u32>) -> String {
    mw.map_or_else(|| ABSENT.to_owned(), |mw| format!("{} W", watts_value(mw)))
}

/// "312 / 700 W", "312 W" without a limit, "-" without a reading.
pub fn power_vs_limit(draw_mw: Option<u32>, limit_mw: Option<u32>) -> String {
    match (draw_mw, limit_mw) {
        (Some(d), Some(l)) => format!("{} / {} W", watts_value(d), watts_value(l)),
        (Some(d), None) => format!("{} W", watts_value(d)),
        (None, Some(l)) => format!("- / {} W", watts_value(l)),
        (None, None) => ABSENT.to_owned(),
    }
}

/// "1755 / 2619 MHz" (SM / memory).
pub fn clocks(sm: Option<u32>, mem: Option<u32>) -> String {
    match (sm, mem) {
        (None, None) => ABSENT.to_owned(),
        (sm, mem) => format!(
            "{} / {} MHz",
            sm.map_or_else(|| ABSENT.to_owned(), |v| v.to_string()),
            mem.map_or_else(|| ABSENT.to_owned(), |v| v.to_string())
        ),
    }
}

pub fn percent(v: Option<u32>) -> String {
    v.map_or_else(|| ABSENT.to_owned(), |v| format!("{v} %"))
}

pub fn gib_value(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

/// "12.3 / 80.0 GiB".
pub fn memory(used: Option<u64>, total: Option<u64>) -> String {
    match (used, total) {
        (Some(u), Some(t)) => format!("{} / {} GiB", gib_value(u), gib_value(t)),
        (Some(u), None) => format!("{} GiB", gib_value(u)),
        (None, Some(t)) => format!("- / {} GiB", gib_value(t)),
        (None, None) => ABSENT.to_owned(),
    }
}

/// A duration rounded up to whole seconds, "3s"; under a second, "<1s".
pub fn short_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return "<1s".to_owned();
    }
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    if secs >= 120 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The last `width` values as block characters, scaled to their own range
/// (at least `min_span` wide, so sensor noise does not look like a cliff).
pub fn sparkline(
    values: impl ExactSizeIterator<Item = u32> + Clone,
    width: usize,
    min_span: u32,
) -> String {
    let skip = values.len().saturating_sub(width);
    let shown = values.skip(skip);
    let (lo, hi) = shown
        .clone()
        .fold((u32::MAX, 0u32), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return String::new();
    }
    let span = (hi - lo).max(min_span.max(1));
    // Centre a flat or narrow range in the scale.
    let base = lo.saturating_sub((span - (hi - lo)) / 2);
    shown
        .map(|v| {
            let level =
                (u64::from(v.saturating_sub(base)) * 7 + u64::from(span) / 2) / u64::from(span);
            BARS[usize::try_from(level.min(7)).unwrap_or(7)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_absent_values() {
        assert_eq!(celsius(Some(71)), "71 °C");
        assert_eq!(celsius(None), ABSENT);
        assert_eq!(power_vs_limit(Some(312_400), Some(700_000)), "312 / 700 W");
        assert_eq!(power_vs_limit(Some(45_250), None), "45.2 W");
        assert_eq!(memory(Some(12 << 30), Some(80 << 30)), "12.0 / 80.0 GiB");
        assert_eq!(clocks(Some(1755), None), "1755 / - MHz");
        assert_eq!(clocks(None, None), ABSENT);
        assert_eq!(short_duration(Duration::from_millis(2100)), "3s");
        assert_eq!(short_duration(Duration::from_millis(300)), "<1s");
    }

    #[test]
    fn sparkline_rises_with_temperature() {
        let line = sparkline([40u32, 50, 60, 70, 80].into_iter(), 10, 10);
        let chars: Vec<char> = line.chars().collect();
        assert_eq!(chars.len(), 5);
        assert_eq!(chars[0], '▁');
        assert_eq!(chars[4], '█');
        assert!(chars.windows(2).all(|w| w[0] <= w[1]), "{line}");
    }

    #[test]
    fn sparkline_keeps_the_last_values_and_damps_noise() {
        let line = sparkline((0..100u32).map(|i| 60 + i % 2), 12, 10);
        assert_eq!(line.chars().count(), 12);
        // A 1 °C wobble stays in the middle of the scale.
        assert!(line.chars().all(|c| c == '▄' || c == '▅'), "{line}");
        assert_eq!(sparkline(std::iter::empty::<u32>(), 5, 10), "");
    }
}
