//! Picking GPUs for work, and the leases that keep picks apart.
//!
//! Why it exists: every scheduler that asks "which GPU is free?" and then
//! launches work races every other scheduler asking the same question. A
//! pick here ranks this host's GPUs against explicit criteria, from what the
//! daemon already has in memory (the latest frame, the frame history for
//! utilisation over a window, the governor's threshold for thermal headroom,
//! the attribution data for processes and kubelet allocations), and says for
//! each GPU and each criterion why it fits or not. A lease holds the picked
//! GPUs for a caller for a TTL.
//!
//! What it owns: the lease book, behind one lock. `LeaseGpus` ranks and
//! grants under that lock, so concurrent pickers on one host never get the
//! same GPU; expiry, renewal, release and the per-caller bound are decided
//! under it too. Every change queues a new `leases.json` to the state
//! directory's one writer (`persist.rs`) while the lock is held (so the
//! newest book is the one saved last) and the answer waits, after the lock
//! is released, until it is durable: a granted lease survives a restart. The
//! file is new in this release and separate from `state.json`, so an older
//! daemon ignores it and a state directory without it has no leases.
//!
//! Leases are advisory: CUDA does not enforce them. They coordinate the
//! schedulers that use gpuwatch.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::{
    api::{self, GpuHealth, ThrottleReason},
    auth::{Caller, Role},
    config::LeasesConfig,
    events::{Actor, EventLog, NewEvent},
    hub::Hub,
    persist::{Ack, Persister, ReplacedFile},
    selector::{self, Empty},
};

const FILE: &str = "leases.json";
const VERSION: u32 = 1;
pub(crate) const LEASES_FILE: ReplacedFile = ReplacedFile {
    current: FILE,
    previous: "leases.json.prev",
    temporary: "leases.json.tmp",
};

/// Most GPUs one pick may ask for.
pub const MAX_COUNT: u32 = 64;
/// Longest `purpose` accepted, in bytes.
pub const MAX_PURPOSE_BYTES: usize = 256;
/// Most lease ids one Renew/Release may name.
pub const MAX_IDS: usize = 256;
/// The utilisation window when a pick names none.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// One lease as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    id: String,
    uuid: String,
    /// The GPU's index when granted (the UUID is what identifies it).
    index: u32,
    holder: String,
    #[serde(default)]
    purpose: String,
    /// Unix milliseconds.
    granted_ms: u64,
    expires_ms: u64,
    ttl_s: u32,
}

impl Record {
    fn to_api(&self, index: u32) -> api::Lease {
        api::Lease {
            id: self.id.clone(),
            index,
            uuid: self.uuid.clone(),
            holder: self.holder.clone(),
            purpose: self.purpose.clone(),
            granted: Some(from_ms(self.granted_ms).into()),
            expires: Some(from_ms(self.expires_ms).into()),
            ttl_s: self.ttl_s,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    leases: Vec<Record>,
}

#[derive(Debug, Default)]
struct Book {
    /// Live leases by GPU UUID (one per GPU).
    by_uuid: BTreeMap<String, Record>,
    /// Makes ids unique within this run (with the run's start time, across
    /// runs).
    counter: u64,
}

/// The lease book and the picker.
#[derive(Debug)]
pub struct Leases {
    book: Mutex<Book>,
    writer: Persister,
    events: Arc<EventLog>,
    hub: Arc<Hub>,
    config: LeasesConfig,
    run: u64,
}

/// What loading `leases.json` found.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    pub expired: usize,
    pub problems: Vec<String>,
}

fn now_ms() -> u64 {
    to_ms(SystemTime::now())
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Reads `leases.json` (then its previous version) from `dir`.
fn load(dir: &Path, report: &mut LoadReport) -> Vec<Record> {
    for name in [LEASES_FILE.current, LEASES_FILE.previous] {
        let path = dir.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => match serde_json::from_str::<FileFormat>(&text) {
                Ok(file) => return file.leases,
                Err(e) => report.problems.push(format!(
                    "{} is damaged ({e}); its leases were ignored",
                    path.display()
                )),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if name == LEASES_FILE.current {
                    return Vec::new();
                }
            }
            Err(e) => report
                .problems
                .push(format!("cannot read {}: {e}", path.display())),
        }
    }
    Vec::new()
}

impl Leases {
    /// The book, loaded from the writer's state directory (leases that
    /// expired while the daemon was down are dropped, with an event each).
    pub fn open(
        writer: &Persister,
        events: Arc<EventLog>,
        hub: Arc<Hub>,
        config: LeasesConfig,
    ) -> (Arc<Self>, LoadReport) {
        let mut report = LoadReport::default();
        let records = writer
            .dir()
            .map(|dir| load(dir, &mut report))
            .unwrap_or_default();
        let now = now_ms();
        let mut book = Book::default();
        let mut expired = Vec::new();
        for r in records {
            if r.expires_ms <= now {
                expired.push(r);
            } else {
                book.by_uuid.insert(r.uuid.clone(), r);
            }
        }
        report.loaded = book.by_uuid.len();
        report.expired = expired.len();
        let leases = Arc::new(Self {
            book: Mutex::new(book),
            writer: writer.clone(),
            events,
            hub,
            config,
            run: now,
        });
        if !expired.is_empty() {
            let book = leases.lock();
            for r in &expired {
                leases.record_expired(r);
            }
            drop(leases.save(&book));
        }
        (leases, report)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues the book as it is now; call with the lock held.
    fn save(&self, book: &Book) -> Ack {
        let file = FileFormat {
            version: VERSION,
            leases: book.by_uuid.values().cloned().collect(),
        };
        match serde_json::to_vec_pretty(&file) {
            Ok(mut bytes) => {
                bytes.push(b'\n');
                self.writer.replace(LEASES_FILE, Some(bytes))
            }
            Err(e) => Ack::ready(Err(crate::persist::PersistError::Io {
                action: "encode",
                path: PathBuf::from(FILE),
                source: Arc::new(io::Error::other(e)),
            })),
        }
    }

    /// The GPU's current index (the stored one when it is not present now).
    fn index_of(&self, r: &Record) -> u32 {
        self.hub
            .devices()
            .iter()
            .find(|d| d.uuid == r.uuid)
            .map_or(r.index, |d| d.index)
    }

    fn record_expired(&self, r: &Record) {
        let lease = r.to_api(self.index_of(r));
        drop(
            self.events.record(
                NewEvent::new(
                    api::EventKind::LeaseExpired,
                    Actor::daemon(),
                    format!(
                        "lease {} of {} ran past its TTL ({} s) without a renewal",
                        r.id, r.holder, r.ttl_s
                    ),
                )
                .gpu(lease.index, &r.uuid)
                .lease(lease),
            ),
        );
    }

    /// Drops the leases that expired by now; call with the lock held.
    /// Returns whether anything changed (and was queued for saving).
    fn sweep_locked(&self, book: &mut Book, now: u64) -> Option<Ack> {
        let expired: Vec<Record> = book
            .by_uuid
            .values()
            .filter(|r| r.expires_ms <= now)
            .cloned()
            .collect();
        if expired.is_empty() {
            return None;
        }
        for r in &expired {
            book.by_uuid.remove(&r.uuid);
            self.record_expired(r);
        }
        Some(self.save(book))
    }

    /// Ends the leases whose TTL ran out (also done by every call below;
    /// the daemon calls this every second so expiry events come on time).
    pub async fn sweep(&self) {
        let ack = {
            let mut book = self.lock();
            self.sweep_locked(&mut book, now_ms())
        };
        if let Some(ack) = ack
            && let Err(e) = ack.await
        {
            tracing::warn!(error = %e, "could not save the leases after expiring some");
        }
    }

    /// The live leases, by GPU UUID.
    pub fn live(&self) -> BTreeMap<String, api::Lease> {
        let now = now_ms();
        let book = self.lock();
        book.by_uuid
            .values()
            .filter(|r| r.expires_ms > now)
            .map(|r| (r.uuid.clone(), r.to_api(self.index_of(r))))
            .collect()
    }

    /// PickGpus: ranks, grants nothing.
    pub fn pick(&self, criteria: &api::PickCriteria) -> Result<api::PickGpusResponse, Status> {
        let leased = self.live();
        rank(&self.hub, criteria, &leased)
    }

    /// LeaseGpus: ranks and leases the picked GPUs to `caller`, under the
    /// book's lock.
    pub async fn lease(
        &self,
        req: &api::LeaseGpusRequest,
        caller: &Caller,
    ) -> Result<api::PickGpusResponse, Status> {
        let criteria = req.criteria.clone().unwrap_or_default();
        let ttl = match req.ttl_s {
            0 => self.config.default_ttl,
            s => Duration::from_secs(u64::from(s)),
        };
        if ttl > self.config.max_ttl {
            return Err(Status::invalid_argument(format!(
                "ttl_s {}: the longest lease this daemon grants is {} s (leases.max_ttl)",
                req.ttl_s,
                self.config.max_ttl.as_secs()
            )));
        }
        if req.purpose.len() > MAX_PURPOSE_BYTES {
            return Err(Status::invalid_argument(format!(
                "purpose: {} bytes; at most {MAX_PURPOSE_BYTES} are allowed",
                req.purpose.len()
            )));
        }
        let ttl_s = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX).max(1);
        let (response, ack) = {
            let mut book = self.lock();
            let now = now_ms();
            let swept = self.sweep_locked(&mut book, now);
            let leased: BTreeMap<String, api::Lease> = book
                .by_uuid
                .values()
                .map(|r| (r.uuid.clone(), r.to_api(self.index_of(r))))
                .collect();
            let mut response = rank(&self.hub, &criteria, &leased)?;
            // Expired leases were dropped above; their save is queued and
            // the next save (or the writer's retry) makes it durable.
            drop(swept);
            if !response.satisfied {
                return Ok(response);
            }
            let held = book
                .by_uuid
                .values()
                .filter(|r| r.holder == caller.name)
                .count();
            if held + response.picked.len() > self.config.max_per_caller {
                return Err(Status::resource_exhausted(format!(
                    "\"{}\" holds {held} leases; {} more would pass the limit of {} per caller (leases.max_per_caller): release some first",
                    caller.name,
                    response.picked.len(),
                    self.config.max_per_caller
                )));
            }
            let devices = self.hub.devices();
            let mut granted = Vec::new();
            for &index in &response.picked {
                let Some(device) = devices.iter().find(|d| d.index == index) else {
                    continue;
                };
                book.counter += 1;
                let record = Record {
                    id: format!("{:x}-{}-{}", self.run, book.counter, index),
                    uuid: device.uuid.clone(),
                    index,
                    holder: caller.name.clone(),
                    purpose: req.purpose.clone(),
                    granted_ms: now,
                    expires_ms: now.saturating_add(u64::from(ttl_s) * 1000),
                    ttl_s,
                };
                book.by_uuid.insert(record.uuid.clone(), record.clone());
                granted.push(record.to_api(index));
            }
            for lease in &granted {
                drop(
                    self.events.record(
                        NewEvent::new(
                            api::EventKind::LeaseGranted,
                            Actor::operator(&caller.name),
                            format!(
                                "lease {} granted to {} for {} s{}",
                                lease.id,
                                caller.name,
                                lease.ttl_s,
                                if lease.purpose.is_empty() {
                                    String::new()
                                } else {
                                    format!(" ({})", lease.purpose)
                                }
                            ),
                        )
                        .gpu(lease.index, &lease.uuid)
                        .lease(lease.clone()),
                    ),
                );
            }
            for c in &mut response.candidates {
                if let Some(l) = granted.iter().find(|l| l.uuid == c.uuid) {
                    c.lease = Some(l.clone());
                }
            }
            response.leases = granted;
            (response, self.save(&book))
        };
        if let Err(e) = ack.await {
            // A grant that would not survive a restart is not a grant: it is
            // withdrawn (all or nothing), with an event per lease.
            let withdrawn = {
                let mut book = self.lock();
                for lease in &response.leases {
                    if book.by_uuid.get(&lease.uuid).is_some_and(|r| r.id == lease.id) {
                        book.by_uuid.remove(&lease.uuid);
                        drop(
                            self.events.record(
                                NewEvent::new(
                                    api::EventKind::LeaseReleased,
                                    Actor::daemon(),
                                    format!(
                                        "lease {} of {} withdrawn: the grant could not be made durable ({e})",
                                        lease.id, lease.holder
                                    ),
                                )
                                .gpu(lease.index, &lease.uuid)
                                .lease(lease.clone()),
                            ),
                        );
                    }
                }
                self.save(&book)
            };
            drop(withdrawn);
            return Err(Status::unavailable(format!(
                "nothing was leased: the grant could not be made durable ({e})"
            )));
        }
        Ok(response)
    }

    /// Checks that `caller` may change every lease in `ids`; returns their
    /// UUIDs (none for no ids: an empty renew or release is a no-op).
    fn owned(book: &Book, ids: &[String], caller: &Caller) -> Result<Vec<String>, Status> {
        if ids.len() > MAX_IDS {
            return Err(Status::invalid_argument(format!(
                "lease_ids: {} entries; at most {MAX_IDS} are allowed",
                ids.len()
            )));
        }
        let mut uuids = Vec::new();
        for id in ids {
            let Some(r) = book.by_uuid.values().find(|r| &r.id == id) else {
                return Err(Status::not_found(format!(
                    "no live lease {id:?} on this host (it expired, was released, or never existed)"
                )));
            };
            if r.holder != caller.name && caller.role < Role::Control {
                return Err(Status::permission_denied(format!(
                    "lease {id} is held by \"{}\", not \"{}\"; only its holder or a control token may change it",
                    r.holder, caller.name
                )));
            }
            uuids.push(r.uuid.clone());
        }
        Ok(uuids)
    }

    /// RenewLease.
    pub async fn renew(
        &self,
        req: &api::RenewLeaseRequest,
        caller: &Caller,
    ) -> Result<api::RenewLeaseResponse, Status> {
        let ttl_override = match req.ttl_s {
            0 => None,
            s if Duration::from_secs(u64::from(s)) > self.config.max_ttl => {
                return Err(Status::invalid_argument(format!(
                    "ttl_s {s}: the longest lease this daemon grants is {} s (leases.max_ttl)",
                    self.config.max_ttl.as_secs()
                )));
            }
            s => Some(s),
        };
        let (leases, ack) = {
            let mut book = self.lock();
            let now = now_ms();
            drop(self.sweep_locked(&mut book, now));
            let uuids = Self::owned(&book, &req.lease_ids, caller)?;
            let mut leases = Vec::new();
            for uuid in uuids {
                if let Some(r) = book.by_uuid.get_mut(&uuid) {
                    if let Some(ttl) = ttl_override {
                        r.ttl_s = ttl;
                    }
                    r.expires_ms = now.saturating_add(u64::from(r.ttl_s) * 1000);
                    leases.push(r.clone());
                }
            }
            let leases: Vec<api::Lease> =
                leases.iter().map(|r| r.to_api(self.index_of(r))).collect();
            (leases, self.save(&book))
        };
        ack.await.map_err(|e| {
            Status::unavailable(format!("the renewal could not be made durable: {e}"))
        })?;
        Ok(api::RenewLeaseResponse { leases })
    }

    /// ReleaseLease.
    pub async fn release(
        &self,
        req: &api::ReleaseLeaseRequest,
        caller: &Caller,
    ) -> Result<api::ReleaseLeaseResponse, Status> {
        let (released, ack) = {
            let mut book = self.lock();
            drop(self.sweep_locked(&mut book, now_ms()));
            let uuids = Self::owned(&book, &req.lease_ids, caller)?;
            let mut released = Vec::new();
            for uuid in uuids {
                if let Some(r) = book.by_uuid.remove(&uuid) {
                    let lease = r.to_api(self.index_of(&r));
                    drop(
                        self.events.record(
                            NewEvent::new(
                                api::EventKind::LeaseReleased,
                                Actor::operator(&caller.name),
                                format!("lease {} of {} released by {}", r.id, r.holder, caller.name),
                            )
                            .gpu(lease.index, &r.uuid)
                            .lease(lease.clone()),
                        ),
                    );
                    released.push(lease);
                }
            }
            (released, self.save(&book))
        };
        ack.await.map_err(|e| {
            Status::unavailable(format!("the release could not be made durable: {e}"))
        })?;
        Ok(api::ReleaseLeaseResponse { released })
    }
}

/// One criterion's verdict.
fn reason(criterion: &str, ok: bool, detail: String) -> api::PickReason {
    api::PickReason {
        criterion: criterion.to_owned(),
        ok,
        detail,
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

const HARDWARE_SLOWDOWN: [ThrottleReason; 3] = [
    ThrottleReason::HwSlowdown,
    ThrottleReason::HwThermalSlowdown,
    ThrottleReason::HwPowerBrakeSlowdown,
];

/// Ranks the GPUs `criteria` selects, from what the hub holds now.
fn rank(
    hub: &Hub,
    criteria: &api::PickCriteria,
    leased: &BTreeMap<String, api::Lease>,
) -> Result<api::PickGpusResponse, Status> {
    let count = match criteria.count {
        0 => 1,
        n if n > MAX_COUNT => {
            return Err(Status::invalid_argument(format!(
                "count {n}: at most {MAX_COUNT} GPUs can be picked at once"
            )));
        }
        n => n,
    };
    if let Some(pct) = criteria.max_utilization_pct
        && pct > 100
    {
        return Err(Status::invalid_argument(format!(
            "max_utilization_pct {pct}: a percentage is 0 to 100"
        )));
    }
    let devices = hub.devices();
    let picked = selector::resolve(&criteria.gpus, &devices, Empty::MeansAll)?;
    let Some(latest) = hub.latest() else {
        return Err(Status::unavailable(
            "no sample yet: the sampler has not completed its first tick",
        ));
    };
    let policies = hub.policies();
    let window = match criteria.utilization_window_ms {
        0 => DEFAULT_WINDOW,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let sampler = hub.sampler_interval().max(Duration::from_millis(1));
    let frames_in_window = usize::try_from(window.as_millis() / sampler.as_millis())
        .unwrap_or(usize::MAX)
        .max(1);
    let recent = hub.recent(frames_in_window);
    let mut candidates = Vec::new();
    for i in picked {
        let device = &devices[i];
        let Some(sample) = latest.samples.iter().find(|s| s.index == device.index) else {
            continue;
        };
        let mut reasons = Vec::new();
        let health_ok = sample.health() == GpuHealth::Ok;
        reasons.push(reason(
            "health",
            health_ok,
            format!("health {}", api::names::name(sample.health())),
        ));
        let lease = leased.get(&device.uuid).cloned();
        reasons.push(match &lease {
            None => reason("lease", true, "not leased".to_owned()),
            Some(l) => reason(
                "lease",
                false,
                format!("leased to {} (lease {})", l.holder, l.id),
            ),
        });
        let processes = u32::try_from(sample.processes.len()).unwrap_or(u32::MAX);
        let allocations = u32::try_from(sample.allocations.len()).unwrap_or(u32::MAX);
        let busy = processes > 0 || allocations > 0;
        let owners: Vec<String> = sample
            .allocations
            .iter()
            .filter_map(|a| a.pod.as_ref())
            .map(|p| format!("pod {}/{}", p.namespace, p.pod))
            .collect();
        reasons.push(reason(
            "busy",
            !busy || criteria.allow_busy,
            if busy {
                format!(
                    "{processes} processes, {allocations} kubelet allocations{}{}",
                    if owners.is_empty() { "" } else { ": " },
                    owners.join(", ")
                )
            } else {
                "no processes, not allocated".to_owned()
            },
        ));
        let mig = sample.mig_enabled.or(device.mig_enabled).unwrap_or(false);
        reasons.push(reason(
            "mig",
            !mig || criteria.allow_mig,
            if mig { "MIG mode on" } else { "MIG mode off" }.to_owned(),
        ));
        let free = match (sample.memory_total_bytes, sample.memory_used_bytes) {
            (Some(total), Some(used)) => Some(total.saturating_sub(used)),
            _ => None,
        };
        reasons.push(match (criteria.min_free_memory_bytes, free) {
            (None, Some(f)) => reason("free_memory", true, format!("free memory {}", gib(f))),
            (None, None) => reason("free_memory", true, "free memory not reported".to_owned()),
            (Some(min), Some(f)) => reason(
                "free_memory",
                f >= min,
                format!(
                    "free memory {} {} {}",
                    gib(f),
                    if f >= min { ">=" } else { "<" },
                    gib(min)
                ),
            ),
            (Some(min), None) => reason(
                "free_memory",
                false,
                format!("free memory not reported (wanted >= {})", gib(min)),
            ),
        });
        let utils: Vec<u32> = recent
            .iter()
            .filter_map(|f| f.samples.iter().find(|s| s.index == device.index))
            .filter_map(|s| s.utilization_gpu_pct)
            .collect();
        let utilization = (!utils.is_empty())
            .then(|| utils.iter().map(|&u| f64::from(u)).sum::<f64>() / utils.len() as f64);
        let window_words = format!("over {} samples", utils.len());
        reasons.push(match (criteria.max_utilization_pct, utilization) {
            (None, Some(u)) => reason(
                "utilization",
                true,
                format!("utilisation {u:.0}% {window_words}"),
            ),
            (None, None) => reason("utilization", true, "utilisation not reported".to_owned()),
            (Some(max), Some(u)) => reason(
                "utilization",
                u <= f64::from(max),
                format!(
                    "utilisation {u:.0}% {window_words} {} {max}%",
                    if u <= f64::from(max) { "<=" } else { ">" }
                ),
            ),
            (Some(max), None) => reason(
                "utilization",
                false,
                format!("utilisation not reported (wanted <= {max}%)"),
            ),
        });
        let threshold = policies
            .iter()
            .find(|p| p.index == device.index)
            .map(|p| p.threshold_c)
            .filter(|&t| t > 0)
            .or(device.slowdown_temperature_c);
        let headroom = match (threshold, sample.temperature_c) {
            (Some(t), Some(temp)) => {
                Some(i32::try_from(i64::from(t) - i64::from(temp)).unwrap_or(i32::MIN))
            }
            _ => None,
        };
        reasons.push(match (criteria.min_headroom_c, headroom) {
            (None, Some(h)) => reason("headroom", true, format!("headroom {h} C")),
            (None, None) => reason("headroom", true, "headroom not known".to_owned()),
            (Some(min), Some(h)) => reason(
                "headroom",
                h >= min,
                format!(
                    "headroom {h} C (threshold {} C - {} C) {} {min} C",
                    threshold.unwrap_or_default(),
                    sample.temperature_c.unwrap_or_default(),
                    if h >= min { ">=" } else { "<" }
                ),
            ),
            (Some(min), None) => reason(
                "headroom",
                false,
                format!("headroom not known (wanted >= {min} C)"),
            ),
        });
        let slowing: Vec<String> = sample
            .throttle_reasons()
            .filter(|r| HARDWARE_SLOWDOWN.contains(r))
            .map(api::names::name)
            .collect();
        reasons.push(reason(
            "slowdown",
            slowing.is_empty(),
            if slowing.is_empty() {
                "no hardware slowdown".to_owned()
            } else {
                format!("hardware slowdown: {}", slowing.join(", "))
            },
        ));
        let fits = reasons.iter().all(|r| r.ok);
        let free_frac = match (free, sample.memory_total_bytes) {
            (Some(f), Some(t)) if t > 0 => f as f64 / t as f64,
            _ => 0.0,
        };
        let idle = utilization.map_or(0.5, |u| 1.0 - u / 100.0);
        let cool = headroom.map_or(0.0, |h| f64::from(h.clamp(0, 50)) / 50.0);
        candidates.push(api::PickCandidate {
            index: device.index,
            uuid: device.uuid.clone(),
            fits,
            rank: 0,
            score: free_frac + idle + cool,
            reasons,
            free_memory_bytes: free,
            utilization_pct: utilization,
            headroom_c: headroom,
            processes,
            allocations,
            lease,
        });
    }
    candidates.sort_by(|a, b| {
        b.fits
            .cmp(&a.fits)
            .then(b.score.total_cmp(&a.score))
            .then(a.index.cmp(&b.index))
    });
    for (i, c) in candidates.iter_mut().enumerate() {
        c.rank = u32::try_from(i + 1).unwrap_or(u32::MAX);
    }
    let fitting: Vec<&api::PickCandidate> = candidates.iter().filter(|c| c.fits).collect();
    let want = usize::try_from(count).unwrap_or(usize::MAX);
    let satisfied = fitting.len() >= want;
    let (picked, cuda, shortfall) = if satisfied {
        let chosen = &fitting[..want];
        (
            chosen.iter().map(|c| c.index).collect(),
            chosen
                .iter()
                .map(|c| c.uuid.as_str())
                .collect::<Vec<_>>()
                .join(","),
            String::new(),
        )
    } else {
        let ruled_out: Vec<String> = candidates
            .iter()
            .filter(|c| !c.fits)
            .map(|c| {
                let failed: Vec<String> = c
                    .reasons
                    .iter()
                    .filter(|r| !r.ok)
                    .map(|r| format!("{}: {}", r.criterion, r.detail))
                    .collect();
                format!("GPU {} ({})", c.index, failed.join("; "))
            })
            .collect();
        (
            Vec::new(),
            String::new(),
            format!(
                "{} of {count} wanted fit; ruled out: {}",
                fitting.len(),
                if ruled_out.is_empty() {
                    "nothing (the host has too few GPUs)".to_owned()
                } else {
                    ruled_out.join(", ")
                }
            ),
        )
    };
    Ok(api::PickGpusResponse {
        candidates,
        picked,
        cuda_visible_devices: cuda,
        satisfied,
        shortfall,
        leases: Vec::new(),
    })
}
