//! `watch` for programs: NDJSON on standard output, one object per GPU
//! sample, host state change or gap.
//!
//! Runs on its own blocking thread so a slow reader only ever slows this
//! writer: when the channel behind it fills, the hosts' streams stop being
//! read and each daemon reports the lost samples as a gap, which then shows
//! up here. Output is flushed once per batch of whatever has arrived.

use std::collections::HashMap;

use tokio::sync::mpsc;

use crate::{
    hosts::HostSpec,
    output::{Output, OutputClosed},
    record::{HostEventRecord, HostGapRecord, SampleRecord, millis, rfc3339},
    watch::session::Update,
};

/// Most updates written between two flushes.
const BATCH: usize = 4096;

/// Writes updates until the channel closes or stdout goes away.
pub fn run(mut rx: mpsc::Receiver<Update>, hosts: &[HostSpec]) -> Result<(), OutputClosed> {
    let mut out = Output::new();
    // GPU names per host, learnt from each stream's `start`.
    let mut names: Vec<HashMap<u32, String>> = vec![HashMap::new(); hosts.len()];
    while let Some(first) = rx.blocking_recv() {
        write(&mut out, hosts, &mut names, first)?;
        for _ in 1..BATCH {
            match rx.try_recv() {
                Ok(update) => write(&mut out, hosts, &mut names, update)?,
                Err(_) => break,
            }
        }
        out.flush()?;
    }
    out.flush()
}

fn label(hosts: &[HostSpec], i: usize) -> &str {
    hosts.get(i).map_or("?", |h| h.label.as_str())
}

fn write(
    out: &mut Output,
    hosts: &[HostSpec],
    names: &mut [HashMap<u32, String>],
    update: Update,
) -> Result<(), OutputClosed> {
    match update {
        Update::Connected {
            host,
            devices,
            server_started,
            interval_ms,
            resumed_after_seq,
        } => {
            if let Some(map) = names.get_mut(host) {
                for d in &devices {
                    map.insert(d.index, d.name.clone());
                }
            }
            let mut record = HostEventRecord::new(label(hosts, host), "connected");
            record.server_started = server_started.as_ref().and_then(rfc3339);
            record.gpus = Some(devices.len());
            record.interval_ms = Some(interval_ms);
            record.resumed_after_seq = resumed_after_seq;
            out.json(&record)
        }
        Update::Frame { host, frame } => {
            let map = names.get(host);
            for sample in &frame.samples {
                let name = map.and_then(|m| m.get(&sample.index)).map(String::as_str);
                let record =
                    SampleRecord::new(label(hosts, host), name, sample, frame.time.as_ref());
                out.json(&record)?;
            }
            Ok(())
        }
        Update::Gap { host, gap } => out.json(&HostGapRecord {
            host: label(hosts, host),
            event: "gap",
            stream: "samples",
            gap: &gap,
        }),
        Update::Disconnected { host, error } => {
            let mut record = HostEventRecord::new(label(hosts, host), "disconnected");
            record.error = Some(&error);
            out.json(&record)
        }
        Update::Reconnecting {
            host,
            error,
            retry_in,
        } => {
            let mut record = HostEventRecord::new(label(hosts, host), "reconnecting");
            record.error = Some(&error);
            record.retry_in_ms = Some(millis(retry_in));
            out.json(&record)
        }
    }
}
