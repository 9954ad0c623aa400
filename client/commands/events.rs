//! `gpuwatch-client events`: the daemons' event and audit logs.
//!
//! Without `--follow`, each host replays what its log retains (after
//! `--since`) up to the `caught_up` marker, and the command exits. With
//! `--follow`, each host's stream is kept open like `watch` keeps its
//! telemetry: reconnecting with backoff and resuming after the last event
//! seen, so nothing is printed twice and nothing is skipped silently (the
//! daemon reports what it no longer holds as a gap).

use gpuwatch_api::names;
use std::{io::IsTerminal as _, sync::Arc, time::Duration};

use gpuwatch_api::{Event, WatchEventsRequest, watch_events_response};
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    app::{Exit, UsageError, shutdown_signal},
    backoff::{Backoff, BackoffPolicy},
    cli::{EventsArgs, read_selectors},
    commands::{HostAnswer, print_answers},
    connect::{Connector, HostFailure},
    fleet::Fleet,
    hosts::HostSpec,
    output::{Output, OutputClosed},
    record::{
        EventRecord, GapRecord, HostErrorRecord, HostEventRecord, HostGapRecord, millis, rfc3339,
    },
    units,
    watch::session::HostStates,
};

/// One item of a host's event stream.
#[derive(Debug)]
enum Item {
    Event(Box<Event>),
    Gap(GapRecord),
}

pub async fn run(
    args: EventsArgs,
    hosts: Vec<HostSpec>,
    connector: Connector,
    json: bool,
) -> Result<Exit, UsageError> {
    let request = WatchEventsRequest {
        since_seq: None,
        gpus: read_selectors(&args.gpu),
        kinds: args.kind.iter().map(|k| *k as i32).collect(),
    };
    if args.follow {
        let initial = BackoffPolicy::DEFAULT_INITIAL.min(args.reconnect_max);
        let backoff = BackoffPolicy::new(initial, args.reconnect_max)
            .map_err(|e| UsageError(format!("--reconnect-max: {e}")))?;
        let request = WatchEventsRequest {
            since_seq: args.since,
            ..request
        };
        return Ok(follow(hosts, connector, request, backoff, json).await);
    }
    let request = WatchEventsRequest {
        since_seq: Some(args.since.unwrap_or(0)),
        ..request
    };
    Ok(replay(hosts, connector, request, json).await)
}

/// Reads one host's replay up to `caught_up`.
async fn replay_host(
    mut client: crate::connect::Client,
    request: WatchEventsRequest,
) -> Result<Vec<Item>, HostFailure> {
    let mut stream = client.watch_events(request).await?.into_inner();
    let mut items = Vec::new();
    loop {
        let Some(message) = stream.message().await? else {
            return Err(HostFailure::Connect(
                "the daemon ended the stream before the replay finished".into(),
            ));
        };
        match message.message {
            Some(watch_events_response::Message::Event(e)) => items.push(Item::Event(Box::new(e))),
            Some(watch_events_response::Message::Gap(g)) => {
                items.push(Item::Gap(GapRecord::from(&g)))
            }
            Some(watch_events_response::Message::CaughtUp(_)) => return Ok(items),
            None => {}
        }
    }
}

async fn replay(
    hosts: Vec<HostSpec>,
    connector: Connector,
    request: WatchEventsRequest,
    json: bool,
) -> Exit {
    let fleet = Fleet::run(&hosts, &connector, move |_, client| {
        replay_host(client, request.clone())
    });
    print_answers(fleet, &hosts, json, write_host_json, write_table).await
}

/// One host's replay as NDJSON, or the record of why there is none.
fn write_host_json(
    out: &mut Output,
    host: &HostSpec,
    answer: &Result<Vec<Item>, HostFailure>,
) -> Result<(), OutputClosed> {
    match answer {
        Ok(items) => items
            .iter()
            .try_for_each(|item| write_item_json(out, &host.label, item)),
        Err(e) => out.json(&HostErrorRecord::new(&host.label, e)),
    }
}

/// Every host's replay in one table, in host order; hosts without an
/// answer are listed after it.
fn write_table(
    out: &mut Output,
    hosts: &[HostSpec],
    answers: &[HostAnswer<Vec<Item>>],
) -> Result<(), OutputClosed> {
    out.line(&header())?;
    let mut errors = Vec::new();
    for (host, answer) in hosts.iter().zip(answers) {
        match answer {
            Some(Ok(items)) => {
                for item in items {
                    out.line(&item_line(&host.label, item))?;
                }
            }
            Some(Err(e)) => errors.push(format!("{}: error: {e}", host.label)),
            None => errors.push(format!("{}: error: no answer", host.label)),
        }
    }
    for line in errors {
        out.line(&line)?;
    }
    Ok(())
}

fn write_item_json(out: &mut Output, host: &str, item: &Item) -> Result<(), OutputClosed> {
    match item {
        Item::Event(e) => out.json(&EventRecord::new(host, e)),
        Item::Gap(g) => out.json(&HostGapRecord {
            host,
            event: "gap",
            stream: "events",
            gap: g,
        }),
    }
}

fn header() -> String {
    format!(
        "{:<20} {:>8}  {:<24} {:<8} {:<24} {:<4} {:<20} {}",
        "HOST", "SEQ", "TIME", "SEVERITY", "KIND", "GPU", "ACTOR", "REASON"
    )
}

/// The change an event records, in words, unless the reason already says
/// it (or nothing changed).
fn change_text(e: &Event) -> String {
    use gpuwatch_api::event::Change;
    if e.reason.contains("->") {
        return String::new();
    }
    let same = match &e.change {
        Some(Change::PowerLimit(c)) => c.before_mw == c.after_mw,
        Some(Change::ClockLock(c)) => c.before_max_mhz == c.after_max_mhz,
        Some(Change::Threshold(c)) => {
            c.before_c == c.after_c && c.before_hysteresis_c == c.after_hysteresis_c
        }
        Some(Change::Budget(c)) => c.before_watts == c.after_watts && c.shares.is_empty(),
        None => true,
    };
    if same {
        return String::new();
    }
    let opt = |v: Option<String>, none: &str| v.unwrap_or_else(|| none.to_owned());
    match &e.change {
        Some(Change::PowerLimit(c)) => format!(
            " [power limit {} -> {}]",
            opt(
                c.before_mw.map(|v| format!("{} W", units::watts_value(v))),
                "unset"
            ),
            opt(
                c.after_mw.map(|v| format!("{} W", units::watts_value(v))),
                "unset"
            )
        ),
        Some(Change::ClockLock(c)) => format!(
            " [clock lock {} -> {}]",
            opt(c.before_max_mhz.map(|v| format!("{v} MHz")), "unlocked"),
            opt(c.after_max_mhz.map(|v| format!("{v} MHz")), "unlocked")
        ),
        Some(Change::Threshold(c)) => {
            let mut parts = Vec::new();
            if c.before_c.is_some() || c.after_c.is_some() {
                parts.push(format!(
                    "threshold {} -> {}",
                    opt(c.before_c.map(|v| format!("{v} °C")), "unset"),
                    opt(c.after_c.map(|v| format!("{v} °C")), "unset")
                ));
            }
            if c.before_hysteresis_c.is_some() || c.after_hysteresis_c.is_some() {
                parts.push(format!(
                    "hysteresis {} -> {}",
                    opt(c.before_hysteresis_c.map(|v| format!("{v} °C")), "unset"),
                    opt(c.after_hysteresis_c.map(|v| format!("{v} °C")), "unset")
                ));
            }
            format!(" [{}]", parts.join(", "))
        }
        Some(Change::Budget(c)) => {
            let budget = |w: Option<f64>| w.map_or("none".to_owned(), |w| format!("{w:.0} W"));
            let share = |mw: Option<u32>| {
                mw.map_or("none".to_owned(), |v| {
                    format!("{} W", units::watts_value(v))
                })
            };
            let mut parts = Vec::new();
            if c.before_watts != c.after_watts {
                parts.push(format!(
                    "budget {} -> {}",
                    budget(c.before_watts),
                    budget(c.after_watts)
                ));
            }
            parts.extend(c.shares.iter().map(|s| {
                format!(
                    "GPU {} {} -> {}",
                    s.index,
                    share(s.before_mw),
                    share(s.after_mw)
                )
            }));
            format!(" [{}]", parts.join(", "))
        }
        None => String::new(),
    }
}

fn item_line(host: &str, item: &Item) -> String {
    match item {
        Item::Event(e) => {
            let actor = e.actor.as_ref().map_or_else(String::new, |a| {
                format!(
                    "{}:{}",
                    names::name_of::<gpuwatch_api::ActorKind>(a.kind),
                    a.name
                )
            });
            let mut reason = e.reason.clone();
            reason.push_str(&change_text(e));
            if let Some(xid) = e.xid {
                reason.push_str(&format!(" [xid {xid}"));
                if let Some(info) = &e.xid_info {
                    // Older daemons give the bare code; newer ones put the
                    // meaning in the reason and the action here too.
                    if !e.reason.contains(&info.meaning) {
                        reason.push_str(&format!(": {}", info.meaning));
                    }
                    reason.push_str(&format!(
                        "; action {}",
                        names::name_of::<gpuwatch_api::XidAction>(info.action)
                    ));
                }
                reason.push(']');
            }
            format!(
                "{:<20} {:>8}  {:<24} {:<8} {:<24} {:<4} {:<20} {}",
                host,
                e.seq,
                e.time.as_ref().and_then(rfc3339).unwrap_or_default(),
                names::name_of::<gpuwatch_api::Severity>(e.severity),
                names::name_of::<gpuwatch_api::EventKind>(e.kind),
                e.gpu_index
                    .map_or_else(|| "-".to_owned(), |i| i.to_string()),
                actor,
                reason
            )
        }
        Item::Gap(g) => format!(
            "{host:<20} gap: events {}..{} not delivered ({}, {} missed)",
            g.first_seq, g.last_seq, g.reason, g.missed
        ),
    }
}

/// What a following host reports to the writer.
#[derive(Debug)]
enum Follow {
    Item(usize, Item),
    Connected(usize),
    Disconnected(usize, String),
    Reconnecting(usize, String, Duration),
}

async fn follow(
    hosts: Vec<HostSpec>,
    connector: Connector,
    request: WatchEventsRequest,
    backoff: BackoffPolicy,
    json: bool,
) -> Exit {
    let hosts: Arc<[HostSpec]> = hosts.into();
    let states = HostStates::new(hosts.len());
    let (tx, rx) = mpsc::channel((hosts.len() * 8).clamp(256, 65_536));
    let mut tasks = JoinSet::new();
    for i in 0..hosts.len() {
        tasks.spawn(follow_host(
            i,
            hosts[i].clone(),
            connector.clone(),
            request.clone(),
            backoff,
            tx.clone(),
            states.clone(),
        ));
    }
    drop(tx);
    let writer_hosts = hosts.clone();
    let mut writer = tokio::task::spawn_blocking(move || write_follow(rx, &writer_hosts, json));
    let finished = tokio::select! {
        r = &mut writer => Some(r),
        _ = shutdown_signal() => None,
    };
    let all_up = states.all_up();
    tasks.shutdown().await;
    let written = match finished {
        Some(r) => r,
        None => tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap_or(Ok(Ok(()))),
    };
    let failed = match written {
        Ok(Ok(())) => false,
        Ok(Err(closed)) => closed.report(),
        Err(_) => true,
    };
    Exit::from_failures(failed || !all_up)
}

fn write_follow(
    mut rx: mpsc::Receiver<Follow>,
    hosts: &[HostSpec],
    json: bool,
) -> Result<(), OutputClosed> {
    let mut out = Output::new();
    if !json && std::io::stdout().is_terminal() {
        out.line(&header())?;
        out.flush()?;
    }
    let label = |i: usize| hosts.get(i).map_or("?", |h| h.label.as_str());
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(update) = next {
            match update {
                Follow::Item(i, item) => {
                    if json {
                        write_item_json(&mut out, label(i), &item)?;
                    } else {
                        out.line(&item_line(label(i), &item))?;
                    }
                }
                Follow::Connected(i) => {
                    if json {
                        out.json(&HostEventRecord::new(label(i), "connected"))?;
                    } else {
                        out.line(&format!("# {}: connected", label(i)))?;
                    }
                }
                Follow::Disconnected(i, error) => {
                    if json {
                        let mut r = HostEventRecord::new(label(i), "disconnected");
                        r.error = Some(&error);
                        out.json(&r)?;
                    } else {
                        out.line(&format!("# {}: disconnected: {error}", label(i)))?;
                    }
                }
                Follow::Reconnecting(i, error, retry_in) => {
                    if json {
                        let mut r = HostEventRecord::new(label(i), "reconnecting");
                        r.error = Some(&error);
                        r.retry_in_ms = Some(millis(retry_in));
                        out.json(&r)?;
                    } else {
                        out.line(&format!(
                            "# {}: reconnecting in {} ({error})",
                            label(i),
                            units::short_duration(retry_in)
                        ))?;
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        out.flush()?;
    }
    out.flush()
}

/// Keeps one host's event stream open, resuming after the last event seen.
async fn follow_host(
    index: usize,
    host: HostSpec,
    connector: Connector,
    request: WatchEventsRequest,
    policy: BackoffPolicy,
    tx: mpsc::Sender<Follow>,
    states: Arc<HostStates>,
) {
    let mut backoff = Backoff::new(policy);
    let mut since = request.since_seq;
    let mut first_attempt = true;
    loop {
        let mut connected = false;
        let error: HostFailure = async {
            let mut client = connector.connect(&host).await?;
            let req = WatchEventsRequest {
                since_seq: since,
                ..request.clone()
            };
            let mut stream = tokio::time::timeout(connector.timeout(), client.watch_events(req))
                .await
                .map_err(|_| HostFailure::Timeout(connector.timeout()))??
                .into_inner();
            connected = true;
            states.set_up(index);
            backoff.reset();
            if tx.send(Follow::Connected(index)).await.is_err() {
                return Ok::<(), HostFailure>(());
            }
            while let Some(message) = stream.message().await? {
                let item = match message.message {
                    Some(watch_events_response::Message::Event(e)) => {
                        since = Some(since.map_or(e.seq, |s| s.max(e.seq)));
                        Item::Event(Box::new(e))
                    }
                    Some(watch_events_response::Message::Gap(g)) => Item::Gap(GapRecord::from(&g)),
                    Some(watch_events_response::Message::CaughtUp(c)) => {
                        // From here on, resume after what the daemon had.
                        since = Some(since.map_or(c.latest_seq, |s| s.max(c.latest_seq)));
                        continue;
                    }
                    None => continue,
                };
                if tx.send(Follow::Item(index, item)).await.is_err() {
                    return Ok(());
                }
            }
            Err(HostFailure::Connect(
                "the daemon ended the stream (shutting down?)".into(),
            ))
        }
        .await
        .err()
        .unwrap_or_else(|| HostFailure::Connect(String::new()));
        if tx.is_closed() {
            return;
        }
        states.set_down(index);
        let message = error.to_string();
        if (connected || first_attempt)
            && tx
                .send(Follow::Disconnected(index, message.clone()))
                .await
                .is_err()
        {
            return;
        }
        first_attempt = false;
        let retry_in = if error.is_permanent() {
            backoff.cap()
        } else {
            backoff.next_delay()
        };
        if tx
            .send(Follow::Reconnecting(index, message, retry_in))
            .await
            .is_err()
        {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuwatch_api::{EventKind, XidAction, XidInfo};

    fn xid_event(reason: &str, info: Option<XidInfo>) -> Item {
        Item::Event(Box::new(Event {
            seq: 7,
            kind: EventKind::XidError as i32,
            gpu_index: Some(0),
            reason: reason.to_owned(),
            xid: Some(79),
            xid_info: info,
            ..Event::default()
        }))
    }

    #[test]
    fn an_xid_line_shows_its_meaning_and_action() {
        let info = XidInfo {
            meaning: "GPU has fallen off the bus".into(),
            action: XidAction::RebootNode as i32,
            action_text: "drain the node and reboot it".into(),
        };
        // An older daemon's reason names only the code: the meaning is added.
        let line = item_line(
            "n1",
            &xid_event("XID 79 reported by the driver", Some(info.clone())),
        );
        assert!(
            line.ends_with("[xid 79: GPU has fallen off the bus; action reboot_node]"),
            "{line}"
        );
        // A reason that already says it is not repeated.
        let line = item_line(
            "n1",
            &xid_event(
                "XID 79 reported by the driver: GPU has fallen off the bus",
                Some(info),
            ),
        );
        assert!(line.ends_with("[xid 79; action reboot_node]"), "{line}");
        // Without xid_info (a daemon before this field): the bare code.
        let line = item_line("n1", &xid_event("XID 79", None));
        assert!(line.ends_with("[xid 79]"), "{line}");
    }
}
