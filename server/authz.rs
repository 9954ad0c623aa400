//! Authorization for every gRPC call, in one table, deny by default.
//!
//! Why it exists: a permission check written by hand in each handler is one
//! forgotten line away from an unprotected RPC. Here every gRPC request, to
//! every service the daemon serves (ours, health, reflection), passes
//! through [`Authorize`] before any handler runs. It looks the request's
//! path up in [`METHODS`], the one table of method → what it needs:
//!
//! - a path that is not in the table is refused with `UNIMPLEMENTED`
//!   ("… is not served by this daemon"): to a client it is a method this
//!   daemon does not have, which is what an unknown method has always
//!   answered, and a new RPC added to the .proto without a row here is
//!   refused rather than served unprotected (the unit tests below fail first:
//!   they check the table against the compiled descriptors);
//! - [`Need::Nothing`]: served to anyone (health probes; reflection, which
//!   describes the schema, not data);
//! - [`Need::Role`]: the caller's credentials must reach that role, as the
//!   [`Authenticator`] decides (tokens compared in constant time, mutual TLS
//!   subjects). A refused call gets the authenticator's status; a refused
//!   *control* call is also recorded as a `CONTROL_REFUSED` event naming who
//!   tried, from where (not durable, so refused traffic stays bounded on its
//!   own).
//!
//! Streams: the GpuWatch streams (Watch, WatchEvents) take their place
//! under `[limits]` in the service; every other streaming method (health
//! Watch, reflection) is listed in [`LAYER_STREAMS`] and takes its place
//! here, held by the response body for as long as the stream lives, so no
//! open method can hold more streams than the limits allow.
//!
//! Refused control calls are recorded through a [`RefusalGate`]: the first
//! refusal per (peer IP, method, reason) per window is an event, later ones
//! are counted and summarised in one event when the window closes, and a
//! global bound caps the events refused traffic can cause per window however
//! many peers it comes from.
//!
//! What it owns: the table and the service that enforces it. An allowed
//! call carries its [`Caller`] to the handler in the request's extensions
//! (tonic hands http extensions to `Request::extensions()`); the caller's
//! name is the actor of the audit events the handler causes.
//!
//! The HTTP side has its own table of path → role, enforced the same way,
//! with the same [`Authenticator`]: see `crate::http::access`.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http_body_util::BodyExt;
use tonic::{Code, Status, body::Body, codegen::Service, codegen::http};

use crate::{
    api,
    auth::{self, Authenticator, Caller, Role},
    events::{Actor, EventLog, NewEvent},
    limits::StreamLimiter,
};

/// What a method needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: anyone may call it.
    Nothing,
    /// Credentials that reach this role.
    Role(Role),
}

const OPEN: Need = Need::Nothing;
const READ: Need = Need::Role(Role::Read);
const LEASE: Need = Need::Role(Role::Lease);
const CONTROL: Need = Need::Role(Role::Control);

/// Every gRPC method the daemon serves, by path, and what it needs. A path
/// not listed is refused.
pub const METHODS: &[(&str, Need)] = &[
    ("/gpuwatch.v1.GpuWatch/ListDevices", READ),
    ("/gpuwatch.v1.GpuWatch/GetSnapshot", READ),
    ("/gpuwatch.v1.GpuWatch/Watch", READ),
    ("/gpuwatch.v1.GpuWatch/WatchEvents", READ),
    ("/gpuwatch.v1.GpuWatch/GetPolicy", READ),
    ("/gpuwatch.v1.GpuWatch/GetHistory", READ),
    ("/gpuwatch.v1.GpuWatch/SetPowerLimit", CONTROL),
    ("/gpuwatch.v1.GpuWatch/ResetClocks", CONTROL),
    ("/gpuwatch.v1.GpuWatch/SetThreshold", CONTROL),
    ("/gpuwatch.v1.GpuWatch/SetPowerBudget", CONTROL),
    ("/gpuwatch.v1.GpuWatch/PickGpus", READ),
    ("/gpuwatch.v1.GpuWatch/ListLeases", READ),
    ("/gpuwatch.v1.GpuWatch/LeaseGpus", LEASE),
    ("/gpuwatch.v1.GpuWatch/RenewLease", LEASE),
    ("/gpuwatch.v1.GpuWatch/ReleaseLease", LEASE),
    ("/grpc.health.v1.Health/Check", OPEN),
    ("/grpc.health.v1.Health/Watch", OPEN),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        OPEN,
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        OPEN,
    ),
];

/// Streaming methods whose streams this layer counts against `[limits]`
/// (the GpuWatch streams are counted by the service itself). Every
/// server-streaming method served is either here or a GpuWatch stream (the
/// unit tests check it against the compiled descriptors).
pub const LAYER_STREAMS: &[&str] = &[
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// What the method at `path` (`/package.Service/Method`) needs; None when
/// the table does not list it (and it must be refused).
pub fn need(path: &str) -> Option<Need> {
    METHODS
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(_, need)| *need)
}

/// The status a path missing from [`METHODS`] is refused with.
pub fn not_in_table(path: &str) -> Status {
    Status::new(
        Code::Unimplemented,
        format!(
            "{path} is not served by this daemon (it is not in the daemon's authorization table)"
        ),
    )
}

/// How long a refusal window lasts: the first refused control call per
/// (peer IP, method, reason) in a window is recorded, the rest are counted
/// and summarised when it closes.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(60);
/// At most this many distinct refusals are recorded per window, whatever
/// the number of peers; beyond it they are counted in one summary.
pub const MAX_REFUSALS_PER_WINDOW: usize = 20;
/// Most (peer, method, reason) keys tracked at once (memory bound).
const MAX_REFUSAL_KEYS: usize = 1024;

/// Who was refused what, for coalescing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RefusalKey {
    peer: Option<IpAddr>,
    method: String,
    /// The status code and the actor ("anonymous", "unknown token", a
    /// token's name): what the refusal was about.
    reason: (i32, String),
}

#[derive(Debug)]
struct RefusalEntry {
    since: Instant,
    /// Refusals after the recorded one, in this window.
    more: u64,
}

#[derive(Debug)]
struct GateState {
    keys: HashMap<RefusalKey, RefusalEntry>,
    window_start: Instant,
    /// Distinct refusals recorded in the current global window.
    recorded: usize,
    /// Refusals neither recorded nor counted under a key (over the global
    /// bound or the key limit) in the current global window.
    overflow: u64,
}

/// What to do with one refused control call.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Record it (the first of its key in this window).
    Record,
    /// Counted; a summary follows when the window closes.
    Counted,
}

/// Rate-limits and coalesces the events refused control calls cause (see
/// the module docs). At most `2 × MAX_REFUSALS_PER_WINDOW + 1` events per
/// window: the recorded firsts, one summary each, one global summary.
#[derive(Debug)]
pub struct RefusalGate {
    window: Duration,
    max_per_window: usize,
    state: Mutex<GateState>,
}

impl RefusalGate {
    /// A gate with the daemon's window and bounds.
    pub fn new() -> Self {
        Self::with(REFUSAL_WINDOW, MAX_REFUSALS_PER_WINDOW)
    }

    fn with(window: Duration, max_per_window: usize) -> Self {
        Self {
            window,
            max_per_window,
            state: Mutex::new(GateState {
                keys: HashMap::new(),
                window_start: Instant::now(),
                recorded: 0,
                overflow: 0,
            }),
        }
    }

    /// Closes the windows that ended by `now`, returning their summaries.
    fn sweep_locked(&self, state: &mut GateState, now: Instant) -> Vec<String> {
        let mut summaries = Vec::new();
        let window = self.window;
        state.keys.retain(|key, entry| {
            if now.duration_since(entry.since) < window {
                return true;
            }
            if entry.more > 0 {
                let peer = key
                    .peer
                    .map_or("an unknown peer".to_owned(), |p| p.to_string());
                summaries.push(format!(
                    "{} more refused {} calls from {peer} ({}) in the last {}",
                    entry.more,
                    key.method,
                    key.reason.1,
                    humantime::format_duration(window)
                ));
            }
            false
        });
        if now.duration_since(state.window_start) >= window {
            if state.overflow > 0 {
                summaries.push(format!(
                    "{} more refused control calls in the last {} were not recorded one by one                      (over the bound of {} distinct refusals per window)",
                    state.overflow,
                    humantime::format_duration(window),
                    self.max_per_window
                ));
            }
            state.window_start = now;
            state.recorded = 0;
            state.overflow = 0;
        }
        summaries
    }

    /// Decides about one refusal at `now`; also returns the summaries of
    /// windows that closed.
    fn decide(&self, key: RefusalKey, now: Instant) -> (Verdict, Vec<String>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let summaries = self.sweep_locked(&mut state, now);
        if let Some(entry) = state.keys.get_mut(&key) {
            entry.more = entry.more.saturating_add(1);
            return (Verdict::Counted, summaries);
        }
        if state.recorded >= self.max_per_window || state.keys.len() >= MAX_REFUSAL_KEYS {
            state.overflow = state.overflow.saturating_add(1);
            return (Verdict::Counted, summaries);
        }
        state.recorded += 1;
        state.keys.insert(
            key,
            RefusalEntry {
                since: now,
                more: 0,
            },
        );
        (Verdict::Record, summaries)
    }

    /// The summaries of windows that closed by `now` (the daemon calls this
    /// periodically, so a summary does not wait for the next refusal).
    pub fn sweep(&self, now: Instant) -> Vec<String> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.sweep_locked(&mut state, now)
    }
}

impl Default for RefusalGate {
    fn default() -> Self {
        Self::new()
    }
}

/// Records `summaries` as CONTROL_REFUSED events.
fn record_summaries(events: &EventLog, summaries: Vec<String>) {
    for summary in summaries {
        events.record(
            NewEvent::new(api::EventKind::ControlRefused, Actor::daemon(), summary)
                .severity(api::Severity::Warning)
                .not_durable(),
        );
    }
}

/// Closes refusal windows every few seconds until `stop`, recording their
/// summaries in `events`.
pub async fn sweep_refusals(
    gate: Arc<RefusalGate>,
    events: Arc<EventLog>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => record_summaries(&events, gate.sweep(Instant::now())),
        }
    }
}

/// Enforces [`METHODS`] in front of `inner` (the daemon's gRPC routes).
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    auth: Arc<Authenticator>,
    events: Arc<EventLog>,
    streams: Arc<StreamLimiter>,
    refusals: Arc<RefusalGate>,
}

/// What the layer decided about a request.
enum Decision {
    /// Serve it, with its caller, holding this stream place if it opens one.
    Serve(Option<Caller>, Option<crate::limits::StreamPermit>),
    Refuse(Status),
}

impl<S> Authorize<S> {
    /// `inner` behind the table, with credentials checked by `auth`,
    /// refused control calls recorded in `events` (through `refusals`) and
    /// the streams of [`LAYER_STREAMS`] counted in `streams`.
    pub fn new(
        inner: S,
        auth: Arc<Authenticator>,
        events: Arc<EventLog>,
        streams: Arc<StreamLimiter>,
        refusals: Arc<RefusalGate>,
    ) -> Self {
        Self {
            inner,
            auth,
            events,
            streams,
            refusals,
        }
    }

    /// What to do with `request`.
    fn decide<B>(&self, request: &http::Request<B>) -> Decision {
        let caller = match self.caller(request) {
            Ok(caller) => caller,
            Err(status) => return Decision::Refuse(status),
        };
        let path = request.uri().path();
        if LAYER_STREAMS.contains(&path) {
            match self.streams.acquire(auth::remote_addr(request)) {
                Ok(permit) => Decision::Serve(caller, Some(permit)),
                Err(status) => Decision::Refuse(status),
            }
        } else {
            Decision::Serve(caller, None)
        }
    }

    /// The caller of `request`, or the status to refuse it with.
    fn caller<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, Status> {
        let path = request.uri().path();
        let need = match need(path) {
            None => return Err(not_in_table(path)),
            Some(Need::Nothing) => return Ok(None),
            Some(Need::Role(role)) => role,
        };
        // The method's own name, as operators know it ("SetPowerLimit").
        let method = path.rsplit('/').next().unwrap_or(path);
        match self.auth.authorize(request, method, need) {
            Ok(caller) => Ok(Some(caller)),
            Err(refusal) => {
                // Leasing changes what other schedulers are told: a refused
                // lease call is audited like a refused control call.
                if need >= Role::Lease {
                    self.record_refused_control(request, method, &refusal);
                }
                Err(refusal.status)
            }
        }
    }

    /// The audit trail of a refused control call: who tried what, from where.
    fn record_refused_control<B>(
        &self,
        request: &http::Request<B>,
        method: &str,
        refusal: &auth::Refusal,
    ) {
        let remote = auth::remote_addr(request);
        let key = RefusalKey {
            peer: remote.map(|a| a.ip()),
            method: method.to_owned(),
            reason: (refusal.status.code() as i32, refusal.actor.clone()),
        };
        let (verdict, summaries) = self.refusals.decide(key, Instant::now());
        record_summaries(&self.events, summaries);
        if verdict != Verdict::Record {
            return;
        }
        let peer = remote.map_or(String::new(), |a| format!(" from {a}"));
        self.events.record(
            NewEvent::new(
                api::EventKind::ControlRefused,
                Actor::operator(&refusal.actor),
                format!("{method}{peer} refused: {}", refusal.status.message()),
            )
            .severity(api::Severity::Warning)
            .not_durable(),
        );
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for Authorize<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>, Error = Infallible>,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<
        Ready<Result<Self::Response, Infallible>>,
        BoxFuture<Result<Self::Response, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.decide(&request) {
            Decision::Serve(caller, permit) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                // In flight on its connection (not evictable at the cap)
                // until the response body is done.
                let in_flight = auth::grpc_connection(&request).map(|c| c.enter());
                let response = self.inner.call(request);
                Either::Right(Box::pin(async move {
                    let response = response.await?;
                    // The stream's place is held by its body: freed when the
                    // stream ends or its client goes away.
                    Ok(response.map(|body| {
                        if permit.is_none() && in_flight.is_none() {
                            return Body::new(body);
                        }
                        Body::new(body.map_frame(move |frame| {
                            let _held = (&permit, &in_flight);
                            frame
                        }))
                    }))
                }))
            }
            Decision::Refuse(status) => Either::Left(ready(Ok(status.into_http()))),
        }
    }
}

/// The authenticated caller the authorization layer attached to `request`,
/// if it has the role `need`. Handlers that act on a caller's behalf take
/// it from here; a request that did not come through [`Authorize`] has
/// none and is refused.
pub fn caller<T>(request: &tonic::Request<T>, need: Role) -> Result<&Caller, Status> {
    match request.extensions().get::<Caller>() {
        Some(caller) if caller.role >= need => Ok(caller),
        Some(caller) => Err(Status::permission_denied(format!(
            "caller \"{}\" does not have the role this call needs",
            caller.name
        ))),
        None => Err(Status::permission_denied(
            "no authenticated caller: the request did not pass the daemon's authorization layer",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        future::poll_fn,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use prost::Message;

    use super::*;
    use crate::config::{AuthConfig, RoleName, TokenConfig};

    /// `/package.Service/Method` of every method of every service in these
    /// encoded descriptor sets.
    fn method_paths(sets: &[&[u8]]) -> BTreeSet<String> {
        let mut paths = BTreeSet::new();
        for set in sets {
            let set = prost_types::FileDescriptorSet::decode(*set).expect("descriptor set");
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        paths.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        paths
    }

    /// Every service the daemon serves, as compiled.
    fn served() -> BTreeSet<String> {
        method_paths(&[
            api::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ])
    }

    #[test]
    fn the_table_lists_every_served_method_and_nothing_else() {
        let served = served();
        let table: BTreeSet<String> = METHODS.iter().map(|(p, _)| (*p).to_owned()).collect();
        assert_eq!(table.len(), METHODS.len(), "a path listed twice");
        let missing: Vec<_> = served.difference(&table).collect();
        assert!(
            missing.is_empty(),
            "methods with no authorization entry (add them to authz::METHODS): {missing:?}"
        );
        let stale: Vec<_> = table.difference(&served).collect();
        assert!(stale.is_empty(), "entries for no served method: {stale:?}");
        // The contract's methods all need a credential (only health and
        // reflection are open), Set*/Reset* need control, and the methods
        // that take, renew or end a lease need the lease role.
        let ours = method_paths(&[api::FILE_DESCRIPTOR_SET]);
        assert!(ours.len() >= 8, "{ours:?}");
        for path in &ours {
            let name = path.rsplit('/').next().expect("a method name");
            let expected = if name.starts_with("Set") || name.starts_with("Reset") {
                CONTROL
            } else if matches!(name, "LeaseGpus" | "RenewLease" | "ReleaseLease") {
                LEASE
            } else {
                READ
            };
            assert_eq!(need(path), Some(expected), "{path}");
        }
    }

    #[test]
    fn unknown_paths_are_not_in_the_table() {
        for path in [
            "/gpuwatch.v1.GpuWatch/DropTables",
            "/gpuwatch.v1.GpuWatch/setpowerlimit",
            "/gpuwatch.v1.GpuWatch/SetPowerLimit/",
            "/gpuwatch.v2.GpuWatch/SetPowerLimit",
            "/gpuwatch.v1.GpuWatch/",
            "/",
            "",
        ] {
            assert_eq!(need(path), None, "{path:?}");
        }
    }

    /// The routes behind the layer: counts the calls that reach them.
    #[derive(Clone, Default)]
    struct Inner {
        reached: Arc<AtomicUsize>,
        saw_caller: Arc<std::sync::Mutex<Option<Caller>>>,
    }

    impl Service<http::Request<()>> for Inner {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Ready<Result<http::Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<()>) -> Self::Future {
            self.reached.fetch_add(1, Ordering::SeqCst);
            *self.saw_caller.lock().expect("lock") = request.extensions().get::<Caller>().cloned();
            // A body that stays open, like a stream's.
            let open = http_body_util::StreamBody::new(futures_util::stream::pending::<
                Result<http_body::Frame<Bytes>, Infallible>,
            >());
            ready(Ok(http::Response::new(Body::new(open))))
        }
    }

    const CONTROL_SECRET: &str = "authz-control-secret-0123456789";
    const READ_SECRET: &str = "authz-read-secret-0123456789";

    fn layer() -> (Authorize<Inner>, Inner, Arc<EventLog>) {
        layer_with(StreamLimiter::new(100, 100))
    }

    fn layer_with(streams: Arc<StreamLimiter>) -> (Authorize<Inner>, Inner, Arc<EventLog>) {
        let config = AuthConfig {
            tokens: vec![
                TokenConfig {
                    name: "ops".into(),
                    role: RoleName::Control,
                    token: CONTROL_SECRET.into(),
                },
                TokenConfig {
                    name: "dashboard".into(),
                    role: RoleName::Read,
                    token: READ_SECRET.into(),
                },
            ],
            ..AuthConfig::default()
        };
        let auth = Authenticator::new(&config, false, "127.0.0.1:9450".parse().expect("addr"))
            .expect("auth");
        let (events, _) = EventLog::open(None, 100);
        let events = Arc::new(events);
        let inner = Inner::default();
        (
            Authorize::new(
                inner.clone(),
                Arc::new(auth),
                events.clone(),
                streams,
                Arc::new(RefusalGate::new()),
            ),
            inner,
            events,
        )
    }

    async fn call(
        layer: &mut Authorize<Inner>,
        path: &str,
        token: Option<&str>,
    ) -> http::Response<Body> {
        let mut request = http::Request::builder().uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(()).expect("request");
        poll_fn(|cx| layer.poll_ready(cx)).await.expect("ready");
        layer.call(request).await.expect("infallible")
    }

    fn grpc_code(response: &http::Response<Body>) -> Option<Code> {
        Status::from_header_map(response.headers()).map(|s| s.code())
    }

    fn refused_control_events(events: &EventLog) -> usize {
        events
            .subscribe(Some(0))
            .replay
            .iter()
            .filter(|e| e.kind() == api::EventKind::ControlRefused)
            .count()
    }

    #[tokio::test]
    async fn an_unknown_path_is_refused_before_any_handler_even_with_a_control_token() {
        let (mut layer, inner, events) = layer();
        for path in [
            "/gpuwatch.v1.GpuWatch/DropTables",
            "/some.Other/Method",
            "/",
        ] {
            let response = call(&mut layer, path, Some(CONTROL_SECRET)).await;
            assert_eq!(grpc_code(&response), Some(Code::Unimplemented), "{path}");
            let message = Status::from_header_map(response.headers())
                .map(|s| s.message().to_owned())
                .unwrap_or_default();
            assert!(message.contains("not served"), "{message}");
        }
        assert_eq!(inner.reached.load(Ordering::SeqCst), 0);
        assert_eq!(refused_control_events(&events), 0);
    }

    #[tokio::test]
    async fn each_entry_is_enforced_and_the_caller_reaches_the_handler() {
        let (mut layer, inner, events) = layer();
        let reached = || inner.reached.load(Ordering::SeqCst);
        let caller = || inner.saw_caller.lock().expect("lock").clone();

        // Open: no credentials needed, no caller attached.
        let response = call(&mut layer, "/grpc.health.v1.Health/Check", None).await;
        assert_eq!(grpc_code(&response), None);
        assert_eq!((reached(), caller()), (1, None));

        // Read on loopback without a token: the anonymous reader.
        call(&mut layer, "/gpuwatch.v1.GpuWatch/GetSnapshot", None).await;
        assert_eq!(reached(), 2);
        assert_eq!(caller(), Some(Caller::anonymous(Role::Read)));

        // Control with the read token: refused, recorded, never reached.
        let response = call(
            &mut layer,
            "/gpuwatch.v1.GpuWatch/SetPowerLimit",
            Some(READ_SECRET),
        )
        .await;
        assert_eq!(grpc_code(&response), Some(Code::PermissionDenied));
        assert_eq!(reached(), 2);
        assert_eq!(refused_control_events(&events), 1);

        // Control with the control token: reached, as "ops".
        call(
            &mut layer,
            "/gpuwatch.v1.GpuWatch/SetPowerLimit",
            Some(CONTROL_SECRET),
        )
        .await;
        assert_eq!(reached(), 3);
        assert_eq!(
            caller().map(|c| (c.name, c.role)),
            Some(("ops".to_owned(), Role::Control))
        );

        // An unknown token on a read: refused, but a refused read is not
        // an audit event.
        let response = call(
            &mut layer,
            "/gpuwatch.v1.GpuWatch/Watch",
            Some("not-a-configured-token"),
        )
        .await;
        assert_eq!(grpc_code(&response), Some(Code::Unauthenticated));
        assert_eq!(reached(), 3);
        assert_eq!(refused_control_events(&events), 1);
    }

    #[test]
    fn handlers_take_the_caller_the_layer_attached_and_refuse_without_one() {
        let mut request = tonic::Request::new(());
        assert_eq!(
            caller(&request, Role::Read).expect_err("none").code(),
            Code::PermissionDenied
        );
        request.extensions_mut().insert(Caller {
            name: "dashboard".into(),
            role: Role::Read,
        });
        assert_eq!(
            caller(&request, Role::Read).expect("read").name,
            "dashboard"
        );
        assert_eq!(
            caller(&request, Role::Control)
                .expect_err("read is not control")
                .code(),
            Code::PermissionDenied
        );
    }

    /// `/package.Service/Method` of every server-streaming method.
    fn streaming_paths(sets: &[&[u8]]) -> BTreeSet<String> {
        let mut paths = BTreeSet::new();
        for set in sets {
            let set = prost_types::FileDescriptorSet::decode(*set).expect("descriptor set");
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        if method.server_streaming() {
                            paths.insert(format!(
                                "/{}.{}/{}",
                                file.package(),
                                service.name(),
                                method.name()
                            ));
                        }
                    }
                }
            }
        }
        paths
    }

    #[test]
    fn every_streaming_method_counts_against_the_stream_limits() {
        // The service counts its own streams (Watch, WatchEvents); every
        // other server-streaming method must be counted by this layer.
        let ours = streaming_paths(&[api::FILE_DESCRIPTOR_SET]);
        assert_eq!(
            ours,
            BTreeSet::from([
                "/gpuwatch.v1.GpuWatch/Watch".to_owned(),
                "/gpuwatch.v1.GpuWatch/WatchEvents".to_owned()
            ]),
            "a new GpuWatch stream must take a StreamPermit in the service"
        );
        let others = streaming_paths(&[
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ]);
        let listed: BTreeSet<String> = LAYER_STREAMS.iter().map(|p| (*p).to_owned()).collect();
        assert_eq!(others, listed);
    }

    #[tokio::test]
    async fn open_streams_take_a_place_until_their_body_is_dropped() {
        let streams = StreamLimiter::new(2, 100);
        let (mut layer, inner, _) = layer_with(streams.clone());
        let a = call(&mut layer, "/grpc.health.v1.Health/Watch", None).await;
        let b = call(
            &mut layer,
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            None,
        )
        .await;
        assert_eq!((grpc_code(&a), grpc_code(&b)), (None, None));
        assert_eq!(streams.open_streams(), 2);
        let refused = call(&mut layer, "/grpc.health.v1.Health/Watch", None).await;
        assert_eq!(grpc_code(&refused), Some(Code::ResourceExhausted));
        assert_eq!(inner.reached.load(Ordering::SeqCst), 2);
        // A unary open method is not a stream: never limited.
        let check = call(&mut layer, "/grpc.health.v1.Health/Check", None).await;
        assert_eq!(grpc_code(&check), None);
        drop(a);
        assert_eq!(streams.open_streams(), 1);
        let again = call(&mut layer, "/grpc.health.v1.Health/Watch", None).await;
        assert_eq!(grpc_code(&again), None);
        drop((b, again));
        assert_eq!(streams.open_streams(), 0);
    }

    fn key(peer: &str, method: &str) -> RefusalKey {
        RefusalKey {
            peer: Some(peer.parse().expect("ip")),
            method: method.to_owned(),
            reason: (Code::Unauthenticated as i32, "anonymous".to_owned()),
        }
    }

    #[test]
    fn refusals_are_coalesced_per_peer_and_summarised_when_the_window_closes() {
        let gate = RefusalGate::with(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        let (first, none) = gate.decide(key("10.0.0.1", "SetPowerLimit"), t0);
        assert_eq!((first, none.len()), (Verdict::Record, 0));
        for i in 0..249 {
            let (v, s) = gate.decide(
                key("10.0.0.1", "SetPowerLimit"),
                t0 + Duration::from_millis(i),
            );
            assert_eq!((v, s.len()), (Verdict::Counted, 0));
        }
        // Another method or peer is its own key.
        assert_eq!(
            gate.decide(key("10.0.0.1", "SetThreshold"), t0).0,
            Verdict::Record
        );
        assert_eq!(
            gate.decide(key("10.0.0.2", "SetPowerLimit"), t0).0,
            Verdict::Record
        );
        // The global bound: a fourth distinct refusal is only counted.
        assert_eq!(
            gate.decide(key("10.0.0.3", "SetPowerLimit"), t0).0,
            Verdict::Counted
        );
        assert!(gate.sweep(t0 + Duration::from_secs(59)).is_empty());
        let summaries = gate.sweep(t0 + Duration::from_secs(60));
        assert_eq!(summaries.len(), 2, "{summaries:?}");
        assert!(
            summaries[0].contains("249 more refused SetPowerLimit calls from 10.0.0.1"),
            "{summaries:?}"
        );
        assert!(
            summaries[1].contains("1 more refused control calls"),
            "{summaries:?}"
        );
        // A new window records again.
        assert_eq!(
            gate.decide(
                key("10.0.0.1", "SetPowerLimit"),
                t0 + Duration::from_secs(61)
            )
            .0,
            Verdict::Record
        );
    }

    #[test]
    fn refused_traffic_from_many_peers_causes_a_bounded_number_of_events() {
        let gate = RefusalGate::new();
        let t0 = Instant::now();
        let mut events = 0;
        for round in 0..3u32 {
            let now = t0 + REFUSAL_WINDOW * round;
            events += gate.sweep(now).len();
            for i in 0..5_000u32 {
                let peer = format!("127.{}.{}.{}", i % 7, (i / 7) % 250, i % 250);
                let (v, s) = gate.decide(key(&peer, "SetPowerLimit"), now);
                events += s.len() + usize::from(v == Verdict::Record);
            }
        }
        events += gate.sweep(t0 + REFUSAL_WINDOW * 3).len();
        assert!(
            events <= 3 * (2 * MAX_REFUSALS_PER_WINDOW + 1),
            "{events} events for 15000 refusals"
        );
        assert!(events >= 3 * MAX_REFUSALS_PER_WINDOW);
    }
}
