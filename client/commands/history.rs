//! `gpuwatch-client history`: what GPUs did over a past window, from each
//! daemon's history store (GetHistory), all hosts at once.
//!
//! On a terminal: one row per host, GPU and field with the window's
//! minimum, mean, maximum and last value and a sparkline of the means
//! (blank where the daemon has no data: a restart, a lost GPU). With
//! `--json`: NDJSON, one `point` object per GPU and point (every field's
//! min/max/mean/last), one `gap` object per range without data, and one
//! `event` object per event in the window.

use std::time::{Duration, SystemTime};

use gpuwatch_api::{self as api, GetHistoryRequest, GetHistoryResponse, HistoryGapReason, names};
use serde_json::{Map, Value, json};

use crate::{
    app::Exit,
    cli::{HistoryArgs, read_selectors},
    commands::{HostAnswer, print_answers, print_table, table},
    connect::{Connector, HostFailure},
    fleet::Fleet,
    hosts::HostSpec,
    output::{Output, OutputClosed},
    record::{EventRecord, HostErrorRecord},
};

/// The fields a table shows when `--field` is not given.
pub const DEFAULT_TABLE_FIELDS: &[&str] = &[
    "temperature_c",
    "power_draw_mw",
    "utilization_gpu_pct",
    "sm_clock_mhz",
];
/// Widest sparkline, in characters.
pub const SPARK_WIDTH: usize = 48;

pub async fn run(
    args: HistoryArgs,
    hosts: Vec<HostSpec>,
    connector: Connector,
    json: bool,
) -> Exit {
    let now = SystemTime::now();
    let since = now
        .checked_sub(args.since)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let fields = if args.field.is_empty() && !json {
        DEFAULT_TABLE_FIELDS.iter().map(|&f| f.to_owned()).collect()
    } else {
        args.field.clone()
    };
    let request = GetHistoryRequest {
        gpus: read_selectors(&args.gpu),
        fields,
        since: Some(since.into()),
        until: Some(now.into()),
        step_ms: args
            .step
            .map_or(0, |s| u32::try_from(s.as_millis()).unwrap_or(u32::MAX)),
        // Columns are a quarter of the bytes and far cheaper to decode; a
        // daemon that predates them answers points (`columnar` false).
        columnar: true,
    };
    let fleet = Fleet::run(&hosts, &connector, move |_, client| {
        let request = request.clone();
        async move {
            let mut c = client.clone();
            let mut answer = c
                .get_history(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(HostFailure::from)?;
            answer.expand_columns().map_err(|e| HostFailure::Rpc {
                code: tonic::Code::DataLoss,
                message: format!("the daemon's answer has {e}"),
            })?;
            Ok(answer)
        }
    });
    print_answers(fleet, &hosts, json, write_json, write_table).await
}

fn rfc3339_ms(ms: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// Values as the JSON vocabulary spells them: watts for `_mw` fields (as
/// `power_draw_w`), everything else in the field's own unit.
fn field_json(name: &str, v: &api::FieldStats) -> (String, Value) {
    let (key, scale) = match name.strip_suffix("_mw") {
        Some(base) => (format!("{base}_w"), 1000.0),
        None => (name.to_owned(), 1.0),
    };
    let f = |x: Option<f64>| x.map(|x| x / scale);
    let round = |x: Option<f64>| x.map(|x| (x * 1000.0).round() / 1000.0);
    (
        key,
        json!({ "min": f(v.min), "max": f(v.max), "mean": round(f(v.mean)), "last": f(v.last) }),
    )
}

fn write_json(
    out: &mut Output,
    host: &HostSpec,
    answer: &Result<GetHistoryResponse, HostFailure>,
) -> Result<(), OutputClosed> {
    let a = match answer {
        Ok(a) => a,
        Err(e) => return out.json(&HostErrorRecord::new(&host.label, e)),
    };
    for g in &a.gpus {
        for p in &g.points {
            let mut m = Map::new();
            m.insert("host".into(), json!(host.label));
            m.insert("event".into(), json!("point"));
            m.insert("gpu".into(), json!(g.index));
            m.insert("uuid".into(), json!(g.uuid));
            m.insert("time".into(), json!(rfc3339_ms(p.time_unix_ms)));
            m.insert("step_ms".into(), json!(a.step_ms));
            m.insert("tier_step_ms".into(), json!(p.tier_step_ms));
            m.insert("samples".into(), json!(p.samples));
            for (name, v) in a.fields.iter().zip(&p.values) {
                if v.min.is_some() {
                    let (k, val) = field_json(name, v);
                    m.insert(k, val);
                }
            }
            m.insert(
                "governor_state".into(),
                json!(names::name_of::<api::GovernorState>(p.governor_state)),
            );
            m.insert(
                "throttle_reasons_mask".into(),
                json!(p.throttle_reasons_mask),
            );
            out.json(&Value::Object(m))?;
        }
        for gap in &g.gaps {
            out.json(&json!({
                "host": host.label,
                "event": "gap",
                "gpu": g.index,
                "uuid": g.uuid,
                "start": rfc3339_ms(gap.start_unix_ms),
                "end": rfc3339_ms(gap.end_unix_ms),
                "reason": names::name_of::<HistoryGapReason>(gap.reason),
            }))?;
        }
    }
    for e in &a.events {
        out.json(&EventRecord::new(&host.label, e))?;
    }
    Ok(())
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The means of one field as at most `width` characters: each character
/// the mean of the points in its slice of the window, blank where there is
/// no point.
pub fn sparkline(values: &[(i64, Option<f64>)], from_ms: i64, to_ms: i64, width: usize) -> String {
    if to_ms <= from_ms || width == 0 {
        return String::new();
    }
    let span = (to_ms - from_ms) as f64;
    let mut sums = vec![(0.0f64, 0u32); width];
    for &(t, v) in values {
        let Some(v) = v else { continue };
        let col = (((t - from_ms) as f64 / span) * width as f64).floor();
        if (0.0..width as f64).contains(&col) {
            let slot = &mut sums[col as usize];
            slot.0 += v;
            slot.1 += 1;
        }
    }
    let means: Vec<Option<f64>> = sums
        .iter()
        .map(|&(s, n)| (n > 0).then(|| s / f64::from(n)))
        .collect();
    let lo = means
        .iter()
        .flatten()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let hi = means
        .iter()
        .flatten()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    means
        .iter()
        .map(|m| match m {
            None => ' ',
            Some(_) if hi <= lo => BARS[3],
            Some(v) => {
                let i = ((v - lo) / (hi - lo) * 7.0).round() as usize;
                BARS[i.min(7)]
            }
        })
        .collect()
}

fn show(name: &str, v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if name.ends_with("_mw") => format!("{:.1} W", v / 1000.0),
        Some(v) if name.ends_with("_bytes") => format!("{:.0} MiB", v / 1_048_576.0),
        Some(v) if name.ends_with("_c") => format!("{v:.1} C"),
        Some(v) if name.ends_with("_pct") => format!("{v:.0}%"),
        Some(v) if name.ends_with("_mhz") => format!("{v:.0} MHz"),
        Some(v) => format!("{v:.1}"),
    }
}

fn write_table(
    out: &mut Output,
    hosts: &[HostSpec],
    answers: &[HostAnswer<GetHistoryResponse>],
) -> Result<(), OutputClosed> {
    let mut t = table(&[
        "HOST", "GPU", "FIELD", "MIN", "MEAN", "MAX", "LAST", "HISTORY", "GAPS",
    ]);
    let mut errors = Vec::new();
    for (host, answer) in hosts.iter().zip(answers) {
        let a = match answer {
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                errors.push(format!("{}: error: {e}", host.label));
                continue;
            }
            None => {
                errors.push(format!("{}: error: no answer", host.label));
                continue;
            }
        };
        let ms = |t: Option<prost_types::Timestamp>| {
            t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        };
        let (from, to) = (ms(a.since), ms(a.until));
        for g in &a.gpus {
            for (i, name) in a.fields.iter().enumerate() {
                let stats: Vec<&api::FieldStats> =
                    g.points.iter().filter_map(|p| p.values.get(i)).collect();
                let min = stats.iter().filter_map(|v| v.min).reduce(f64::min);
                let max = stats.iter().filter_map(|v| v.max).reduce(f64::max);
                let (sum, n) = g.points.iter().fold((0.0, 0u64), |(s, n), p| {
                    match p.values.get(i).and_then(|v| v.mean) {
                        Some(m) => (s + m * f64::from(p.samples), n + u64::from(p.samples)),
                        None => (s, n),
                    }
                });
                let mean = (n > 0).then(|| sum / n as f64);
                let last = stats.iter().rev().find_map(|v| v.last);
                let series: Vec<(i64, Option<f64>)> = g
                    .points
                    .iter()
                    .map(|p| (p.time_unix_ms, p.values.get(i).and_then(|v| v.mean)))
                    .collect();
                t.add_row(vec![
                    host.label.clone(),
                    g.index.to_string(),
                    name.clone(),
                    show(name, min),
                    show(name, mean),
                    show(name, max),
                    show(name, last),
                    sparkline(&series, from, to, SPARK_WIDTH),
                    g.gaps.len().to_string(),
                ]);
            }
        }
    }
    if t.row_count() > 0 {
        print_table(out, &t)?;
    }
    for line in errors {
        out.line(&line)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparkline_is_blank_where_there_is_no_data() {
        let values = vec![(0, Some(1.0)), (10, Some(2.0)), (30, Some(8.0))];
        let s = sparkline(&values, 0, 40, 4);
        let chars: Vec<char> = s.chars().collect();
        assert_eq!(chars.len(), 4);
        assert_eq!(chars[2], ' ', "{s:?}");
        assert_eq!(chars[0], '▁');
        assert_eq!(chars[3], '█');
    }
}
