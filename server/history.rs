//! History: what every GPU did over the last day and month, kept in the
//! state directory across restarts and served by `GetHistory`, the
//! dashboard and the CLI.
//!
//! Why it exists: the hub's ring holds one minute of frames; operators ask
//! what a GPU did overnight. This module owns the history store
//! (`history.redb` in the state directory, a redb database: copy-on-write
//! B-trees, crash-safe commits, checksummed pages), the one thread that
//! writes it, and the queries over it.
//!
//! Tiers: each configured tier (default 1 s for 24 h, 1 min for 30 days)
//! keeps one bucket per GPU per step: count, min, max, sum and last of every
//! numeric field in [`FIELDS`], and the throttle mask and governor state
//! that held longest. The finest data is the hub's ring of raw frames (in
//! memory). Buckets are encoded as varints relative to the bucket's minimum
//! (about 100 bytes a bucket; see ARCHITECTURE.md for bytes per GPU-day).
//!
//! Writing never blocks the sampler: the hub offers every frame to a bounded
//! channel ([`HistorySink::offer`], `try_send`; a full channel drops the
//! frame and counts it). The writer thread folds frames into the open
//! buckets and commits once per `flush_interval` (one redb transaction,
//! fsynced): the finished buckets, and the open ones as they stand, so a
//! SIGKILL loses at most one flush interval; a clean stop commits
//! everything. Each run of the daemon is recorded (start, last commit), so a
//! restart shows as an exact `DAEMON_DOWN` gap.
//!
//! Recovery: a file redb cannot open, or one with an unknown format version,
//! is moved aside (`history.redb.damaged-<unix ms>`), reported to the caller
//! (the daemon logs it and records a STATE_DAMAGED event) and replaced by a
//! new store. Tiers whose step is no longer configured are folded into the
//! configured tiers whose step is a multiple of theirs, then dropped; a
//! shorter retention trims, a longer one keeps everything.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::Deserialize;

use crate::api::{
    self, Frame, GovernorState, GpuHealth, GpuSample,
    history_columns::{self, ColumnsBuilder, IntStats},
};

/// The store's file in the state directory.
pub const FILE_NAME: &str = "history.redb";
/// The format this build writes and reads. Stored in the `meta` table; a
/// file with another version is moved aside.
pub const FORMAT_VERSION: u64 = 1;
/// Frames the writer may be behind by before frames are dropped (about
/// 100 s at 10 Hz).
pub const QUEUE_FRAMES: usize = 1024;
/// redb's page cache (its default is 1 GiB).
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// The numeric `GpuSample` fields kept, in storage order. Never reorder:
/// the encoding refers to them by position (append only).
pub const FIELDS: &[&str] = &[
    "temperature_c",
    "memory_temperature_c",
    "fan_speed_pct",
    "power_draw_mw",
    "power_limit_mw",
    "enforced_power_limit_mw",
    "graphics_clock_mhz",
    "sm_clock_mhz",
    "memory_clock_mhz",
    "video_clock_mhz",
    "utilization_gpu_pct",
    "utilization_memory_pct",
    "memory_used_bytes",
    "pcie_tx_kbps",
    "pcie_rx_kbps",
];
const NFIELDS: usize = FIELDS.len();

fn field_values(s: &GpuSample) -> [Option<u64>; NFIELDS] {
    let u = |v: Option<u32>| v.map(u64::from);
    [
        u(s.temperature_c),
        u(s.memory_temperature_c),
        u(s.fan_speed_pct),
        u(s.power_draw_mw),
        u(s.power_limit_mw),
        u(s.enforced_power_limit_mw),
        u(s.graphics_clock_mhz),
        u(s.sm_clock_mhz),
        u(s.memory_clock_mhz),
        u(s.video_clock_mhz),
        u(s.utilization_gpu_pct),
        u(s.utilization_memory_pct),
        s.memory_used_bytes,
        u(s.pcie_tx_kbps),
        u(s.pcie_rx_kbps),
    ]
}

// ---------------------------------------------------------------- config

/// One tier: a bucket per `step`, kept for `retain`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Bucket width.
    #[serde(with = "humantime_serde")]
    pub step: Duration,
    /// How long buckets are kept.
    #[serde(with = "humantime_serde")]
    pub retain: Duration,
}

/// `[history]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Keep history in the state directory.
    pub enabled: bool,
    /// How often the writer commits (the most a SIGKILL loses).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Tiers, finest first.
    pub tiers: Vec<TierConfig>,
    /// Most points (summed over GPUs) one GetHistory answer may hold.
    pub max_points_per_request: usize,
    /// Most bytes (estimated, encoded) one GetHistory answer may hold.
    pub max_bytes_per_request: usize,
    /// Disk budget of the store; past it the oldest data of every tier goes.
    pub max_disk_bytes: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            flush_interval: Duration::from_secs(1),
            tiers: vec![
                TierConfig {
                    step: Duration::from_secs(1),
                    retain: Duration::from_secs(24 * 3600),
                },
                TierConfig {
                    step: Duration::from_secs(60),
                    retain: Duration::from_secs(30 * 24 * 3600),
                },
            ],
            max_points_per_request: 200_000,
            max_bytes_per_request: 32 * 1024 * 1024,
            max_disk_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// Checks `[history]`; the error names the key and what is allowed.
pub fn validate(c: &HistoryConfig) -> Result<(), (String, String)> {
    let bad = |k: &str, m: String| Err((format!("history.{k}"), m));
    if !(Duration::from_millis(100)..=Duration::from_secs(10)).contains(&c.flush_interval) {
        return bad(
            "flush_interval",
            format!(
                "{} is out of range; allowed: 100ms to 10s",
                humantime::format_duration(c.flush_interval)
            ),
        );
    }
    if c.tiers.is_empty() || c.tiers.len() > 4 {
        return bad("tiers", format!("{} tiers; allowed: 1 to 4", c.tiers.len()));
    }
    let mut prev: Option<TierConfig> = None;
    for (i, t) in c.tiers.iter().enumerate() {
        let step_ms = t.step.as_millis();
        if !(100..=3_600_000).contains(&step_ms) || step_ms % 100 != 0 {
            return bad(
                &format!("tiers[{i}].step"),
                format!(
                    "{} is not allowed: 100ms to 1h, a multiple of 100ms",
                    humantime::format_duration(t.step)
                ),
            );
        }
        if t.retain < t.step * 10 || t.retain > Duration::from_secs(400 * 24 * 3600) {
            return bad(
                &format!("tiers[{i}].retain"),
                format!(
                    "{} is out of range; allowed: 10 steps to 400 days",
                    humantime::format_duration(t.retain)
                ),
            );
        }
        if let Some(p) = prev
            && (t.step <= p.step || step_ms % p.step.as_millis() != 0)
        {
            return bad(
                &format!("tiers[{i}].step"),
                "each tier's step must be a multiple of (and larger than) the previous tier's"
                    .to_owned(),
            );
        }
        prev = Some(*t);
    }
    if !(1_000..=10_000_000).contains(&c.max_points_per_request) {
        return bad(
            "max_points_per_request",
            format!(
                "{} is out of range; allowed: 1000 to 10000000",
                c.max_points_per_request
            ),
        );
    }
    if !(64 * 1024..=256 * 1024 * 1024).contains(&c.max_bytes_per_request) {
        return bad(
            "max_bytes_per_request",
            format!(
                "{} is out of range; allowed: 65536 to 268435456",
                c.max_bytes_per_request
            ),
        );
    }
    if !(1024 * 1024..=1024 * 1024 * 1024 * 1024).contains(&c.max_disk_bytes) {
        return bad(
            "max_disk_bytes",
            format!(
                "{} is out of range; allowed: 1048576 to 1099511627776",
                c.max_disk_bytes
            ),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- buckets

/// One field's statistics over a bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FieldAcc {
    pub n: u32,
    pub min: u64,
    pub max: u64,
    pub sum: u128,
    pub last: u64,
}

impl FieldAcc {
    fn add(&mut self, v: u64) {
        if self.n == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.n += 1;
        self.sum += u128::from(v);
        self.last = v;
    }

    /// Folds `later` (a bucket after this one) in.
    fn merge(&mut self, later: &FieldAcc) {
        if later.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *later;
            return;
        }
        self.min = self.min.min(later.min);
        self.max = self.max.max(later.max);
        self.n += later.n;
        self.sum += later.sum;
        self.last = later.last;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum as f64 / f64::from(self.n))
    }
}

/// A value and how many readings it held for; the longest wins. The first
/// value is held inline: a stored bucket has one (its winner), so decoding
/// and merging buckets whose state never changed allocates nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Longest {
    first: Option<(u64, u32)>,
    more: Vec<(u64, u32)>,
}

impl Longest {
    fn add(&mut self, v: u64, n: u32) {
        match &mut self.first {
            None => self.first = Some((v, n)),
            Some((x, held)) if *x == v => *held += n,
            Some(_) => match self.more.iter_mut().find(|(x, _)| *x == v) {
                Some(slot) => slot.1 += n,
                None => self.more.push((v, n)),
            },
        }
    }

    fn held(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.first.into_iter().chain(self.more.iter().copied())
    }

    fn winner(&self) -> (u64, u32) {
        self.held()
            .max_by_key(|&(v, n)| (n, std::cmp::Reverse(v)))
            .unwrap_or((0, 0))
    }

    fn clear(&mut self) {
        self.first = None;
        self.more.clear();
    }
}

/// One GPU's bucket of one tier (or one output point).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bucket {
    pub start_ms: u64,
    pub samples: u32,
    pub fields: [FieldAcc; NFIELDS],
    throttle: Longest,
    governor: Longest,
}

impl Bucket {
    fn new(start_ms: u64) -> Self {
        Self {
            start_ms,
            ..Self::default()
        }
    }

    fn add_sample(&mut self, s: &GpuSample) {
        self.samples += 1;
        for (acc, v) in self.fields.iter_mut().zip(field_values(s)) {
            if let Some(v) = v {
                acc.add(v);
            }
        }
        self.throttle.add(s.throttle_reasons_mask.unwrap_or(0), 1);
        self.governor
            .add(u64::try_from(s.governor_state).unwrap_or(0), 1);
    }

    fn merge(&mut self, later: &Bucket) {
        self.samples += later.samples;
        for (a, b) in self.fields.iter_mut().zip(&later.fields) {
            a.merge(b);
        }
        for (v, n) in later.throttle.held() {
            self.throttle.add(v, n);
        }
        for (v, n) in later.governor.held() {
            self.governor.add(v, n);
        }
    }

    /// The throttle mask that held longest.
    pub fn throttle_mask(&self) -> u64 {
        self.throttle.winner().0
    }

    /// The governor state that held longest.
    pub fn governor_state(&self) -> GovernorState {
        GovernorState::try_from(i32::try_from(self.governor.winner().0).unwrap_or(0))
            .unwrap_or(GovernorState::Unspecified)
    }

    /// The compact encoding: varints, each field relative to its minimum.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        put(&mut out, u64::from(self.samples));
        let mut mask = 0u64;
        for (i, f) in self.fields.iter().enumerate() {
            if f.n > 0 {
                mask |= 1 << i;
            }
        }
        put(&mut out, mask);
        for f in self.fields.iter().filter(|f| f.n > 0) {
            put(&mut out, u64::from(f.n));
            put(&mut out, f.min);
            put(&mut out, f.max - f.min);
            put(&mut out, f.last - f.min);
            let offsets = f.sum - u128::from(f.min) * u128::from(f.n);
            put(&mut out, u64::try_from(offsets).unwrap_or(u64::MAX));
        }
        // Longest-held states, with how long, so partial buckets merge.
        for l in [&self.throttle, &self.governor] {
            let (v, n) = l.winner();
            put(&mut out, v);
            put(&mut out, u64::from(n));
        }
        out
    }

    /// Decodes [`Bucket::encode`]'s output; None when it is malformed.
    pub fn decode(start_ms: u64, bytes: &[u8]) -> Option<Self> {
        let mut bucket = Bucket::new(start_ms);
        bucket
            .decode_into(start_ms, bytes, u64::MAX)
            .then_some(bucket)
    }

    /// [`Bucket::decode`] into `self` (reusing its storage: a query decodes
    /// thousands of buckets through one), keeping only the fields whose bit
    /// is set in `wanted` (the others read as absent); false when `bytes`
    /// is malformed.
    fn decode_into(&mut self, start_ms: u64, mut bytes: &[u8], wanted: u64) -> bool {
        self.start_ms = start_ms;
        self.throttle.clear();
        self.governor.clear();
        let b = &mut bytes;
        let mut read = || -> Option<()> {
            self.samples = u32::try_from(get(b)?).ok()?;
            let mask = get(b)?;
            for (i, f) in self.fields.iter_mut().enumerate() {
                if mask & (1 << i) == 0 {
                    *f = FieldAcc::default();
                    continue;
                }
                if wanted & (1 << i) == 0 {
                    *f = FieldAcc::default();
                    for _ in 0..5 {
                        skip(b)?;
                    }
                    continue;
                }
                f.n = u32::try_from(get(b)?).ok()?;
                f.min = get(b)?;
                f.max = f.min.checked_add(get(b)?)?;
                f.last = f.min.checked_add(get(b)?)?;
                f.sum = u128::from(f.min) * u128::from(f.n) + u128::from(get(b)?);
            }
            let (tv, tn) = (get(b)?, get(b)?);
            let (gv, gn) = (get(b)?, get(b)?);
            self.throttle.add(tv, u32::try_from(tn).ok()?);
            self.governor.add(gv, u32::try_from(gn).ok()?);
            Some(())
        };
        read().is_some()
    }
}

fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Steps over one varint.
fn skip(bytes: &mut &[u8]) -> Option<()> {
    let end = bytes.iter().take(10).position(|&b| b & 0x80 == 0)?;
    *bytes = &bytes[end + 1..];
    Some(())
}

fn get(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

// ---------------------------------------------------------------- the store

type TierTable<'a> = TableDefinition<'a, (u32, u64), &'static [u8]>;
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const GPUS: TableDefinition<&str, u32> = TableDefinition::new("gpus");
/// Daemon runs: start (Unix ms) → time of the last commit (Unix ms).
const RUNS: TableDefinition<u64, u64> = TableDefinition::new("runs");
/// Each run's first Watch seq (its hub's start in Unix ms) → the run's
/// start in `RUNS`: how a resume point maps to a time.
const FIRST_SEQS: TableDefinition<u64, u64> = TableDefinition::new("first_seqs");

fn tier_table_name(step_ms: u64) -> String {
    format!("tier_{step_ms}ms")
}

fn step_of_table(name: &str) -> Option<u64> {
    name.strip_prefix("tier_")?.strip_suffix("ms")?.parse().ok()
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history store: {0}")]
    Store(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for HistoryError {
            fn from(e: $t) -> Self {
                Self::Store(e.to_string())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// What opening the store found wrong (already repaired).
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    /// A damaged file that was moved aside, and why.
    pub damaged: Option<String>,
    /// Tiers folded into others or trimmed after a configuration change.
    pub notes: Vec<String>,
}

/// What `[history] max_disk_bytes` has cost the tiers: the retention each
/// keeps now (the configured one until the file first reaches the cap).
#[derive(Debug, Clone)]
pub struct DiskBudget {
    pub max_bytes: u64,
    /// Per tier, how much is kept now, in ms.
    pub keep_ms: Vec<u64>,
    /// The file's size at the last cut (a cut happens again only when the
    /// file has grown since).
    cut_at_len: u64,
    /// The share of what a tier holds that one cut drops.
    cut_fraction: f64,
    /// Cuts so far.
    pub cuts: u32,
}

impl DiskBudget {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            keep_ms: Vec::new(),
            cut_at_len: 0,
            cut_fraction: 0.1,
            cuts: 0,
        }
    }

    fn describe(&self, tiers: &[TierConfig]) -> String {
        let kept: Vec<String> = tiers
            .iter()
            .zip(&self.keep_ms)
            .map(|(t, &k)| {
                format!(
                    "the {} tier keeps {} of its {}",
                    humantime::format_duration(t.step),
                    humantime::format_duration(Duration::from_secs(k / 1000)),
                    humantime::format_duration(t.retain)
                )
            })
            .collect();
        format!(
            "dropped the oldest data to stay within {} bytes; {}",
            self.max_bytes,
            kept.join(", ")
        )
    }
}

/// Buckets per cached stretch of a tier (an hour of the 1 min tier, a
/// minute of the 1 s tier).
pub const CHUNK_BUCKETS: u64 = 60;
/// The most the [`ChunkCache`] holds (part of the RSS history may add;
/// see BENCHMARKS.md).
pub const QUERY_CACHE_BYTES: usize = 8 << 20;
/// A generous size of one cached stretch of every field (measured: 9 to
/// 11 KiB for a loaded GPU's minute at 1 s or hour at 1 min), for deciding
/// whether a question's stretches fit in the cache.
const CHUNK_BYTES_ESTIMATE: u64 = 12 << 10;

/// One GPU's finished stretch of a tier, every field, in the answer's
/// column encoding (deltas counted from zero, so it can be appended after
/// anything), and its buckets' start times (for the gap search).
#[derive(Debug)]
struct Chunk {
    columns: ColumnsBuilder,
    starts: Vec<u64>,
    bytes: usize,
}

/// What queries answered from disk, kept for the next ones: finished
/// stretches of [`CHUNK_BUCKETS`] buckets ([`Chunk`]), keyed by (tier, GPU
/// id, stretch start), at most [`QUERY_CACHE_BYTES`], the least recently
/// used dropped first.
///
/// Why it holds: every change to a tier goes through [`Store::commit`] or
/// [`Store::prune`], which drop the stretches they touch after their
/// transaction commits and bump `generation`; a query keeps a stretch it
/// built only if no commit happened since it began reading, so a
/// stretch read before a commit cannot outlive it.
#[derive(Debug, Default)]
struct ChunkCache {
    map: HashMap<(usize, u32, u64), (Arc<Chunk>, u64)>,
    bytes: usize,
    clock: u64,
    generation: u64,
}

impl ChunkCache {
    fn remove(&mut self, key: &(usize, u32, u64)) {
        if let Some((c, _)) = self.map.remove(key) {
            self.bytes -= c.bytes;
        }
    }

    fn insert(&mut self, key: (usize, u32, u64), chunk: Arc<Chunk>) {
        self.remove(&key);
        self.clock += 1;
        self.bytes += chunk.bytes;
        self.map.insert(key, (chunk, self.clock));
        while self.bytes > QUERY_CACHE_BYTES {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.remove(&oldest);
        }
    }
}

/// The on-disk store. Cheap to clone; reads run concurrently with the
/// writer (redb's MVCC).
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
    tiers: Vec<TierConfig>,
    gpu_ids: Arc<Mutex<HashMap<String, u32>>>,
    run_start_ms: u64,
    budget: Arc<Mutex<DiskBudget>>,
    cache: Arc<Mutex<ChunkCache>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Store {
    /// Opens (or creates) the store in `dir`; a damaged file is moved aside
    /// and replaced, and said so in the report.
    pub fn open(dir: &Path, config: &HistoryConfig) -> Result<(Self, OpenReport), HistoryError> {
        let path = dir.join(FILE_NAME);
        let mut report = OpenReport::default();
        let db = match Self::open_checked(&path) {
            Ok(db) => db,
            Err(why) => {
                let aside = dir.join(format!(
                    "{FILE_NAME}.damaged-{}",
                    unix_ms(SystemTime::now())
                ));
                std::fs::rename(&path, &aside).map_err(|e| {
                    HistoryError::Store(format!(
                        "cannot move the damaged {} aside: {e}",
                        path.display()
                    ))
                })?;
                report.damaged = Some(format!(
                    "history store {} is damaged ({why}); moved aside to {} and started a new one",
                    path.display(),
                    aside.display()
                ));
                Self::open_checked(&path).map_err(HistoryError::Store)?
            }
        };
        let run_start_ms = unix_ms(SystemTime::now());
        let mut store = Self {
            db: Arc::new(db),
            path,
            tiers: config.tiers.clone(),
            gpu_ids: Arc::default(),
            run_start_ms,
            budget: Arc::new(Mutex::new(DiskBudget::new(config.max_disk_bytes))),
            cache: Arc::default(),
        };
        store.reconcile_tiers(&mut report)?;
        store.load_gpu_ids()?;
        let txn = store.db.begin_write()?;
        {
            let mut runs = txn.open_table(RUNS)?;
            runs.insert(run_start_ms, run_start_ms)?;
        }
        txn.commit()?;
        store.prune(run_start_ms)?;
        store.enforce_budget_at_open(run_start_ms, &mut report)?;
        Ok((store, report))
    }

    /// Over the cap at start (the file was filled under a larger cap, or
    /// by a run that could not finish pruning): cuts every tier's oldest
    /// data and compacts the file (redb never gives freed pages back to
    /// the file system otherwise) until it fits. Nothing else holds the
    /// database yet, so compaction can run.
    fn enforce_budget_at_open(
        &mut self,
        now_ms: u64,
        report: &mut OpenReport,
    ) -> Result<(), HistoryError> {
        let before = self.disk_bytes();
        let max_bytes = self.budget().max_bytes;
        if before <= max_bytes {
            return Ok(());
        }
        // Compaction first (it drops nothing: redb leaves freed and
        // half-empty pages in the file), then, while still over, a cut of
        // what should bring the file to 85 % of the cap (at least a tenth
        // of what each tier holds) and another compaction.
        for pass in 0..10 {
            let db = Arc::get_mut(&mut self.db).ok_or_else(|| {
                HistoryError::Store("the history store is shared while it is opened".to_owned())
            })?;
            db.compact()
                .map_err(|e| HistoryError::Store(format!("cannot compact: {e}")))?;
            let len = self.disk_bytes();
            if len <= max_bytes || pass == 9 {
                break;
            }
            {
                let mut b = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
                b.cut_at_len = 0;
                b.cut_fraction = (1.0 - 0.85 * max_bytes as f64 / len as f64).clamp(0.1, 0.95);
            }
            self.prune(now_ms)?;
        }
        let after = self.disk_bytes();
        let mut budget = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        budget.cut_at_len = after;
        budget.cut_fraction = 0.1;
        let what = if budget.cuts == 0 {
            "compacted it, nothing dropped".to_owned()
        } else {
            format!("compacted it and {}", budget.describe(&self.tiers))
        };
        report.notes.push(format!(
            "history store {} was {before} bytes, over [history] max_disk_bytes = {max_bytes}: {what}; it is {after} bytes now",
            self.path.display(),
        ));
        Ok(())
    }

    fn open_checked(path: &Path) -> Result<Database, String> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| e.to_string())?;
        let check = || -> Result<(), HistoryError> {
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                let version = meta.get("format_version")?.map(|v| v.value());
                match version {
                    None => {
                        meta.insert("format_version", FORMAT_VERSION)?;
                        meta.insert("created_unix_ms", unix_ms(SystemTime::now()))?;
                    }
                    Some(FORMAT_VERSION) => {}
                    Some(v) => {
                        return Err(HistoryError::Store(format!(
                            "format version {v}; this gpuwatch reads version {FORMAT_VERSION}"
                        )));
                    }
                }
                txn.open_table(GPUS)?;
                txn.open_table(RUNS)?;
            }
            txn.commit()?;
            Ok(())
        };
        check().map_err(|e| e.to_string())?;
        Ok(db)
    }

    /// Folds tiers no longer configured into the configured ones whose step
    /// is a multiple of theirs (keeping what the new tiers do not hold
    /// yet), then drops them.
    fn reconcile_tiers(&mut self, report: &mut OpenReport) -> Result<(), HistoryError> {
        let steps: Vec<u64> = self.tiers.iter().map(|t| ms(t.step)).collect();
        let read = self.db.begin_read()?;
        let orphans: Vec<u64> = read
            .list_tables()?
            .filter_map(|t| step_of_table(t.name()))
            .filter(|s| !steps.contains(s))
            .collect();
        drop(read);
        for old in orphans {
            let old_name = tier_table_name(old);
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)
                .map_err(|e| HistoryError::Store(e.to_string()))?;
            let mut folded = Vec::new();
            {
                let old_table = txn.open_table(TierTable::new(&old_name))?;
                for &new in steps.iter().filter(|&&s| s >= old && s % old == 0) {
                    let new_name = tier_table_name(new);
                    let mut new_table = txn.open_table(TierTable::new(&new_name))?;
                    let mut merged: std::collections::BTreeMap<(u32, u64), Bucket> =
                        Default::default();
                    for item in old_table.iter()? {
                        let (k, v) = item?;
                        let (gpu, start) = k.value();
                        let Some(b) = Bucket::decode(start, v.value()) else {
                            continue;
                        };
                        let key = (gpu, start - start % new);
                        merged
                            .entry(key)
                            .or_insert_with(|| Bucket::new(key.1))
                            .merge(&b);
                    }
                    let mut added = 0usize;
                    for (key, b) in merged {
                        if new_table.get(key)?.is_none() {
                            new_table.insert(key, b.encode().as_slice())?;
                            added += 1;
                        }
                    }
                    folded.push(format!("{added} buckets into the {new} ms tier"));
                }
            }
            txn.delete_table(TierTable::new(&old_name))?;
            txn.commit()?;
            report.notes.push(format!(
                "history tier {old} ms is no longer configured: folded {}; dropped it",
                if folded.is_empty() {
                    "nothing (no configured step is a multiple of it)".to_owned()
                } else {
                    folded.join(", ")
                }
            ));
        }
        Ok(())
    }

    fn load_gpu_ids(&self) -> Result<(), HistoryError> {
        let read = self.db.begin_read()?;
        let table = read.open_table(GPUS)?;
        let mut ids = self.gpu_ids.lock().unwrap_or_else(PoisonError::into_inner);
        for item in table.iter()? {
            let (k, v) = item?;
            ids.insert(k.value().to_owned(), v.value());
        }
        Ok(())
    }

    /// The tiers on disk, finest first.
    pub fn tiers(&self) -> &[TierConfig] {
        &self.tiers
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the disk budget has cut so far.
    pub fn budget(&self) -> DiskBudget {
        self.budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The file's size in bytes.
    pub fn disk_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    fn gpu_id(&self, uuid: &str) -> Option<u32> {
        self.gpu_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uuid)
            .copied()
    }

    /// Commits buckets (replacing any with the same key) and the run's
    /// last-alive time, fsynced.
    fn commit(
        &self,
        buckets: &[(String, usize, Bucket)],
        alive_ms: u64,
    ) -> Result<(), HistoryError> {
        let mut touched = Vec::with_capacity(buckets.len());
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| HistoryError::Store(e.to_string()))?;
        {
            let mut gpus = txn.open_table(GPUS)?;
            let mut ids = self.gpu_ids.lock().unwrap_or_else(PoisonError::into_inner);
            let names: Vec<String> = self
                .tiers
                .iter()
                .map(|t| tier_table_name(ms(t.step)))
                .collect();
            let mut tables = Vec::new();
            for name in &names {
                tables.push(txn.open_table(TierTable::new(name))?);
            }
            for (uuid, tier, bucket) in buckets {
                let id = match ids.get(uuid) {
                    Some(&id) => id,
                    None => {
                        let id = u32::try_from(ids.len()).unwrap_or(u32::MAX);
                        gpus.insert(uuid.as_str(), id)?;
                        ids.insert(uuid.clone(), id);
                        id
                    }
                };
                if let Some(table) = tables.get_mut(*tier) {
                    table.insert((id, bucket.start_ms), bucket.encode().as_slice())?;
                    touched.push((*tier, id, bucket.start_ms));
                }
            }
            let mut runs = txn.open_table(RUNS)?;
            runs.insert(self.run_start_ms, alive_ms)?;
        }
        txn.commit()?;
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.generation += 1;
        for (tier, id, start) in touched {
            let span = ms(self.tiers[tier].step).max(1) * CHUNK_BUCKETS;
            cache.remove(&(tier, id, start - start % span));
        }
        Ok(())
    }

    /// Fills the query cache (see [`ChunkCache`]) with what the usual
    /// questions ask for, so the first of them after a start is as fast as
    /// the next: the last day of every tier but the finest, then the last
    /// hour of the finest; stops before the cache would start dropping
    /// what it holds. Reads the disk; the daemon runs it on its own thread.
    pub fn warm_cache(&self, now_ms: u64) -> Result<(), HistoryError> {
        let gpus: Vec<(String, u32)> = self
            .gpu_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(u, &id)| (u.clone(), id))
            .collect();
        let mut order: Vec<(usize, u64)> = (1..self.tiers.len()).map(|t| (t, 86_400_000)).collect();
        order.push((
            0,
            if self.tiers.len() > 1 {
                3_600_000
            } else {
                86_400_000
            },
        ));
        for (tier, window) in order {
            let step = ms(self.tiers[tier].step).max(1);
            let span = step * CHUNK_BUCKETS;
            let since = now_ms.saturating_sub(window);
            let mut from = since.div_ceil(span) * span;
            while from + span + step <= now_ms {
                for (uuid, id) in &gpus {
                    let full = {
                        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
                        cache.bytes > QUERY_CACHE_BYTES / 10 * 9
                    };
                    if full {
                        return Ok(());
                    }
                    self.chunk(tier, *id, uuid, from, from + span)?;
                }
                from += span;
            }
        }
        Ok(())
    }

    /// Bytes the query cache holds now.
    pub fn cache_bytes(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes
    }

    /// The cached stretch of tier `tier` of GPU `id` (`uuid`) starting at
    /// `from` (see [`ChunkCache`]), read from disk on a miss.
    fn chunk(
        &self,
        tier: usize,
        id: u32,
        uuid: &str,
        from: u64,
        to: u64,
    ) -> Result<Arc<Chunk>, HistoryError> {
        let key = (tier, id, from);
        let generation = {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            cache.clock += 1;
            let clock = cache.clock;
            if let Some((chunk, used)) = cache.map.get_mut(&key) {
                *used = clock;
                return Ok(chunk.clone());
            }
            cache.generation
        };
        let step = self.tiers.get(tier).map_or(1, |t| ms(t.step));
        let all: Vec<usize> = (0..NFIELDS).collect();
        let tier_step = u32::try_from(step).unwrap_or(u32::MAX);
        let mut series = Series::Columns(ColumnsBuilder::new(NFIELDS, CHUNK_BUCKETS as usize));
        let mut starts = Vec::with_capacity(CHUNK_BUCKETS as usize);
        self.visit_buckets(tier, uuid, from, to, u64::MAX, |b| {
            starts.push(b.start_ms);
            Folder::write(&all, tier_step, &mut series, b);
        })?;
        let Series::Columns(mut columns) = series else {
            unreachable!("built as columns")
        };
        columns.shrink_to_fit();
        starts.shrink_to_fit();
        let bytes =
            columns.heap_bytes() + starts.capacity() * 8 + std::mem::size_of::<Chunk>() + 64;
        let chunk = Arc::new(Chunk {
            columns,
            starts,
            bytes,
        });
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.generation == generation {
            cache.insert(key, chunk.clone());
        }
        Ok(chunk)
    }

    /// Drops buckets past each tier's retention (as `budget` has cut it).
    /// When the file has grown past `budget.max_bytes` (and since the last
    /// cut), every tier keeps 10 % less than the span it holds, from now
    /// on: redb reuses the freed pages, so the file stops growing and the
    /// newest data stays. Returns whether it cut.
    fn prune(&self, now_ms: u64) -> Result<bool, HistoryError> {
        let mut budget = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        let len = self.disk_bytes();
        let over = len > budget.max_bytes && len > budget.cut_at_len;
        if budget.keep_ms.len() != self.tiers.len() {
            budget.keep_ms = self.tiers.iter().map(|t| ms(t.retain)).collect();
        }
        let ids: Vec<u32> = self
            .gpu_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .copied()
            .collect();
        let mut cutoffs = Vec::with_capacity(self.tiers.len());
        let txn = self.db.begin_write()?;
        {
            for (i, t) in self.tiers.iter().enumerate() {
                let name = tier_table_name(ms(t.step));
                let mut table = txn.open_table(TierTable::new(&name))?;
                let mut cutoff = now_ms.saturating_sub(budget.keep_ms[i]);
                if over {
                    // The span this tier holds (its oldest and newest
                    // bucket over all GPUs): its oldest share goes.
                    let (mut oldest, mut newest) = (u64::MAX, 0);
                    for &id in &ids {
                        let mut range = table.range((id, 0)..(id, u64::MAX))?;
                        if let Some(item) = range.next() {
                            oldest = oldest.min(item?.0.value().1);
                        }
                        if let Some(item) = range.next_back() {
                            newest = newest.max(item?.0.value().1);
                        }
                    }
                    if newest >= oldest {
                        let drop = ((newest - oldest) as f64 * budget.cut_fraction) as u64;
                        cutoff = cutoff.max(oldest + drop);
                        let keep = now_ms.saturating_sub(cutoff).max(ms(t.step) * 10);
                        budget.keep_ms[i] = budget.keep_ms[i].min(keep);
                    }
                }
                for &id in &ids {
                    table.retain_in((id, 0)..(id, cutoff), |_, _| false)?;
                }
                cutoffs.push(cutoff);
            }
            // Runs older than the longest retention say nothing any more.
            let longest = self.tiers.iter().map(|t| ms(t.retain)).max().unwrap_or(0);
            let mut runs = txn.open_table(RUNS)?;
            runs.retain_in(0..now_ms.saturating_sub(longest), |_, _| false)?;
            let mut seqs = txn.open_table(FIRST_SEQS)?;
            seqs.retain_in(0..now_ms.saturating_sub(longest), |_, _| false)?;
        }
        txn.commit()?;
        {
            // Stretches reaching below a cutoff lost buckets.
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            cache.generation += 1;
            let gone: Vec<(usize, u32, u64)> = cache
                .map
                .keys()
                .filter(|(tier, _, start)| cutoffs.get(*tier).is_some_and(|&c| *start < c))
                .copied()
                .collect();
            for key in gone {
                cache.remove(&key);
            }
        }
        if over {
            budget.cut_at_len = len;
            budget.cuts += 1;
            tracing::warn!(
                bytes = len,
                max_disk_bytes = budget.max_bytes,
                "the history store reached [history] max_disk_bytes: {}",
                budget.describe(&self.tiers)
            );
        }
        Ok(over)
    }

    /// The start (Unix ms, which is also its first seq) of the run that
    /// published tick `seq`: this run's `current_first_seq`, or the latest
    /// recorded run that started at or before it.
    pub fn run_start_for_seq(&self, seq: u64, current_first_seq: u64) -> Option<u64> {
        if seq >= current_first_seq {
            return Some(current_first_seq);
        }
        let read = self.db.begin_read().ok()?;
        let table = read.open_table(FIRST_SEQS).ok()?;
        let mut found = None;
        for item in table.range(0..=seq).ok()? {
            let (k, _) = item.ok()?;
            found = Some(k.value());
        }
        found
    }

    /// Records this run's first Watch seq (see [`Store::run_start_for_seq`]).
    pub fn record_first_seq(&self, first_seq: u64) -> Result<(), HistoryError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(FIRST_SEQS)?;
            t.insert(first_seq, self.run_start_ms)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The daemon's runs (start, last commit) overlapping `[from, to)`.
    fn runs(&self, from_ms: u64, to_ms: u64) -> Result<Vec<(u64, u64)>, HistoryError> {
        let read = self.db.begin_read()?;
        let table = read.open_table(RUNS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let (start, alive) = (k.value(), v.value());
            if start < to_ms && alive.max(start) >= from_ms.saturating_sub(3_600_000) {
                out.push((start, alive));
            }
        }
        Ok(out)
    }

    /// One GPU's buckets of tier `tier` in `[from, to)`, oldest first.
    fn buckets(
        &self,
        tier: usize,
        uuid: &str,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<Vec<Bucket>, HistoryError> {
        let mut out = Vec::new();
        self.visit_buckets(tier, uuid, from_ms, to_ms, u64::MAX, |b| {
            out.push(b.clone());
        })?;
        Ok(out)
    }

    /// Hands one GPU's buckets of tier `tier` in `[from, to)` to `visit`,
    /// oldest first, in one pass over the key range and decoded through
    /// one reused bucket (nothing is collected). A malformed bucket is
    /// skipped.
    fn visit_buckets(
        &self,
        tier: usize,
        uuid: &str,
        from_ms: u64,
        to_ms: u64,
        wanted: u64,
        mut visit: impl FnMut(&Bucket),
    ) -> Result<(), HistoryError> {
        let Some(id) = self.gpu_id(uuid) else {
            return Ok(());
        };
        let Some(t) = self.tiers.get(tier) else {
            return Ok(());
        };
        let read = self.db.begin_read()?;
        let name = tier_table_name(ms(t.step));
        let table = match read.open_table(TierTable::new(&name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut bucket = Bucket::default();
        for item in table.range((id, from_ms)..(id, to_ms))? {
            let (k, v) = item?;
            if bucket.decode_into(k.value().1, v.value(), wanted) {
                visit(&bucket);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- the writer

enum Msg {
    Frame(Arc<Frame>),
    Flush(mpsc::Sender<()>),
}

/// The sampler's side: offers frames without ever waiting.
#[derive(Debug)]
pub struct HistorySink {
    tx: SyncSender<Msg>,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Frame(fr) => write!(f, "Frame({})", fr.seq),
            Msg::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl HistorySink {
    /// Hands a frame to the writer; a full queue drops it (counted).
    pub fn offer(&self, frame: &Arc<Frame>) {
        match self.tx.try_send(Msg::Frame(frame.clone())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Frames not recorded because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread's handle: flush (and stop) it.
#[derive(Debug)]
pub struct HistoryWriter {
    sink: Arc<HistorySink>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl HistoryWriter {
    /// Starts the writer thread for `store`.
    pub fn start(store: Store, config: &HistoryConfig) -> std::io::Result<Self> {
        let warm = store.clone();
        std::thread::Builder::new()
            .name("gpuwatch-history-warm".into())
            .spawn(move || {
                let started = Instant::now();
                match warm.warm_cache(unix_ms(SystemTime::now())) {
                    Ok(()) => tracing::debug!(
                        bytes = warm.cache_bytes(),
                        ms = started.elapsed().as_millis() as u64,
                        "history query cache warmed"
                    ),
                    Err(e) => tracing::warn!(error = %e, "history: cannot warm the query cache"),
                }
            })?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_FRAMES);
        let flush_every = config.flush_interval;
        let thread = std::thread::Builder::new()
            .name("gpuwatch-history".into())
            .spawn(move || Writer::new(store, flush_every).run(rx))?;
        Ok(Self {
            sink: Arc::new(HistorySink {
                tx,
                dropped: AtomicU64::new(0),
            }),
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn sink(&self) -> Arc<HistorySink> {
        self.sink.clone()
    }

    /// Commits everything offered so far; waits (blocking) up to `within`.
    pub fn flush_blocking(&self, within: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        if self.sink.tx.send(Msg::Flush(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(within).is_ok()
    }

    /// Commits everything and ends the thread (a clean stop).
    pub fn stop(&self, within: Duration) {
        if !self.flush_blocking(within) {
            tracing::error!("the history writer did not commit within {within:?}");
        }
        // The thread ends when every sender is gone; the hub holds one, so
        // it is left to end with the process.
        drop(
            self.thread
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

struct Writer {
    store: Store,
    flush_every: Duration,
    /// Open bucket per (GPU uuid, tier).
    open: HashMap<(String, usize), Bucket>,
    /// Finished buckets not committed yet.
    done: Vec<(String, usize, Bucket)>,
    last_frame_ms: u64,
    last_prune: Instant,
    failing: bool,
}

impl Writer {
    fn new(store: Store, flush_every: Duration) -> Self {
        Self {
            store,
            flush_every,
            open: HashMap::new(),
            done: Vec::new(),
            last_frame_ms: 0,
            last_prune: Instant::now(),
            failing: false,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        let mut next_flush = Instant::now() + self.flush_every;
        loop {
            let wait = next_flush.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Msg::Frame(frame)) => self.fold(&frame),
                Ok(Msg::Flush(ack)) => {
                    // Everything offered before the flush is queued ahead.
                    while let Ok(msg) = rx.try_recv() {
                        match msg {
                            Msg::Frame(frame) => self.fold(&frame),
                            Msg::Flush(other) => {
                                let _ = other.send(());
                            }
                        }
                    }
                    self.commit();
                    let _ = ack.send(());
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.commit();
                    return;
                }
            }
            if Instant::now() >= next_flush {
                self.commit();
                next_flush = Instant::now() + self.flush_every;
                if self.last_prune.elapsed() >= Duration::from_secs(60) {
                    self.last_prune = Instant::now();
                    if let Err(e) = self.store.prune(self.last_frame_ms) {
                        tracing::warn!(error = %e, "history retention pass failed");
                    }
                }
            }
        }
    }

    /// Folds one frame into the open buckets of every tier.
    fn fold(&mut self, frame: &Frame) {
        let Some(time) = frame.time.and_then(|t| SystemTime::try_from(t).ok()) else {
            return;
        };
        let t_ms = unix_ms(time);
        self.last_frame_ms = self.last_frame_ms.max(t_ms);
        for s in &frame.samples {
            if s.uuid.is_empty() || !readable(s) {
                continue;
            }
            for (tier, cfg) in self.store.tiers.iter().enumerate() {
                let step = ms(cfg.step).max(1);
                let start = t_ms - t_ms % step;
                let key = (s.uuid.clone(), tier);
                let store = &self.store;
                let bucket = self.open.entry(key.clone()).or_insert_with(|| {
                    // The first bucket of a run may continue one an earlier
                    // run left open (a restart within one step): go on
                    // from what it committed instead of replacing it.
                    store
                        .buckets(tier, &key.0, start, start + 1)
                        .ok()
                        .and_then(|mut v| v.pop())
                        .unwrap_or_else(|| Bucket::new(start))
                });
                if bucket.start_ms != start {
                    let finished = std::mem::replace(bucket, Bucket::new(start));
                    if finished.samples > 0 {
                        self.done.push((key.0.clone(), tier, finished));
                    }
                }
                bucket.add_sample(s);
            }
        }
    }

    fn commit(&mut self) {
        if self.done.is_empty() && self.open.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut self.done);
        let open_count = self.open.len();
        batch.extend(
            self.open
                .iter()
                .filter(|(_, b)| b.samples > 0)
                .map(|((uuid, tier), b)| (uuid.clone(), *tier, b.clone())),
        );
        match self.store.commit(&batch, self.last_frame_ms) {
            Ok(()) => {
                if self.failing {
                    tracing::info!("the history store is written again");
                    self.failing = false;
                }
            }
            Err(e) => {
                if !self.failing {
                    tracing::error!(error = %e, "cannot commit history; retrying every flush");
                    self.failing = true;
                }
                // Keep the finished buckets for the next try (bounded).
                let finished = batch.len() - open_count.min(batch.len());
                batch.truncate(finished.min(100_000));
                self.done = batch;
            }
        }
    }
}

/// A sample whose telemetry is a fresh reading (not lost, not stale).
fn readable(s: &GpuSample) -> bool {
    matches!(
        GpuHealth::try_from(s.health),
        Ok(GpuHealth::Ok | GpuHealth::Error)
    ) && s.temperature_c.is_some()
}

// ---------------------------------------------------------------- queries

/// One GetHistory question, already validated.
#[derive(Debug, Clone)]
pub struct Query {
    /// (index, uuid) per GPU.
    pub gpus: Vec<(u32, String)>,
    /// Indices into [`FIELDS`].
    pub fields: Vec<usize>,
    pub since_ms: u64,
    pub until_ms: u64,
    /// Requested step (0: pick one).
    pub step_ms: u64,
    /// Answer in columns (`GpuHistory.columns`) instead of points.
    pub columnar: bool,
}

/// Limits on one answer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_points: usize,
    pub max_bytes: usize,
}

/// Why a query was refused.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Store(#[from] HistoryError),
}

/// What answers a query: the store (if any), and the hub's raw ring.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    pub store: Option<&'a Store>,
    /// Raw frames, oldest first.
    pub raw: &'a [Arc<Frame>],
    pub sampler_interval_ms: u64,
    /// The daemon's start (for gaps in the raw ring).
    pub started_ms: u64,
    pub now_ms: u64,
}

impl<'a> Source<'a> {
    /// Test and benchmark only: a source that answers from `store` alone,
    /// as a daemon sampling every 100 ms that started at `now_ms` would
    /// (no raw ring yet). Not used by the daemon.
    #[doc(hidden)]
    pub fn store_only(store: &'a Store, now_ms: u64) -> Self {
        Source {
            store: Some(store),
            raw: &[],
            sampler_interval_ms: 100,
            started_ms: now_ms,
            now_ms,
        }
    }
}

impl Limits {
    /// Test and benchmark only: limits loose enough that no benchmarked
    /// or tested query is refused (a million points, 256 MiB).
    #[doc(hidden)]
    pub const LOOSE: Limits = Limits {
        max_points: 1_000_000,
        max_bytes: 256 << 20,
    };
}

/// Points the automatic step aims for, per GPU.
pub const AUTO_POINTS: u64 = 1000;
/// Bytes one point costs per field in the answer (estimate: 4 doubles
/// and tags), and per point.
const BYTES_PER_FIELD: usize = 40;
const BYTES_PER_POINT: usize = 24;
/// The same in columns (five varints per field; times, samples and states
/// per point), generously: memory sizes and sums take 5-8 bytes.
const COLUMN_BYTES_PER_FIELD: usize = 20;
const COLUMN_BYTES_PER_POINT: usize = 12;

/// Which tier serves `step_ms` over `[since, until)`: the coarsest with a
/// step at most `step_ms`; None = the raw ring.
fn pick_tier(tiers: &[TierConfig], step_ms: u64) -> Option<usize> {
    tiers
        .iter()
        .enumerate()
        .filter(|(_, t)| ms(t.step) <= step_ms)
        .map(|(i, _)| i)
        .next_back()
}

/// Answers a query.
pub fn query(
    src: &Source<'_>,
    q: &Query,
    limits: Limits,
) -> Result<api::GetHistoryResponse, QueryError> {
    Ok(query_wire(src, q, limits)?.into_response())
}

/// A `GetHistory` answer whose columnar series are still in their wire
/// encoding (`gpuwatch_api::history_columns`): what the gRPC route sends
/// as it is ([`WireAnswer::encode`]), with no message built for the
/// columns and no pass of prost's over them.
#[derive(Debug)]
pub struct WireAnswer {
    /// The answer, every `GpuHistory.columns` None.
    pub response: api::GetHistoryResponse,
    /// Per entry of `response.gpus`, its `HistoryColumns` in their wire
    /// form (None for an answer in points).
    columns: Vec<Option<ColumnsBuilder>>,
}

impl WireAnswer {
    /// The answer as a message, columns decoded.
    pub fn into_response(self) -> api::GetHistoryResponse {
        let mut response = self.response;
        for (g, c) in response.gpus.iter_mut().zip(self.columns) {
            if let Some(c) = c {
                g.columns = Some(c.finish());
            }
        }
        response
    }

    /// The encoded `GetHistoryResponse`: exactly prost's encoding of
    /// [`WireAnswer::into_response`]'s message (fields in order; tested).
    pub fn encode(self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// [`encode`](Self::encode), appended to `out` (e.g. after a gRPC
    /// message prefix).
    pub fn encode_into(self, out: &mut Vec<u8>) {
        let mut head = self.response;
        let gpus = std::mem::take(&mut head.gpus);
        // Fields 7 to 9 follow the GPUs (6).
        let tail = api::GetHistoryResponse {
            events: std::mem::take(&mut head.events),
            tiers: std::mem::take(&mut head.tiers),
            columnar: std::mem::take(&mut head.columnar),
            ..api::GetHistoryResponse::default()
        };
        // Sized exactly: one allocation, written once.
        let gpus_len: usize = gpus
            .iter()
            .zip(&self.columns)
            .map(|(g, c)| match c {
                Some(c) => history_columns::gpu_history_len(6, g, c),
                None => prost::encoding::message::encoded_len(6, g),
            })
            .sum();
        out.reserve_exact(head.encoded_len() + gpus_len + tail.encoded_len());
        head.encode_raw(out);
        for (g, c) in gpus.iter().zip(&self.columns) {
            match c {
                Some(c) => history_columns::encode_gpu_history(6, g, c, out),
                None => prost::encoding::message::encode(6, g, out),
            }
        }
        tail.encode_raw(out);
    }
}

/// [`query`], keeping columns in their wire encoding.
pub fn query_wire(src: &Source<'_>, q: &Query, limits: Limits) -> Result<WireAnswer, QueryError> {
    if q.until_ms <= q.since_ms {
        return Err(QueryError::Invalid("until must be after since".to_owned()));
    }
    let window = q.until_ms - q.since_ms;
    let tiers: &[TierConfig] = src.store.map_or(&[], |s| s.tiers());
    let raw_step = src.sampler_interval_ms.max(1);
    let mut step = if q.step_ms == 0 {
        window.div_ceil(AUTO_POINTS).max(raw_step)
    } else {
        q.step_ms
    };
    // The raw ring serves steps below the finest tier when it reaches back
    // to `since` (it holds about a minute), and everything when there is
    // no store; otherwise the finest tier serves them at its own step.
    let ring_from_ms = src
        .raw
        .first()
        .and_then(|f| f.time)
        .and_then(|t| SystemTime::try_from(t).ok())
        .map_or(u64::MAX, unix_ms);
    let ring_covers = ring_from_ms <= q.since_ms.saturating_add(raw_step);
    let tier = pick_tier(tiers, step).or_else(|| (!ring_covers && !tiers.is_empty()).then_some(0));
    let tier_step = tier.map_or(raw_step, |i| ms(tiers[i].step));
    if step < tier_step {
        step = tier_step;
    }
    step = step.div_ceil(tier_step) * tier_step;
    let first = q.since_ms - q.since_ms % step;
    let per_gpu = usize::try_from((q.until_ms - first).div_ceil(step)).unwrap_or(usize::MAX);
    let points = per_gpu.saturating_mul(q.gpus.len());
    if points > limits.max_points {
        return Err(QueryError::TooLarge(format!(
            "the answer would hold {points} points ({} GPU(s) x {per_gpu}); the limit is [history] max_points_per_request = {}: ask for a coarser step, fewer GPUs or a shorter window",
            q.gpus.len(),
            limits.max_points
        )));
    }
    let (per_field, per_point) = if q.columnar {
        (COLUMN_BYTES_PER_FIELD, COLUMN_BYTES_PER_POINT)
    } else {
        (BYTES_PER_FIELD, BYTES_PER_POINT)
    };
    let bytes = points.saturating_mul(q.fields.len() * per_field + per_point);
    if bytes > limits.max_bytes {
        return Err(QueryError::TooLarge(format!(
            "the answer would take about {bytes} bytes; the limit is [history] max_bytes_per_request = {}: ask for fewer fields, a coarser step, fewer GPUs or a shorter window",
            limits.max_bytes
        )));
    }
    let runs = match src.store {
        Some(store) => store.runs(q.since_ms, q.until_ms)?,
        None => vec![(src.started_ms, src.now_ms)],
    };
    let retained_from = match tier {
        Some(i) => src.now_ms.saturating_sub(ms(tiers[i].retain)),
        None => src
            .raw
            .first()
            .and_then(|f| f.time)
            .and_then(|t| SystemTime::try_from(t).ok())
            .map_or(src.now_ms, unix_ms),
    };
    let mut gpus = Vec::with_capacity(q.gpus.len());
    let mut encoded = Vec::with_capacity(q.gpus.len());
    for (index, uuid) in &q.gpus {
        let mut folder = Folder::new(q, step, tier_step, per_gpu);
        match (tier, src.store) {
            (Some(i), Some(store)) => {
                let wanted = q.fields.iter().fold(0u64, |m, &i| m | 1 << i);
                // The cache serves a question whose stretches all fit in
                // it; a larger one (a week at 1 min of 8 GPUs) would only
                // push out what the next questions need, and reads disk.
                let stretches =
                    (q.until_ms - first).div_ceil(tier_step * CHUNK_BUCKETS) * q.gpus.len() as u64;
                let fits =
                    stretches.saturating_mul(CHUNK_BYTES_ESTIMATE) <= QUERY_CACHE_BYTES as u64;
                if q.columnar && step == tier_step && fits {
                    fill_from_chunks(store, i, uuid, first, q.until_ms, src.now_ms, &mut folder)?;
                } else {
                    store.visit_buckets(i, uuid, first, q.until_ms, wanted, |b| folder.add(b))?;
                }
            }
            _ => {
                for b in raw_buckets(src.raw, uuid, first, q.until_ms) {
                    folder.add(&b);
                }
            }
        }
        let (series, starts) = folder.finish();
        let gaps = find_gaps(
            &starts,
            &GapContext {
                since_ms: q.since_ms,
                until_ms: q.until_ms.min(src.now_ms),
                tier_step,
                threshold: 2 * tier_step.max(raw_step),
                runs: &runs,
                retained_from,
                // Open buckets reach the disk once per flush.
                trailing_slack: tier_step + 2_000 + 2 * raw_step,
            },
        );
        let (points, columns) = match series {
            Series::Rows(points) => (points, None),
            Series::Columns(c) => (Vec::new(), Some(c)),
        };
        gpus.push(api::GpuHistory {
            index: *index,
            uuid: uuid.clone(),
            points,
            gaps,
            columns: None,
        });
        encoded.push(columns);
    }
    let mut tiers_out = vec![api::HistoryTier {
        step_ms: u32::try_from(raw_step).unwrap_or(u32::MAX),
        retain_ms: raw_step * src.raw.len() as u64,
        raw: true,
    }];
    tiers_out.extend(tiers.iter().map(|t| api::HistoryTier {
        step_ms: u32::try_from(ms(t.step)).unwrap_or(u32::MAX),
        retain_ms: ms(t.retain),
        raw: false,
    }));
    let response = api::GetHistoryResponse {
        since: Some(time_of(q.since_ms).into()),
        until: Some(time_of(q.until_ms).into()),
        step_ms: u32::try_from(step).unwrap_or(u32::MAX),
        tier_step_ms: u32::try_from(tier_step).unwrap_or(u32::MAX),
        fields: q.fields.iter().map(|&i| FIELDS[i].to_owned()).collect(),
        gpus,
        events: Vec::new(),
        tiers: tiers_out,
        columnar: q.columnar,
    };
    Ok(WireAnswer {
        response,
        columns: encoded,
    })
}

/// One GPU's columns of tier `tier` over `[first, until)` when every
/// bucket is a point: whole finished stretches of [`CHUNK_BUCKETS`] buckets
/// from the store's [`ChunkCache`] (built from disk on a miss), the rest
/// (the stretch now being written, and partial ones at either end) from
/// disk. The answer is the same either way.
fn fill_from_chunks(
    store: &Store,
    tier: usize,
    uuid: &str,
    first: u64,
    until: u64,
    now_ms: u64,
    folder: &mut Folder<'_>,
) -> Result<(), HistoryError> {
    let (Some(id), Some(t)) = (store.gpu_id(uuid), store.tiers.get(tier)) else {
        return Ok(());
    };
    let step = ms(t.step).max(1);
    let span = step * CHUNK_BUCKETS;
    let wanted = folder.q.fields.iter().fold(0u64, |m, &i| m | 1 << i);
    let mut at = first;
    // Disk reads are batched: consecutive stretches not served from the
    // cache are read in one pass.
    let mut disk_from = at;
    while at < until {
        let chunk_start = at - at % span;
        let chunk_end = chunk_start + span;
        let whole = at == chunk_start && chunk_end <= until && chunk_end + step <= now_ms;
        if whole {
            if disk_from < at {
                store.visit_buckets(tier, uuid, disk_from, at, wanted, |b| folder.add(b))?;
            }
            let chunk = store.chunk(tier, id, uuid, chunk_start, chunk_end)?;
            folder.splice(&chunk);
            disk_from = chunk_end;
        }
        at = chunk_end.min(until);
    }
    if disk_from < until {
        store.visit_buckets(tier, uuid, disk_from, until, wanted, |b| folder.add(b))?;
    }
    Ok(())
}

fn time_of(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// One bucket per raw frame of `uuid` in `[from, to)`.
fn raw_buckets(raw: &[Arc<Frame>], uuid: &str, from_ms: u64, to_ms: u64) -> Vec<Bucket> {
    let mut out = Vec::new();
    for f in raw {
        let Some(t) = f.time.and_then(|t| SystemTime::try_from(t).ok()) else {
            continue;
        };
        let t_ms = unix_ms(t);
        if t_ms < from_ms || t_ms >= to_ms {
            continue;
        }
        if let Some(s) = f.samples.iter().find(|s| s.uuid == uuid)
            && readable(s)
        {
            let mut b = Bucket::new(t_ms);
            b.add_sample(s);
            out.push(b);
        }
    }
    out
}

/// A GPU's series as it is built: points, or columns.
enum Series {
    Rows(Vec<api::HistoryPoint>),
    Columns(ColumnsBuilder),
}

/// Folds one GPU's buckets, oldest first, into the answer's points (one
/// per `step`), writing each point as soon as it is complete: no bucket is
/// collected, only the start times the gap search needs.
struct Folder<'q> {
    q: &'q Query,
    step: u64,
    tier_step: u32,
    /// The point being summed, if any.
    open: Option<Bucket>,
    series: Series,
    starts: Vec<u64>,
}

impl<'q> Folder<'q> {
    fn new(q: &'q Query, step: u64, tier_step: u64, points: usize) -> Self {
        // The answer is bounded by the limits checked before this; the
        // capacity only avoids regrowing.
        let points = points.min(1 << 20);
        let series = if q.columnar {
            Series::Columns(ColumnsBuilder::new(q.fields.len(), points))
        } else {
            Series::Rows(Vec::with_capacity(points))
        };
        let per_point = usize::try_from(step / tier_step.max(1)).unwrap_or(1).max(1);
        Self {
            q,
            step,
            tier_step: u32::try_from(tier_step).unwrap_or(u32::MAX),
            open: None,
            series,
            starts: Vec::with_capacity(points.saturating_mul(per_point).min(1 << 22)),
        }
    }

    fn add(&mut self, b: &Bucket) {
        self.starts.push(b.start_ms);
        let start = b.start_ms - b.start_ms % self.step;
        if self.open.is_none() && start == b.start_ms && self.step == u64::from(self.tier_step) {
            // One tier bucket is one point (each start is stored once).
            Self::write(&self.q.fields, self.tier_step, &mut self.series, b);
            return;
        }
        match &mut self.open {
            Some(open) if open.start_ms == start => open.merge(b),
            Some(open) => {
                Self::write(&self.q.fields, self.tier_step, &mut self.series, open);
                open.clone_from(b);
                open.start_ms = start;
            }
            None => {
                let mut open = b.clone();
                open.start_ms = start;
                self.open = Some(open);
            }
        }
    }

    /// Appends a cached stretch of the tier (see [`ChunkCache`]): only
    /// when every bucket is a point (`step` is the tier's step), so no
    /// point is open.
    fn splice(&mut self, chunk: &Chunk) {
        debug_assert!(self.open.is_none() && self.step == u64::from(self.tier_step));
        if let Series::Columns(c) = &mut self.series {
            c.append(&chunk.columns, &self.q.fields);
            self.starts.extend_from_slice(&chunk.starts);
        }
    }

    fn finish(mut self) -> (Series, Vec<u64>) {
        if let Some(open) = &self.open {
            Self::write(&self.q.fields, self.tier_step, &mut self.series, open);
        }
        (self.series, self.starts)
    }

    fn write(fields: &[usize], tier_step: u32, series: &mut Series, b: &Bucket) {
        let time = i64::try_from(b.start_ms).unwrap_or(i64::MAX);
        let (throttle, governor) = (b.throttle_mask(), b.governor_state() as i32);
        match series {
            Series::Rows(points) => points.push(api::HistoryPoint {
                time_unix_ms: time,
                tier_step_ms: tier_step,
                samples: b.samples,
                values: fields
                    .iter()
                    .map(|&i| {
                        let f = &b.fields[i];
                        if f.n == 0 {
                            api::FieldStats::default()
                        } else {
                            api::FieldStats {
                                min: Some(f.min as f64),
                                max: Some(f.max as f64),
                                mean: f.mean(),
                                last: Some(f.last as f64),
                            }
                        }
                    })
                    .collect(),
                throttle_reasons_mask: throttle,
                governor_state: governor,
            }),
            Series::Columns(c) => {
                c.point(time, tier_step, b.samples, throttle, governor);
                for (j, &i) in fields.iter().enumerate() {
                    let f = &b.fields[i];
                    c.field(
                        j,
                        (f.n > 0).then(|| IntStats {
                            count: f.n,
                            min: f.min,
                            max: f.max,
                            last: f.last,
                            sum_over_min: u64::try_from(
                                f.sum - u128::from(f.min) * u128::from(f.n),
                            )
                            .unwrap_or(u64::MAX),
                        }),
                    );
                }
            }
        }
    }
}

struct GapContext<'a> {
    since_ms: u64,
    until_ms: u64,
    tier_step: u64,
    threshold: u64,
    runs: &'a [(u64, u64)],
    retained_from: u64,
    trailing_slack: u64,
}

/// The ranges of `[since, until)` with no data: daemon downtime (exact,
/// from the recorded runs), missing buckets longer than the threshold, and
/// what lies before retention.
fn find_gaps(starts: &[u64], cx: &GapContext<'_>) -> Vec<api::HistoryGap> {
    use api::HistoryGapReason as R;
    let mut raw: Vec<(u64, u64, R)> = Vec::new();
    // Downtime between runs (and before the first run, after the last
    // commit of a run that did not end cleanly).
    let mut runs = cx.runs.to_vec();
    runs.sort_unstable();
    for pair in runs.windows(2) {
        let (down_from, down_to) = (pair[0].1.max(pair[0].0), pair[1].0);
        if down_to > down_from {
            raw.push((down_from, down_to, R::DaemonDown));
        }
    }
    // Missing buckets while the daemon ran.
    let mut cursor = cx.since_ms;
    let mut first = true;
    for &start in starts {
        let end = start + cx.tier_step;
        if end <= cx.since_ms {
            continue;
        }
        if start > cursor && (start - cursor >= cx.threshold || first) {
            let reason = if first && cursor < cx.retained_from {
                R::NotRetained
            } else {
                R::NoSamples
            };
            if !(first && start - cursor < cx.tier_step) {
                raw.push((cursor, start, reason));
            }
        }
        first = false;
        cursor = cursor.max(end);
    }
    if cx.until_ms > cursor && cx.until_ms - cursor > cx.trailing_slack {
        let reason = if starts.is_empty() && cursor < cx.retained_from {
            R::NotRetained
        } else {
            R::NoSamples
        };
        raw.push((cursor, cx.until_ms, reason));
    }
    // Clip to the window; downtime wins where ranges overlap.
    let mut out: Vec<(u64, u64, R)> = Vec::new();
    let down: Vec<(u64, u64)> = raw
        .iter()
        .filter(|g| g.2 == R::DaemonDown)
        .map(|g| (g.0.max(cx.since_ms), g.1.min(cx.until_ms)))
        .filter(|g| g.1 > g.0)
        .collect();
    for &(a, b) in &down {
        out.push((a, b, R::DaemonDown));
    }
    for &(a, b, r) in raw.iter().filter(|g| g.2 != R::DaemonDown) {
        // Subtract the downtime ranges.
        let mut pieces = vec![(a.max(cx.since_ms), b.min(cx.until_ms))];
        for &(da, db) in &down {
            pieces = pieces
                .into_iter()
                .flat_map(|(pa, pb)| {
                    let mut v = Vec::new();
                    if pa < da.min(pb) {
                        v.push((pa, da.min(pb)));
                    }
                    if db.max(pa) < pb {
                        v.push((db.max(pa), pb));
                    }
                    v
                })
                .collect();
        }
        for (pa, pb) in pieces {
            // A sliver left beside downtime is the same outage.
            if pb > pa && pb - pa >= cx.tier_step {
                out.push((pa, pb, r));
            }
        }
    }
    out.sort_unstable_by_key(|g| g.0);
    out.into_iter()
        .map(|(a, b, r)| api::HistoryGap {
            start_unix_ms: i64::try_from(a).unwrap_or(i64::MAX),
            end_unix_ms: i64::try_from(b).unwrap_or(i64::MAX),
            reason: r as i32,
        })
        .collect()
}

/// Test and benchmark only: [`backfill`]s `dir` and opens the store, for
/// queries as of `end` (returned in Unix ms). Not used by the daemon.
#[doc(hidden)]
pub fn backfilled(
    dir: &Path,
    config: &HistoryConfig,
    uuids: &[String],
    span: Duration,
    end: SystemTime,
) -> Result<(Store, u64), HistoryError> {
    backfill(dir, config, uuids, span, end)?;
    let (store, _) = Store::open(dir, config)?;
    Ok((store, unix_ms(end)))
}

/// Test and benchmark only: fills `dir`'s store with `span` of synthetic
/// history ending at `end` for GPUs `uuids` (every configured tier, 10
/// readings a second, values that move like a loaded H100), through the
/// same encoding and commits as the writer, and records the span as one
/// daemon run. Returns the store's size in bytes. Not used by the daemon.
#[doc(hidden)]
pub fn backfill(
    dir: &Path,
    config: &HistoryConfig,
    uuids: &[String],
    span: Duration,
    end: SystemTime,
) -> Result<u64, HistoryError> {
    let (store, _) = Store::open(dir, config)?;
    let end_ms = unix_ms(end);
    let from_ms = end_ms.saturating_sub(ms(span));
    for (tier, cfg) in store.tiers.clone().iter().enumerate() {
        let step = ms(cfg.step).max(1);
        let first = from_ms - from_ms % step;
        let mut batch = Vec::with_capacity(4096);
        let mut t = first;
        while t < end_ms {
            for (g, uuid) in uuids.iter().enumerate() {
                let mut b = Bucket::new(t);
                let readings = (step / 100).clamp(1, 600);
                for r in 0..readings {
                    let at = t + r * 100;
                    let phase = (at / 100 + g as u64 * 37) % 900;
                    let load = if phase < 450 { phase } else { 900 - phase };
                    let power_mw = 350_000 + u32::try_from(load).unwrap_or(0) * 660;
                    let s = GpuSample {
                        uuid: uuid.clone(),
                        health: GpuHealth::Ok as i32,
                        temperature_c: Some(45 + power_mw / 20_000),
                        memory_temperature_c: Some(50 + power_mw / 25_000),
                        power_draw_mw: Some(power_mw),
                        power_limit_mw: Some(700_000),
                        enforced_power_limit_mw: Some(700_000),
                        graphics_clock_mhz: Some(1980 - power_mw / 10_000),
                        sm_clock_mhz: Some(1980 - power_mw / 10_000),
                        memory_clock_mhz: Some(2619),
                        video_clock_mhz: Some(1545),
                        utilization_gpu_pct: Some(power_mw / 7_000),
                        utilization_memory_pct: Some(power_mw / 14_000),
                        memory_used_bytes: Some(40_000_000_000 + u64::from(power_mw) * 1000),
                        pcie_tx_kbps: Some(power_mw * 4),
                        pcie_rx_kbps: Some(power_mw * 2),
                        governor_state: GovernorState::Idle as i32,
                        throttle_reasons_mask: Some(0),
                        ..GpuSample::default()
                    };
                    b.add_sample(&s);
                }
                batch.push((uuid.clone(), tier, b));
            }
            if batch.len() >= 4096 {
                store.commit(&batch, end_ms)?;
                batch.clear();
            }
            t += step;
        }
        store.commit(&batch, end_ms)?;
    }
    // The span as one run that ended at `end`.
    let txn = store.db.begin_write()?;
    {
        let mut runs = txn.open_table(RUNS)?;
        runs.remove(store.run_start_ms)?;
        runs.insert(from_ms, end_ms)?;
    }
    txn.commit()?;
    Ok(store.disk_bytes())
}

/// Indices into [`FIELDS`] for `names` (empty: all); an unknown name is an
/// error listing the known ones.
pub fn resolve_fields(names: &[String]) -> Result<Vec<usize>, String> {
    if names.is_empty() {
        return Ok((0..NFIELDS).collect());
    }
    let mut out = Vec::new();
    for n in names {
        match FIELDS.iter().position(|f| f == n) {
            Some(i) if !out.contains(&i) => out.push(i),
            Some(_) => {}
            None => {
                return Err(format!(
                    "unknown history field {n:?}; allowed: {}",
                    FIELDS.join(", ")
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(temp: u32, power_mw: u32) -> GpuSample {
        GpuSample {
            uuid: "GPU-x".into(),
            health: GpuHealth::Ok as i32,
            temperature_c: Some(temp),
            power_draw_mw: Some(power_mw),
            ..GpuSample::default()
        }
    }

    #[test]
    fn a_bucket_round_trips_through_its_encoding() {
        let mut b = Bucket::new(60_000);
        for (t, p) in [(60, 300_000), (65, 310_500), (62, 299_000)] {
            b.add_sample(&sample(t, p));
        }
        let bytes = b.encode();
        let back = Bucket::decode(60_000, &bytes).expect("decodes");
        assert_eq!(back.fields, b.fields);
        assert_eq!(back.samples, 3);
        assert!(bytes.len() < 40, "{} bytes", bytes.len());
        assert!(Bucket::decode(0, &bytes[..bytes.len() - 1]).is_none());
    }

    #[test]
    fn merged_partial_buckets_equal_one_bucket() {
        let mut whole = Bucket::new(0);
        let mut a = Bucket::new(0);
        let mut b = Bucket::new(0);
        for i in 0..10u32 {
            let s = sample(50 + i % 7, 200_000 + i * 1000);
            whole.add_sample(&s);
            if i < 4 {
                a.add_sample(&s)
            } else {
                b.add_sample(&s)
            }
        }
        a.merge(&b);
        assert_eq!(a.fields, whole.fields);
    }

    #[test]
    fn downtime_between_runs_is_a_gap_and_points_are_not_invented() {
        let mut buckets = Vec::new();
        for t in (0..10_000)
            .step_by(1000)
            .chain((20_000..30_000).step_by(1000))
        {
            let mut b = Bucket::new(t);
            b.add_sample(&sample(60, 1));
            buckets.push(b);
        }
        let runs = [(0, 9_500), (19_800, 30_000)];
        let starts: Vec<u64> = buckets.iter().map(|b| b.start_ms).collect();
        let gaps = find_gaps(
            &starts,
            &GapContext {
                since_ms: 0,
                until_ms: 30_000,
                tier_step: 1000,
                threshold: 2000,
                runs: &runs,
                retained_from: 0,
                trailing_slack: 3000,
            },
        );
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert_eq!(gaps[0].reason, api::HistoryGapReason::DaemonDown as i32);
        assert_eq!(
            (gaps[0].start_unix_ms, gaps[0].end_unix_ms),
            (9_500, 19_800)
        );
    }

    /// Points per GPU of `store` at `step_ms` over `[since, until)`.
    fn points_per_gpu(store: &Store, uuids: &[String], since_ms: u64, until_ms: u64) -> Vec<usize> {
        let q = Query {
            gpus: uuids
                .iter()
                .enumerate()
                .map(|(i, u)| (i as u32, u.clone()))
                .collect(),
            fields: vec![0],
            since_ms,
            until_ms,
            step_ms: 1000,
            columnar: false,
        };
        query(&Source::store_only(store, until_ms), &q, Limits::LOOSE)
            .expect("query")
            .gpus
            .iter()
            .map(|g| g.points.len())
            .collect()
    }

    #[test]
    fn the_disk_budget_keeps_the_file_under_it_and_the_newest_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uuids: Vec<String> = vec!["GPU-a".into(), "GPU-b".into()];
        let hour = Duration::from_secs(3600);
        let end = SystemTime::now() - Duration::from_secs(2 * 3600);
        // Three hours filled under the default cap: far over a 2 MiB one.
        let filled = backfill(dir.path(), &HistoryConfig::default(), &uuids, 3 * hour, end)
            .expect("backfill");
        let cap: u64 = 1 << 20;
        assert!(
            filled > 2 * cap,
            "the test needs a file over the cap: {filled} bytes"
        );
        let small = HistoryConfig {
            max_disk_bytes: cap,
            ..HistoryConfig::default()
        };
        // Restarting under the small cap cuts the oldest data and compacts.
        let (store, report) = Store::open(dir.path(), &small).expect("open");
        assert!(store.disk_bytes() <= cap, "{} bytes", store.disk_bytes());
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("max_disk_bytes = 1048576")),
            "the cut is reported: {:?}",
            report.notes
        );
        let end_ms = unix_ms(end);
        // The newest ten minutes are whole; the oldest hour is gone.
        let newest = points_per_gpu(&store, &uuids, end_ms - 600_000, end_ms);
        assert!(newest.iter().all(|&n| n >= 600), "{newest:?}");
        let oldest = points_per_gpu(
            &store,
            &uuids,
            end_ms - 3 * 3_600_000,
            end_ms - 2 * 3_600_000,
        );
        assert!(oldest.iter().all(|&n| n == 0), "{oldest:?}");
        let kept = store.budget();
        assert!(kept.cuts > 0, "compaction alone did not fit: data was cut");
        assert!(kept.keep_ms[0] < 5 * 3_600_000, "{kept:?}");
        drop(store);

        // Two more hours while running: the writer's pass (every minute)
        // cuts again once the file grows past the cap, and the file stops
        // growing; a restart compacts it under the cap again.
        let later = end + 2 * hour;
        backfill(dir.path(), &small, &uuids, 2 * hour, later).expect("backfill");
        let (store, _) = Store::open(dir.path(), &small).expect("reopen");
        assert!(store.disk_bytes() <= cap, "{} bytes", store.disk_bytes());
        let later_ms = unix_ms(later);
        let newest = points_per_gpu(&store, &uuids, later_ms - 600_000, later_ms);
        assert!(newest.iter().all(|&n| n >= 600), "{newest:?}");
        // The running path: writing past the cap cuts the oldest data (the
        // freed pages are reused; the file itself only shrinks at the next
        // start, when it is compacted) and keeps the newest.
        let mut t = later_ms;
        let mut peak_after_cut = 0;
        let mut cut = false;
        for _ in 0..30 {
            let mut batch = Vec::new();
            for _ in 0..120 {
                for u in &uuids {
                    let mut b = Bucket::new(t - t % 1000);
                    b.add_sample(&GpuSample {
                        uuid: u.clone(),
                        ..sample(60, 300_000)
                    });
                    batch.push((u.clone(), 0, b));
                }
                t += 1000;
            }
            store.commit(&batch, t).expect("commit");
            cut |= store.prune(t).expect("prune");
            if cut {
                peak_after_cut = peak_after_cut.max(store.disk_bytes());
            }
        }
        let final_len = store.disk_bytes();
        assert!(cut, "two more hours went past the cap ({final_len} bytes)");
        assert!(
            store.budget().keep_ms[0] < 3_600_000 * 3,
            "{:?}",
            store.budget()
        );
        assert!(peak_after_cut > 0);
        let newest = points_per_gpu(&store, &uuids, t - 60_000, t);
        assert!(newest.iter().all(|&n| n >= 60), "{newest:?}");
    }

    #[test]
    fn the_wire_answer_is_prosts_encoding_of_the_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uuids: Vec<String> = vec!["GPU-a".into(), "GPU-b".into()];
        let (store, end_ms) = backfilled(
            dir.path(),
            &HistoryConfig::default(),
            &uuids,
            Duration::from_secs(1800),
            SystemTime::now(),
        )
        .expect("backfill");
        let src = Source::store_only(&store, end_ms);
        let limits = Limits::LOOSE;
        for (step_ms, fields, columnar) in [
            (60_000, vec![0, 3, 12], true),
            (1_000, (0..NFIELDS).collect(), true),
            (5_000, vec![14], true),
            (1_000, vec![0, 3], false),
        ] {
            let q = Query {
                gpus: vec![
                    (0, uuids[0].clone()),
                    (1, uuids[1].clone()),
                    (2, "GPU-none".into()),
                ],
                fields,
                // Before the first bucket: a gap, then points.
                since_ms: end_ms - 2_400_000,
                until_ms: end_ms,
                step_ms,
                columnar,
            };
            let mut answer = query_wire(&src, &q, limits).expect("query");
            answer.response.events.push(api::Event {
                seq: 42,
                ..api::Event::default()
            });
            let mut message = query(&src, &q, limits).expect("query");
            message.events = answer.response.events.clone();
            assert_eq!(message.columnar, columnar);
            assert!(
                message.gpus[0].gaps.len() == 1,
                "{:?}",
                message.gpus[0].gaps
            );
            let points = message.gpus[0]
                .columns
                .as_ref()
                .map_or(message.gpus[0].points.len(), |c| c.time_delta_ms.len());
            assert!(
                points >= 1_800_000 / step_ms as usize,
                "{points} points at {step_ms} ms"
            );
            assert_eq!(answer.encode(), message.encode_to_vec(), "step {step_ms}");
        }
    }

    #[test]
    fn answers_from_the_query_cache_equal_answers_from_disk_across_writes_and_cuts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uuids: Vec<String> = vec!["GPU-a".into(), "GPU-b".into()];
        let config = HistoryConfig::default();
        let (store, end_ms) = backfilled(
            dir.path(),
            &config,
            &uuids,
            Duration::from_secs(3 * 3600),
            SystemTime::now(),
        )
        .expect("backfill");
        let src = Source::store_only(&store, end_ms);
        let limits = Limits::LOOSE;
        let gpus: Vec<(u32, String)> = vec![(0, uuids[0].clone()), (1, uuids[1].clone())];
        // Columns (served from the cache where whole stretches are
        // finished) against points (always read from disk), same question.
        let check = |since_ms: u64, step_ms: u64, fields: Vec<usize>| -> Vec<u8> {
            let q = Query {
                gpus: gpus.clone(),
                fields,
                since_ms,
                until_ms: end_ms,
                step_ms,
                columnar: true,
            };
            let bytes = query_wire(&src, &q, limits).expect("columns").encode();
            let mut columns = query(&src, &q, limits).expect("columns");
            columns.expand_columns().expect("well formed");
            let points = query(
                &src,
                &Query {
                    columnar: false,
                    ..q
                },
                limits,
            )
            .expect("points");
            for (c, p) in columns.gpus.iter().zip(&points.gpus) {
                assert_eq!(c.gaps, p.gaps, "gaps; since {since_ms}, step {step_ms}");
                assert_eq!(
                    c.points.len(),
                    p.points.len(),
                    "since {since_ms}, step {step_ms}"
                );
                // Columns carry the mean as an exact sum; as points it is
                // the same to the last bit or two.
                let same = |a: &api::HistoryPoint, b: &api::HistoryPoint| {
                    let strip = |p: &api::HistoryPoint| {
                        let mut p = p.clone();
                        p.values
                            .iter_mut()
                            .for_each(|v| v.mean = v.mean.map(|_| 0.0));
                        p
                    };
                    strip(a) == strip(b)
                        && a.values.iter().zip(&b.values).all(|(x, y)| {
                            x.mean
                                .zip(y.mean)
                                .is_none_or(|(x, y)| (x - y).abs() <= 1e-9 * y.abs())
                        })
                };
                if let Some(i) = (0..c.points.len()).find(|&i| !same(&c.points[i], &p.points[i])) {
                    panic!(
                        "point {i} differs (since {since_ms}, step {step_ms}):\n{:?}\n{:?}",
                        c.points[i], p.points[i]
                    );
                }
            }
            assert_eq!(columns.gpus.len(), points.gpus.len());
            bytes
        };
        let day = end_ms - 3 * 3_600_000 - 120_000;
        let cold = check(day, 60_000, vec![3, 0, 12]);
        assert!(store.cache_bytes() > 0, "whole hours were cached");
        assert_eq!(
            check(day, 60_000, vec![3, 0, 12]),
            cold,
            "the cached answer"
        );
        check(day, 60_000, (0..NFIELDS).collect());
        check(end_ms - 1_800_000, 1_000, vec![14, 1]);
        check(end_ms - 1_800_000, 1_000, vec![14, 1]);

        // A write into a cached hour (and minute) is seen.
        let cached_minute = end_ms - end_ms % 3_600_000 - 3_600_000 + 5 * 60_000;
        let mut b = Bucket::new(cached_minute);
        b.add_sample(&GpuSample {
            uuid: uuids[1].clone(),
            ..sample(99, 123_456)
        });
        let second = end_ms - end_ms % 60_000 - 600_000 + 7_000;
        let mut fine = Bucket::new(second);
        fine.add_sample(&GpuSample {
            uuid: uuids[0].clone(),
            ..sample(98, 654_321)
        });
        store
            .commit(
                &[(uuids[1].clone(), 1, b), (uuids[0].clone(), 0, fine)],
                end_ms,
            )
            .expect("commit");
        let after = check(day, 60_000, vec![3, 0, 12]);
        assert_ne!(after, cold, "the write shows");
        check(end_ms - 1_800_000, 1_000, vec![14, 1]);

        // A cut through a cached hour is seen.
        {
            let mut budget = store.budget.lock().expect("budget");
            budget.keep_ms = vec![3_600_000, 2 * 3_600_000 + 30 * 60_000];
        }
        store.prune(end_ms).expect("prune");
        check(day, 60_000, vec![3, 0, 12]);
        check(day, 60_000, (0..NFIELDS).collect());

        // Warming fills the cache with the same stretches.
        drop(store);
        let (store2, _) = Store::open(dir.path(), &config).expect("reopen");
        store2.warm_cache(end_ms).expect("warm");
        assert!(store2.cache_bytes() > 0);
        assert!(store2.cache_bytes() <= QUERY_CACHE_BYTES);
    }

    #[test]
    fn the_config_is_checked() {
        let mut c = HistoryConfig::default();
        assert!(validate(&c).is_ok());
        c.tiers[1].step = Duration::from_millis(1500);
        assert!(
            validate(&c)
                .expect_err("refused")
                .0
                .contains("tiers[1].step")
        );
    }
}
