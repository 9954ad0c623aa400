//! The columnar form of a `GetHistory` answer (`GetHistoryRequest.columnar`,
//! `GpuHistory.columns`): building it (the daemon) and turning it back into
//! points (the CLI, tests, any Rust client).
//!
//! Why it exists: as points, every field of every point is a `FieldStats`
//! of four optional doubles — about 40 bytes, a nested message to encode
//! and, on the client, one allocation to decode. A day of 8 GPUs at 1 min
//! with all 15 fields was 6.4 MB and most of the query's time. Every stored
//! field is an integer reading, so a column of varints (minimum as a delta
//! from the point before, the rest relative to the minimum, the mean as an
//! exact sum) carries exactly the same statistics in about a third of the
//! bytes, packed, with no per-point message. The one definition of that
//! encoding lives here so the daemon and its clients cannot disagree.

use crate::{FieldColumns, FieldStats, GetHistoryResponse, HistoryColumns, HistoryPoint};

/// One field's statistics over one point, as integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntStats {
    /// Readings (at least 1).
    pub count: u32,
    pub min: u64,
    pub max: u64,
    pub last: u64,
    /// Sum of the readings minus `count × min`.
    pub sum_over_min: u64,
}

impl IntStats {
    /// The mean of the readings.
    pub fn mean(&self) -> f64 {
        self.min as f64 + self.sum_over_min as f64 / f64::from(self.count.max(1))
    }
}

/// Builds one GPU's [`HistoryColumns`], point by point.
#[derive(Debug)]
pub struct ColumnsBuilder {
    cols: HistoryColumns,
    last_time: i64,
    /// Per field, the minimum of its last present entry.
    last_min: Vec<i64>,
}

impl ColumnsBuilder {
    /// A builder for `fields` fields and about `points` points.
    pub fn new(fields: usize, points: usize) -> Self {
        let field = || FieldColumns {
            count: Vec::with_capacity(points),
            min_delta: Vec::with_capacity(points),
            max_over_min: Vec::with_capacity(points),
            last_over_min: Vec::with_capacity(points),
            sum_over_min: Vec::with_capacity(points),
        };
        Self {
            cols: HistoryColumns {
                time_delta_ms: Vec::with_capacity(points),
                tier_step_ms: Vec::with_capacity(points),
                samples: Vec::with_capacity(points),
                throttle_reasons_mask: Vec::with_capacity(points),
                governor_state: Vec::with_capacity(points),
                fields: (0..fields).map(|_| field()).collect(),
            },
            last_time: 0,
            last_min: vec![0; fields],
        }
    }

    /// Starts a point; follow with one [`ColumnsBuilder::field`] per field,
    /// in order.
    pub fn point(
        &mut self,
        time_unix_ms: i64,
        tier_step_ms: u32,
        samples: u32,
        throttle_reasons_mask: u64,
        governor_state: i32,
    ) {
        let c = &mut self.cols;
        c.time_delta_ms
            .push(time_unix_ms.wrapping_sub(self.last_time));
        self.last_time = time_unix_ms;
        c.tier_step_ms.push(tier_step_ms);
        c.samples.push(samples);
        c.throttle_reasons_mask.push(throttle_reasons_mask);
        c.governor_state.push(governor_state);
    }

    /// The current point's statistics of field `i` (None: not reported).
    pub fn field(&mut self, i: usize, stats: Option<IntStats>) {
        let f = &mut self.cols.fields[i];
        match stats {
            None => f.count.push(0),
            Some(s) => {
                let min = i64::try_from(s.min).unwrap_or(i64::MAX);
                f.count.push(s.count.max(1));
                f.min_delta.push(min.wrapping_sub(self.last_min[i]));
                self.last_min[i] = min;
                f.max_over_min.push(s.max.saturating_sub(s.min));
                f.last_over_min.push(s.last.saturating_sub(s.min));
                f.sum_over_min.push(s.sum_over_min);
            }
        }
    }

    pub fn finish(self) -> HistoryColumns {
        self.cols
    }
}

/// Why columns could not be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnsError(pub String);

impl std::fmt::Display for ColumnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed history columns: {}", self.0)
    }
}

impl std::error::Error for ColumnsError {}

/// The points `columns` holds, with `fields` fields each: exactly the
/// `HistoryPoint`s the daemon would have sent.
pub fn to_points(
    columns: &HistoryColumns,
    fields: usize,
) -> Result<Vec<HistoryPoint>, ColumnsError> {
    let c = columns;
    let n = c.time_delta_ms.len();
    for (what, len) in [
        ("tier_step_ms", c.tier_step_ms.len()),
        ("samples", c.samples.len()),
        ("throttle_reasons_mask", c.throttle_reasons_mask.len()),
        ("governor_state", c.governor_state.len()),
    ] {
        if len != n {
            return Err(ColumnsError(format!(
                "{what} has {len} entries for {n} points"
            )));
        }
    }
    if c.fields.len() != fields {
        return Err(ColumnsError(format!(
            "{} field columns for {fields} fields",
            c.fields.len()
        )));
    }
    let mut points: Vec<HistoryPoint> = Vec::with_capacity(n);
    let mut time = 0i64;
    for i in 0..n {
        time = time.wrapping_add(c.time_delta_ms[i]);
        points.push(HistoryPoint {
            time_unix_ms: time,
            tier_step_ms: c.tier_step_ms[i],
            samples: c.samples[i],
            values: Vec::with_capacity(fields),
            throttle_reasons_mask: c.throttle_reasons_mask[i],
            governor_state: c.governor_state[i],
        });
    }
    for (fi, f) in c.fields.iter().enumerate() {
        if f.count.len() != n {
            return Err(ColumnsError(format!(
                "field {fi}: {} counts for {n} points",
                f.count.len()
            )));
        }
        let present = f.count.iter().filter(|&&k| k > 0).count();
        for (what, len) in [
            ("min_delta", f.min_delta.len()),
            ("max_over_min", f.max_over_min.len()),
            ("last_over_min", f.last_over_min.len()),
            ("sum_over_min", f.sum_over_min.len()),
        ] {
            if len != present {
                return Err(ColumnsError(format!(
                    "field {fi}: {what} has {len} entries for {present} points with readings"
                )));
            }
        }
        let (mut j, mut min) = (0usize, 0i64);
        for (p, &count) in points.iter_mut().zip(&f.count) {
            if count == 0 {
                p.values.push(FieldStats::default());
                continue;
            }
            min = min.wrapping_add(f.min_delta[j]);
            let base = u64::try_from(min)
                .map_err(|_| ColumnsError(format!("field {fi}: a negative minimum {min}")))?;
            let s = IntStats {
                count,
                min: base,
                max: base.saturating_add(f.max_over_min[j]),
                last: base.saturating_add(f.last_over_min[j]),
                sum_over_min: f.sum_over_min[j],
            };
            p.values.push(FieldStats {
                min: Some(s.min as f64),
                max: Some(s.max as f64),
                mean: Some(s.mean()),
                last: Some(s.last as f64),
            });
            j += 1;
        }
    }
    Ok(points)
}

impl GetHistoryResponse {
    /// Moves a columnar answer's series into `GpuHistory.points` (and
    /// clears the columns); an answer in points is left as it is.
    pub fn expand_columns(&mut self) -> Result<(), ColumnsError> {
        if !self.columnar {
            return Ok(());
        }
        let fields = self.fields.len();
        for g in &mut self.gpus {
            if let Some(columns) = g.columns.take() {
                g.points = to_points(&columns, fields)?;
            }
        }
        self.columnar = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_round_trip_to_the_same_points_with_absent_fields_kept_absent() {
        let mut b = ColumnsBuilder::new(2, 3);
        let s = |min, max, last, count, sum_over_min| IntStats {
            count,
            min,
            max,
            last,
            sum_over_min,
        };
        b.point(1_000, 1000, 10, 4, 2);
        b.field(0, Some(s(60, 65, 61, 10, 17)));
        b.field(1, None);
        b.point(2_000, 1000, 10, 0, 2);
        b.field(0, Some(s(58, 70, 70, 10, 30)));
        b.field(
            1,
            Some(s(40_000_000_000, 40_100_000_000, 40_000_000_001, 9, 5)),
        );
        b.point(60_000, 60_000, 3, 0, 1);
        b.field(0, None);
        b.field(1, Some(s(7, 7, 7, 3, 0)));
        let cols = b.finish();
        let points = to_points(&cols, 2).expect("well formed");
        assert_eq!(points.len(), 3);
        assert_eq!(points[2].time_unix_ms, 60_000);
        assert_eq!(points[2].tier_step_ms, 60_000);
        assert_eq!(points[0].throttle_reasons_mask, 4);
        assert_eq!(points[0].values[0].min, Some(60.0));
        assert_eq!(points[0].values[0].max, Some(65.0));
        assert_eq!(points[0].values[0].last, Some(61.0));
        assert_eq!(points[0].values[0].mean, Some(61.7));
        assert_eq!(points[0].values[1], FieldStats::default());
        assert_eq!(points[1].values[0].min, Some(58.0));
        assert_eq!(points[1].values[1].max, Some(40_100_000_000.0));
        assert_eq!(points[2].values[0], FieldStats::default());
        assert_eq!(points[2].values[1].mean, Some(7.0));
        // Damaged columns are an error naming the column, not a panic.
        let mut bad = cols.clone();
        bad.fields[1].sum_over_min.pop();
        let e = to_points(&bad, 2).expect_err("refused");
        assert!(e.0.contains("sum_over_min"), "{e}");
        assert!(to_points(&cols, 3).is_err());
    }
}
