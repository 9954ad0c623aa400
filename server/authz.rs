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
//! What it owns: the table and the service that enforces it. An allowed
//! call carries its [`Caller`] to the handler in the request's extensions
//! (tonic hands http extensions to `Request::extensions()`); the caller's
//! name is the actor of the audit events the handler causes.
//!
//! The HTTP side (`crate::http`) has no authenticated paths: its router's
//! table of routes, with a 404 fallback, is its deny-by-default table.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::{Either, Ready, ready};
use tonic::{Code, Status, codegen::Service, codegen::http};

use crate::{
    api,
    auth::{self, Authenticator, Caller, Role},
    events::{Actor, EventLog, NewEvent},
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
const CONTROL: Need = Need::Role(Role::Control);

/// Every gRPC method the daemon serves, by path, and what it needs. A path
/// not listed is refused.
pub const METHODS: &[(&str, Need)] = &[
    ("/gpuwatch.v1.GpuWatch/ListDevices", READ),
    ("/gpuwatch.v1.GpuWatch/GetSnapshot", READ),
    ("/gpuwatch.v1.GpuWatch/Watch", READ),
    ("/gpuwatch.v1.GpuWatch/WatchEvents", READ),
    ("/gpuwatch.v1.GpuWatch/GetPolicy", READ),
    ("/gpuwatch.v1.GpuWatch/SetPowerLimit", CONTROL),
    ("/gpuwatch.v1.GpuWatch/ResetClocks", CONTROL),
    ("/gpuwatch.v1.GpuWatch/SetThreshold", CONTROL),
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

/// Enforces [`METHODS`] in front of `inner` (the daemon's gRPC routes).
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    auth: Arc<Authenticator>,
    events: Arc<EventLog>,
}

impl<S> Authorize<S> {
    /// `inner` behind the table, with credentials checked by `auth` and
    /// refused control calls recorded in `events`.
    pub fn new(inner: S, auth: Arc<Authenticator>, events: Arc<EventLog>) -> Self {
        Self {
            inner,
            auth,
            events,
        }
    }

    /// The caller of `request`, or the status to refuse it with.
    fn decide<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, Status> {
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
                if need == Role::Control {
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
        let peer = auth::remote_addr(request).map_or(String::new(), |a| format!(" from {a}"));
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

impl<S, B, RB> Service<http::Request<B>> for Authorize<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>, Error = Infallible>,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Self::Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.decide(&request) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Either::Right(self.inner.call(request))
            }
            Err(status) => Either::Left(ready(Ok(status.into_http()))),
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
        // reflection are open), and Set*/Reset* need control.
        let ours = method_paths(&[api::FILE_DESCRIPTOR_SET]);
        assert!(ours.len() >= 8, "{ours:?}");
        for path in &ours {
            let name = path.rsplit('/').next().expect("a method name");
            let expected = if name.starts_with("Set") || name.starts_with("Reset") {
                CONTROL
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
        type Response = http::Response<()>;
        type Error = Infallible;
        type Future = Ready<Result<http::Response<()>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<()>) -> Self::Future {
            self.reached.fetch_add(1, Ordering::SeqCst);
            *self.saw_caller.lock().expect("lock") = request.extensions().get::<Caller>().cloned();
            ready(Ok(http::Response::new(())))
        }
    }

    const CONTROL_SECRET: &str = "authz-control-secret-0123456789";
    const READ_SECRET: &str = "authz-read-secret-0123456789";

    fn layer() -> (Authorize<Inner>, Inner, Arc<EventLog>) {
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
            Authorize::new(inner.clone(), Arc::new(auth), events.clone()),
            inner,
            events,
        )
    }

    async fn call(
        layer: &mut Authorize<Inner>,
        path: &str,
        token: Option<&str>,
    ) -> http::Response<()> {
        let mut request = http::Request::builder().uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(()).expect("request");
        poll_fn(|cx| layer.poll_ready(cx)).await.expect("ready");
        layer.call(request).await.expect("infallible")
    }

    fn grpc_code(response: &http::Response<()>) -> Option<Code> {
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
}
