//! Who may read what over HTTP: one table of path → what it needs, deny by
//! default, enforced in front of every route — the HTTP twin of
//! [`crate::authz`].
//!
//! - `/healthz` and `/` (the dashboard page: static, it holds no data) are
//!   open to anyone;
//! - `/api/v1/dashboard` and `/api/v1/stream` (the audit log: operator
//!   names, peers) need the read role, like gRPC's WatchEvents;
//! - `/metrics` needs the read role too, unless `auth.open_metrics = true`
//!   (Prometheus sends a bearer token: `authorization.credentials_file`);
//! - a path not in the table is not served (404), whatever the credentials
//!   — even one the router has a route for.
//!
//! When is a token needed? Reads are open when no token is configured and
//! the HTTP listener is on loopback (the default install: nothing to set
//! up), or with `auth.allow_unauthenticated_reads = true`. As soon as
//! tokens are configured, the data paths need one, on any address.
//!
//! A token comes as `Authorization: Bearer <token>`, or as the
//! `gpuwatch_token` cookie: the dashboard page asks for a token when the
//! daemon wants one and keeps it in that cookie (`SameSite=Strict`, sent
//! only to this daemon), because a browser's EventSource cannot send
//! headers. Tokens are compared in constant time by the same
//! [`Authenticator`] as gRPC's. HTTP serves no control: every path is a read.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tonic::Code;

use crate::{
    auth::{Authenticator, Role},
    authz::Need,
};

/// The cookie the dashboard keeps its token in.
pub const TOKEN_COOKIE: &str = "gpuwatch_token";

/// What an HTTP path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathNeed {
    /// Like a gRPC method: nothing, or a role.
    Is(Need),
    /// `/metrics`: the read role, unless `auth.open_metrics`.
    Metrics,
}

/// Every path the HTTP listener serves and what it needs. A path not
/// listed is not served (the router's 404).
pub const PATHS: &[(&str, PathNeed)] = &[
    ("/", PathNeed::Is(Need::Nothing)),
    ("/healthz", PathNeed::Is(Need::Nothing)),
    ("/metrics", PathNeed::Metrics),
    ("/api/v1/dashboard", PathNeed::Is(Need::Role(Role::Read))),
    ("/api/v1/stream", PathNeed::Is(Need::Role(Role::Read))),
    ("/api/v1/history", PathNeed::Is(Need::Role(Role::Read))),
];

/// What `path` needs; None when it is not served.
pub fn need(path: &str) -> Option<PathNeed> {
    PATHS.iter().find(|(p, _)| *p == path).map(|(_, n)| *n)
}

/// The HTTP side's credentials check.
#[derive(Debug)]
pub struct HttpAccess {
    auth: Authenticator,
    open_metrics: bool,
}

impl HttpAccess {
    /// `auth` must have been built with [`Authenticator::for_http`].
    pub fn new(auth: Authenticator, open_metrics: bool) -> Self {
        Self { auth, open_metrics }
    }

    /// Serves anything to anyone (the unused gate when HTTP is off, and
    /// tests of the handlers).
    pub fn open() -> Self {
        Self {
            auth: Authenticator::open(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            open_metrics: true,
        }
    }

    /// The role `path` needs here (None: open).
    fn role(&self, need: PathNeed) -> Option<Role> {
        match need {
            PathNeed::Is(Need::Nothing) => None,
            PathNeed::Is(Need::Role(role)) => Some(role),
            PathNeed::Metrics if self.open_metrics => None,
            PathNeed::Metrics => Some(Role::Read),
        }
    }

    /// True when any token is configured.
    pub fn has_tokens(&self) -> bool {
        self.auth.token_count() > 0
    }

    /// True when data paths need a token.
    pub fn reads_need_token(&self) -> bool {
        !self.auth.reads_open()
    }
}

/// The `gpuwatch_token` cookie's value, if the request has one.
fn cookie_token(request: &Request) -> Option<String> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .and_then(|(_, value)| percent_decode(value.trim()))
        .filter(|v| !v.is_empty())
}

/// Undoes the page's `encodeURIComponent`; None when malformed.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The middleware: looks the path up in [`PATHS`] and checks credentials.
pub async fn enforce(
    State(access): State<Arc<HttpAccess>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    // Not in the table: not served, even if a route exists for it (a
    // route added without a row here is refused, not served unprotected).
    let Some(need) = need(&path) else {
        return super::not_found(request.uri().clone()).await;
    };
    let Some(role) = access.role(need) else {
        return next.run(request).await;
    };
    if !request.headers().contains_key(header::AUTHORIZATION)
        && let Some(token) = cookie_token(&request)
        && let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}"))
    {
        request.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let presented = request.headers().contains_key(header::AUTHORIZATION);
    match access.auth.authorize(&request, &path, role) {
        Ok(_) => next.run(request).await,
        Err(refusal) => {
            let (status, message) = match refusal.status.code() {
                Code::PermissionDenied => {
                    (StatusCode::FORBIDDEN, refusal.status.message().to_owned())
                }
                _ if presented => (
                    StatusCode::UNAUTHORIZED,
                    refusal.status.message().to_owned(),
                ),
                _ => (
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "{path} needs a token with role read: send `Authorization: Bearer <token>` \
                         (Prometheus: `authorization: credentials_file:`), or open / and enter it there"
                    ),
                ),
            };
            (
                status,
                [(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"gpuwatch\""),
                )],
                format!("{message}\n"),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_token_is_decoded_and_malformed_ones_are_ignored() {
        let request = |cookie: &str| {
            axum::http::Request::builder()
                .header(header::COOKIE, cookie)
                .body(axum::body::Body::empty())
                .expect("request")
        };
        assert_eq!(
            cookie_token(&request("a=b; gpuwatch_token=abc%2Bdef%3D; c=d")).as_deref(),
            Some("abc+def=")
        );
        assert_eq!(cookie_token(&request("gpuwatch_token=%zz")), None);
        assert_eq!(cookie_token(&request("gpuwatch_token=%e2")), None);
        assert_eq!(cookie_token(&request("other=x")), None);
    }

    #[tokio::test]
    async fn a_route_missing_from_the_table_is_not_served() {
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route("/secret", axum::routing::get(|| async { "secret" }))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(HttpAccess::open()),
                enforce,
            ));
        let get = |path: &str| {
            axum::http::Request::get(path)
                .body(axum::body::Body::empty())
                .expect("request")
        };
        let served = app
            .clone()
            .oneshot(get("/healthz"))
            .await
            .expect("infallible");
        assert_eq!(served.status(), StatusCode::OK);
        let refused = app.oneshot(get("/secret")).await.expect("infallible");
        assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_table_is_deny_by_default_and_only_probes_and_the_page_are_open() {
        assert_eq!(need("/healthz"), Some(PathNeed::Is(Need::Nothing)));
        assert_eq!(need("/"), Some(PathNeed::Is(Need::Nothing)));
        for path in ["/api/v1/dashboard", "/api/v1/stream"] {
            assert_eq!(
                need(path),
                Some(PathNeed::Is(Need::Role(Role::Read))),
                "{path}"
            );
        }
        for path in [
            "/api/v1/dashboard/",
            "/API/v1/stream",
            "/api/v2/stream",
            "/metrics/x",
            "",
        ] {
            assert_eq!(need(path), None, "{path:?}");
        }
    }
}
