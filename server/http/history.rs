//! `GET /api/v1/history`: the history store as JSON for the dashboard's
//! windows (15 min, 1 h, 24 h, 7 d).
//!
//! Why it exists: the page draws from history instead of the one-minute
//! ring, so it opens full even right after a restart. It answers exactly
//! what GetHistory answers ([`crate::service::answer_history`]: the same
//! tiers, limits, gaps and events), in a compact JSON shape the page reads
//! without a protobuf decoder. Needs the read role (see `access`).

use std::time::{Duration, SystemTime};

use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    api::{self, EventKind, GovernorState, HistoryGapReason, Severity, names},
    http::App,
};

/// Query of `/api/v1/history`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// How far back, as a duration ("15m", "24h"); default 15m.
    pub since: Option<String>,
    /// Point width ("10s"); default: about 1000 points per GPU.
    pub step: Option<String>,
    /// One GPU by index; default every GPU.
    pub gpu: Option<u32>,
    /// Comma-separated field names; default every stored field.
    pub fields: Option<String>,
}

fn bad(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

fn parse_duration(what: &str, text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{what}={text:?} is not a duration like \"15m\" or \"24h\": {e}"))
}

/// The handler.
pub(crate) async fn history_json(
    State(app): State<App>,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let since = match parse_duration("since", q.since.as_deref().unwrap_or("15m")) {
        Ok(d) => d,
        Err(m) => return bad(m),
    };
    let step_ms = match q.step.as_deref().map(|s| parse_duration("step", s)) {
        None => 0,
        Some(Ok(d)) => u32::try_from(d.as_millis()).unwrap_or(u32::MAX),
        Some(Err(m)) => return bad(m),
    };
    let now = SystemTime::now();
    let Some(from) = now.checked_sub(since) else {
        return bad("since reaches before 1970".to_owned());
    };
    let req = api::GetHistoryRequest {
        gpus: q
            .gpu
            .map(|i| api::GpuSelector {
                selector: Some(api::gpu_selector::Selector::Index(i)),
            })
            .into_iter()
            .collect(),
        fields: q
            .fields
            .as_deref()
            .map(|f| {
                f.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        since: Some(from.into()),
        until: None,
        step_ms,
        // The page reads points (as compact JSON rows, see `to_json`).
        columnar: false,
    };
    let (hub, events, history) = (
        app.state.hub.clone(),
        app.state.events.clone(),
        app.state.history.clone(),
    );
    let answer = tokio::task::spawn_blocking(move || {
        crate::service::answer_history(&hub, &events, &history, &req)
    })
    .await;
    match answer {
        Ok(Ok(a)) => {
            let body = to_json(&a);
            drop(a);
            match serde_json::to_vec(&body) {
                // A large answer's release trims the allocator, as
                // GetHistory's does.
                Ok(bytes) => (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    axum::body::Body::from(crate::memory::answer_bytes(bytes)),
                )
                    .into_response(),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
            }
        }
        Ok(Err(status)) => {
            let code = match status.code() {
                tonic::Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
                tonic::Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            (code, status.message().to_owned()).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn ms_of(t: Option<prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// Points as `[time_ms, samples, [min, max, mean, last] per field...]`
/// (null for a field the GPU did not report), to keep the page's download
/// small.
fn to_json(a: &api::GetHistoryResponse) -> Value {
    let gpus: Vec<Value> = a
        .gpus
        .iter()
        .map(|g| {
            let points: Vec<Value> = g
                .points
                .iter()
                .map(|p| {
                    let mut row = vec![json!(p.time_unix_ms), json!(p.samples)];
                    row.extend(p.values.iter().map(|v| match (v.min, v.max, v.mean, v.last) {
                        (Some(min), Some(max), Some(mean), Some(last)) => {
                            json!([min, max, (mean * 100.0).round() / 100.0, last])
                        }
                        _ => Value::Null,
                    }));
                    row.push(json!(names::name_of::<GovernorState>(p.governor_state)));
                    row.push(json!(p.throttle_reasons_mask));
                    Value::Array(row)
                })
                .collect();
            let gaps: Vec<Value> = g
                .gaps
                .iter()
                .map(|gap| {
                    json!({
                        "start_ms": gap.start_unix_ms,
                        "end_ms": gap.end_unix_ms,
                        "reason": names::name_of::<HistoryGapReason>(gap.reason),
                    })
                })
                .collect();
            json!({ "index": g.index, "uuid": g.uuid, "points": points, "gaps": gaps })
        })
        .collect();
    let events: Vec<Value> = a
        .events
        .iter()
        .map(|e| {
            json!({
                "seq": e.seq,
                "time_ms": ms_of(e.time),
                "kind": names::name_of::<EventKind>(e.kind),
                "severity": names::name_of::<Severity>(e.severity),
                "gpu": e.gpu_index,
                "reason": e.reason,
            })
        })
        .collect();
    json!({
        "since_ms": ms_of(a.since),
        "until_ms": ms_of(a.until),
        "step_ms": a.step_ms,
        "tier_step_ms": a.tier_step_ms,
        "fields": a.fields,
        "gpus": gpus,
        "events": events,
    })
}
