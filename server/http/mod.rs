//! The HTTP side: `/metrics` for Prometheus, the live thermal dashboard at
//! `/`, and `/healthz` for probes, on a listener of its own. Everything is
//! served from the hub and the event log in memory; no request touches a GPU.
//!
//! Routes:
//! - `/` — the dashboard: one self-contained page (inline script and style,
//!   nothing fetched from anywhere but this daemon) drawing each GPU's
//!   temperature and power limit over time with the governor's threshold as a
//!   line, power draw against the limit, and the recent events.
//! - `/api/v1/dashboard` (JSON) and `/api/v1/stream` (server-sent events) —
//!   the page's data; see [`api`].
//! - `/metrics` — Prometheus / OpenMetrics text; see [`metrics`].
//! - `/healthz` — 200 while the sampler publishes, 503 when it stalls.
//!
//! Who may read which path is one table, in [`access`]; how the listener
//! bounds its connections (cap, header and write timeouts, header memory)
//! and serves TLS is in [`conn`].

pub mod access;
pub mod api;
pub mod conn;
pub mod dcgm;
pub mod history;
pub mod metrics;
pub mod procstat;

use std::{
    sync::{Arc, atomic::AtomicUsize},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{api::GpuHealth, events::EventLog, hub::Hub};

/// What the HTTP handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub hub: Arc<Hub>,
    pub events: Arc<EventLog>,
    pub hostname: String,
    /// Who may read which path.
    pub access: Arc<access::HttpAccess>,
    /// How long an SSE message may wait for a stalled reader before its
    /// stream is dropped (`limits.http_write_timeout`).
    pub write_timeout: Duration,
    /// The lease book, for /metrics.
    pub leases: Option<Arc<crate::leases::Leases>>,
    /// The history store, for `/api/v1/history`.
    pub history: crate::service::HistoryParts,
    /// Which metric names `/metrics` serves.
    pub metrics_profile: crate::config::MetricsProfile,
    /// The driver version (dcgm-exporter's `DCGM_FI_DRIVER_VERSION` label).
    pub driver_version: Option<String>,
}

/// Shared by every handler.
#[derive(Debug, Clone)]
pub(crate) struct App {
    pub(crate) state: HttpState,
    pub(crate) metrics: Arc<metrics::MetricsEndpoint>,
    /// Dashboard streams open now.
    pub(crate) stream_count: Arc<AtomicUsize>,
    /// Ends every open stream, so a graceful shutdown does not wait on them.
    pub(crate) shutdown: CancellationToken,
}

/// The dashboard page, with its script and style inline.
const DASHBOARD_HTML: &str = include_str!("assets/dashboard.html");

/// The page may load nothing from anywhere: only its own inline script and
/// style, and data from this daemon.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The HTTP routes. `shutdown` ends the dashboard's live streams.
pub fn router(state: HttpState, shutdown: CancellationToken) -> Router {
    let stream_count = Arc::new(AtomicUsize::new(0));
    let metrics = Arc::new(metrics::MetricsEndpoint::with_profile(
        metrics::Sources {
            hub: state.hub.clone(),
            events: state.events.clone(),
            hostname: Arc::from(state.hostname.as_str()),
            dashboard_streams: stream_count.clone(),
            leases: state.leases.clone(),
        },
        state.metrics_profile,
        state.driver_version.clone(),
    ));
    let gate = state.access.clone();
    let app = App {
        state,
        metrics,
        stream_count,
        shutdown,
    };
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/api/v1/dashboard", get(api::dashboard_json))
        .route("/api/v1/stream", get(api::stream))
        .route("/api/v1/history", get(history::history_json))
        .fallback(not_found)
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(gate, access::enforce))
}

async fn dashboard() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(DASHBOARD_CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        DASHBOARD_HTML,
    )
        .into_response()
}

async fn metrics_handler(State(app): State<App>, headers: HeaderMap) -> Response {
    app.metrics.respond(&headers)
}

/// How old the latest frame may grow before `/healthz` calls the sampler
/// stalled: twenty ticks, and never less than five seconds.
fn stall_after(sampler_interval: Duration) -> Duration {
    (sampler_interval * 20).max(Duration::from_secs(5))
}

/// `/healthz`: is the daemon doing its job — is the sampler publishing? A
/// lost GPU does not make the daemon unhealthy (it is reporting the loss
/// correctly); alert on `gpuwatch_gpu_health` for that.
async fn healthz(State(app): State<App>) -> Response {
    let hub = &app.state.hub;
    let Some(frame) = hub.latest() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: no frame published yet\n",
        )
            .into_response();
    };
    let age = frame
        .time
        .as_ref()
        .and_then(|t| SystemTime::try_from(*t).ok())
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default();
    let limit = stall_after(hub.sampler_interval());
    if age > limit {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: the latest frame ({}) is {:.1} s old; more than {:.1} s means the sampler stopped\n",
                frame.seq,
                age.as_secs_f64(),
                limit.as_secs_f64()
            ),
        )
            .into_response();
    }
    let ok = frame
        .samples
        .iter()
        .filter(|s| s.health == GpuHealth::Ok as i32)
        .count();
    (
        StatusCode::OK,
        format!(
            "ok: frame {}, {} GPU(s), {} reading normally\n",
            frame.seq,
            frame.samples.len(),
            ok
        ),
    )
        .into_response()
}

pub(crate) async fn not_found(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!(
            "not found: {}\nthis daemon serves / (dashboard), /metrics, /healthz, /api/v1/dashboard, /api/v1/stream, /api/v1/history\n",
            uri.path()
        ),
    )
        .into_response()
}

/// Serves HTTP on `listener` until `shutdown`, within `limits`, over TLS
/// when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    limits: conn::ConnLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = router(state, shutdown.clone());
    conn::serve(
        listener,
        router,
        limits,
        tls.map(tokio_rustls::TlsAcceptor::from),
        shutdown,
    )
    .await
}
