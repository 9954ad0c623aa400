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

use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};

use crate::{FieldStats, GetHistoryResponse, GpuHistory, HistoryColumns, HistoryPoint};

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

/// Builds one GPU's [`HistoryColumns`], point by point, straight into
/// their wire encoding: every column is a packed varint field, so each
/// value is written once as it arrives, and [`ColumnsBuilder::encode`]
/// only lays the columns out behind their tags. The bytes are exactly
/// prost's encoding of the same [`HistoryColumns`] (tested below), without
/// prost's length passes over every value at every level of nesting, which
/// were most of the daemon's time for a large answer (BENCHMARKS.md).
#[derive(Debug)]
pub struct ColumnsBuilder {
    time_delta_ms: Vec<u8>,
    tier_step_ms: Vec<u8>,
    samples: Vec<u8>,
    throttle_reasons_mask: Vec<u8>,
    governor_state: Vec<u8>,
    fields: Vec<FieldBytes>,
    last_time: i64,
    /// Per field, the minimum of its last present entry.
    last_min: Vec<i64>,
}

/// One field's columns, encoded (`FieldColumns` fields 1 to 5).
#[derive(Debug, Default)]
struct FieldBytes {
    count: Vec<u8>,
    min_delta: Vec<u8>,
    max_over_min: Vec<u8>,
    last_over_min: Vec<u8>,
    sum_over_min: Vec<u8>,
}

impl FieldBytes {
    fn columns(&self) -> [(u32, &[u8]); 5] {
        [
            (1, &self.count),
            (2, &self.min_delta),
            (3, &self.max_over_min),
            (4, &self.last_over_min),
            (5, &self.sum_over_min),
        ]
    }
}

/// A packed field's encoded length: tag, length, values (none when empty:
/// proto3 writes no empty repeated field).
fn packed_len(tag: u32, values: &[u8]) -> usize {
    if values.is_empty() {
        return 0;
    }
    key_len(tag) + encoded_len_varint(values.len() as u64) + values.len()
}

/// The first varint of `bytes` and the bytes after it (None when empty).
fn split_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut rest = bytes;
    let v = prost::encoding::decode_varint(&mut rest).ok()?;
    Some((v, rest))
}

fn put_packed(out: &mut Vec<u8>, tag: u32, values: &[u8]) {
    if values.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(values.len() as u64, out);
    out.extend_from_slice(values);
}

impl ColumnsBuilder {
    /// A builder for `fields` fields and about `points` points.
    pub fn new(fields: usize, points: usize) -> Self {
        // Typical sizes per value; the buffers grow past them if needed.
        let field = || FieldBytes {
            count: Vec::with_capacity(points * 2),
            min_delta: Vec::with_capacity(points * 2),
            max_over_min: Vec::with_capacity(points * 2),
            last_over_min: Vec::with_capacity(points * 2),
            sum_over_min: Vec::with_capacity(points * 4),
        };
        Self {
            time_delta_ms: Vec::with_capacity(points * 3),
            tier_step_ms: Vec::with_capacity(points * 3),
            samples: Vec::with_capacity(points * 2),
            throttle_reasons_mask: Vec::with_capacity(points),
            governor_state: Vec::with_capacity(points),
            fields: (0..fields).map(|_| field()).collect(),
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
        // int64 and enum (int32) values are varints of their two's
        // complement, as protobuf writes them.
        encode_varint(
            time_unix_ms.wrapping_sub(self.last_time) as u64,
            &mut self.time_delta_ms,
        );
        self.last_time = time_unix_ms;
        encode_varint(u64::from(tier_step_ms), &mut self.tier_step_ms);
        encode_varint(u64::from(samples), &mut self.samples);
        encode_varint(throttle_reasons_mask, &mut self.throttle_reasons_mask);
        encode_varint(i64::from(governor_state) as u64, &mut self.governor_state);
    }

    /// The current point's statistics of field `i` (None: not reported).
    pub fn field(&mut self, i: usize, stats: Option<IntStats>) {
        let f = &mut self.fields[i];
        match stats {
            None => f.count.push(0),
            Some(s) => {
                let min = i64::try_from(s.min).unwrap_or(i64::MAX);
                encode_varint(u64::from(s.count.max(1)), &mut f.count);
                let delta = min.wrapping_sub(self.last_min[i]);
                // sint64: zigzag.
                encode_varint(((delta << 1) ^ (delta >> 63)) as u64, &mut f.min_delta);
                self.last_min[i] = min;
                encode_varint(s.max.saturating_sub(s.min), &mut f.max_over_min);
                encode_varint(s.last.saturating_sub(s.min), &mut f.last_over_min);
                encode_varint(s.sum_over_min, &mut f.sum_over_min);
            }
        }
    }

    /// Appends the points of `other`, a builder started afresh (its deltas
    /// count from zero), as if they had been added to this one: `fields[j]`
    /// is the field of `other` that becomes this builder's field `j`. Only
    /// the first time and each field's first minimum are re-encoded (as
    /// deltas from this builder's last ones); every other value is copied
    /// as it is encoded. How the daemon serves cached stretches of a tier.
    pub fn append(&mut self, other: &ColumnsBuilder, fields: &[usize]) {
        debug_assert_eq!(fields.len(), self.fields.len());
        if let Some((first, rest)) = split_varint(&other.time_delta_ms) {
            let time = first as i64;
            encode_varint(
                time.wrapping_sub(self.last_time) as u64,
                &mut self.time_delta_ms,
            );
            self.time_delta_ms.extend_from_slice(rest);
            self.last_time = other.last_time;
        }
        self.tier_step_ms.extend_from_slice(&other.tier_step_ms);
        self.samples.extend_from_slice(&other.samples);
        self.throttle_reasons_mask
            .extend_from_slice(&other.throttle_reasons_mask);
        self.governor_state.extend_from_slice(&other.governor_state);
        for (j, &i) in fields.iter().enumerate() {
            let (to, from) = (&mut self.fields[j], &other.fields[i]);
            to.count.extend_from_slice(&from.count);
            if let Some((first, rest)) = split_varint(&from.min_delta) {
                // Zigzag back to the first minimum (a delta from zero).
                let min = ((first >> 1) as i64) ^ -((first & 1) as i64);
                let delta = min.wrapping_sub(self.last_min[j]);
                encode_varint(((delta << 1) ^ (delta >> 63)) as u64, &mut to.min_delta);
                to.min_delta.extend_from_slice(rest);
                self.last_min[j] = other.last_min[i];
            }
            to.max_over_min.extend_from_slice(&from.max_over_min);
            to.last_over_min.extend_from_slice(&from.last_over_min);
            to.sum_over_min.extend_from_slice(&from.sum_over_min);
        }
    }

    /// Bytes held (capacity), for bounding a cache of builders.
    pub fn heap_bytes(&self) -> usize {
        let f: usize = self
            .fields
            .iter()
            .map(|f| {
                f.count.capacity()
                    + f.min_delta.capacity()
                    + f.max_over_min.capacity()
                    + f.last_over_min.capacity()
                    + f.sum_over_min.capacity()
                    + std::mem::size_of::<FieldBytes>()
            })
            .sum();
        f + self.time_delta_ms.capacity()
            + self.tier_step_ms.capacity()
            + self.samples.capacity()
            + self.throttle_reasons_mask.capacity()
            + self.governor_state.capacity()
            + self.last_min.capacity() * 8
            + std::mem::size_of::<Self>()
    }

    /// Gives back spare capacity (a builder kept in a cache).
    pub fn shrink_to_fit(&mut self) {
        for f in &mut self.fields {
            f.count.shrink_to_fit();
            f.min_delta.shrink_to_fit();
            f.max_over_min.shrink_to_fit();
            f.last_over_min.shrink_to_fit();
            f.sum_over_min.shrink_to_fit();
        }
        self.time_delta_ms.shrink_to_fit();
        self.tier_step_ms.shrink_to_fit();
        self.samples.shrink_to_fit();
        self.throttle_reasons_mask.shrink_to_fit();
        self.governor_state.shrink_to_fit();
    }

    /// The encoded length of each `FieldColumns` message.
    fn field_lens(&self) -> impl Iterator<Item = usize> + '_ {
        self.fields
            .iter()
            .map(|f| f.columns().iter().map(|(t, v)| packed_len(*t, v)).sum())
    }

    /// The length of [`ColumnsBuilder::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        let mut len = packed_len(1, &self.time_delta_ms)
            + packed_len(2, &self.tier_step_ms)
            + packed_len(3, &self.samples)
            + packed_len(4, &self.throttle_reasons_mask)
            + packed_len(5, &self.governor_state);
        for n in self.field_lens() {
            len += key_len(6) + encoded_len_varint(n as u64) + n;
        }
        len
    }

    /// The encoded `HistoryColumns` message (its body, without a tag or
    /// length): what prost writes for [`ColumnsBuilder::finish`]'s value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// [`ColumnsBuilder::encode`], appended to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        #[cfg(debug_assertions)]
        let (start, len) = (out.len(), self.encoded_len());
        put_packed(out, 1, &self.time_delta_ms);
        put_packed(out, 2, &self.tier_step_ms);
        put_packed(out, 3, &self.samples);
        put_packed(out, 4, &self.throttle_reasons_mask);
        put_packed(out, 5, &self.governor_state);
        for (f, n) in self.fields.iter().zip(self.field_lens()) {
            encode_key(6, WireType::LengthDelimited, out);
            encode_varint(n as u64, out);
            for (tag, values) in f.columns() {
                put_packed(out, tag, values);
            }
        }
        #[cfg(debug_assertions)]
        debug_assert_eq!(out.len() - start, len);
    }

    /// The columns as a message (decoded from [`ColumnsBuilder::encode`]:
    /// for callers that want the values rather than the wire).
    pub fn finish(self) -> HistoryColumns {
        HistoryColumns::decode(self.encode().as_slice())
            .expect("the builder writes well-formed columns")
    }
}

/// The length of [`encode_gpu_history`]'s output.
pub fn gpu_history_len(tag: u32, history: &GpuHistory, columns: &ColumnsBuilder) -> usize {
    let body = gpu_history_body_len(history, columns);
    key_len(tag) + encoded_len_varint(body as u64) + body
}

fn gpu_history_body_len(history: &GpuHistory, columns: &ColumnsBuilder) -> usize {
    let n = columns.encoded_len();
    history.encoded_len() + key_len(5) + encoded_len_varint(n as u64) + n
}

/// Appends `GpuHistory` `history` to `out` as field `tag` of its parent
/// (`GetHistoryResponse.gpus` is 6), with `columns` as its `columns`:
/// exactly what prost writes for `history` with those columns set.
/// `history.columns` must be None.
pub fn encode_gpu_history(
    tag: u32,
    history: &GpuHistory,
    columns: &ColumnsBuilder,
    out: &mut Vec<u8>,
) {
    debug_assert!(history.columns.is_none());
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(gpu_history_body_len(history, columns) as u64, out);
    // Fields 1 to 4 (index, uuid, points, gaps), then 5 (columns).
    history.encode_raw(out);
    encode_key(5, WireType::LengthDelimited, out);
    encode_varint(columns.encoded_len() as u64, out);
    columns.encode_into(out);
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
    use crate::FieldColumns;

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

    /// The columns as the builder used to hold them (plain vectors), for
    /// comparing encodings.
    /// One point: time, tier step, samples, throttle mask, governor state
    /// and each field's statistics.
    type Point = (i64, u32, u32, u64, i32, Vec<Option<IntStats>>);

    fn expected(points: &[Point]) -> HistoryColumns {
        let fields = points.first().map_or(2, |p| p.5.len());
        let mut c = HistoryColumns {
            fields: vec![FieldColumns::default(); fields],
            ..HistoryColumns::default()
        };
        let (mut last_time, mut last_min) = (0i64, vec![0i64; fields]);
        for (time, step, samples, throttle, governor, stats) in points {
            c.time_delta_ms.push(time.wrapping_sub(last_time));
            last_time = *time;
            c.tier_step_ms.push(*step);
            c.samples.push(*samples);
            c.throttle_reasons_mask.push(*throttle);
            c.governor_state.push(*governor);
            for (i, s) in stats.iter().enumerate() {
                let f = &mut c.fields[i];
                match s {
                    None => f.count.push(0),
                    Some(s) => {
                        let min = i64::try_from(s.min).unwrap_or(i64::MAX);
                        f.count.push(s.count.max(1));
                        f.min_delta.push(min.wrapping_sub(last_min[i]));
                        last_min[i] = min;
                        f.max_over_min.push(s.max - s.min);
                        f.last_over_min.push(s.last - s.min);
                        f.sum_over_min.push(s.sum_over_min);
                    }
                }
            }
        }
        c
    }

    #[test]
    fn the_builders_bytes_are_prosts_encoding_of_the_same_columns() {
        let s = |min: u64, spread: u64, count: u32| IntStats {
            count,
            min,
            max: min + spread,
            last: min + spread / 2,
            sum_over_min: spread * u64::from(count) / 3,
        };
        let mut cases: Vec<Vec<Point>> = vec![Vec::new()];
        // Times going backwards, a negative enum, minima falling and
        // rising by large steps, fields absent at the start, in the middle
        // and throughout, values needing every varint length.
        let mut big = Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..500i64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let stats = vec![
                (i % 7 != 3).then(|| s(x % 100, x % 13, 600)),
                (i > 20).then(|| s(x >> (x % 60), x >> 40, 1 + (x % 1000) as u32)),
                None,
            ];
            let time = 1_764_000_000_000 + i * 60_000 - if i == 250 { 1_000_000 } else { 0 };
            let governor = if i == 77 { -1 } else { (x % 5) as i32 };
            big.push((time, 60_000, 600, x >> 3, governor, stats));
        }
        cases.push(big);
        for points in cases {
            let mut b = ColumnsBuilder::new(3, points.len());
            for (time, step, samples, throttle, governor, stats) in &points {
                b.point(*time, *step, *samples, *throttle, *governor);
                for (i, st) in stats.iter().enumerate() {
                    b.field(i, *st);
                }
            }
            let want = expected(&points);
            let want = if points.is_empty() {
                HistoryColumns {
                    fields: vec![FieldColumns::default(); 3],
                    ..want
                }
            } else {
                want
            };
            let bytes = b.encode();
            assert_eq!(bytes, want.encode_to_vec(), "{} points", points.len());
            assert_eq!(bytes.len(), b.encoded_len());
            // And inside a GpuHistory, next to gaps.
            let history = GpuHistory {
                index: 3,
                uuid: "GPU-0123".into(),
                points: Vec::new(),
                gaps: vec![crate::HistoryGap {
                    start_unix_ms: 5,
                    end_unix_ms: 9,
                    reason: 1,
                }],
                columns: None,
            };
            let mut out = Vec::new();
            encode_gpu_history(6, &history, &b, &mut out);
            assert_eq!(out.len(), gpu_history_len(6, &history, &b));
            let whole = GetHistoryResponse {
                gpus: vec![GpuHistory {
                    columns: Some(want),
                    ..history
                }],
                ..GetHistoryResponse::default()
            };
            assert_eq!(out, whole.encode_to_vec());
            assert_eq!(b.finish(), want_again(&whole));
        }
    }

    fn want_again(whole: &GetHistoryResponse) -> HistoryColumns {
        whole.gpus[0].columns.clone().expect("set")
    }

    #[test]
    fn appending_a_fresh_builder_equals_building_in_one() {
        let s = |min: u64, spread: u64| IntStats {
            count: 600,
            min,
            max: min + spread,
            last: min + spread / 3,
            sum_over_min: spread * 200,
        };
        // Three stretches; the middle one, built alone with its fields in
        // another order, is appended.
        let point = |i: i64| {
            let k = i as u64;
            (
                1_764_000_000_000 + i * 60_000,
                [
                    (i % 5 != 0).then(|| s(300_000 + k * 997 % 5000, k % 40)),
                    (i != 7).then(|| s(60 - k % 20, k % 3)),
                ],
            )
        };
        let add = |b: &mut ColumnsBuilder, i: i64, order: [usize; 2]| {
            let (time, stats) = point(i);
            b.point(time, 60_000, 600, i as u64 % 3, (i % 4) as i32);
            for (j, &f) in order.iter().enumerate() {
                b.field(j, stats[f]);
            }
        };
        let mut whole = ColumnsBuilder::new(2, 0);
        let mut pieces = ColumnsBuilder::new(2, 0);
        let mut middle = ColumnsBuilder::new(2, 0);
        for i in 0..30 {
            add(&mut whole, i, [0, 1]);
            match i {
                10..20 => add(&mut middle, i, [1, 0]),
                _ => add(&mut pieces, i, [0, 1]),
            }
            if i == 19 {
                pieces.append(&middle, &[1, 0]);
            }
        }
        assert_eq!(pieces.encode(), whole.encode());
        // An empty builder appends nothing.
        let before = pieces.encode();
        pieces.append(&ColumnsBuilder::new(2, 0), &[0, 1]);
        assert_eq!(pieces.encode(), before);
    }
}
