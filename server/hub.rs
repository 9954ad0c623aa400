//! The hub: what the sampler last published, and the fan-out to subscribers.
//!
//! The sampler publishes one [`TickFrame`] per tick (the fast frame and
//! each GPU's slow part, shared across ticks: see [`crate::tick`]). The hub
//! keeps the latest tick (every snapshot is served from it, never from a
//! device call; the whole [`Frame`] is built from it once, on first demand),
//! a bounded ring of recent ticks (so a reconnecting subscriber can resume),
//! and a broadcast channel that hands each tick to every live subscriber.
//! The broadcast is bounded too: a subscriber that falls behind loses the
//! oldest frames and is told so — the sampler never waits for anyone.
//!
//! The hub also holds the slowly changing facts published beside the frames:
//! the GPUs' identities and limits, and the governor's policies.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::sync::broadcast;

use crate::{
    api::{DeviceInfo, Frame, GpuPolicy},
    tick::TickFrame,
};

/// What a new subscriber starts from.
#[derive(Debug)]
pub struct Subscription {
    /// Ticks for the subscriber to replay (when resuming), oldest first.
    pub replay: Vec<Arc<TickFrame>>,
    /// The newest tick at subscription time (None before the first tick).
    pub latest: Option<Arc<TickFrame>>,
    /// Oldest seq still in history (0 when empty).
    pub oldest_seq: u64,
    /// Live ticks after `latest`.
    pub live: broadcast::Receiver<Arc<TickFrame>>,
}

/// Counters about the daemon's own cost, exported as metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Watch streams currently open.
    pub watch_subscribers: AtomicUsize,
    /// WatchEvents streams currently open.
    pub event_subscribers: AtomicUsize,
    /// Frames not delivered to slow subscribers, summed over subscribers.
    pub frames_dropped: AtomicU64,
    /// Frames published.
    pub frames_published: AtomicU64,
    /// Duration of the last tick's device reads, in microseconds.
    pub last_sample_duration_us: AtomicU64,
    /// Sum of all ticks' read durations, in microseconds.
    pub sample_duration_us_total: AtomicU64,
    /// Ticks per read-duration bucket (not cumulative); the bounds are
    /// [`SAMPLE_DURATION_BUCKETS_S`], and the last slot counts the rest.
    pub sample_duration_buckets: [AtomicU64; SAMPLE_DURATION_BUCKETS_S.len() + 1],
}

/// Upper bounds, in seconds, of the buckets the tick read durations are
/// counted in: from a simulator's microseconds to a driver call that hangs
/// until the read deadline.
pub const SAMPLE_DURATION_BUCKETS_S: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The tick read durations as a histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationHistogram {
    pub sum_s: f64,
    pub count: u64,
    /// (upper bound in seconds, ticks in that bucket alone — not
    /// cumulative); the last bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
}

impl HubStats {
    /// Records how long one tick's device reads took.
    pub fn record_sample_duration(&self, took: Duration) {
        let took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.last_sample_duration_us
            .store(took_us, Ordering::Relaxed);
        self.sample_duration_us_total
            .fetch_add(took_us, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let slot = SAMPLE_DURATION_BUCKETS_S
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(SAMPLE_DURATION_BUCKETS_S.len());
        if let Some(bucket) = self.sample_duration_buckets.get(slot) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The recorded tick read durations, for the metrics endpoint.
    pub fn sample_duration_histogram(&self) -> DurationHistogram {
        let buckets: Vec<(f64, u64)> = SAMPLE_DURATION_BUCKETS_S
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.sample_duration_buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        DurationHistogram {
            // Micros to seconds; exact below 2^53 us (285 years).
            sum_s: self.sample_duration_us_total.load(Ordering::Relaxed) as f64 / 1e6,
            count: buckets.iter().map(|b| b.1).sum(),
            buckets,
        }
    }
}

/// The sending side of a channel of ticks.
type TickSender = broadcast::Sender<Arc<TickFrame>>;

/// The hub. Shared by the sampler (writer) and every reader.
#[derive(Debug)]
pub struct Hub {
    started: SystemTime,
    first_seq: u64,
    sampler_interval: Duration,
    slow_interval: Duration,
    history_capacity: usize,
    /// The latest tick; read on every snapshot, so kept apart from the ring.
    latest: RwLock<Option<Arc<TickFrame>>>,
    /// The latest tick's whole frame, built on first demand (by seq).
    latest_whole: Mutex<Option<Arc<Frame>>>,
    /// Recent frames, oldest first. Publishing holds this lock while it
    /// sends, so a subscriber that takes the lock sees a consistent cut:
    /// everything up to the ring's end, then the live channel.
    history: Mutex<VecDeque<Arc<TickFrame>>>,
    frames: broadcast::Sender<Arc<TickFrame>>,
    /// Channels that carry every `stride`-th tick only (those whose seq is
    /// `phase` modulo `stride`), keyed by (stride, phase): a subscriber
    /// decimated to 1 s is woken once a second, not every tick.
    strided: Mutex<HashMap<(u64, u64), TickSender>>,
    devices: RwLock<Arc<Vec<DeviceInfo>>>,
    policies: RwLock<Arc<Vec<GpuPolicy>>>,
    /// The node power budget, when one is set (GetPolicy, metrics, the
    /// dashboard).
    power_budget: RwLock<Option<crate::api::PowerBudget>>,
    /// The history writer, offered every frame (never waited for).
    history_sink: std::sync::OnceLock<Arc<crate::history::HistorySink>>,
    pub stats: HubStats,
}

/// Sequence numbers start at the start time in Unix milliseconds, so they
/// keep rising across restarts (as long as ticks come at most every 1 ms).
pub fn first_seq_for(started: SystemTime) -> u64 {
    started
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(1))
        .max(1)
}

/// Frames a subscriber may fall behind by before it loses some.
pub const SUBSCRIBER_BUFFER_FRAMES: usize = 256;

impl Hub {
    pub fn new(
        sampler_interval: Duration,
        slow_interval: Duration,
        history_capacity: usize,
    ) -> Self {
        let (frames, _) = broadcast::channel(SUBSCRIBER_BUFFER_FRAMES);
        let started = SystemTime::now();
        Self {
            started,
            first_seq: first_seq_for(started),
            sampler_interval,
            slow_interval,
            history_capacity: history_capacity.max(1),
            latest: RwLock::new(None),
            latest_whole: Mutex::new(None),
            history: Mutex::new(VecDeque::with_capacity(history_capacity.clamp(1, 4096))),
            frames,
            strided: Mutex::new(HashMap::new()),
            devices: RwLock::new(Arc::new(Vec::new())),
            policies: RwLock::new(Arc::new(Vec::new())),
            power_budget: RwLock::new(None),
            history_sink: std::sync::OnceLock::new(),
            stats: HubStats::default(),
        }
    }

    /// The first seq this run of the daemon publishes: anything lower came
    /// from an earlier run.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    pub fn started(&self) -> SystemTime {
        self.started
    }

    pub fn sampler_interval(&self) -> Duration {
        self.sampler_interval
    }

    pub fn slow_interval(&self) -> Duration {
        self.slow_interval
    }

    pub fn history_capacity(&self) -> usize {
        self.history_capacity
    }

    /// Publishes a whole frame (split into its fast and slow parts).
    pub fn publish(&self, frame: Frame) {
        self.publish_tick(TickFrame::from_whole(frame));
    }

    /// Publishes a tick: latest, history, then every subscriber.
    pub fn publish_tick(&self, tick: TickFrame) {
        let tick = Arc::new(tick);
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        if history.len() == self.history_capacity {
            history.pop_front();
        }
        history.push_back(tick.clone());
        *self.latest.write().unwrap_or_else(PoisonError::into_inner) = Some(tick.clone());
        if let Some(sink) = self.history_sink.get() {
            sink.offer(tick.fast());
        }
        {
            let seq = tick.seq();
            let mut strided = self.strided.lock().unwrap_or_else(PoisonError::into_inner);
            strided.retain(|_, tx| tx.receiver_count() > 0);
            for ((stride, phase), tx) in strided.iter() {
                if seq % stride == *phase {
                    let _ = tx.send(tick.clone());
                }
            }
        }
        // An error only means nobody is subscribed.
        let _ = self.frames.send(tick);
        self.stats.frames_published.fetch_add(1, Ordering::Relaxed);
    }

    /// Feeds every published frame to the history writer from now on.
    pub fn set_history_sink(&self, sink: Arc<crate::history::HistorySink>) {
        let _ = self.history_sink.set(sink);
    }

    /// The history writer's sink, if history is on.
    pub fn history_sink(&self) -> Option<&Arc<crate::history::HistorySink>> {
        self.history_sink.get()
    }

    /// Every tick's fast frame in the ring, oldest first (history's raw
    /// tier: numeric readings only).
    pub fn ring(&self) -> Vec<Arc<Frame>> {
        let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        history.iter().map(|t| t.fast().clone()).collect()
    }

    /// The latest tick, if any has run.
    pub fn latest_tick(&self) -> Option<Arc<TickFrame>> {
        self.latest
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The latest whole frame, if any tick has run: built from the latest
    /// tick by the first caller after each tick, then shared.
    pub fn latest(&self) -> Option<Arc<Frame>> {
        let tick = self.latest_tick()?;
        Some(self.whole(&tick))
    }

    /// `tick` as a whole frame; the newest one built is kept for the next
    /// caller (a resuming subscriber's old ticks never evict it).
    pub fn whole(&self, tick: &TickFrame) -> Arc<Frame> {
        let mut cached = self
            .latest_whole
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(frame) = cached.as_ref()
            && frame.seq == tick.seq()
        {
            return frame.clone();
        }
        let frame = Arc::new(tick.whole());
        if cached.as_ref().is_none_or(|f| f.seq < frame.seq) {
            *cached = Some(frame.clone());
        }
        frame
    }

    /// The fast frames of the newest `n` ticks of the ring, oldest first
    /// (a pick's utilisation window).
    pub fn recent(&self, n: usize) -> Vec<Arc<Frame>> {
        let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = history.len().saturating_sub(n);
        history.iter().skip(skip).map(|t| t.fast().clone()).collect()
    }

    /// Subscribes to live frames; with `resume_after`, also returns the
    /// history frames with a larger seq.
    pub fn subscribe(&self, resume_after: Option<u64>) -> Subscription {
        let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        let live = self.frames.subscribe();
        let replay = match resume_after {
            Some(after) => {
                let start = history.partition_point(|f| f.seq() <= after);
                history.range(start..).cloned().collect()
            }
            None => Vec::new(),
        };
        Subscription {
            replay,
            latest: history.back().cloned(),
            oldest_seq: history.front().map_or(0, |f| f.seq()),
            live,
        }
    }

    /// Live ticks whose seq is `phase` modulo `stride` (`stride` ≥ 2),
    /// published from now on. A decimated subscriber moves to this once
    /// it knows its phase (the seq of a tick it delivered), so it is woken
    /// only for the ticks it sends. A subscriber that falls more than
    /// [`SUBSCRIBER_BUFFER_FRAMES`] of these behind lags as on the main
    /// channel, counted in these ticks.
    pub fn subscribe_strided(&self, stride: u64, phase: u64) -> broadcast::Receiver<Arc<TickFrame>> {
        let stride = stride.max(1);
        self.strided
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((stride, phase % stride))
            .or_insert_with(|| broadcast::channel(SUBSCRIBER_BUFFER_FRAMES).0)
            .subscribe()
    }

    pub fn devices(&self) -> Arc<Vec<DeviceInfo>> {
        self.devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_devices(&self, devices: Vec<DeviceInfo>) {
        *self.devices.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(devices);
    }

    pub fn policies(&self) -> Arc<Vec<GpuPolicy>> {
        self.policies
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn power_budget(&self) -> Option<crate::api::PowerBudget> {
        self.power_budget
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_power_budget(&self, budget: Option<crate::api::PowerBudget>) {
        *self
            .power_budget
            .write()
            .unwrap_or_else(PoisonError::into_inner) = budget;
    }

    pub fn set_policies(&self, policies: Vec<GpuPolicy>) {
        *self
            .policies
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(policies);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Frame {
        Frame {
            seq,
            time: None,
            samples: Vec::new(),
        }
    }

    #[test]
    fn history_is_bounded_and_latest_is_newest() {
        let hub = Hub::new(Duration::from_millis(100), Duration::from_secs(5), 3);
        for seq in 1..=5 {
            hub.publish(frame(seq));
        }
        assert_eq!(hub.latest().map(|f| f.seq), Some(5));
        let sub = hub.subscribe(Some(0));
        let seqs: Vec<_> = sub.replay.iter().map(|f| f.seq()).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(sub.oldest_seq, 3);
    }

    #[test]
    fn resume_replays_only_newer_frames_then_live() {
        let hub = Hub::new(Duration::from_millis(100), Duration::from_secs(5), 10);
        for seq in 1..=4 {
            hub.publish(frame(seq));
        }
        let mut sub = hub.subscribe(Some(2));
        assert_eq!(sub.replay.iter().map(|f| f.seq()).collect::<Vec<_>>(), [3, 4]);
        hub.publish(frame(5));
        assert_eq!(sub.live.try_recv().map(|f| f.seq()).ok(), Some(5));
    }

    #[test]
    fn a_strided_subscriber_gets_only_its_phase() {
        let hub = Hub::new(Duration::from_millis(100), Duration::from_secs(5), 10);
        let mut every_third = hub.subscribe_strided(3, 7);
        let mut other_phase = hub.subscribe_strided(3, 2);
        for seq in 1..=12 {
            hub.publish(frame(seq));
        }
        let mut got = Vec::new();
        while let Ok(t) = every_third.try_recv() {
            got.push(t.seq());
        }
        assert_eq!(got, [1, 4, 7, 10], "7 mod 3 is phase 1");
        assert_eq!(other_phase.try_recv().map(|t| t.seq()).ok(), Some(2));
        drop(every_third);
        drop(other_phase);
        hub.publish(frame(13));
        assert!(
            hub.strided.lock().expect("lock").is_empty(),
            "channels nobody listens to are dropped"
        );
    }

    #[test]
    fn sample_durations_land_in_their_buckets() {
        let stats = HubStats::default();
        stats.record_sample_duration(Duration::from_micros(50));
        stats.record_sample_duration(Duration::from_micros(700));
        stats.record_sample_duration(Duration::from_secs(3));
        let h = stats.sample_duration_histogram();
        assert_eq!(h.count, 3);
        assert!((h.sum_s - 3.00075).abs() < 1e-9, "{}", h.sum_s);
        let at = |bound: f64| h.buckets.iter().find(|b| b.0 == bound).map(|b| b.1);
        assert_eq!(at(0.0001), Some(1));
        assert_eq!(at(0.00025), Some(0));
        assert_eq!(at(0.001), Some(1));
        assert_eq!(at(1.0), Some(0));
        assert_eq!(at(f64::INFINITY), Some(1), "3 s only counts in +Inf");
        assert_eq!(
            stats.last_sample_duration_us.load(Ordering::Relaxed),
            3_000_000
        );
    }

    #[test]
    fn slow_subscriber_lags_instead_of_blocking_the_publisher() {
        let hub = Hub::new(Duration::from_millis(100), Duration::from_secs(5), 10);
        let mut sub = hub.subscribe(None);
        let total = SUBSCRIBER_BUFFER_FRAMES as u64 + 10;
        for seq in 1..=total {
            hub.publish(frame(seq));
        }
        match sub.live.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 10),
            other => panic!("expected lag, got {other:?}"),
        }
        assert_eq!(sub.live.try_recv().map(|f| f.seq()).ok(), Some(11));
    }
}
