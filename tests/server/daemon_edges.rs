//! The edges of the gRPC side (issue 12): extreme client numbers
//! (`since_seq`, `resume_after_seq` = 2^64−1), streams of open methods
//! (health Watch, reflection) under `[limits]`, and refused control traffic
//! that must stay bounded and leave the operator's events in the replay.

use std::time::{Duration, Instant};

use crate::support::{CONTROL_TOKEN, Options, events_since, index, start};
use gpuwatch_api::{
    self as api, EventKind, set_power_limit_request, set_threshold_request,
    watch_events_response::Message as EventsMessage, watch_response::Message as WatchMessage,
};
use tonic::{Code, transport::Channel};

async fn next_events_message(
    stream: &mut tonic::Streaming<api::WatchEventsResponse>,
) -> EventsMessage {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a message in time")
        .expect("the stream is healthy")
        .expect("the stream is open")
        .message
        .expect("a message")
}

#[tokio::test]
async fn watch_events_since_the_largest_seq_is_caught_up_without_a_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = start(dir.path(), Options::default());
    let mut client = d.client().await;
    for since in [u64::MAX, u64::MAX - 1, 1 << 63, 1_000_000_000] {
        let mut stream = client
            .watch_events(api::WatchEventsRequest {
                since_seq: Some(since),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("since_seq {since}: {e}"))
            .into_inner();
        match next_events_message(&mut stream).await {
            EventsMessage::CaughtUp(up) => assert!(up.latest_seq > 0, "{up:?}"),
            other => panic!("since_seq {since}: expected caught_up first, got {other:?}"),
        }
        // And live events still arrive on it.
        client
            .set_threshold(api::SetThresholdRequest {
                gpus: vec![index(0)],
                target: Some(set_threshold_request::Target::Celsius(
                    70 + u32::try_from(since % 10).expect("small"),
                )),
                hysteresis_c: None,
            })
            .await
            .expect("set threshold");
        let live = next_events_message(&mut stream).await;
        assert!(
            matches!(&live, EventsMessage::Event(e) if e.kind() == EventKind::ThresholdChanged),
            "since_seq {since}: {live:?}"
        );
    }
    // The daemon is still serving.
    client
        .get_snapshot(api::GetSnapshotRequest::default())
        .await
        .expect("still serving");
}

#[tokio::test]
async fn watch_resume_after_the_largest_seq_starts_fresh_without_a_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = start(dir.path(), Options::default());
    let mut client = d.client().await;
    for (resume, interval_ms) in [(u64::MAX, 0), (u64::MAX - 1, u32::MAX), (u64::MAX, 100)] {
        let result = client
            .watch(api::WatchRequest {
                gpus: Vec::new(),
                interval_ms,
                resume_after_seq: Some(resume),
            })
            .await;
        let mut stream = match result {
            Ok(r) => r.into_inner(),
            Err(e) => {
                assert_eq!(
                    e.code(),
                    Code::InvalidArgument,
                    "{resume}/{interval_ms}: {e}"
                );
                continue;
            }
        };
        let mut saw_start = false;
        for _ in 0..3 {
            let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("in time")
                .expect("healthy")
                .expect("open")
                .message
                .expect("a message");
            match message {
                WatchMessage::Start(_) => saw_start = true,
                WatchMessage::Gap(gap) => panic!("resume {resume}: a bogus gap {gap:?}"),
                WatchMessage::Frame(_) | WatchMessage::History(_) => {}
            }
        }
        assert!(saw_start);
    }
}

#[tokio::test]
async fn health_and_reflection_streams_count_against_max_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = start(
        dir.path(),
        Options {
            config: Some("[limits]\nmax_streams = 2\n".into()),
            no_tokens: true,
            ..Options::default()
        },
    );
    let channel = Channel::from_shared(d.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        match health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(stream) => open.push(stream.into_inner()),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                assert!(
                    e.message().contains("limits.max_streams"),
                    "{}",
                    e.message()
                );
                refused += 1;
            }
        }
    }
    assert_eq!((open.len(), refused), (2, 38));
    // Reflection is a stream too, and the places are taken.
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let e = reflection
        .server_reflection_info(tokio_stream::iter([request.clone()]))
        .await
        .expect_err("no place left");
    assert_eq!(e.code(), Code::ResourceExhausted);
    // Unary health checks are not streams: still answered.
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Check is answered");
    // Closing a stream gives its place back.
    drop(open.pop());
    let mut reopened = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while reopened.is_none() && Instant::now() < deadline {
        match reflection
            .server_reflection_info(tokio_stream::iter([request.clone()]))
            .await
        {
            Ok(stream) => reopened = Some(stream),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(reopened.is_some(), "a closed stream's place came back");
}

#[tokio::test]
async fn refused_control_calls_are_coalesced_per_peer_and_leave_operator_events_in_the_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = start(dir.path(), Options::with_config("[events]\nretain = 100\n"));
    let mut operator = d.client().await;
    operator
        .set_power_limit(api::SetPowerLimitRequest {
            gpus: vec![index(0)],
            target: Some(set_power_limit_request::Target::Watts(450.0)),
        })
        .await
        .expect("the operator sets a ceiling");
    operator
        .set_threshold(api::SetThresholdRequest {
            gpus: vec![index(0)],
            target: Some(set_threshold_request::Target::Celsius(76)),
            hysteresis_c: Some(4),
        })
        .await
        .expect("the operator sets a threshold");

    // 250 token-less, then 50 wrong-token, SetPowerLimit calls.
    let mut anonymous = d.client_with(None).await;
    let mut wrong = d.client_with(Some("not-the-token-0123456789")).await;
    for i in 0..300 {
        let client = if i < 250 { &mut anonymous } else { &mut wrong };
        let e = client
            .set_power_limit(api::SetPowerLimitRequest {
                gpus: vec![index(0)],
                target: Some(set_power_limit_request::Target::Watts(300.0)),
            })
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let _ = CONTROL_TOKEN;
    let events = events_since(&mut operator, 0).await;
    let kinds: Vec<EventKind> = events.iter().map(api::Event::kind).collect();
    let refused = kinds
        .iter()
        .filter(|k| **k == EventKind::ControlRefused)
        .count();
    // One per (peer, method, reason) in the window: the anonymous caller
    // and the unknown token.
    assert_eq!(refused, 2, "refused calls recorded one by one: {kinds:?}");
    for kind in [EventKind::CeilingChanged, EventKind::ThresholdChanged] {
        assert!(
            kinds.contains(&kind),
            "{kind:?} was pushed out of the replay by refused calls: {kinds:?}"
        );
    }
}

#[tokio::test]
async fn refused_calls_from_many_peers_cause_a_bounded_number_of_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = start(dir.path(), Options::with_config("[events]\nretain = 100\n"));
    let mut operator = d.client().await;
    operator
        .set_threshold(api::SetThresholdRequest {
            gpus: vec![index(0)],
            target: Some(set_threshold_request::Target::Celsius(77)),
            hysteresis_c: Some(5),
        })
        .await
        .expect("the operator sets a threshold");
    // 60 peers (127.0.0.2 .. 127.0.0.61), each trying three control methods
    // three times without a token: 540 refusals, 180 distinct ones.
    let mut tried = 0;
    for last in 2..62u8 {
        let channel = tonic::transport::Endpoint::from_shared(d.url())
            .expect("url")
            .local_address(Some(std::net::IpAddr::from([127, 0, 0, last])))
            .connect()
            .await
            .expect("connect from another loopback address");
        let mut client = api::gpu_watch_client::GpuWatchClient::new(channel);
        for _ in 0..3 {
            let a = client
                .set_power_limit(api::SetPowerLimitRequest {
                    gpus: vec![index(0)],
                    target: Some(set_power_limit_request::Target::Watts(300.0)),
                })
                .await;
            let b = client
                .reset_clocks(api::ResetClocksRequest {
                    gpus: vec![index(0)],
                })
                .await;
            let c = client
                .set_threshold(api::SetThresholdRequest {
                    gpus: vec![index(0)],
                    target: Some(set_threshold_request::Target::Celsius(90)),
                    hysteresis_c: None,
                })
                .await;
            for r in [a.err(), b.err(), c.err()] {
                assert_eq!(r.map(|e| e.code()), Some(Code::Unauthenticated));
                tried += 1;
            }
        }
    }
    assert_eq!(tried, 540);
    let events = events_since(&mut operator, 0).await;
    let refused = events
        .iter()
        .filter(|e| e.kind() == EventKind::ControlRefused)
        .count();
    assert!(
        (1..=2 * gpuwatch_server::authz::MAX_REFUSALS_PER_WINDOW + 1).contains(&refused),
        "{refused} CONTROL_REFUSED events for 540 refusals from 60 peers"
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind() == EventKind::ThresholdChanged),
        "the operator's threshold event was pushed out"
    );
}

#[test]
fn the_listener_limits_are_validated_naming_the_key_and_the_allowed_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let load = |toml: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).expect("write");
        gpuwatch_server::config::load(
            Some(&path),
            Vec::new(),
            &gpuwatch_server::config::Overrides::default(),
        )
    };
    for (toml, key) in [
        (
            "[limits]\nhttp_max_connections = 0\n",
            "limits.http_max_connections",
        ),
        (
            "[limits]\nhttp_header_timeout = \"1ms\"\n",
            "limits.http_header_timeout",
        ),
        (
            "[limits]\nhttp_header_timeout = \"1h\"\n",
            "limits.http_header_timeout",
        ),
        (
            "[limits]\nhttp_max_header_bytes = 1024\n",
            "limits.http_max_header_bytes",
        ),
        (
            "[limits]\nhttp_write_timeout = \"0s\"\n",
            "limits.http_write_timeout",
        ),
        (
            "[limits]\ngrpc_max_connections = 1\n",
            "limits.grpc_max_connections",
        ),
        ("[tls]\nhttp = true\n", "tls.http"),
    ] {
        let e = load(toml).expect_err(toml).to_string();
        assert!(e.contains(key), "{toml}: {e}");
    }
    let ok = load(
        "[limits]\nhttp_max_connections = 100\nhttp_header_timeout = \"3s\"\n\
         http_max_header_bytes = 8192\nhttp_write_timeout = \"2s\"\ngrpc_max_connections = 64\n\
         [auth]\nopen_metrics = true\n",
    )
    .expect("valid limits");
    assert_eq!(ok.limits.http_max_connections, 100);
    assert_eq!(ok.limits.http_header_timeout, Duration::from_secs(3));
    assert!(ok.auth.open_metrics);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_grpc_connection_cap_idle_connections_make_room_and_streaming_ones_stay() {
    const CAP: usize = 32;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = start(
        dir.path(),
        Options::with_config(format!("[limits]\ngrpc_max_connections = {CAP}\n")),
    );
    // The oldest connection holds a Watch stream: it must never be evicted.
    let mut watcher = d.client().await;
    let mut stream = watcher
        .watch(api::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    // Three times the cap of HTTP/2 connections that made one call and
    // went idle.
    let mut idle = Vec::new();
    for i in 0..3 * CAP {
        let mut client = d.client().await;
        client
            .get_snapshot(api::GetSnapshotRequest::default())
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        idle.push(client);
    }
    // A fresh connection still gets in, and answers at once.
    let started = Instant::now();
    let mut fresh = d.client().await;
    fresh
        .set_power_limit(api::SetPowerLimitRequest {
            gpus: vec![index(0)],
            target: Some(set_power_limit_request::Target::Watts(470.0)),
        })
        .await
        .expect("SetPowerLimit at the cap");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    // The streaming connection kept its stream.
    for _ in 0..3 {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("frames in time")
            .expect("the stream survived the flood")
            .expect("open");
        assert!(message.message.is_some());
    }
}
