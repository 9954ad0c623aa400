//! Regressions found by the performance harness (BENCHMARKS.md), pinned
//! with bounds far above normal so a busy machine cannot fail them:
//!
//! - accepted gRPC connections use TCP_NODELAY: without it a small response
//!   waited for the client's delayed ACK (~40 ms on Linux) on most round
//!   trips, and GetSnapshot polling ran at 44 ms a request;
//! - Watch frames are encoded once per tick and shared by every subscriber
//!   of all GPUs: each must still get every tick, complete, and the same
//!   frame as every other subscriber of that tick.

use std::time::{Duration, Instant};

use crate::support::Options;
use gpuwatch_api::{self as api, GetSnapshotRequest, WatchRequest, watch_response::Message};

#[tokio::test]
async fn sequential_snapshots_are_not_held_back_for_delayed_acks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = crate::support::start(dir.path(), Options::default());
    let mut client = daemon.client().await;
    client
        .get_snapshot(GetSnapshotRequest::default())
        .await
        .expect("first snapshot");
    const ROUND_TRIPS: u32 = 50;
    let started = Instant::now();
    for _ in 0..ROUND_TRIPS {
        client
            .get_snapshot(GetSnapshotRequest::default())
            .await
            .expect("snapshot");
    }
    let took = started.elapsed();
    // Normally a few milliseconds in all; with Nagle's algorithm most round
    // trips wait ~40 ms for a delayed ACK, i.e. about 2 s.
    assert!(
        took < Duration::from_millis(1500),
        "{ROUND_TRIPS} GetSnapshot round trips on one connection took {took:?}"
    );
}

#[tokio::test]
async fn many_subscribers_get_identical_complete_frames() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = crate::support::start(dir.path(), Options::default());
    let client = daemon.client().await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut c = client.clone();
        let stream = crate::support::watch(&mut c, WatchRequest::default()).await;
        streams.push(stream);
    }
    // Every subscriber's next five frames after `start`.
    let mut seen: Vec<Vec<api::Frame>> = Vec::new();
    for stream in &mut streams {
        let mut frames = Vec::new();
        while frames.len() < 5 {
            let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("a message within 10 s")
                .expect("stream ok")
                .expect("stream open");
            match message.message {
                Some(Message::Frame(f)) => frames.push(f),
                Some(Message::Start(s)) => assert_eq!(s.stride, 1),
                other => panic!("unexpected message {other:?}"),
            }
        }
        seen.push(frames);
    }
    let gpus = seen[0][0].samples.len();
    assert!(gpus > 0, "frames carry samples");
    for frames in &seen {
        for pair in frames.windows(2) {
            assert_eq!(pair[1].seq, pair[0].seq + 1, "consecutive ticks");
        }
        for f in frames {
            assert_eq!(f.samples.len(), gpus, "every GPU in every frame");
        }
    }
    // Where two subscribers got the same tick, they got the same frame.
    let mut compared = 0;
    for frames in &seen[1..] {
        for f in frames {
            if let Some(same) = seen[0].iter().find(|g| g.seq == f.seq) {
                assert_eq!(same, f, "tick {} differs between subscribers", f.seq);
                compared += 1;
            }
        }
    }
    assert!(compared > 0, "no tick was seen by two subscribers");
}
