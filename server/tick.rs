//! A published tick, held so that the slow half of each sample is built once.
//!
//! Why: a GPU's processes, their owners, its MIG instances and the pods it
//! is allocated to change at the slow cadence (1 s), but every frame at the
//! fast cadence (10 Hz) carries them. Copying that list into each frame
//! cost an allocation per string per process per tick, and the resume ring
//! kept 600 copies of it (`gpuwatch-bench attribution` measured +50 MiB and
//! most of attribution's CPU there; see BENCHMARKS.md).
//!
//! What it owns: [`TickFrame`], the hub's unit — the tick's fast frame
//! (every sample with its slow fields empty) beside one shared
//! [`SlowPart`] per GPU, made once per slow reading and referred to by every
//! tick until the next; and the two ways out of it: a whole [`Frame`] built
//! on demand (snapshots, `/metrics`, a filtered Watch) and the Watch wire
//! encoding, spliced from the fast frame and each slow part's bytes encoded
//! once. The spliced sample writes the fast fields, then the slow ones:
//! protobuf parsers accept fields in any order and merge them, so it
//! decodes to exactly the whole sample (a test decodes and compares), and
//! no field number has to be known here.
//!
//! The slow fields are `processes`, `processes_time`, `mig_enabled`,
//! `mig_instances` and `allocations`. ECC counts are read on the slow
//! cadence too, but they are a few plain integers that cost no allocation,
//! so they stay in the fast sample.

use std::sync::Arc;

use bytes::Bytes;
use prost::{Message, encoding};

use crate::api::{Frame, GpuSample};

/// `Frame.samples`' field number (the last of the frame's fields).
const SAMPLES_FIELD: u32 = 3;

/// The slow fields of one GPU's sample, as of one slow reading (and one
/// attribution refresh), with their encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SlowPart {
    /// A sample with only the slow fields set.
    sample: GpuSample,
    /// That sample, encoded.
    encoded: Bytes,
}

impl SlowPart {
    /// Takes the slow fields out of `sample` (leaving them empty there).
    pub fn split_from(sample: &mut GpuSample) -> Self {
        let slow = GpuSample {
            processes: std::mem::take(&mut sample.processes),
            processes_time: sample.processes_time.take(),
            mig_enabled: sample.mig_enabled.take(),
            mig_instances: std::mem::take(&mut sample.mig_instances),
            allocations: std::mem::take(&mut sample.allocations),
            ..GpuSample::default()
        };
        Self::new(slow)
    }

    /// A slow part from a sample that holds nothing but slow fields (any
    /// other field is ignored).
    pub fn new(slow: GpuSample) -> Self {
        let slow = GpuSample {
            processes: slow.processes,
            processes_time: slow.processes_time,
            mig_enabled: slow.mig_enabled,
            mig_instances: slow.mig_instances,
            allocations: slow.allocations,
            ..GpuSample::default()
        };
        let encoded = slow.encode_to_vec().into();
        Self {
            sample: slow,
            encoded,
        }
    }

    /// The slow fields (everything else in it is default).
    pub fn sample(&self) -> &GpuSample {
        &self.sample
    }

    /// Copies the slow fields into `into`.
    fn fill(&self, into: &mut GpuSample) {
        let s = &self.sample;
        into.processes.clone_from(&s.processes);
        into.processes_time = s.processes_time;
        into.mig_enabled = s.mig_enabled;
        into.mig_instances.clone_from(&s.mig_instances);
        into.allocations.clone_from(&s.allocations);
    }

    fn encoded_len(&self) -> usize {
        self.encoded.len()
    }
}

/// One tick as the hub keeps it.
#[derive(Debug, Clone)]
pub struct TickFrame {
    /// The frame with every sample's slow fields empty.
    fast: Arc<Frame>,
    /// Each sample's slow fields, by position in `fast.samples` (None: the
    /// GPU had none to give — lost, or no slow reading yet).
    slow: Vec<Option<Arc<SlowPart>>>,
}

impl TickFrame {
    /// A tick from its fast frame and each sample's slow part.
    ///
    /// # Panics
    /// When `slow` does not have one entry per sample (a programming error).
    pub fn new(fast: Frame, slow: Vec<Option<Arc<SlowPart>>>) -> Self {
        assert_eq!(fast.samples.len(), slow.len(), "one slow part per sample");
        Self {
            fast: Arc::new(fast),
            slow,
        }
    }

    /// Splits a whole frame (tests, and callers that built one whole).
    pub fn from_whole(mut frame: Frame) -> Self {
        let slow = frame
            .samples
            .iter_mut()
            .map(|s| {
                let part = SlowPart::split_from(s);
                (part.encoded_len() > 0).then(|| Arc::new(part))
            })
            .collect();
        Self::new(frame, slow)
    }

    pub fn seq(&self) -> u64 {
        self.fast.seq
    }

    /// The fast frame: every numeric reading, no processes, MIG instances
    /// or allocations. What history, the charts and utilisation windows use.
    pub fn fast(&self) -> &Arc<Frame> {
        &self.fast
    }

    /// The slow part of the sample at `pos`.
    pub fn slow(&self, pos: usize) -> Option<&Arc<SlowPart>> {
        self.slow.get(pos).and_then(Option::as_ref)
    }

    /// The whole sample at `pos`.
    fn whole_sample(&self, pos: usize) -> GpuSample {
        let mut s = self.fast.samples[pos].clone();
        if let Some(slow) = self.slow(pos) {
            slow.fill(&mut s);
        }
        s
    }

    /// The whole frame, for the GPUs whose index `keep` accepts.
    pub fn whole_filtered(&self, keep: impl Fn(u32) -> bool) -> Frame {
        Frame {
            seq: self.fast.seq,
            time: self.fast.time,
            samples: (0..self.fast.samples.len())
                .filter(|&pos| keep(self.fast.samples[pos].index))
                .map(|pos| self.whole_sample(pos))
                .collect(),
        }
    }

    /// The whole frame, as the contract has it.
    pub fn whole(&self) -> Frame {
        self.whole_filtered(|_| true)
    }

    /// The sample at `pos`, encoded: its fast fields, then its slow part's
    /// bytes (the same message once decoded).
    fn encode_sample(&self, pos: usize, buf: &mut Vec<u8>) {
        let fast = &self.fast.samples[pos];
        let Some(slow) = self.slow(pos) else {
            encoding::message::encode(SAMPLES_FIELD, fast, buf);
            return;
        };
        let len = fast.encoded_len() + slow.encoded_len();
        encoding::encode_key(SAMPLES_FIELD, encoding::WireType::LengthDelimited, buf);
        encoding::encode_varint(len as u64, buf);
        fast.encode(buf)
            .expect("a Vec<u8> grows to whatever is encoded into it");
        buf.extend_from_slice(&slow.encoded);
    }

    /// The whole frame encoded as `Frame` (decoding to [`Self::whole`],
    /// without building it).
    pub fn encode_whole(&self) -> Vec<u8> {
        let head = Frame {
            seq: self.fast.seq,
            time: self.fast.time,
            samples: Vec::new(),
        };
        let samples_len: usize = self
            .slow
            .iter()
            .map(|s| s.as_ref().map_or(0, |s| s.encoded_len()))
            .sum();
        let mut buf = Vec::with_capacity(self.fast.encoded_len() + samples_len + 16);
        head.encode(&mut buf)
            .expect("a Vec<u8> grows to whatever is encoded into it");
        for pos in 0..self.fast.samples.len() {
            self.encode_sample(pos, &mut buf);
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{GpuAllocation, GpuProcess, MigInstance};

    fn whole(seq: u64) -> Frame {
        let busy = GpuSample {
            index: 0,
            uuid: "GPU-a".into(),
            seq,
            temperature_c: Some(71),
            throttle_reasons: vec![3],
            processes: vec![
                GpuProcess {
                    pid: 10,
                    name: Some("python3".into()),
                    used_memory_bytes: Some(1 << 30),
                    ..GpuProcess::default()
                },
                GpuProcess {
                    pid: 11,
                    ..GpuProcess::default()
                },
            ],
            processes_time: Some(prost_types::Timestamp {
                seconds: 5,
                nanos: 6,
            }),
            governor_state: 2,
            mig_enabled: Some(true),
            mig_instances: vec![MigInstance {
                uuid: "MIG-x".into(),
                pids: vec![11],
                ..MigInstance::default()
            }],
            allocations: vec![GpuAllocation {
                pod: Some(crate::api::PodRef {
                    pod: "p".into(),
                    ..crate::api::PodRef::default()
                }),
                ..GpuAllocation::default()
            }],
            ..GpuSample::default()
        };
        // Governor idle (0, not encoded) and MIG off (false, encoded).
        let idle = GpuSample {
            index: 1,
            uuid: "GPU-b".into(),
            seq,
            processes_time: Some(prost_types::Timestamp::default()),
            mig_enabled: Some(false),
            ..GpuSample::default()
        };
        let lost = GpuSample {
            index: 2,
            uuid: "GPU-c".into(),
            seq,
            health: 3,
            governor_state: 4,
            ..GpuSample::default()
        };
        Frame {
            seq,
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 9,
            }),
            samples: vec![busy, idle, lost],
        }
    }

    #[test]
    fn split_and_rebuilt_is_the_same_frame() {
        let f = whole(3);
        let tick = TickFrame::from_whole(f.clone());
        assert_eq!(tick.whole(), f);
        assert!(tick.fast().samples.iter().all(|s| s.processes.is_empty()
            && s.mig_instances.is_empty()
            && s.allocations.is_empty()
            && s.processes_time.is_none()));
        assert!(tick.slow(2).is_none(), "nothing slow to keep for a lost GPU");
        assert_eq!(tick.fast().samples[0].governor_state, 2, "governor stays fast");
    }

    #[test]
    fn spliced_encoding_decodes_to_the_whole_frame() {
        let mut f = whole(9);
        // Fast fields numbered after the slow ones, too.
        f.samples[0].tensor_active_ratio = Some(0.25);
        f.samples[0].dram_active_ratio = Some(0.5);
        let tick = TickFrame::from_whole(f.clone());
        let bytes = tick.encode_whole();
        assert_eq!(bytes.len(), f.encoded_len(), "the same size as prost's");
        let back = Frame::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, f);
    }

    #[test]
    fn ticks_of_one_slow_reading_share_its_part() {
        let mut f = whole(1);
        let part = Arc::new(SlowPart::split_from(&mut f.samples[0]));
        let slow = vec![Some(part.clone()), None, None];
        let a = TickFrame::new(f.clone(), slow.clone());
        f.seq = 2;
        let b = TickFrame::new(f, slow);
        assert!(Arc::ptr_eq(
            a.slow(0).expect("a slow part"),
            b.slow(0).expect("a slow part")
        ));
        assert_eq!(b.whole().samples[0].processes.len(), 2);
        assert_eq!(b.whole_filtered(|i| i == 1).samples.len(), 1);
    }
}
