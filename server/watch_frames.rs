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
//! What it owns: [`Shared`], a message or its bytes already encoded (a
//! Watch stream's `WatchItem`, a shared GetSnapshot answer), the cache of
//! the newest encoded frame, and the codec that writes either. It is a leaf: it knows the wire types and
//! tonic's codec traits, nothing of the service. The service
//! ([`crate::service`]) produces `WatchItem`s; [`crate::watch_wire`] serves
//! them. The bytes on the wire decode to exactly what the generated code
//! would send (fields of a sample may come in another order).

use std::{
    marker::PhantomData,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, EncodeBuf, Encoder},
};
use tonic_prost::{ProstCodec, ProstDecoder};

use crate::{
    api::{WatchRequest, WatchResponse},
    tick::TickFrame,
};

/// `WatchResponse.frame`'s field number (`oneof message { Frame frame = 2 }`).
const FRAME_FIELD: u32 = 2;

/// The length of gRPC's message prefix: a compression flag and a
/// big-endian u32 length.
pub const GRPC_PREFIX: usize = 5;

/// A message to encode, or one already encoded (shared by many callers).
#[derive(Debug, Clone)]
pub enum Shared<M> {
    /// A message to encode.
    Message(M),
    /// The message's bytes, already encoded and framed for gRPC: the
    /// [`GRPC_PREFIX`] bytes (not compressed, the length), then the message
    /// (see [`framed`]). [`SharedBody`] sends them as they are.
    Encoded(Bytes),
}

/// A message written by `encode`, framed for gRPC: what a
/// [`Shared::Encoded`] holds.
pub fn framed(capacity: usize, encode: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    Bytes::from(framed_buf(capacity, encode))
}

/// [`framed`], as the buffer itself (for an owner of its own, see
/// [`crate::memory::answer_bytes`]).
pub fn framed_buf(capacity: usize, encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = Vec::with_capacity(GRPC_PREFIX + capacity);
    buf.extend_from_slice(&[0; GRPC_PREFIX]);
    encode(&mut buf);
    let len = u32::try_from(buf.len() - GRPC_PREFIX).unwrap_or(u32::MAX);
    buf[1..GRPC_PREFIX].copy_from_slice(&len.to_be_bytes());
    buf
}

/// The message inside bytes made by [`framed`].
fn unframed(bytes: &Bytes) -> Bytes {
    bytes.slice(GRPC_PREFIX.min(bytes.len())..)
}

impl<M: Message + Default> Shared<M> {
    /// The message itself (decoding shared bytes back, for callers that
    /// want messages rather than bytes).
    pub fn into_message(self) -> Result<M, Status> {
        match self {
            Shared::Message(m) => Ok(m),
            Shared::Encoded(bytes) => M::decode(unframed(&bytes))
                .map_err(|e| Status::internal(format!("re-reading a shared message: {e}"))),
        }
    }
}

/// One message of a Watch stream: a message to encode (start, gap, or a
/// frame for a subset of GPUs), or a `WatchResponse` holding a whole frame,
/// already encoded.
pub type WatchItem = Shared<WatchResponse>;

/// The newest frame, encoded as a `WatchResponse`.
#[derive(Debug, Default)]
pub struct SharedFrames {
    newest: Mutex<Option<(u64, Bytes)>>,
}

impl SharedFrames {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The seq of the frame the cache holds, if any.
    #[cfg(test)]
    pub fn newest_seq(&self) -> Option<u64> {
        self.newest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(seq, _)| *seq)
    }

    /// `WatchResponse { frame }` encoded: from the cache when this is the
    /// frame it holds, else encoded now (and cached if it is newer, so a
    /// resuming subscriber's replay of old frames never evicts the live one).
    pub fn encoded(&self, frame: &TickFrame) -> Bytes {
        if let Some((seq, bytes)) = self
            .newest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            && *seq == frame.seq()
        {
            return bytes.clone();
        }
        let bytes = encode_frame(frame);
        let mut newest = self.newest.lock().unwrap_or_else(PoisonError::into_inner);
        if newest.as_ref().is_none_or(|(seq, _)| frame.seq() > *seq) {
            *newest = Some((frame.seq(), bytes.clone()));
        }
        bytes
    }
}

/// `WatchResponse { message: Some(Frame(frame)) }` on the wire, without
/// building the whole frame or a message first: the tick's fast frame and
/// its slow parts' bytes (encoded once per slow reading) are spliced.
fn encode_frame(frame: &TickFrame) -> Bytes {
    let body = frame.encode_whole();
    framed(body.len() + 8, |buf| {
        prost::encoding::encode_key(FRAME_FIELD, prost::encoding::WireType::LengthDelimited, buf);
        prost::encoding::encode_varint(body.len() as u64, buf);
        buf.extend_from_slice(&body);
    })
}

/// Encodes [`Shared`] messages of type `M` (writing shared bytes as they
/// are), decodes requests of type `R` as the generated code does.
#[derive(Debug)]
pub struct SharedCodec<M, R>(PhantomData<fn() -> (M, R)>);

impl<M, R> Default for SharedCodec<M, R> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// The codec of the Watch route.
pub type WatchCodec = SharedCodec<WatchResponse, WatchRequest>;

/// The encoding half of [`SharedCodec`].
#[derive(Debug)]
pub struct SharedEncoder<M>(PhantomData<fn() -> M>);

impl<M: Message> Encoder for SharedEncoder<M> {
    type Item = Shared<M>;
    type Error = Status;

    fn encode(&mut self, item: Shared<M>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Shared::Message(m) => m
                .encode(dst)
                .map_err(|e| Status::internal(format!("encoding a message: {e}"))),
            Shared::Encoded(bytes) => {
                dst.put_slice(&bytes[GRPC_PREFIX.min(bytes.len())..]);
                Ok(())
            }
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        // Only a message to encode is written into tonic's buffer (shared
        // bytes go out through [`SharedBody`]); its default 8 KiB a stream
        // was most of the memory of 10,000 Watch streams.
        BufferSettings::new(SMALL_BUFFER, DEFAULT_YIELD_THRESHOLD)
    }
}

/// tonic's buffer for the messages [`SharedEncoder`] encodes, and for
/// decoding a request of these routes (it grows for a larger one).
pub(crate) const SMALL_BUFFER: usize = 512;
/// tonic's default: a chunk goes to the transport at 32 KiB.
const DEFAULT_YIELD_THRESHOLD: usize = 32 * 1024;

/// A response body of [`Shared`] messages: shared bytes go to the
/// transport as they are (no copy, no buffer kept per stream), messages are
/// encoded and framed one by one; then the trailers with the stream's
/// status (OK at the end, or the error it ended with).
pub struct SharedBody<M> {
    items: futures_util::stream::BoxStream<'static, Result<Shared<M>, Status>>,
    done: bool,
}

impl<M> SharedBody<M> {
    pub fn new(items: futures_util::stream::BoxStream<'static, Result<Shared<M>, Status>>) -> Self {
        Self { items, done: false }
    }
}

impl<M: Message> http_body::Body for SharedBody<M> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        use futures_util::StreamExt;
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        let end = |status: Status| {
            let mut trailers = tonic::codegen::http::HeaderMap::with_capacity(3);
            status.add_header(&mut trailers)?;
            Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
        };
        match std::task::ready!(self.items.poll_next_unpin(cx)) {
            Some(Ok(Shared::Encoded(bytes))) => {
                Poll::Ready(Some(Ok(http_body::Frame::data(bytes))))
            }
            Some(Ok(Shared::Message(m))) => Poll::Ready(Some(Ok(http_body::Frame::data(framed(
                m.encoded_len(),
                |buf| m.encode_raw(buf),
            ))))),
            Some(Err(status)) => {
                self.done = true;
                end(status)
            }
            None => {
                self.done = true;
                end(Status::ok(""))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl<M, R> Codec for SharedCodec<M, R>
where
    M: Message + Send + 'static,
    R: Message + Default + Send + 'static,
{
    type Encode = Shared<M>;
    type Decode = R;
    type Encoder = SharedEncoder<M>;
    type Decoder = ProstDecoder<R>;

    fn encoder(&mut self) -> Self::Encoder {
        SharedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        // The requests of these routes are a few dozen bytes; tonic's
        // default is an 8 KiB buffer a stream, allocated as the request is
        // read (the buffer grows for a larger one).
        ProstCodec::<M, R>::raw_decoder(BufferSettings::new(SMALL_BUFFER, DEFAULT_YIELD_THRESHOLD))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Frame, GpuProcess, GpuSample, watch_response};

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
                governor_state: 1,
                processes: vec![GpuProcess {
                    pid: 4,
                    name: Some("worker".into()),
                    ..GpuProcess::default()
                }],
                ..GpuSample::default()
            }],
        }
    }

    #[test]
    fn shared_bytes_decode_to_what_the_generated_code_sends() {
        let f = frame(7);
        let expected = WatchResponse {
            message: Some(watch_response::Message::Frame(f.clone())),
        }
        .encode_to_vec();
        let shared = SharedFrames::default();
        let tick = TickFrame::from_whole(f.clone());
        let bytes = shared.encoded(&tick);
        assert_eq!(bytes.len(), GRPC_PREFIX + expected.len());
        assert_eq!(bytes[0], 0, "not compressed");
        assert_eq!(
            u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize,
            expected.len()
        );
        assert_eq!(
            WatchResponse::decode(&bytes[GRPC_PREFIX..]).expect("decodes"),
            WatchResponse::decode(expected.as_slice()).expect("decodes")
        );
        // Served from the cache the second time: the same allocation.
        let a = shared.encoded(&tick);
        let b = shared.encoded(&tick);
        assert_eq!(a.as_ptr(), b.as_ptr());
        let back = WatchItem::Encoded(a).into_message().expect("decodes");
        assert_eq!(back.message, Some(watch_response::Message::Frame(f)));
    }

    #[test]
    fn an_old_frame_never_evicts_the_newest() {
        let shared = SharedFrames::default();
        let tick = |seq| TickFrame::from_whole(frame(seq));
        let newest = shared.encoded(&tick(10));
        let old = shared.encoded(&tick(3));
        assert_ne!(old, newest);
        assert_eq!(shared.encoded(&tick(10)).as_ptr(), newest.as_ptr());
    }
}
