//! The protobuf codec of every generated gRPC method, server and client.
//!
//! Why it exists: `tonic_prost`'s encoder has prost write the message
//! straight into tonic's `EncodeBuf`, which does not override
//! `BufMut::put_u8`; every varint and tag byte prost writes therefore goes
//! through a generic `put_slice` (a capacity check and a `memmove` call).
//! Under `gpuwatch-bench polling`, perf put about a fifth of a
//! `GetSnapshot`'s CPU there. This encoder has prost write into a
//! contiguous buffer, where a byte is a store, and copies the result into
//! tonic's buffer once. Decoding is `tonic_prost`'s. The bytes on the wire
//! are exactly the same (tested below, and every gRPC test runs through it).
//!
//! Decoding has the mirror problem: prost reading from tonic's `DecodeBuf`
//! advances a `BytesMut` after every varint (`BytesMut::advance_unchecked`
//! was the largest item after the varints themselves when a client
//! decoded a 1.6 MB `GetHistoryResponse`). A received message is one
//! contiguous chunk, so [`SliceDecoder`] has prost read it as a slice, and
//! only falls back to the buffer when it is not.
//!
//! What it owns: [`ProstCodec`], named by `build.rs` as the generated code's
//! codec (`Watch` is encoded by [`crate::watch_wire`] instead), and its
//! [`SliceDecoder`].

use std::marker::PhantomData;

use bytes::{Buf, BufMut};
use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};
use tonic_prost::ProstDecoder;

/// `application/grpc+proto` via prost, encoding through a contiguous buffer.
#[derive(Debug, Clone)]
pub struct ProstCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SliceDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder { _pd: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        SliceDecoder {
            inner: tonic_prost::ProstCodec::<T, U>::raw_decoder(BufferSettings::default()),
        }
    }
}

/// Decodes `U` from the received message as one slice when it is
/// contiguous (it is whenever tonic has buffered the whole message, which
/// it does before decoding), else as `tonic_prost` does.
#[derive(Debug)]
pub struct SliceDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: Message + Default> Decoder for SliceDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = buf.remaining();
        let chunk = buf.chunk();
        if chunk.len() != len {
            return self.inner.decode(buf);
        }
        let item = U::decode(chunk)
            // As tonic_prost maps a decoding error: INTERNAL.
            .map_err(|e| Status::internal(e.to_string()))?;
        buf.advance(len);
        Ok(Some(item))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// Encodes `T` into a `Vec` sized by `encoded_len`, then into tonic's buffer
/// with one copy.
#[derive(Debug)]
pub struct ProstEncoder<T> {
    _pd: PhantomData<T>,
}

impl<T: Message> Encoder for ProstEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.encode_to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::{GetSnapshotResponse, GpuSample};

    fn snapshot(gpus: u32) -> GetSnapshotResponse {
        GetSnapshotResponse {
            seq: 1_763_000_000_123,
            time: None,
            samples: (0..gpus)
                .map(|i| GpuSample {
                    index: i,
                    uuid: format!("GPU-{i:08x}-0000-0000-0000-000000000000"),
                    temperature_c: Some(40 + i),
                    power_draw_mw: Some(350_000 + 1_000 * i),
                    age_ms: 7,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn bytes_are_what_prost_writes_into_any_buffer() {
        for gpus in [0, 1, 8, 64] {
            let message = snapshot(gpus);
            // What tonic_prost's encoder produces: prost writing straight
            // into a growable buffer.
            let mut direct = BytesMut::new();
            message.encode(&mut direct).expect("encodes");
            assert_eq!(message.encode_to_vec(), direct.to_vec(), "{gpus} GPUs");
            assert_eq!(
                GetSnapshotResponse::decode(direct).expect("decodes"),
                message
            );
        }
    }
}
