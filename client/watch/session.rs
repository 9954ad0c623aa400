//! One host's telemetry stream, kept alive: connect, `Watch`, read frames,
//! and on any failure report it, wait (capped jittered backoff) and resume
//! after the last sequence number seen.
//!
//! The [`SeqTracker`] is the bookkeeping that makes "a gap is shown, never
//! hidden" true: it passes on the daemon's gap messages, drops frames
//! replayed twice, and reports any jump in sequence numbers the daemon did
//! not announce (for example a restarted daemon that had nothing to replay).

use gpuwatch_api::names;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use gpuwatch_api::{DeviceInfo, Frame, Gap, WatchRequest, WatchStart, watch_response};
use tokio::sync::mpsc;

use crate::{
    backoff::{Backoff, BackoffPolicy},
    connect::{Connector, HostFailure},
    hosts::HostSpec,
    record::GapRecord,
};

/// What a host's stream reports to the renderer.
#[derive(Debug, Clone)]
pub enum Update {
    /// The stream is up (again).
    Connected {
        host: usize,
        devices: Vec<DeviceInfo>,
        server_started: Option<prost_types::Timestamp>,
        interval_ms: u32,
        resumed_after_seq: Option<u64>,
    },
    /// One tick's samples.
    Frame { host: usize, frame: Frame },
    /// Samples that will never arrive.
    Gap { host: usize, gap: GapRecord },
    /// A working stream broke (or the first attempt failed).
    Disconnected { host: usize, error: String },
    /// The next attempt is scheduled.
    Reconnecting {
        host: usize,
        error: String,
        retry_in: Duration,
    },
}

/// Connection state of every host, readable without the renderer (for the
/// exit code).
#[derive(Debug)]
pub struct HostStates {
    states: Vec<AtomicU8>,
}

const NEVER: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl HostStates {
    pub fn new(hosts: usize) -> Arc<Self> {
        Arc::new(Self {
            states: (0..hosts).map(|_| AtomicU8::new(NEVER)).collect(),
        })
    }

    pub fn set_up(&self, host: usize) {
        self.set(host, UP);
    }

    pub fn set_down(&self, host: usize) {
        self.set(host, DOWN);
    }

    fn set(&self, host: usize, state: u8) {
        if let Some(s) = self.states.get(host) {
            s.store(state, Ordering::Relaxed);
        }
    }

    /// True when every host's stream is up right now.
    pub fn all_up(&self) -> bool {
        self.states.iter().all(|s| s.load(Ordering::Relaxed) == UP)
    }
}

/// Sequence bookkeeping for one host, across reconnects.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    last_seq: Option<u64>,
    stride: u64,
    server_started: Option<prost_types::Timestamp>,
    /// The daemon restarted since the last frame we saw.
    restarted: bool,
    /// The next frame follows a gap message: any seq is fine.
    after_gap: bool,
    /// Oldest seq the daemon holds, from the latest `start`.
    oldest_seq: u64,
}

/// What to do with a frame.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameVerdict {
    /// False for a frame already delivered (a replay overlap).
    pub deliver: bool,
    /// A jump the daemon did not announce.
    pub gap: Option<GapRecord>,
}

impl SeqTracker {
    /// The resume point for the next `Watch`.
    pub fn resume_after(&self) -> Option<u64> {
        self.last_seq
    }

    /// A new stream started. Returns a gap when the daemon restarted with
    /// its clock behind our resume point (nothing it sends can be compared).
    pub fn on_start(&mut self, start: &WatchStart) -> Option<GapRecord> {
        self.stride = u64::from(start.stride.max(1));
        self.oldest_seq = start.oldest_seq;
        self.after_gap = false;
        if self.server_started.is_some() && start.server_started != self.server_started {
            self.restarted = true;
        }
        self.server_started = start.server_started;
        let last = self.last_seq?;
        if self.restarted && start.latest_seq != 0 && start.latest_seq <= last {
            self.last_seq = None;
            self.restarted = false;
            return Some(GapRecord {
                first_seq: last + 1,
                last_seq: last + 1,
                reason: "unannounced".to_owned(),
                missed: 0,
                restarted: true,
            });
        }
        None
    }

    /// The daemon announced a gap.
    pub fn on_gap(&mut self, gap: &Gap) -> GapRecord {
        self.after_gap = true;
        let restarted = gap.restarted || self.restarted;
        self.restarted = false;
        GapRecord {
            first_seq: gap.first_seq,
            last_seq: gap.last_seq,
            reason: names::name_of::<gpuwatch_api::GapReason>(gap.reason),
            missed: gap.missed,
            restarted,
        }
    }

    /// A frame arrived.
    pub fn on_frame(&mut self, seq: u64) -> FrameVerdict {
        let stride = self.stride.max(1);
        let mut gap = None;
        if let Some(last) = self.last_seq {
            if seq <= last {
                return FrameVerdict {
                    deliver: false,
                    gap: None,
                };
            }
            if !self.after_gap && seq > last + stride {
                let missed = if self.restarted {
                    // The previous run's unsent frames cannot be counted.
                    if self.oldest_seq != 0 && self.oldest_seq <= seq {
                        (seq - self.oldest_seq) / stride
                    } else {
                        0
                    }
                } else {
                    (seq - last) / stride - 1
                };
                // After a restart the frames are simply not in the new
                // daemon's history; otherwise nobody said why they are gone.
                let reason = if self.restarted {
                    "not_in_history"
                } else {
                    "unannounced"
                };
                gap = Some(GapRecord {
                    first_seq: last + 1,
                    last_seq: seq - 1,
                    reason: reason.to_owned(),
                    missed,
                    restarted: self.restarted,
                });
            }
        }
        self.restarted = false;
        self.after_gap = false;
        self.last_seq = Some(seq);
        FrameVerdict { deliver: true, gap }
    }
}

/// What one host's watch loop needs.
#[derive(Debug, Clone)]
pub struct WatchPlan {
    pub request: WatchRequest,
    pub interval: Duration,
    pub backoff: BackoffPolicy,
}

/// Why a session ended.
enum Ended {
    /// The renderer is gone: stop.
    Quit,
    /// The stream failed or closed; `connected` if it had got going.
    Failed {
        error: String,
        permanent: bool,
        connected: bool,
    },
}

/// Runs one host's stream until the receiver goes away.
pub async fn run_host(
    index: usize,
    host: HostSpec,
    connector: Connector,
    plan: WatchPlan,
    tx: mpsc::Sender<Update>,
    states: Arc<HostStates>,
) {
    let mut backoff = Backoff::new(plan.backoff);
    let mut tracker = SeqTracker::default();
    let mut first_attempt = true;
    loop {
        let ended = session(
            index,
            &host,
            &connector,
            &plan,
            &tx,
            &states,
            &mut tracker,
            &mut backoff,
        )
        .await;
        states.set(index, DOWN);
        let (error, permanent, connected) = match ended {
            Ended::Quit => return,
            Ended::Failed {
                error,
                permanent,
                connected,
            } => (error, permanent, connected),
        };
        if connected || first_attempt {
            let update = Update::Disconnected {
                host: index,
                error: error.clone(),
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
        first_attempt = false;
        // A refused token or a bad selector will not fix itself quickly:
        // keep trying, but at the slowest pace.
        let retry_in = if permanent {
            backoff.cap()
        } else {
            backoff.next_delay()
        };
        let update = Update::Reconnecting {
            host: index,
            error,
            retry_in,
        };
        if tx.send(update).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = tx.closed() => return,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    index: usize,
    host: &HostSpec,
    connector: &Connector,
    plan: &WatchPlan,
    tx: &mpsc::Sender<Update>,
    states: &HostStates,
    tracker: &mut SeqTracker,
    backoff: &mut Backoff,
) -> Ended {
    let failed = |f: HostFailure, connected: bool| Ended::Failed {
        error: f.to_string(),
        permanent: f.is_permanent(),
        connected,
    };
    let timeout = connector.timeout();
    let mut client = match connector.connect(host).await {
        Ok(c) => c,
        Err(f) => return failed(f, false),
    };
    let mut request = plan.request.clone();
    request.resume_after_seq = tracker.resume_after();
    let resumed_after_seq = request.resume_after_seq;
    let mut stream = match tokio::time::timeout(timeout, client.watch(request)).await {
        Err(_) => return failed(HostFailure::Timeout(timeout), false),
        Ok(Err(status)) => return failed(status.into(), false),
        Ok(Ok(response)) => response.into_inner(),
    };
    let start = match tokio::time::timeout(timeout, stream.message()).await {
        Err(_) => return failed(HostFailure::Timeout(timeout), false),
        Ok(Err(status)) => return failed(status.into(), false),
        Ok(Ok(None)) => {
            return failed(
                HostFailure::Connect("the daemon closed the stream before it started".into()),
                false,
            );
        }
        Ok(Ok(Some(msg))) => match msg.message {
            Some(watch_response::Message::Start(start)) => start,
            _ => {
                return failed(
                    HostFailure::Connect(
                        "protocol error: the stream did not begin with `start`".into(),
                    ),
                    false,
                );
            }
        },
    };
    backoff.reset();
    states.set(index, UP);
    let restart_gap = tracker.on_start(&start);
    let mut outbox = Vec::with_capacity(3);
    outbox.push(Update::Connected {
        host: index,
        devices: start.devices,
        server_started: start.server_started,
        interval_ms: start.interval_ms,
        resumed_after_seq,
    });
    if let Some(gap) = restart_gap {
        outbox.push(Update::Gap { host: index, gap });
    }
    if let Some(frame) = start.current {
        push_frame(index, tracker, frame, &mut outbox);
    }
    for update in outbox.drain(..) {
        if tx.send(update).await.is_err() {
            return Ended::Quit;
        }
    }
    // A daemon that stops talking without closing the connection (hung, or
    // a network path that silently died) is given up on after this long.
    let interval = Duration::from_millis(u64::from(start.interval_ms.max(1))).max(plan.interval);
    let stall = interval.saturating_mul(3) + timeout;
    loop {
        let message = match tokio::time::timeout(stall, stream.message()).await {
            Err(_) => {
                return failed(
                    HostFailure::Connect(format!(
                        "no data for {}; reconnecting",
                        humantime::format_duration(stall)
                    )),
                    true,
                );
            }
            Ok(Err(status)) => return failed(status.into(), true),
            Ok(Ok(None)) => {
                return failed(
                    HostFailure::Connect("the daemon ended the stream (shutting down?)".into()),
                    true,
                );
            }
            Ok(Ok(Some(message))) => message,
        };
        match message.message {
            Some(watch_response::Message::Frame(frame)) => {
                push_frame(index, tracker, frame, &mut outbox);
            }
            Some(watch_response::Message::Gap(gap)) => {
                let gap = tracker.on_gap(&gap);
                outbox.push(Update::Gap { host: index, gap });
            }
            // A second `start` or an unknown message: ignore it.
            // History for a resume older than the ring: not drawn by the
            // live view (its gap is reported as before).
            Some(watch_response::Message::Start(_) | watch_response::Message::History(_))
            | None => {}
        }
        for update in outbox.drain(..) {
            if tx.send(update).await.is_err() {
                return Ended::Quit;
            }
        }
    }
}

fn push_frame(host: usize, tracker: &mut SeqTracker, frame: Frame, outbox: &mut Vec<Update>) {
    let verdict = tracker.on_frame(frame.seq);
    if let Some(gap) = verdict.gap {
        outbox.push(Update::Gap { host, gap });
    }
    if verdict.deliver {
        outbox.push(Update::Frame { host, frame });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuwatch_api::GapReason;

    fn start(started: i64, stride: u32, oldest: u64, latest: u64) -> WatchStart {
        WatchStart {
            stride,
            server_started: Some(prost_types::Timestamp {
                seconds: started,
                nanos: 0,
            }),
            oldest_seq: oldest,
            latest_seq: latest,
            ..Default::default()
        }
    }

    #[test]
    fn contiguous_frames_pass_without_gaps() {
        let mut t = SeqTracker::default();
        assert!(t.on_start(&start(1, 10, 0, 100)).is_none());
        for seq in [100, 110, 120] {
            assert_eq!(
                t.on_frame(seq),
                FrameVerdict {
                    deliver: true,
                    gap: None
                }
            );
        }
        assert_eq!(t.resume_after(), Some(120));
    }

    #[test]
    fn replayed_frames_are_not_delivered_twice() {
        let mut t = SeqTracker::default();
        t.on_start(&start(1, 1, 0, 5));
        t.on_frame(5);
        t.on_start(&start(1, 1, 1, 9));
        assert!(!t.on_frame(5).deliver);
        assert!(t.on_frame(6).deliver);
    }

    #[test]
    fn announced_gap_is_passed_on_and_not_doubled() {
        let mut t = SeqTracker::default();
        t.on_start(&start(1, 1, 0, 10));
        t.on_frame(10);
        let gap = t.on_gap(&Gap {
            first_seq: 11,
            last_seq: 20,
            reason: GapReason::SlowSubscriber as i32,
            missed: 10,
            restarted: false,
        });
        assert_eq!(gap.reason, "slow_subscriber");
        assert_eq!(gap.missed, 10);
        // The frame after an announced gap raises no second one.
        assert_eq!(t.on_frame(21).gap, None);
    }

    #[test]
    fn unannounced_jump_becomes_a_gap() {
        let mut t = SeqTracker::default();
        t.on_start(&start(1, 2, 0, 10));
        t.on_frame(10);
        let verdict = t.on_frame(20);
        let gap = verdict.gap.expect("a gap");
        assert_eq!((gap.first_seq, gap.last_seq, gap.missed), (11, 19, 4));
        assert_eq!(gap.reason, "unannounced");
        assert!(!gap.restarted);
        assert!(verdict.deliver);
    }

    #[test]
    fn restart_without_a_gap_message_is_still_reported_as_restart() {
        let mut t = SeqTracker::default();
        t.on_start(&start(1, 1, 0, 100));
        t.on_frame(100);
        // The daemon came back (new start time) and replayed nothing.
        assert!(t.on_start(&start(2, 1, 5000, 5003)).is_none());
        let gap = t.on_frame(5003).gap.expect("restart gap");
        assert!(gap.restarted);
        assert_eq!(gap.reason, "not_in_history");
        assert_eq!((gap.first_seq, gap.last_seq, gap.missed), (101, 5002, 3));
    }

    #[test]
    fn restart_gap_from_daemon_keeps_restart_flag() {
        let mut t = SeqTracker::default();
        t.on_start(&start(1, 1, 0, 100));
        t.on_frame(100);
        t.on_start(&start(2, 1, 5000, 5003));
        let gap = t.on_gap(&Gap {
            first_seq: 101,
            last_seq: 4999,
            reason: GapReason::NotInHistory as i32,
            missed: 0,
            restarted: false,
        });
        assert!(gap.restarted, "we know the daemon restarted");
        assert_eq!(t.on_frame(5000).gap, None);
    }

    #[test]
    fn restart_with_clock_behind_resets_tracking() {
        let mut t = SeqTracker::default();
        t.on_start(&start(1, 1, 0, 100));
        t.on_frame(100);
        let gap = t.on_start(&start(2, 1, 40, 50)).expect("reported");
        assert!(gap.restarted);
        assert!(t.on_frame(50).deliver);
    }
}
