//! Recordings: `gpuwatch-client record` writes every host's Watch stream to
//! a file, and `gpuwatch-client watch --replay` plays one back through the
//! live view (or NDJSON) at any speed.
//!
//! Why it exists: a thermal incident can be kept, mailed and replayed
//! without a daemon. This module owns the file format (see
//! `proto/gpuwatch/v1/recording.proto`): a gzip stream with a magic line,
//! then length-delimited protobuf messages — one `RecordingHeader` holding
//! the hosts and the contract's own descriptor set (so the file describes
//! itself), then one `RecordingEntry` per message received. The writer
//! flushes the gzip stream every second, so a recorder that is killed
//! leaves a file that replays up to its last flush.

use std::{
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use gpuwatch_api::{
    self as api, Gap, GapReason, RecordingEntry, RecordingHeader, WatchResponse, WatchStart, names,
    recording_entry, watch_response,
};
use prost::Message;

use crate::{record::GapRecord, watch::session::Update};

/// The file's first bytes (inside the gzip stream).
pub const MAGIC: &[u8] = b"GPUWATCH-RECORDING\n";
/// `RecordingHeader.format`.
pub const FORMAT: &str = "gpuwatch-recording";
/// `RecordingHeader.version` this build writes and reads.
pub const VERSION: u32 = 1;
/// Largest message accepted when reading (a frame of 64 GPUs is ~20 KiB).
const MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Writes a recording.
pub struct RecordingWriter {
    gz: GzEncoder<BufWriter<File>>,
    last_flush: Instant,
    /// Entries written.
    pub entries: u64,
}

impl RecordingWriter {
    /// Creates `path` and writes the header.
    pub fn create(path: &Path, hosts: &[String]) -> io::Result<Self> {
        let file = File::create(path)?;
        let mut gz = GzEncoder::new(BufWriter::new(file), Compression::default());
        gz.write_all(MAGIC)?;
        let header = RecordingHeader {
            format: FORMAT.to_owned(),
            version: VERSION,
            hosts: hosts.to_vec(),
            started: Some(SystemTime::now().into()),
            descriptor_set: api::FILE_DESCRIPTOR_SET.to_vec(),
            entry_type: "gpuwatch.v1.RecordingEntry".to_owned(),
            client_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        gz.write_all(&header.encode_length_delimited_to_vec())?;
        gz.flush()?;
        Ok(Self {
            gz,
            last_flush: Instant::now(),
            entries: 0,
        })
    }

    /// Appends what one update says (reconnect attempts are not kept).
    pub fn write(&mut self, update: &Update) -> io::Result<()> {
        let Some(entry) = entry_of(update, unix_ms(SystemTime::now())) else {
            return Ok(());
        };
        self.gz.write_all(&entry.encode_length_delimited_to_vec())?;
        self.entries += 1;
        if self.last_flush.elapsed() >= Duration::from_secs(1) {
            self.gz.flush()?;
            self.last_flush = Instant::now();
        }
        Ok(())
    }

    /// Ends the gzip stream.
    pub fn finish(self) -> io::Result<()> {
        let mut inner = self.gz.finish()?;
        inner.flush()
    }
}

/// The entry for one update.
pub fn entry_of(update: &Update, received_unix_ms: i64) -> Option<RecordingEntry> {
    let (host, entry) = match update {
        Update::Connected {
            host,
            devices,
            server_started,
            interval_ms,
            ..
        } => (
            *host,
            recording_entry::Entry::Watch(WatchResponse {
                message: Some(watch_response::Message::Start(WatchStart {
                    interval_ms: *interval_ms,
                    server_started: *server_started,
                    devices: devices.clone(),
                    ..WatchStart::default()
                })),
            }),
        ),
        Update::Frame { host, frame } => (
            *host,
            recording_entry::Entry::Watch(WatchResponse {
                message: Some(watch_response::Message::Frame(frame.clone())),
            }),
        ),
        Update::Gap { host, gap } => (
            *host,
            recording_entry::Entry::Watch(WatchResponse {
                message: Some(watch_response::Message::Gap(Gap {
                    first_seq: gap.first_seq,
                    last_seq: gap.last_seq,
                    reason: names::parse::<GapReason>(&gap.reason).unwrap_or(GapReason::Unspecified)
                        as i32,
                    missed: gap.missed,
                    restarted: gap.restarted,
                })),
            }),
        ),
        Update::Disconnected { host, error } => {
            (*host, recording_entry::Entry::Disconnected(error.clone()))
        }
        Update::Reconnecting { .. } => return None,
    };
    Some(RecordingEntry {
        host: u32::try_from(host).unwrap_or(u32::MAX),
        received_unix_ms,
        entry: Some(entry),
    })
}

/// The update an entry replays as.
pub fn update_of(entry: RecordingEntry) -> Option<Update> {
    let host = usize::try_from(entry.host).ok()?;
    match entry.entry? {
        recording_entry::Entry::Disconnected(error) => Some(Update::Disconnected { host, error }),
        recording_entry::Entry::Watch(w) => match w.message? {
            watch_response::Message::Start(s) => Some(Update::Connected {
                host,
                devices: s.devices,
                server_started: s.server_started,
                interval_ms: s.interval_ms,
                resumed_after_seq: None,
            }),
            watch_response::Message::Frame(frame) => Some(Update::Frame { host, frame }),
            // Not recorded (see entry_of): a replay draws frames only.
            watch_response::Message::History(_) => None,
            watch_response::Message::Gap(g) => {
                let mut gap = GapRecord::from(&g);
                if g.reason == GapReason::Unspecified as i32 {
                    "unannounced".clone_into(&mut gap.reason);
                }
                Some(Update::Gap { host, gap })
            }
        },
    }
}

/// Why a recording cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0} is not a gpuwatch recording (no GPUWATCH-RECORDING header)")]
    NotARecording(String),
    #[error("{path}: {why}")]
    Bad { path: String, why: String },
}

/// Reads a recording, entry by entry.
pub struct RecordingReader {
    gz: GzDecoder<BufReader<File>>,
    pub header: RecordingHeader,
}

fn read_varint(r: &mut impl Read) -> io::Result<Option<u64>> {
    let mut v = 0u64;
    for (i, shift) in (0..64).step_by(7).enumerate() {
        let mut b = [0u8; 1];
        match r.read_exact(&mut b) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && i == 0 => return Ok(None),
            Err(e) => return Err(e),
        }
        v |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            return Ok(Some(v));
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "bad length"))
}

fn read_message<M: Message + Default>(r: &mut impl Read) -> io::Result<Option<M>> {
    let Some(len) = read_varint(r)? else {
        return Ok(None);
    };
    if len > MAX_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {len}-byte message"),
        ));
    }
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    r.read_exact(&mut buf)?;
    M::decode(buf.as_slice())
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl RecordingReader {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self, ReadError> {
        let shown = path.display().to_string();
        let io_err = |source| ReadError::Io {
            path: shown.clone(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let mut gz = GzDecoder::new(BufReader::new(file));
        let mut magic = vec![0u8; MAGIC.len()];
        if gz.read_exact(&mut magic).is_err() || magic != MAGIC {
            return Err(ReadError::NotARecording(shown));
        }
        let header: RecordingHeader = read_message(&mut gz)
            .map_err(io_err)?
            .ok_or_else(|| ReadError::NotARecording(shown.clone()))?;
        if header.format != FORMAT || header.version != VERSION {
            return Err(ReadError::Bad {
                path: shown,
                why: format!(
                    "format {:?} version {}; this client reads {FORMAT:?} version {VERSION}",
                    header.format, header.version
                ),
            });
        }
        Ok(Self { gz, header })
    }

    /// The next entry; None at the end (a file cut short by a killed
    /// recorder ends where its last whole entry ends).
    pub fn next_entry(&mut self) -> Option<RecordingEntry> {
        read_message(&mut self.gz).ok().flatten()
    }
}
