//! Watch frames encoded once per tick and shared by every subscriber.
//!
//! Why: with the generated gRPC plumbing every Watch subscriber deep-copied
//! each frame and encoded it itself, so a tick with 1,000 subscribers
//! encoded the same bytes 1,000 times. `gpuwatch-bench fanout` measured that
//! copy-and-encode as about 40 % of the daemon's CPU under fan-out, and the
//! tick's burst of work as what set the subscribers' latency (see
//! BENCHMARKS.md). Here the first subscriber to send a frame encodes it;
//! the others send the same bytes.
//!
//! What it owns: the `WatchItem` a Watch stream yields (a message, or a
//! frame already encoded), the cache of the newest encoded frame, the codec
//! that writes either, and the route that serves
//! `/gpuwatch.v1.GpuWatch/Watch` with them in front of the generated
//! server (every other method goes to the generated server unchanged).
//! The bytes on the wire are exactly what the generated code would send.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::{
    Request, Response, Status,
    codec::{BufferSettings, Codec, EncodeBuf, Encoder},
    codegen::{Body, BoxFuture, Service, StdError, http},
    server::{Grpc, NamedService, ServerStreamingService},
};
use tonic_prost::{ProstCodec, ProstDecoder};

use crate::{
    api::{Frame, WatchRequest, WatchResponse, gpu_watch_server::GpuWatchServer},
    service::{GpuWatchService, WatchItemStream},
};

/// The Watch method's path.
const WATCH_PATH: &str = "/gpuwatch.v1.GpuWatch/Watch";
/// `WatchResponse.frame`'s field number (`oneof message { Frame frame = 2 }`).
const FRAME_FIELD: u32 = 2;

/// One message of a Watch stream.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// A message to encode (start, gap, or a frame for a subset of GPUs).
    Message(WatchResponse),
    /// A `WatchResponse` holding a whole frame, already encoded.
    Encoded(Bytes),
}

impl WatchItem {
    /// The message itself (decoding a shared frame back, for callers that
    /// want messages rather than bytes).
    pub fn into_message(self) -> Result<WatchResponse, Status> {
        match self {
            WatchItem::Message(m) => Ok(m),
            WatchItem::Encoded(bytes) => WatchResponse::decode(bytes)
                .map_err(|e| Status::internal(format!("re-reading a shared frame: {e}"))),
        }
    }
}

/// The newest frame, encoded as a `WatchResponse`.
#[derive(Debug, Default)]
pub struct SharedFrames {
    newest: Mutex<Option<(u64, Bytes)>>,
}

impl SharedFrames {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// `WatchResponse { frame }` encoded: from the cache when this is the
    /// frame it holds, else encoded now (and cached if it is newer, so a
    /// resuming subscriber's replay of old frames never evicts the live one).
    pub fn encoded(&self, frame: &Frame) -> Bytes {
        if let Some((seq, bytes)) = self
            .newest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            && *seq == frame.seq
        {
            return bytes.clone();
        }
        let bytes = encode_frame(frame);
        let mut newest = self.newest.lock().unwrap_or_else(PoisonError::into_inner);
        if newest.as_ref().is_none_or(|(seq, _)| frame.seq > *seq) {
            *newest = Some((frame.seq, bytes.clone()));
        }
        bytes
    }
}

/// `WatchResponse { message: Some(Frame(frame)) }` on the wire, without
/// copying the frame into a message first.
fn encode_frame(frame: &Frame) -> Bytes {
    let len = frame.encoded_len();
    let mut buf = Vec::with_capacity(len + 8);
    prost::encoding::message::encode(FRAME_FIELD, frame, &mut buf);
    Bytes::from(buf)
}

/// Encodes `WatchItem`s, decodes `WatchRequest`s.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchCodec;

/// The encoding half of [`WatchCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchEncoder;

impl Encoder for WatchEncoder {
    type Item = WatchItem;
    type Error = Status;

    fn encode(&mut self, item: WatchItem, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            WatchItem::Message(m) => m
                .encode(dst)
                .map_err(|e| Status::internal(format!("encoding a Watch message: {e}"))),
            WatchItem::Encoded(bytes) => {
                dst.put_slice(&bytes);
                Ok(())
            }
        }
    }
}

impl Codec for WatchCodec {
    type Encode = WatchItem;
    type Decode = WatchRequest;
    type Encoder = WatchEncoder;
    type Decoder = ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        WatchEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<WatchResponse, WatchRequest>::raw_decoder(BufferSettings::default())
    }
}

/// The `gpuwatch.v1.GpuWatch` service as the daemon serves it: Watch with
/// shared frames, every other method from the generated server.
#[derive(Debug, Clone)]
pub struct GpuWatchRoutes {
    generated: GpuWatchServer<GpuWatchService>,
    service: Arc<GpuWatchService>,
    shared: Arc<SharedFrames>,
    max_request_bytes: usize,
}

impl GpuWatchRoutes {
    pub fn new(service: GpuWatchService, max_request_bytes: usize) -> Self {
        Self {
            generated: GpuWatchServer::new(service.clone())
                .max_decoding_message_size(max_request_bytes),
            service: Arc::new(service),
            shared: SharedFrames::new(),
            max_request_bytes,
        }
    }
}

impl NamedService for GpuWatchRoutes {
    const NAME: &'static str = <GpuWatchServer<GpuWatchService> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for GpuWatchRoutes
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return self.generated.call(request);
        }
        let method = WatchMethod {
            service: self.service.clone(),
            shared: self.shared.clone(),
        };
        let max_request_bytes = self.max_request_bytes;
        Box::pin(async move {
            let mut grpc =
                Grpc::new(WatchCodec).apply_max_message_size_config(Some(max_request_bytes), None);
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}

/// Watch, served with shared frames.
struct WatchMethod {
    service: Arc<GpuWatchService>,
    shared: Arc<SharedFrames>,
}

impl ServerStreamingService<WatchRequest> for WatchMethod {
    type Response = WatchItem;
    type ResponseStream = WatchItemStream;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<WatchRequest>) -> Self::Future {
        std::future::ready(
            self.service
                .open_watch(request, Some(self.shared.clone()))
                .map(Response::new),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{GpuSample, watch_response};

    fn frame(seq: u64) -> Frame {
        Frame {
            seq,
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 1,
            }),
            samples: vec![GpuSample {
                index: 0,
                uuid: "GPU-shared".into(),
                seq,
                temperature_c: Some(70),
                throttle_reasons: vec![3, 4],
                ..GpuSample::default()
            }],
        }
    }

    #[test]
    fn shared_bytes_are_what_the_generated_code_sends() {
        let f = frame(7);
        let expected = WatchResponse {
            message: Some(watch_response::Message::Frame(f.clone())),
        }
        .encode_to_vec();
        let shared = SharedFrames::default();
        assert_eq!(shared.encoded(&f).as_ref(), expected.as_slice());
        // Served from the cache the second time: the same allocation.
        let a = shared.encoded(&f);
        let b = shared.encoded(&f);
        assert_eq!(a.as_ptr(), b.as_ptr());
        let back = WatchItem::Encoded(a).into_message().expect("decodes");
        assert_eq!(back.message, Some(watch_response::Message::Frame(f)));
    }

    #[test]
    fn an_old_frame_never_evicts_the_newest() {
        let shared = SharedFrames::default();
        let newest = shared.encoded(&frame(10));
        let old = shared.encoded(&frame(3));
        assert_ne!(old, newest);
        assert_eq!(shared.encoded(&frame(10)).as_ptr(), newest.as_ptr());
    }
}
