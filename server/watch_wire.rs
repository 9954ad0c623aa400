//! The Watch, GetSnapshot and GetHistory methods as the daemon serves them: frames
//! encoded once per tick and shared (see [`crate::watch_frames`]), and a
//! snapshot of every GPU encoded once per tick and millisecond.
//!
//! Why GetSnapshot too: polling schedulers call it thousands of times a
//! second, and building, encoding and dropping the same answer for each
//! caller made it cost ~1.6× an empty health check (BENCHMARKS.md).
//!
//! What it owns: the [`Route`]s for `/gpuwatch.v1.GpuWatch/Watch`,
//! `/GetSnapshot` and `/GetHistory` (an answer encoded as it is built), each
//! sending its answer's shared bytes as they are ([`SharedBody`]) while
//! tonic decodes the request, and [`add_gpuwatch`],
//! which registers them in the gRPC router under those paths next to the
//! generated server that serves every other method (the router prefers the
//! exact path to the service's `/{*rest}`); nothing here looks at a
//! request's path. Authorization has already happened in front
//! of the router ([`crate::authz`]), like for every other method.
//!
//! The generated server's own `watch` (without the shared encoding) serves
//! callers of the `GpuWatch` trait; the route makes sure the network gets
//! the shared one.

use std::{
    convert::Infallible,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use futures_util::stream::BoxStream;
use prost::Message;

use tonic::{
    Request, Response, Status,
    codegen::{Body, BoxFuture, Service, StdError, http},
    server::{Grpc, ServerStreamingService, UnaryService},
    service::Routes,
};

use crate::{
    api::{
        GetHistoryRequest, GetHistoryResponse, GetSnapshotRequest, GetSnapshotResponse,
        WatchRequest, WatchResponse, gpu_watch_server::GpuWatchServer,
    },
    service::{GpuWatchService, SharedSnapshots, WatchItemStream},
    watch_frames::{Shared, SharedBody, SharedCodec, SharedFrames, WatchCodec, WatchItem},
};

/// The path of the Watch route.
pub const WATCH_PATH: &str = "/gpuwatch.v1.GpuWatch/Watch";
/// The path of the GetSnapshot route.
pub const SNAPSHOT_PATH: &str = "/gpuwatch.v1.GpuWatch/GetSnapshot";
/// The path of the GetHistory route.
pub const HISTORY_PATH: &str = "/gpuwatch.v1.GpuWatch/GetHistory";

/// `routes` plus the `gpuwatch.v1.GpuWatch` service: Watch, GetSnapshot and
/// GetHistory served by [`Route`]s (Watch with frames from `shared`), every
/// other method by the generated server. Requests larger than
/// `max_request_bytes` are refused.
pub fn add_gpuwatch(
    routes: Routes,
    service: GpuWatchService,
    shared: Arc<SharedFrames>,
    max_request_bytes: usize,
) -> Routes {
    let generated =
        GpuWatchServer::new(service.clone()).max_decoding_message_size(max_request_bytes);
    let service = Arc::new(service);
    let snapshots = Arc::new(SharedSnapshots::default());
    let snapshot = {
        let service = service.clone();
        Route::new(move |request| {
            let (service, snapshots) = (service.clone(), snapshots.clone());
            Box::pin(unary::<GetSnapshotRequest, GetSnapshotResponse, _, _>(
                request,
                max_request_bytes,
                move |request| std::future::ready(service.snapshot(request, Some(&snapshots))),
            ))
        })
    };
    let history = {
        let service = service.clone();
        Route::new(move |request| {
            let service = service.clone();
            Box::pin(unary::<GetHistoryRequest, GetHistoryResponse, _, _>(
                request,
                max_request_bytes,
                move |request| async move {
                    service.history_encoded(request).await.map(Shared::Encoded)
                },
            ))
        })
    };
    let watch = Route::new(move |request| {
        let (service, shared) = (service.clone(), shared.clone());
        Box::pin(server_streaming(
            request,
            max_request_bytes,
            move |request| service.open_watch(request, Some(shared)),
        ))
    });
    Routes::from(
        routes
            .add_service(generated)
            .into_axum_router()
            .route_service(WATCH_PATH, watch)
            .route_service(SNAPSHOT_PATH, snapshot)
            .route_service(HISTORY_PATH, history),
    )
}

type Answering = BoxFuture<http::Response<tonic::body::Body>, Infallible>;

/// One method's service in front of the generated server: a function of
/// the request (its body boxed) to the response.
#[derive(Clone)]
pub struct Route(Arc<dyn Fn(http::Request<tonic::body::Body>) -> Answering + Send + Sync>);

impl Route {
    fn new(
        answer: impl Fn(http::Request<tonic::body::Body>) -> Answering + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(answer))
    }
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Route")
    }
}

impl<B> Service<http::Request<B>> for Route
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Answering;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        (self.0)(request.map(tonic::body::Body::new))
    }
}

/// An answer handed from a method (called inside tonic's request
/// handling, which decodes the request and checks its limits) to its
/// route, which sends it as a [`SharedBody`] in place of tonic's body.
type Answer<M> = Arc<Mutex<Option<BoxStream<'static, Result<Shared<M>, Status>>>>>;

/// tonic's `response` with its body replaced by the answer the method
/// handed over; as it is when there is none (the request was refused
/// before or by the method: tonic's response carries the status).
fn with_answer<M: Message + Send + 'static>(
    response: http::Response<tonic::body::Body>,
    answer: &Answer<M>,
) -> http::Response<tonic::body::Body> {
    match answer.lock().unwrap_or_else(PoisonError::into_inner).take() {
        Some(items) => {
            let (parts, _placeholder) = response.into_parts();
            http::Response::from_parts(parts, tonic::body::Body::new(SharedBody::new(items)))
        }
        None => response,
    }
}

/// A unary method answered by `call`, its answer sent as a [`SharedBody`].
async fn unary<Req, M, F, Fut>(
    request: http::Request<tonic::body::Body>,
    max_request_bytes: usize,
    call: F,
) -> Result<http::Response<tonic::body::Body>, Infallible>
where
    Req: Message + Default + Send + 'static,
    M: Message + Send + 'static,
    F: FnOnce(Request<Req>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Shared<M>, Status>> + Send + 'static,
{
    let answer = Answer::default();
    let method = Unary {
        answer: answer.clone(),
        call: Some(call),
    };
    let mut grpc = Grpc::new(SharedCodec::<M, Req>::default())
        .apply_max_message_size_config(Some(max_request_bytes), None);
    Ok(with_answer(grpc.unary(method, request).await, &answer))
}

/// A server-streaming method whose stream `open` makes, sent as a
/// [`SharedBody`].
async fn server_streaming<F>(
    request: http::Request<tonic::body::Body>,
    max_request_bytes: usize,
    open: F,
) -> Result<http::Response<tonic::body::Body>, Infallible>
where
    F: FnOnce(Request<WatchRequest>) -> Result<WatchItemStream, Status> + Send + 'static,
{
    let answer = Answer::default();
    let method = Streaming {
        answer: answer.clone(),
        open: Some(open),
    };
    let mut grpc = Grpc::new(WatchCodec::default())
        .apply_max_message_size_config(Some(max_request_bytes), None);
    Ok(with_answer(
        grpc.server_streaming(method, request).await,
        &answer,
    ))
}

/// tonic's view of a unary route's method: hands the answer over.
struct Unary<F, M> {
    answer: Answer<M>,
    call: Option<F>,
}

impl<Req, M, F, Fut> UnaryService<Req> for Unary<F, M>
where
    M: Message + Send + 'static,
    F: FnOnce(Request<Req>) -> Fut,
    Fut: Future<Output = Result<Shared<M>, Status>> + Send + 'static,
{
    type Response = Shared<M>;
    type Future = BoxFuture<Response<Shared<M>>, Status>;

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let answer = self.answer.clone();
        let called = self.call.take().map(|call| call(request));
        Box::pin(async move {
            let item = called
                .ok_or_else(|| Status::internal("a route's method was called twice"))?
                .await?;
            *answer.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::pin(
                futures_util::stream::once(std::future::ready(Ok(item))),
            ));
            // tonic encodes this placeholder; the route drops it.
            Ok(Response::new(Shared::Encoded(bytes::Bytes::new())))
        })
    }
}

/// tonic's view of Watch's route: hands the stream over.
struct Streaming<F> {
    answer: Answer<WatchResponse>,
    open: Option<F>,
}

impl<F> ServerStreamingService<WatchRequest> for Streaming<F>
where
    F: FnOnce(Request<WatchRequest>) -> Result<WatchItemStream, Status>,
{
    type Response = WatchItem;
    type ResponseStream = WatchItemStream;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<WatchRequest>) -> Self::Future {
        let opened = match self.open.take() {
            Some(open) => open(request),
            None => Err(Status::internal("a route's method was called twice")),
        };
        std::future::ready(opened.map(|items| {
            *self.answer.lock().unwrap_or_else(PoisonError::into_inner) = Some(items);
            // tonic wraps this placeholder; the route drops it.
            Response::new(Box::pin(futures_util::stream::empty()) as WatchItemStream)
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;
    use tonic::server::NamedService;

    use super::*;
    use crate::{
        api::{Frame, GpuSample, watch_response},
        auth::{Caller, Role},
        backend::HostFacts,
        control::ControlHandle,
        events::EventLog,
        hub::Hub,
        limits::StreamLimiter,
        service::ServiceParts,
        watch_frames::SMALL_BUFFER,
    };

    /// The gRPC messages in `bytes` (5-byte length-prefixed frames).
    fn grpc_messages(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        while bytes.len() >= 5 {
            let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
            messages.push(bytes[5..5 + len].to_vec());
            bytes = &bytes[5 + len..];
        }
        messages
    }

    /// A service on `hub` with nothing else behind it.
    fn service(hub: &Arc<Hub>) -> GpuWatchService {
        let (events, _) = EventLog::open(None, 100);
        let events = Arc::new(events);
        let (leases, _) = crate::leases::Leases::open(
            &crate::persist::Persister::memory(),
            events.clone(),
            hub.clone(),
            crate::config::LeasesConfig::default(),
        );
        let (control, _requests) = ControlHandle::channel();
        GpuWatchService::new(
            ServiceParts {
                hub: hub.clone(),
                events,
                control,
                streams: StreamLimiter::new(8, 8),
                shutdown: CancellationToken::new(),
                attribution: None,
                leases,
                history: crate::service::HistoryParts {
                    store: None,
                    limits: crate::history::Limits {
                        max_points: 1000,
                        max_bytes: 1 << 20,
                    },
                },
            },
            &HostFacts {
                backend: "simulator",
                driver_version: None,
                nvml_version: None,
            },
        )
    }

    /// A gRPC request for `path` carrying `message`, as the transport hands
    /// it over after the authorization layer attached the caller.
    fn grpc_request(path: &str, message: &impl Message) -> http::Request<tonic::body::Body> {
        let body = message.encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
        framed.extend_from_slice(&body);
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(
                bytes::Bytes::from(framed),
            )))
            .expect("request");
        request
            .extensions_mut()
            .insert(Caller::anonymous(Role::Read));
        request
    }

    #[tokio::test]
    async fn the_router_answers_get_snapshot_from_shared_bytes() {
        let hub = Arc::new(Hub::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            16,
        ));
        let sample = |index: u32| GpuSample {
            index,
            uuid: format!("GPU-{index}"),
            seq: hub.first_seq() + 1,
            temperature_c: Some(60 + index),
            governor_state: 1,
            processes: vec![crate::api::GpuProcess {
                pid: 100 + index,
                ..crate::api::GpuProcess::default()
            }],
            processes_time: Some(prost_types::Timestamp::default()),
            ..GpuSample::default()
        };
        hub.set_devices(
            (0..2)
                .map(|i| crate::api::DeviceInfo {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    ..crate::api::DeviceInfo::default()
                })
                .collect(),
        );
        let frame = Frame {
            seq: hub.first_seq() + 1,
            time: None,
            samples: vec![sample(0), sample(1)],
        };
        hub.publish(frame.clone());
        let mut routes = add_gpuwatch(
            Routes::default(),
            service(&hub),
            SharedFrames::new(),
            1 << 20,
        );
        let mut ask = async |request: GetSnapshotRequest| {
            let response = routes
                .call(grpc_request(SNAPSHOT_PATH, &request))
                .await
                .expect("infallible");
            assert_eq!(response.status(), http::StatusCode::OK);
            let body = response.into_body().collect().await.expect("a body");
            let status = body
                .trailers()
                .and_then(|t| t.get("grpc-status"))
                .map(|v| v.to_str().expect("ascii").to_owned());
            let messages = grpc_messages(&body.to_bytes());
            (status, messages)
        };
        for _ in 0..2 {
            let (status, messages) = ask(GetSnapshotRequest::default()).await;
            assert_eq!(status.as_deref(), Some("0"));
            let got = GetSnapshotResponse::decode(messages[0].as_slice()).expect("decodes");
            assert_eq!(got.seq, frame.seq);
            assert_eq!(got.samples, frame.samples, "every GPU, processes included");
        }
        let one = GetSnapshotRequest {
            gpus: vec![crate::api::GpuSelector {
                selector: Some(crate::api::gpu_selector::Selector::Index(1)),
            }],
        };
        let (_, messages) = ask(one).await;
        let got = GetSnapshotResponse::decode(messages[0].as_slice()).expect("decodes");
        assert_eq!(got.samples, vec![sample(1)]);
        let missing = GetSnapshotRequest {
            gpus: vec![crate::api::GpuSelector {
                selector: Some(crate::api::gpu_selector::Selector::Index(7)),
            }],
        };
        let (status, messages) = ask(missing).await;
        assert!(messages.is_empty());
        assert_ne!(status.as_deref(), Some("0"), "an unknown GPU is refused");
        // A request larger than the decoder's small buffer is read whole:
        // refused as an unknown GPU, as the short one is, not as bad bytes.
        let long = GetSnapshotRequest {
            gpus: vec![crate::api::GpuSelector {
                selector: Some(crate::api::gpu_selector::Selector::Uuid(format!(
                    "GPU-{}",
                    "7".repeat(4 * SMALL_BUFFER)
                ))),
            }],
        };
        assert!(long.encoded_len() > SMALL_BUFFER);
        let (long_status, messages) = ask(long).await;
        assert!(messages.is_empty());
        assert_eq!(long_status, status);
    }

    #[tokio::test]
    async fn the_router_sends_watch_through_the_shared_encoding() {
        let hub = Arc::new(Hub::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            16,
        ));
        let service = service(&hub);
        let shared = SharedFrames::new();
        let mut routes = add_gpuwatch(Routes::default(), service, shared.clone(), 1 << 20);

        // An empty WatchRequest, as the transport hands it over after the
        // authorization layer attached the caller.
        let request = grpc_request(WATCH_PATH, &WatchRequest::default());
        let response = routes.call(request).await.expect("infallible");
        assert_eq!(response.status(), http::StatusCode::OK);
        let frame = Frame {
            seq: hub.first_seq() + 1,
            time: None,
            samples: vec![GpuSample {
                index: 0,
                uuid: "GPU-route".into(),
                seq: hub.first_seq() + 1,
                ..GpuSample::default()
            }],
        };
        hub.publish(frame.clone());

        // `start`, then the frame.
        let mut body = response.into_body();
        let mut received = Vec::new();
        while grpc_messages(&received).len() < 2 {
            let next = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("a message within 5 s")
                .expect("the stream is open")
                .expect("a data frame");
            if let Ok(data) = next.into_data() {
                received.extend_from_slice(&data);
            }
        }
        let messages = grpc_messages(&received);
        let sent = WatchResponse::decode(messages[1].as_slice()).expect("decodes");
        assert_eq!(
            sent.message,
            Some(watch_response::Message::Frame(frame.clone()))
        );
        // Sent from the shared encoding: it cached that tick's bytes.
        assert_eq!(shared.newest_seq(), Some(frame.seq));
        assert_eq!(
            shared
                .encoded(&crate::tick::TickFrame::from_whole(frame))
                .slice(crate::watch_frames::GRPC_PREFIX..),
            messages[1].as_slice()
        );
    }

    #[test]
    fn the_route_is_the_contracts_watch_method() {
        let set = prost_types::FileDescriptorSet::decode(crate::api::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let service = <GpuWatchServer<GpuWatchService> as NamedService>::NAME;
        let watch = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| (f, s)))
            .filter(|(f, s)| format!("{}.{}", f.package(), s.name()) == service)
            .flat_map(|(_, s)| s.method.iter())
            .find(|m| format!("/{service}/{}", m.name()) == WATCH_PATH)
            .expect("WATCH_PATH names a method of the service");
        assert!(watch.server_streaming() && !watch.client_streaming());
        assert_eq!(watch.input_type(), ".gpuwatch.v1.WatchRequest");
        assert_eq!(watch.output_type(), ".gpuwatch.v1.WatchResponse");
    }
}
