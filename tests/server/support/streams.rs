//! Stream clients that outlive daemon restarts, shared by the suites that
//! restart a daemon under load (the soak, fault injection): a Watch
//! subscriber that checks frame numbering, and an event follower that
//! remembers every event it saw.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use gpuwatch_api::{self as api, WatchRequest, watch_events_response, watch_response::Message};

/// A Watch subscriber that survives restarts: resumes after the last seq it
/// saw and checks every frame is the next one or announced by a gap.
pub async fn watcher(
    url: String,
    stop: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    violations: Arc<Mutex<Vec<String>>>,
) {
    let mut last: Option<u64> = None;
    let mut stride = 1;
    while !stop.load(Ordering::Relaxed) {
        let Ok(channel) = tonic::transport::Channel::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut client = api::gpu_watch_client::GpuWatchClient::new(channel);
        let request = WatchRequest {
            interval_ms: 100,
            resume_after_seq: last,
            ..Default::default()
        };
        let Ok(response) = client.watch(request).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = response.into_inner();
        while let Ok(Ok(Some(msg))) =
            tokio::time::timeout(Duration::from_secs(5), stream.message()).await
        {
            match msg.message {
                Some(Message::Start(s)) => {
                    stride = u64::from(s.stride);
                    if let Some(f) = s.current {
                        last = Some(f.seq);
                    }
                }
                Some(Message::Gap(g)) => last = Some(g.last_seq + 1 - stride),
                Some(Message::History(_)) => {}
                Some(Message::Frame(f)) => {
                    if let Some(prev) = last
                        && f.seq != prev + stride
                    {
                        violations
                            .lock()
                            .expect("lock")
                            .push(format!("frame {} after {prev} without a gap", f.seq));
                    }
                    last = Some(f.seq);
                    frames.fetch_add(1, Ordering::Relaxed);
                }
                None => {}
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// Follows events across restarts, remembering every one it saw; an event
/// seen again under a seq it already saw with other contents (a seq handed
/// out twice) is recorded in `violations`.
pub async fn event_follower(
    url: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<u64, api::Event>>>,
    violations: Arc<Mutex<Vec<String>>>,
) {
    let mut since = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok(channel) = tonic::transport::Channel::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut client = api::gpu_watch_client::GpuWatchClient::new(channel);
        let Ok(response) = client
            .watch_events(api::WatchEventsRequest {
                since_seq: Some(since),
                ..Default::default()
            })
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = response.into_inner();
        while let Ok(Ok(Some(msg))) =
            tokio::time::timeout(Duration::from_secs(5), stream.message()).await
        {
            if let Some(watch_events_response::Message::Event(e)) = msg.message {
                since = since.max(e.seq);
                let seq = e.seq;
                if let Some(before) = seen.lock().expect("lock").insert(seq, e.clone())
                    && before != e
                {
                    violations.lock().expect("lock").push(format!(
                        "seq {seq} streamed twice with different events: {before:?} then {e:?}"
                    ));
                }
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}
