//! The few fields a load generator needs from gpuwatch's messages, decoded
//! with prost from the same wire bytes (every other field is skipped).
//!
//! A subscriber of the fan-out figures only needs each frame's `seq`, the
//! read time of each sample (for sample→client latency), gaps, and the
//! stride from `start`; decoding whole `GpuSample`s (strings, vectors,
//! thirty optional fields) for 10,000 frames a second would charge the
//! generator's cost to the measurement. Field numbers follow
//! `proto/gpuwatch/v1/*.proto`; `lite_messages_read_real_ones` below checks
//! them against the generated types.
//!
//! Messages are decoded from one contiguous slice ([`SliceCodec`]) rather
//! than through tonic's `DecodeBuf`: prost reads a plain `&[u8]` on its fast
//! path, while skipping fields through the generic buffer cost the
//! generator more than everything else it did (measured with perf).

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use prost_types::Timestamp;
use tonic::{
    Status,
    client::Grpc,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint},
};
use tonic_prost::{ProstCodec, ProstEncoder};

use gpuwatch_api::{GetSnapshotRequest, WatchRequest};

/// `WatchResponse`: its oneof members read as optional fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchMsg {
    #[prost(message, optional, tag = "1")]
    pub start: Option<StartMsg>,
    #[prost(message, optional, tag = "2")]
    pub frame: Option<FrameMsg>,
    #[prost(message, optional, tag = "3")]
    pub gap: Option<GapMsg>,
}

/// `WatchStart`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StartMsg {
    #[prost(uint32, tag = "3")]
    pub stride: u32,
    #[prost(uint64, tag = "6")]
    pub latest_seq: u64,
    #[prost(message, optional, tag = "8")]
    pub current: Option<FrameMsg>,
}

/// `Frame`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FrameMsg {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(message, optional, tag = "2")]
    pub time: Option<Timestamp>,
    #[prost(message, repeated, tag = "3")]
    pub samples: Vec<SampleMsg>,
}

/// `GpuSample`: when the GPU was read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SampleMsg {
    #[prost(message, optional, tag = "4")]
    pub time: Option<Timestamp>,
}

/// `Gap`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GapMsg {
    #[prost(uint64, tag = "1")]
    pub first_seq: u64,
    #[prost(uint64, tag = "2")]
    pub last_seq: u64,
    #[prost(int32, tag = "3")]
    pub reason: i32,
    #[prost(uint64, tag = "4")]
    pub missed: u64,
}

/// `GetSnapshotResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotMsg {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(message, repeated, tag = "3")]
    pub samples: Vec<SampleMsg>,
}

/// Encodes `T` with prost; decodes `U` from one contiguous slice.
#[derive(Debug)]
pub struct SliceCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for SliceCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// The decoding half of [`SliceCodec`].
#[derive(Debug)]
pub struct SliceDecoder<U>(PhantomData<fn() -> U>);

impl<U: Message + Default> Decoder for SliceDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        U::decode(bytes.as_ref())
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable message: {e}")))
    }
}

impl<T, U> Codec for SliceCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SliceDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        SliceDecoder(PhantomData)
    }
}

/// `gpuwatch.v1.GapReason.GAP_REASON_SLOW_SUBSCRIBER`.
pub const GAP_SLOW_SUBSCRIBER: i32 = 1;

/// Seconds since the Unix epoch of a protobuf timestamp.
pub fn unix_secs(t: &Timestamp) -> f64 {
    t.seconds as f64 + f64::from(t.nanos) * 1e-9
}

/// Seconds since the Unix epoch now.
pub fn now_unix_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One HTTP/2 connection to the daemon (each call opens a new one).
pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| anyhow::anyhow!("{url} is not a URL: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(10));
    endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {url}: {e}"))
}

/// Opens a Watch stream that decodes only [`WatchMsg`].
pub async fn watch(
    channel: Channel,
    interval_ms: u32,
) -> Result<tonic::Streaming<WatchMsg>, tonic::Status> {
    let mut grpc = Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    let request = WatchRequest {
        gpus: Vec::new(),
        interval_ms,
        resume_after_seq: None,
    };
    grpc.server_streaming(
        tonic::Request::new(request),
        PathAndQuery::from_static("/gpuwatch.v1.GpuWatch/Watch"),
        SliceCodec::<WatchRequest, WatchMsg>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// One GetSnapshot that decodes only [`SnapshotMsg`].
pub async fn snapshot(grpc: &mut Grpc<Channel>) -> Result<SnapshotMsg, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
    grpc.unary(
        tonic::Request::new(GetSnapshotRequest { gpus: Vec::new() }),
        PathAndQuery::from_static("/gpuwatch.v1.GpuWatch/GetSnapshot"),
        SliceCodec::<GetSnapshotRequest, SnapshotMsg>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuwatch_api::{
        Frame, Gap, GapReason, GetSnapshotResponse, GpuSample, WatchResponse, WatchStart,
        watch_response::Message,
    };
    use prost::Message as _;

    fn sample(seq: u64, nanos: i32) -> GpuSample {
        GpuSample {
            index: 3,
            uuid: "GPU-test".into(),
            seq,
            time: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos,
            }),
            temperature_c: Some(71),
            power_draw_mw: Some(512_000),
            ..GpuSample::default()
        }
    }

    #[test]
    fn lite_messages_read_real_ones() {
        let frame = Frame {
            seq: 42,
            time: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            samples: vec![sample(42, 7), sample(42, 9)],
        };
        let start = WatchResponse {
            message: Some(Message::Start(WatchStart {
                stride: 10,
                latest_seq: 42,
                current: Some(frame.clone()),
                ..WatchStart::default()
            })),
        };
        let lite = WatchMsg::decode(start.encode_to_vec().as_slice()).expect("start");
        let s = lite.start.expect("start message");
        assert_eq!((s.stride, s.latest_seq), (10, 42));
        let current = s.current.expect("current frame");
        assert_eq!(current.seq, 42);
        assert_eq!(current.samples.len(), 2);
        assert_eq!(current.samples[1].time.map(|t| t.nanos), Some(9));

        let gap = WatchResponse {
            message: Some(Message::Gap(Gap {
                first_seq: 5,
                last_seq: 9,
                reason: GapReason::SlowSubscriber as i32,
                missed: 5,
                restarted: false,
            })),
        };
        let lite = WatchMsg::decode(gap.encode_to_vec().as_slice()).expect("gap");
        let g = lite.gap.expect("gap message");
        assert_eq!((g.first_seq, g.last_seq, g.missed), (5, 9, 5));
        assert_eq!(g.reason, GAP_SLOW_SUBSCRIBER);

        let framed = WatchResponse {
            message: Some(Message::Frame(frame)),
        };
        let lite = WatchMsg::decode(framed.encode_to_vec().as_slice()).expect("frame");
        assert!(lite.start.is_none() && lite.gap.is_none());
        assert_eq!(lite.frame.map(|f| f.seq), Some(42));

        let snap = GetSnapshotResponse {
            seq: 7,
            time: None,
            samples: vec![sample(7, 1)],
        };
        let lite = SnapshotMsg::decode(snap.encode_to_vec().as_slice()).expect("snapshot");
        assert_eq!((lite.seq, lite.samples.len()), (7, 1));
    }
}
