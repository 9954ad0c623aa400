//! The `gpuwatch.v1.GpuWatch` gRPC service.
//!
//! The service owns nothing: it holds handles to the hub (telemetry), the
//! event log, and the control plane's request channel. Reads are answered
//! from memory; streams are built from the hub's broadcast with per-
//! subscriber filtering, decimation and gap reporting; control requests are
//! validated here for shape and forwarded to the control plane, which owns
//! every write to a GPU.
//!
//! Who may call what is decided before a request gets here, by the one
//! authorization table in [`crate::authz`]; control handlers take the
//! authenticated caller (the actor of their audit events) from the
//! request's extensions, where that layer put it.

use std::{collections::VecDeque, pin::Pin, sync::Arc, sync::atomic::Ordering, time::SystemTime};

use futures_util::{Stream, StreamExt};
use prost::Message;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    api::{
        self, EventsCaughtUp, Frame, Gap, GapReason, GetPolicyRequest, GetPolicyResponse,
        GetSnapshotRequest, GetSnapshotResponse, HostInfo, LeaseGpusRequest, ListDevicesRequest,
        ListDevicesResponse, ListLeasesRequest, ListLeasesResponse, PickGpusRequest,
        PickGpusResponse, ReleaseLeaseRequest, ReleaseLeaseResponse, RenewLeaseRequest,
        RenewLeaseResponse, ResetClocksRequest, ResetClocksResponse, SetPowerBudgetRequest,
        SetPowerBudgetResponse, SetPowerLimitRequest, SetPowerLimitResponse, SetThresholdRequest,
        SetThresholdResponse, WatchEventsRequest, WatchEventsResponse, WatchRequest, WatchResponse,
        WatchStart, gpu_watch_server::GpuWatch, watch_events_response, watch_response,
    },
    attribution::tracker::Tracker,
    auth::Role,
    authz,
    backend::HostFacts,
    control::ControlHandle,
    control_status,
    events::EventLog,
    hub::Hub,
    leases::Leases,
    limits::{StreamLimiter, StreamPermit},
    selector::{self, Empty},
    throttle,
    tick::TickFrame,
    watch_frames::{Shared, SharedFrames, WatchItem},
    wire,
};

/// Longest Watch interval accepted.
pub const MAX_WATCH_INTERVAL_MS: u32 = 3_600_000;
/// Most event kinds one WatchEvents filter may list.
pub const MAX_EVENT_KINDS: usize = 64;

/// The service.
#[derive(Debug, Clone)]
pub struct GpuWatchService {
    hub: Arc<Hub>,
    events: Arc<EventLog>,
    control: ControlHandle,
    streams: Arc<StreamLimiter>,
    host: Arc<HostInfo>,
    shutdown: CancellationToken,
    attribution: Option<Tracker>,
    leases: Arc<Leases>,
    history: HistoryParts,
}

/// The history store (None: no state directory, or history off) and the
/// limits on one answer; shared by GetHistory and `/api/v1/history`.
#[derive(Debug, Clone)]
pub struct HistoryParts {
    pub store: Option<crate::history::Store>,
    pub limits: crate::history::Limits,
}

/// Most events one history answer carries (the newest).
pub const MAX_HISTORY_EVENTS: usize = 2000;
/// The window GetHistory answers when `since` is absent.
pub const DEFAULT_HISTORY_WINDOW_MS: u64 = 3_600_000;

/// Answers a GetHistory request from the store, the hub's ring and the
/// event log. Blocking (disk reads): call from a blocking thread.
pub fn answer_history(
    hub: &Hub,
    events: &EventLog,
    history: &HistoryParts,
    req: &api::GetHistoryRequest,
) -> Result<api::GetHistoryResponse, Status> {
    answer_history_wire(hub, events, history, req).map(crate::history::WireAnswer::into_response)
}

/// [`answer_history`], columns kept in their wire encoding (what the
/// GetHistory route sends; see [`crate::watch_wire`]).
pub fn answer_history_wire(
    hub: &Hub,
    events: &EventLog,
    history: &HistoryParts,
    req: &api::GetHistoryRequest,
) -> Result<crate::history::WireAnswer, Status> {
    let devices = hub.devices();
    let picked = selector::resolve(&req.gpus, &devices, Empty::MeansAll)?;
    let gpus: Vec<(u32, String)> = picked
        .into_iter()
        .map(|i| (devices[i].index, devices[i].uuid.clone()))
        .collect();
    let fields = crate::history::resolve_fields(&req.fields).map_err(Status::invalid_argument)?;
    let now = SystemTime::now();
    let now_ms = crate::history::unix_ms(now);
    let to_ms = |t: &prost_types::Timestamp, what: &str| -> Result<u64, Status> {
        SystemTime::try_from(*t)
            .ok()
            .map(crate::history::unix_ms)
            .filter(|&ms| ms > 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("{what} is not a valid time after 1970"))
            })
    };
    let until_ms = match &req.until {
        Some(t) => to_ms(t, "until")?.min(now_ms),
        None => now_ms,
    };
    let since_ms = match &req.since {
        Some(t) => to_ms(t, "since")?,
        None => until_ms.saturating_sub(DEFAULT_HISTORY_WINDOW_MS),
    };
    if since_ms >= until_ms {
        return Err(Status::invalid_argument(
            "since must be before until (and before now)",
        ));
    }
    let raw = hub.ring();
    let source = crate::history::Source {
        store: history.store.as_ref(),
        raw: &raw,
        sampler_interval_ms: u64::try_from(hub.sampler_interval().as_millis()).unwrap_or(u64::MAX),
        started_ms: crate::history::unix_ms(hub.started()),
        now_ms,
    };
    let query = crate::history::Query {
        gpus,
        fields,
        since_ms,
        until_ms,
        step_ms: u64::from(req.step_ms),
        columnar: req.columnar,
    };
    let mut answer =
        crate::history::query_wire(&source, &query, history.limits).map_err(|e| match e {
            crate::history::QueryError::Invalid(m) => Status::invalid_argument(m),
            crate::history::QueryError::TooLarge(m) => Status::resource_exhausted(m),
            crate::history::QueryError::Store(e) => Status::internal(e.to_string()),
        })?;
    let uuids: Vec<&str> = answer
        .response
        .gpus
        .iter()
        .map(|g| g.uuid.as_str())
        .collect();
    let in_window = |e: &api::Event| {
        e.time
            .and_then(|t| SystemTime::try_from(t).ok())
            .map(crate::history::unix_ms)
            .is_some_and(|t| t >= since_ms && t < until_ms)
            && e.gpu_uuid.as_deref().is_none_or(|u| uuids.contains(&u))
    };
    let mut picked_events: Vec<api::Event> = events
        .recent(usize::MAX)
        .iter()
        .filter(|e| in_window(e))
        .map(|e| (**e).clone())
        .collect();
    let skip = picked_events.len().saturating_sub(MAX_HISTORY_EVENTS);
    picked_events.drain(..skip);
    answer.response.events = picked_events;
    Ok(answer)
}

/// What the service is built from.
#[derive(Debug)]
pub struct ServiceParts {
    pub hub: Arc<Hub>,
    pub events: Arc<EventLog>,
    pub control: ControlHandle,
    pub streams: Arc<StreamLimiter>,
    pub shutdown: CancellationToken,
    /// Who uses each GPU (for the attribution status in ListDevices).
    pub attribution: Option<Tracker>,
    /// The lease book and picker.
    pub leases: Arc<Leases>,
    pub history: HistoryParts,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The messages of one Watch stream, as `open_watch` produces them.
pub type WatchItemStream = BoxStream<WatchItem>;

impl GpuWatchService {
    pub fn new(parts: ServiceParts, facts: &HostFacts) -> Self {
        let ServiceParts {
            hub,
            events,
            control,
            streams,
            shutdown,
            attribution,
            leases,
            history,
        } = parts;
        let hostname = hostname();
        let host = HostInfo {
            hostname,
            backend: facts.backend.to_owned(),
            driver_version: facts.driver_version.clone(),
            nvml_version: facts.nvml_version.clone(),
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            started: Some(hub.started().into()),
            sampler_interval_ms: duration_ms(hub.sampler_interval()),
            slow_interval_ms: duration_ms(hub.slow_interval()),
            history_frames: u32::try_from(hub.history_capacity()).unwrap_or(u32::MAX),
            attribution: None,
        };
        Self {
            hub,
            events,
            control,
            streams,
            host: Arc::new(host),
            shutdown,
            attribution,
            leases,
            history,
        }
    }

    /// A place for one more stream from this request's connection.
    fn stream_permit<T>(&self, request: &Request<T>) -> Result<StreamPermit, Status> {
        self.streams
            .acquire(crate::auth::peer_in(request.extensions()).or_else(|| request.remote_addr()))
    }

    /// Devices with their current policy, health and power limits merged in.
    fn devices_with_policy(&self) -> Vec<api::DeviceInfo> {
        let policies = self.hub.policies();
        let latest = self.hub.latest();
        let leases = self.leases.live();
        self.hub
            .devices()
            .iter()
            .map(|d| {
                let mut d = d.clone();
                d.policy = policies.iter().find(|p| p.index == d.index).cloned();
                d.lease = leases.get(&d.uuid).cloned();
                if let Some(sample) = latest
                    .as_ref()
                    .and_then(|f| f.samples.iter().find(|s| s.index == d.index))
                {
                    d.health = sample.health;
                    if let Some(limits) = d.power_limits.as_mut() {
                        limits.current_mw = sample.power_limit_mw;
                        limits.enforced_mw = sample.enforced_power_limit_mw;
                    }
                }
                d
            })
            .collect()
    }

    /// GPU indices picked by `selectors` (empty = all).
    fn pick_indices(
        &self,
        selectors: &[api::GpuSelector],
        empty: Empty,
    ) -> Result<Vec<u32>, Status> {
        let devices = self.hub.devices();
        let picked = selector::resolve(selectors, &devices, empty)?;
        Ok(picked.into_iter().map(|i| devices[i].index).collect())
    }

    /// Opens a Watch stream: validates the request, takes a stream permit,
    /// and returns the stream's messages. With `shared`, frames for
    /// subscribers of every GPU come out encoded once per tick (see
    /// [`crate::watch_frames`]).
    pub fn open_watch(
        &self,
        request: Request<WatchRequest>,
        shared: Option<Arc<SharedFrames>>,
    ) -> Result<WatchItemStream, Status> {
        authz::caller(&request, Role::Read)?;
        let permit = self.stream_permit(&request)?;
        let req = request.into_inner();
        let all = req.gpus.is_empty();
        let indices = self.pick_indices(&req.gpus, Empty::MeansAll)?;
        let sampler_ms = duration_ms(self.hub.sampler_interval()).max(1);
        let interval_ms = match req.interval_ms {
            0 => sampler_ms,
            ms if ms < sampler_ms => {
                return Err(Status::invalid_argument(format!(
                    "interval_ms {ms} is below the sampler's interval; the minimum is {sampler_ms} ms (0 means the sampler's interval)"
                )));
            }
            ms if ms > MAX_WATCH_INTERVAL_MS => {
                return Err(Status::invalid_argument(format!(
                    "interval_ms {ms} is too long; the maximum is {MAX_WATCH_INTERVAL_MS} ms"
                )));
            }
            ms => ms,
        };
        let stride = u64::from((interval_ms + sampler_ms / 2) / sampler_ms).max(1);
        let filter = (!all).then_some(indices.clone());
        let sub = self.hub.subscribe(req.resume_after_seq);
        let latest_seq = sub.latest.as_ref().map_or(0, |f| f.seq());
        // A resume point newer than anything published (e.g. the clock went
        // back across a restart) is treated as a fresh subscription.
        let resume = req.resume_after_seq.filter(|&after| after <= latest_seq);
        let devices = self
            .devices_with_policy()
            .into_iter()
            .filter(|d| indices.contains(&d.index))
            .collect();
        let mut queue = VecDeque::new();
        let mut last_delivered = None;
        let current = match resume {
            None => sub.latest.as_ref().map(|f| {
                last_delivered = Some(f.seq());
                filter_frame(f, filter.as_deref())
            }),
            Some(_) => None,
        };
        queue.push_back(Pending::Message(watch_response::Message::Start(
            WatchStart {
                sampler_interval_ms: sampler_ms,
                interval_ms: u32::try_from(stride)
                    .unwrap_or(u32::MAX)
                    .saturating_mul(sampler_ms),
                stride: u32::try_from(stride).unwrap_or(u32::MAX),
                server_started: Some(self.hub.started().into()),
                oldest_seq: sub.oldest_seq,
                latest_seq,
                devices,
                current,
            },
        )));
        if let Some(after) = resume {
            last_delivered = Some(after);
            let first_kept = sub.replay.first().map_or(latest_seq + 1, |f| f.seq());
            if after + 1 < first_kept {
                let restarted = after < self.hub.first_seq();
                let counted_from = if restarted {
                    self.hub.first_seq()
                } else {
                    after + 1
                };
                if let Some(history) = self.history_for_resume(after, first_kept, &indices) {
                    queue.push_back(Pending::Message(watch_response::Message::History(history)));
                }
                queue.push_back(Pending::Message(watch_response::Message::Gap(Gap {
                    first_seq: after + 1,
                    last_seq: first_kept - 1,
                    reason: GapReason::NotInHistory as i32,
                    missed: first_kept.saturating_sub(counted_from) / stride,
                    restarted,
                })));
                last_delivered = Some(first_kept.saturating_sub(stride));
            }
            for frame in sub.replay {
                if last_delivered.is_some_and(|last| frame.seq() < last.saturating_add(stride)) {
                    continue;
                }
                last_delivered = Some(frame.seq());
                queue.push_back(Pending::Frame(frame));
            }
        }
        let state = WatchState {
            queue,
            live: sub.live,
            filter,
            shared,
            stride,
            last_delivered,
            lagged: 0,
            strided: false,
            shutdown: self.shutdown.clone(),
            _guard: SubscriberGuard::new(self.hub.clone(), Gauge::Watch, permit),
        };
        Ok(Box::pin(futures_util::stream::unfold(
            state,
            WatchState::next,
        )))
    }
}

impl GpuWatchService {
    /// Answers GetSnapshot from the latest tick. With `shared`, an answer
    /// for every GPU (no selector) comes from bytes encoded once per tick
    /// and millisecond: every caller in that millisecond gets the same
    /// ages, to the millisecond, and the same bytes.
    pub fn snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
        shared: Option<&SharedSnapshots>,
    ) -> Result<Shared<GetSnapshotResponse>, Status> {
        authz::caller(&request, Role::Read)?;
        let selectors = &request.get_ref().gpus;
        let indices = if selectors.is_empty() {
            None
        } else {
            Some(self.pick_indices(selectors, Empty::MeansAll)?)
        };
        let Some(latest) = self.hub.latest_tick() else {
            return Err(Status::unavailable(
                "no sample yet: the sampler has not completed its first tick",
            ));
        };
        let now = SystemTime::now();
        let answer = || {
            let mut frame = match &indices {
                None => latest.whole(),
                Some(indices) => latest.whole_filtered(|i| indices.contains(&i)),
            };
            for s in &mut frame.samples {
                if let Some(t) = s.time.and_then(|t| SystemTime::try_from(t).ok()) {
                    s.age_ms = wire::age_ms(t, now);
                }
            }
            GetSnapshotResponse {
                seq: frame.seq,
                time: frame.time,
                samples: frame.samples,
            }
        };
        Ok(match (shared, &indices) {
            (Some(cache), None) => Shared::Encoded(cache.encoded(
                latest.seq(),
                crate::history::unix_ms(now),
                || {
                    let answer = answer();
                    crate::watch_frames::framed(answer.encoded_len(), |buf| answer.encode_raw(buf))
                },
            )),
            _ => Shared::Message(answer()),
        })
    }
}

/// The newest GetSnapshot answer for every GPU, encoded, with the tick and
/// the millisecond it was made in.
#[derive(Debug, Default)]
pub struct SharedSnapshots {
    newest: std::sync::Mutex<Option<(u64, u64, bytes::Bytes)>>,
}

impl SharedSnapshots {
    /// The answer for tick `seq` at `now_ms`: the cached one when it was
    /// made for both, else `encode`'s (cached if newer).
    fn encoded(
        &self,
        seq: u64,
        now_ms: u64,
        encode: impl FnOnce() -> bytes::Bytes,
    ) -> bytes::Bytes {
        use std::sync::PoisonError;
        if let Some((s, ms, bytes)) = self
            .newest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            && *s == seq
            && *ms == now_ms
        {
            return bytes.clone();
        }
        let bytes = encode();
        let mut newest = self.newest.lock().unwrap_or_else(PoisonError::into_inner);
        if newest
            .as_ref()
            .is_none_or(|(s, ms, _)| (seq, now_ms) > (*s, *ms))
        {
            *newest = Some((seq, now_ms, bytes.clone()));
        }
        bytes
    }
}

impl GpuWatchService {
    /// GetHistory as the network gets it: the answer encoded and framed for
    /// gRPC (see [`crate::watch_frames::framed`]), its columns
    /// written straight from the store's buckets into their wire form
    /// ([`crate::history::WireAnswer`]). The query and the encoding run on
    /// a blocking thread, off the runtime's workers.
    pub async fn history_encoded(
        &self,
        request: Request<api::GetHistoryRequest>,
    ) -> Result<bytes::Bytes, Status> {
        authz::caller(&request, Role::Read)?;
        let (hub, events, history) = (self.hub.clone(), self.events.clone(), self.history.clone());
        let req = request.into_inner();
        tokio::task::spawn_blocking(move || {
            answer_history_wire(&hub, &events, &history, &req).map(|a| {
                // A large answer's release trims the allocator (its
                // pages would otherwise stay with the daemon).
                crate::memory::answer_bytes(crate::watch_frames::framed_buf(0, |buf| {
                    a.encode_into(buf)
                }))
            })
        })
        .await
        .map_err(|e| Status::internal(format!("history query failed: {e}")))?
    }

    /// The history store's 1 s points between the tick numbered `after`
    /// and the ring's first kept tick, for a resume older than the ring.
    /// Ticks are numbered from their run's start in Unix ms, one per
    /// sampler interval, so a seq's time is its run's start plus its tick
    /// count times the interval (the current interval: approximate for a
    /// run that used another). None without a store or over the limits.
    fn history_for_resume(
        &self,
        after: u64,
        first_kept: u64,
        indices: &[u32],
    ) -> Option<api::GetHistoryResponse> {
        let store = self.history.store.as_ref()?;
        let interval_ms =
            u64::try_from(self.hub.sampler_interval().as_millis()).unwrap_or(u64::MAX);
        let run_start = store.run_start_for_seq(after, self.hub.first_seq())?;
        let since_ms = run_start + (after + 1 - run_start).saturating_mul(interval_ms);
        let until_ms = match self.hub.ring().first() {
            Some(f) if f.seq == first_kept => f
                .time
                .and_then(|t| SystemTime::try_from(t).ok())
                .map(crate::history::unix_ms)?,
            _ => crate::history::unix_ms(SystemTime::now()),
        };
        if until_ms <= since_ms {
            return None;
        }
        let devices = self.hub.devices();
        let gpus = devices
            .iter()
            .filter(|d| indices.contains(&d.index))
            .map(|d| (d.index, d.uuid.clone()))
            .collect();
        let raw = Vec::new();
        let source = crate::history::Source {
            store: Some(store),
            raw: &raw,
            sampler_interval_ms: interval_ms,
            started_ms: crate::history::unix_ms(self.hub.started()),
            now_ms: crate::history::unix_ms(SystemTime::now()),
        };
        let query = crate::history::Query {
            gpus,
            fields: crate::history::resolve_fields(&[]).ok()?,
            since_ms,
            until_ms,
            step_ms: store
                .tiers()
                .first()
                .map_or(1000, |t| u64::try_from(t.step.as_millis()).unwrap_or(1000)),
            columnar: false,
        };
        crate::history::query(&source, &query, self.history.limits).ok()
    }
}

fn duration_ms(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// This host's name (empty when it cannot be read).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

/// The whole samples of `tick` for `indices` (None = all).
fn filter_frame(tick: &TickFrame, indices: Option<&[u32]>) -> Frame {
    match indices {
        None => tick.whole(),
        Some(indices) => tick.whole_filtered(|i| indices.contains(&i)),
    }
}

#[tonic::async_trait]
impl GpuWatch for GpuWatchService {
    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        authz::caller(&request, Role::Read)?;
        let devices = self.devices_with_policy();
        let picked = selector::resolve(&request.get_ref().gpus, &devices, Empty::MeansAll)?;
        let devices = picked.into_iter().map(|i| devices[i].clone()).collect();
        let mut host = (*self.host).clone();
        host.attribution = self.attribution.as_ref().map(|t| t.view().status.clone());
        Ok(Response::new(ListDevicesResponse {
            host: Some(host),
            devices,
            throttle_reasons: throttle::catalog(),
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        // The daemon serves GetSnapshot through `watch_wire`'s GetSnapshot route
        // (answers for every GPU encoded once per millisecond); this path
        // serves in-process callers of the trait.
        self.snapshot(request, None)?
            .into_message()
            .map(Response::new)
    }

    type WatchStream = BoxStream<WatchResponse>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // The daemon serves Watch through `watch_wire`'s Watch route (frames
        // encoded once and shared); this path, without the shared encoding,
        // serves in-process callers of the trait.
        let items = self.open_watch(request, None)?;
        Ok(Response::new(Box::pin(
            items.map(|item| item.and_then(WatchItem::into_message)),
        )))
    }

    type WatchEventsStream = BoxStream<WatchEventsResponse>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        authz::caller(&request, Role::Read)?;
        let permit = self.stream_permit(&request)?;
        let req = request.into_inner();
        let filter = if req.gpus.is_empty() {
            None
        } else {
            Some(self.pick_indices(&req.gpus, Empty::MeansAll)?)
        };
        if req.kinds.len() > MAX_EVENT_KINDS {
            return Err(Status::invalid_argument(format!(
                "kinds: {} entries; at most {MAX_EVENT_KINDS} are allowed",
                req.kinds.len()
            )));
        }
        for (i, kind) in req.kinds.iter().enumerate() {
            match api::EventKind::try_from(*kind) {
                Ok(api::EventKind::Unspecified) | Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "kinds[{i}]: {kind} is not an event kind; allowed: 1 to {}",
                        api::EventKind::CeilingChanged as i32
                    )));
                }
                Ok(_) => {}
            }
        }
        // A client's `since_seq` beyond the newest event (u64::MAX, or a
        // number from before the log was reset) means "caught up": clamped
        // to the newest seq before it reaches any arithmetic, so it is never
        // a gap and never overflows (`since + 1`).
        let since_seq = req
            .since_seq
            .map(|since| since.min(self.events.latest_seq()));
        let sub = self.events.subscribe(since_seq);
        let mut queue = VecDeque::new();
        if let Some((first, last)) = sub.missing {
            queue.push_back(watch_events_response::Message::Gap(Gap {
                first_seq: first,
                last_seq: last,
                reason: GapReason::NotInHistory as i32,
                missed: last.saturating_sub(first).saturating_add(1),
                restarted: false,
            }));
        }
        let filter = EventFilter {
            gpus: filter,
            kinds: req.kinds,
        };
        let mut last_seq = since_seq.map_or(sub.latest_seq, |s| s.min(sub.latest_seq));
        for event in sub.replay {
            last_seq = event.seq;
            if filter.accepts(&event) {
                queue.push_back(watch_events_response::Message::Event((*event).clone()));
            }
        }
        queue.push_back(watch_events_response::Message::CaughtUp(EventsCaughtUp {
            latest_seq: sub.latest_seq,
        }));
        let state = EventsState {
            queue,
            live: sub.live,
            filter,
            last_seq,
            shutdown: self.shutdown.clone(),
            _guard: SubscriberGuard::new(self.hub.clone(), Gauge::Events, permit),
        };
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            state,
            EventsState::next,
        ))))
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        authz::caller(&request, Role::Read)?;
        let indices = self.pick_indices(&request.get_ref().gpus, Empty::MeansAll)?;
        let policies = self
            .hub
            .policies()
            .iter()
            .filter(|p| indices.contains(&p.index))
            .cloned()
            .collect();
        Ok(Response::new(GetPolicyResponse {
            policies,
            power_budget: self.hub.power_budget(),
        }))
    }

    async fn get_history(
        &self,
        request: Request<api::GetHistoryRequest>,
    ) -> Result<Response<api::GetHistoryResponse>, Status> {
        // Callers of the trait; the network is served by
        // `GpuWatchService::history_encoded` (the GetHistory route).
        authz::caller(&request, Role::Read)?;
        let (hub, events, history) = (self.hub.clone(), self.events.clone(), self.history.clone());
        let req = request.into_inner();
        tokio::task::spawn_blocking(move || answer_history(&hub, &events, &history, &req))
            .await
            .map_err(|e| Status::internal(format!("history query failed: {e}")))?
            .map(Response::new)
    }

    async fn set_power_limit(
        &self,
        request: Request<SetPowerLimitRequest>,
    ) -> Result<Response<SetPowerLimitResponse>, Status> {
        let caller = authz::caller(&request, Role::Control)?.clone();
        let req = request.into_inner();
        let indices = self.pick_indices(&req.gpus, Empty::Refused)?;
        let target = req.target.ok_or_else(|| {
            Status::invalid_argument(
                "target: set `watts` (the new limit) or `restore_default: true`",
            )
        })?;
        let target = target.try_into().map_err(|e| control_status::status(&e))?;
        self.control
            .set_power_limit(indices, target, caller)
            .await
            .map(Response::new)
            .map_err(|e| control_status::status(&e))
    }

    async fn reset_clocks(
        &self,
        request: Request<ResetClocksRequest>,
    ) -> Result<Response<ResetClocksResponse>, Status> {
        let caller = authz::caller(&request, Role::Control)?.clone();
        let indices = self.pick_indices(&request.get_ref().gpus, Empty::Refused)?;
        self.control
            .reset_clocks(indices, caller)
            .await
            .map(Response::new)
            .map_err(|e| control_status::status(&e))
    }

    async fn set_threshold(
        &self,
        request: Request<SetThresholdRequest>,
    ) -> Result<Response<SetThresholdResponse>, Status> {
        let caller = authz::caller(&request, Role::Control)?.clone();
        let req = request.into_inner();
        let indices = self.pick_indices(&req.gpus, Empty::Refused)?;
        let target = req.target.ok_or_else(|| {
            Status::invalid_argument(
                "target: set `celsius` (the new threshold) or `restore_default: true`",
            )
        })?;
        let target = target.try_into().map_err(|e| control_status::status(&e))?;
        self.control
            .set_threshold(indices, target, req.hysteresis_c, caller)
            .await
            .map(Response::new)
            .map_err(|e| control_status::status(&e))
    }

    async fn set_power_budget(
        &self,
        request: Request<SetPowerBudgetRequest>,
    ) -> Result<Response<SetPowerBudgetResponse>, Status> {
        let caller = authz::caller(&request, Role::Control)?.clone();
        let target = request.into_inner().target.ok_or_else(|| {
            Status::invalid_argument(
                "target: set `watts` (the host-wide budget) or `restore_default: true` (no budget)",
            )
        })?;
        let target = target.try_into().map_err(|e| control_status::status(&e))?;
        self.control
            .set_power_budget(target, caller)
            .await
            .map(Response::new)
            .map_err(|e| control_status::status(&e))
    }

    async fn pick_gpus(
        &self,
        request: Request<PickGpusRequest>,
    ) -> Result<Response<PickGpusResponse>, Status> {
        authz::caller(&request, Role::Read)?;
        let criteria = request.into_inner().criteria.unwrap_or_default();
        self.leases.pick(&criteria).map(Response::new)
    }

    async fn lease_gpus(
        &self,
        request: Request<LeaseGpusRequest>,
    ) -> Result<Response<PickGpusResponse>, Status> {
        let caller = authz::caller(&request, Role::Lease)?.clone();
        self.leases
            .lease(request.get_ref(), &caller)
            .await
            .map(Response::new)
    }

    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseResponse>, Status> {
        let caller = authz::caller(&request, Role::Lease)?.clone();
        self.leases
            .renew(request.get_ref(), &caller)
            .await
            .map(Response::new)
    }

    async fn release_lease(
        &self,
        request: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        let caller = authz::caller(&request, Role::Lease)?.clone();
        self.leases
            .release(request.get_ref(), &caller)
            .await
            .map(Response::new)
    }

    async fn list_leases(
        &self,
        request: Request<ListLeasesRequest>,
    ) -> Result<Response<ListLeasesResponse>, Status> {
        authz::caller(&request, Role::Read)?;
        let mut leases: Vec<_> = self.leases.live().into_values().collect();
        leases.sort_by_key(|l| l.index);
        Ok(Response::new(ListLeasesResponse { leases }))
    }
}

/// Which gauge a subscriber counts in.
#[derive(Debug, Clone, Copy)]
enum Gauge {
    Watch,
    Events,
}

/// Counts a subscriber, and holds its place under the stream limits, for
/// as long as its stream lives.
#[derive(Debug)]
struct SubscriberGuard {
    hub: Arc<Hub>,
    gauge: Gauge,
    _permit: StreamPermit,
}

impl SubscriberGuard {
    fn new(hub: Arc<Hub>, gauge: Gauge, permit: StreamPermit) -> Self {
        Self::counter(&hub, gauge).fetch_add(1, Ordering::Relaxed);
        Self {
            hub,
            gauge,
            _permit: permit,
        }
    }

    fn counter(hub: &Hub, gauge: Gauge) -> &std::sync::atomic::AtomicUsize {
        match gauge {
            Gauge::Watch => &hub.stats.watch_subscribers,
            Gauge::Events => &hub.stats.event_subscribers,
        }
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        Self::counter(&self.hub, self.gauge).fetch_sub(1, Ordering::Relaxed);
    }
}

enum Pending {
    Message(watch_response::Message),
    Frame(Arc<TickFrame>),
}

struct WatchState {
    queue: VecDeque<Pending>,
    live: broadcast::Receiver<Arc<TickFrame>>,
    filter: Option<Vec<u32>>,
    /// Frames encoded once for every subscriber of all GPUs.
    shared: Option<Arc<SharedFrames>>,
    stride: u64,
    last_delivered: Option<u64>,
    /// Ticks the broadcast dropped for us since the last delivery.
    lagged: u64,
    /// Whether `live` carries only this subscriber's ticks (every
    /// `stride`-th, in its phase) rather than every tick.
    strided: bool,
    shutdown: CancellationToken,
    _guard: SubscriberGuard,
}

impl WatchState {
    fn message(&self, pending: Pending) -> WatchItem {
        let message = match pending {
            Pending::Message(m) => m,
            Pending::Frame(f) => match (&self.shared, &self.filter) {
                (Some(shared), None) => return WatchItem::Encoded(shared.encoded(&f)),
                _ => watch_response::Message::Frame(filter_frame(&f, self.filter.as_deref())),
            },
        };
        WatchItem::Message(WatchResponse {
            message: Some(message),
        })
    }

    /// A decimated subscriber that has just delivered tick `seq` and is
    /// caught up moves to the channel of its own ticks (`seq` plus
    /// multiples of the stride), so it is no longer woken for the others.
    /// Ticks published while it moved are taken from the old channel first.
    fn move_to_strided(&mut self, seq: u64) {
        if self.stride < 2 || self.strided || !self.live.is_empty() {
            return;
        }
        let strided = self
            ._guard
            .hub
            .subscribe_strided(self.stride, seq % self.stride);
        let old = std::mem::replace(&mut self.live, strided);
        self.strided = true;
        let mut old = old;
        loop {
            match old.try_recv() {
                Ok(frame) if frame.seq() % self.stride == seq % self.stride => {
                    if self.last_delivered.is_none_or(|last| frame.seq() > last) {
                        self.last_delivered = Some(frame.seq());
                        self.queue.push_back(Pending::Frame(frame));
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    self.lagged = self.lagged.saturating_add(n);
                }
                Err(_) => break,
            }
        }
    }

    async fn next(mut self) -> Option<(Result<WatchItem, Status>, Self)> {
        loop {
            if let Some(pending) = self.queue.pop_front() {
                let msg = self.message(pending);
                return Some((Ok(msg), self));
            }
            let received = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return None,
                r = self.live.recv() => r,
            };
            match received {
                Ok(frame) => {
                    let seq = frame.seq();
                    if self.lagged > 0 {
                        let first = self
                            .last_delivered
                            .map_or(seq.saturating_sub(self.lagged), |l| l.saturating_add(1));
                        let missed = self.lagged;
                        self.lagged = 0;
                        self.last_delivered = Some(seq);
                        self.queue
                            .push_back(Pending::Message(watch_response::Message::Gap(Gap {
                                first_seq: first,
                                last_seq: seq.saturating_sub(1),
                                reason: GapReason::SlowSubscriber as i32,
                                missed: (missed / self.stride).max(1),
                                restarted: false,
                            })));
                        self.queue.push_back(Pending::Frame(frame));
                        continue;
                    }
                    if self
                        .last_delivered
                        .is_some_and(|last| seq < last.saturating_add(self.stride))
                    {
                        continue;
                    }
                    self.last_delivered = Some(seq);
                    let msg = self.message(Pending::Frame(frame));
                    self.move_to_strided(seq);
                    return Some((Ok(msg), self));
                }
                Err(RecvError::Lagged(n)) => {
                    // Counted in ticks: a strided channel's are `stride` apart.
                    let ticks = if self.strided {
                        n.saturating_mul(self.stride)
                    } else {
                        n
                    };
                    self.lagged = self.lagged.saturating_add(ticks);
                    self._guard
                        .hub
                        .stats
                        .frames_dropped
                        .fetch_add(ticks, Ordering::Relaxed);
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

struct EventFilter {
    gpus: Option<Vec<u32>>,
    kinds: Vec<i32>,
}

impl EventFilter {
    fn accepts(&self, e: &api::Event) -> bool {
        let gpu_ok = match (&self.gpus, e.gpu_index) {
            (Some(gpus), Some(i)) => gpus.contains(&i),
            _ => true,
        };
        gpu_ok && (self.kinds.is_empty() || self.kinds.contains(&e.kind))
    }
}

struct EventsState {
    queue: VecDeque<watch_events_response::Message>,
    live: broadcast::Receiver<Arc<api::Event>>,
    filter: EventFilter,
    last_seq: u64,
    shutdown: CancellationToken,
    _guard: SubscriberGuard,
}

impl EventsState {
    async fn next(mut self) -> Option<(Result<WatchEventsResponse, Status>, Self)> {
        loop {
            if let Some(message) = self.queue.pop_front() {
                return Some((
                    Ok(WatchEventsResponse {
                        message: Some(message),
                    }),
                    self,
                ));
            }
            let received = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return None,
                r = self.live.recv() => r,
            };
            match received {
                Ok(event) => {
                    if event.seq <= self.last_seq {
                        continue;
                    }
                    self.last_seq = event.seq;
                    if self.filter.accepts(&event) {
                        let message = watch_events_response::Message::Event((*event).clone());
                        return Some((
                            Ok(WatchEventsResponse {
                                message: Some(message),
                            }),
                            self,
                        ));
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    let first = self.last_seq.saturating_add(1);
                    self.last_seq = self.last_seq.saturating_add(n);
                    self.queue
                        .push_back(watch_events_response::Message::Gap(Gap {
                            first_seq: first,
                            last_seq: self.last_seq,
                            reason: GapReason::SlowSubscriber as i32,
                            missed: n,
                            restarted: false,
                        }));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_snapshot_is_made_once_per_tick_and_millisecond() {
        let shared = SharedSnapshots::default();
        let mut made = 0;
        let mut make = |b: u8| {
            made += 1;
            bytes::Bytes::from(vec![b])
        };
        let a = shared.encoded(5, 1000, || make(1));
        let b = shared.encoded(5, 1000, || make(2));
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "the same bytes within a millisecond"
        );
        let c = shared.encoded(5, 1001, || make(3));
        assert_eq!(c.as_ref(), [3], "a new millisecond: new ages, new bytes");
        let d = shared.encoded(6, 1001, || make(4));
        assert_eq!(d.as_ref(), [4], "a new tick: new bytes");
        // A caller whose clock read is older gets its own answer and never
        // evicts the newest.
        assert_eq!(shared.encoded(6, 999, || make(5)).as_ref(), [5]);
        assert_eq!(shared.encoded(6, 1001, || make(6)).as_ptr(), d.as_ptr());
        assert_eq!(made, 4, "only the four answers above were encoded");
    }
}
