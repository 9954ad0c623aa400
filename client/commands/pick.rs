//! `gpuwatch-client pick` and `release`: choose GPUs for new work across a
//! fleet, and end the leases a pick took.
//!
//! A pick asks every host to rank its GPUs (PickGpus: read only), merges
//! the fitting ones best first over all hosts, and keeps the best
//! `--count`. With `--lease`, each chosen host is then asked to lease
//! exactly the chosen GPUs (LeaseGpus, restricted to their UUIDs): the
//! daemon re-checks them under its lock, so a GPU another scheduler took in
//! between is refused there, not handed out twice. When a host cannot
//! lease what was chosen, what was leased is released and the pick starts
//! over (a few times) with fresh rankings.
//!
//! Output: one `HOST CUDA_VISIBLE_DEVICES=…` line per host with picked GPUs
//! (with a lease, followed by `GPUWATCH_LEASES=…`), or one JSON object per
//! host. Exit 1 when fewer than `--count` GPUs fit, with what ruled the rest
//! out on stderr; a host that did not answer is reported on stderr.

use std::time::Duration;

use gpuwatch_api::{
    GpuSelector, LeaseGpusRequest, ListLeasesRequest, PickCandidate, PickCriteria, PickGpusRequest,
    PickGpusResponse, ReleaseLeaseRequest, gpu_selector::Selector,
};
use serde::Serialize;

use crate::{
    app::Exit,
    cli::{PickArgs, ReleaseArgs, read_selectors},
    connect::{Connector, HostFailure},
    fleet::Fleet,
    hosts::HostSpec,
    output::Output,
};

/// How many times a leased pick starts over after losing a race.
const ATTEMPTS: usize = 3;

/// One picked GPU.
#[derive(Debug, Clone, Serialize)]
struct PickedGpu {
    index: u32,
    uuid: String,
    score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    free_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    utilization_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    headroom_c: Option<i32>,
}

/// One lease taken.
#[derive(Debug, Clone, Serialize)]
struct LeaseRecord {
    id: String,
    index: u32,
    uuid: String,
    holder: String,
    ttl_s: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
}

/// One host's share of the pick, as printed.
#[derive(Debug, Serialize)]
struct HostPick<'a> {
    host: &'a str,
    cuda_visible_devices: String,
    gpus: Vec<PickedGpu>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    leases: Vec<LeaseRecord>,
}

fn criteria(args: &PickArgs, gpus: Vec<GpuSelector>, count: u32) -> PickCriteria {
    PickCriteria {
        gpus,
        count,
        min_free_memory_bytes: args.min_free,
        max_utilization_pct: args.max_util,
        min_headroom_c: args.min_headroom,
        allow_mig: args.allow_mig,
        allow_busy: args.allow_busy,
        utilization_window_ms: u32::try_from(args.window.as_millis()).unwrap_or(u32::MAX),
    }
}

fn picked(c: &PickCandidate) -> PickedGpu {
    PickedGpu {
        index: c.index,
        uuid: c.uuid.clone(),
        score: c.score,
        free_memory_bytes: c.free_memory_bytes,
        utilization_pct: c.utilization_pct,
        headroom_c: c.headroom_c,
    }
}

/// Every host's ranking (count 1: a host only ranks; the fleet decides).
async fn rank_fleet(
    args: &PickArgs,
    hosts: &[HostSpec],
    connector: &Connector,
) -> Vec<Option<Result<PickGpusResponse, HostFailure>>> {
    let request = PickGpusRequest {
        criteria: Some(criteria(args, read_selectors(&args.gpu), 1)),
    };
    let fleet = Fleet::run(hosts, connector, move |_, mut client| {
        let request = request.clone();
        async move {
            client
                .pick_gpus(request)
                .await
                .map(|r| r.into_inner())
                .map_err(HostFailure::from)
        }
    });
    fleet.collect(hosts.len()).await
}

/// Why GPUs were ruled out, one line per host.
fn ruled_out(
    hosts: &[HostSpec],
    answers: &[Option<Result<PickGpusResponse, HostFailure>>],
) -> Vec<String> {
    let mut lines = Vec::new();
    for (host, answer) in hosts.iter().zip(answers) {
        let Some(Ok(r)) = answer else { continue };
        let out: Vec<String> = r
            .candidates
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
        if !out.is_empty() {
            lines.push(format!("{}: {}", host.label, out.join(", ")));
        }
    }
    lines
}

pub async fn run(args: PickArgs, hosts: Vec<HostSpec>, connector: Connector, json: bool) -> Exit {
    let mut out = Output::new();
    let want = usize::try_from(args.count).unwrap_or(usize::MAX);
    for attempt in 1..=ATTEMPTS {
        let answers = rank_fleet(&args, &hosts, &connector).await;
        let mut host_failed = false;
        for (host, answer) in hosts.iter().zip(&answers) {
            match answer {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    host_failed = true;
                    eprintln!("{}: {e}", host.label);
                }
                None => {
                    host_failed = true;
                    eprintln!("{}: no answer", host.label);
                }
            }
        }
        // Fitting GPUs over the fleet, best first (ties: host order, index).
        let mut fitting: Vec<(usize, &PickCandidate)> = answers
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a {
                Some(Ok(r)) => Some((i, r)),
                _ => None,
            })
            .flat_map(|(i, r)| r.candidates.iter().filter(|c| c.fits).map(move |c| (i, c)))
            .collect();
        fitting.sort_by(|a, b| {
            b.1.score
                .total_cmp(&a.1.score)
                .then(a.0.cmp(&b.0))
                .then(a.1.index.cmp(&b.1.index))
        });
        if fitting.len() < want {
            eprintln!(
                "not enough GPUs fit: {} of {want} wanted{}",
                fitting.len(),
                if host_failed {
                    " (some hosts did not answer)"
                } else {
                    ""
                }
            );
            let lines = ruled_out(&hosts, &answers);
            if !lines.is_empty() {
                eprintln!("ruled out:");
                for l in lines {
                    eprintln!("  {l}");
                }
            }
            return Exit::Failed;
        }
        let chosen = &fitting[..want];
        let mut per_host: Vec<(usize, Vec<PickedGpu>)> = Vec::new();
        for (i, c) in chosen {
            match per_host.iter_mut().find(|(h, _)| h == i) {
                Some((_, gpus)) => gpus.push(picked(c)),
                None => per_host.push((*i, vec![picked(c)])),
            }
        }
        per_host.sort_by_key(|(i, _)| *i);
        let mut leases: Vec<(usize, Vec<LeaseRecord>)> = Vec::new();
        if let Some(ttl) = args.lease {
            match lease_chosen(&args, ttl, &hosts, &connector, &per_host).await {
                Ok(granted) => leases = granted,
                Err(why) if attempt < ATTEMPTS => {
                    eprintln!("{why}; picking again");
                    continue;
                }
                Err(why) => {
                    eprintln!("{why}; giving up after {ATTEMPTS} attempts");
                    return Exit::Failed;
                }
            }
        }
        let mut result = Ok(());
        for (i, gpus) in per_host {
            let host_leases = leases
                .iter()
                .find(|(h, _)| *h == i)
                .map(|(_, l)| l.clone())
                .unwrap_or_default();
            let record = HostPick {
                host: &hosts[i].label,
                cuda_visible_devices: gpus
                    .iter()
                    .map(|g| g.uuid.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                gpus,
                leases: host_leases,
            };
            result = if json {
                out.json(&record)
            } else {
                let mut line = format!(
                    "{} CUDA_VISIBLE_DEVICES={}",
                    record.host, record.cuda_visible_devices
                );
                if !record.leases.is_empty() {
                    let ids: Vec<&str> = record.leases.iter().map(|l| l.id.as_str()).collect();
                    line.push_str(&format!(" GPUWATCH_LEASES={}", ids.join(",")));
                }
                out.line(&line)
            };
            if result.is_err() {
                break;
            }
        }
        let closed = super::finish(&mut out, result);
        return Exit::from_failures(closed);
    }
    Exit::Failed
}

/// Leases exactly the chosen GPUs on each host; on any refusal, releases
/// what was granted and says why.
async fn lease_chosen(
    args: &PickArgs,
    ttl: Duration,
    hosts: &[HostSpec],
    connector: &Connector,
    per_host: &[(usize, Vec<PickedGpu>)],
) -> Result<Vec<(usize, Vec<LeaseRecord>)>, String> {
    let chosen_hosts: Vec<HostSpec> = per_host.iter().map(|(i, _)| hosts[*i].clone()).collect();
    let requests: Vec<LeaseGpusRequest> = per_host
        .iter()
        .map(|(_, gpus)| LeaseGpusRequest {
            criteria: Some(criteria(
                args,
                gpus.iter()
                    .map(|g| GpuSelector {
                        selector: Some(Selector::Uuid(g.uuid.clone())),
                    })
                    .collect(),
                u32::try_from(gpus.len()).unwrap_or(u32::MAX),
            )),
            ttl_s: u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX).max(1),
            purpose: args.purpose.clone(),
        })
        .collect();
    let fleet = Fleet::run(&chosen_hosts, connector, move |i, mut client| {
        let request = requests[i].clone();
        async move {
            client
                .lease_gpus(request)
                .await
                .map(|r| r.into_inner())
                .map_err(HostFailure::from)
        }
    });
    let answers = fleet.collect(chosen_hosts.len()).await;
    let mut granted = Vec::new();
    let mut problems = Vec::new();
    for ((i, _), answer) in per_host.iter().zip(answers) {
        match answer {
            Some(Ok(r)) if r.satisfied => granted.push((
                *i,
                r.leases
                    .iter()
                    .map(|l| LeaseRecord {
                        id: l.id.clone(),
                        index: l.index,
                        uuid: l.uuid.clone(),
                        holder: l.holder.clone(),
                        ttl_s: l.ttl_s,
                        expires: l
                            .expires
                            .and_then(|t| std::time::SystemTime::try_from(t).ok())
                            .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                    })
                    .collect(),
            )),
            Some(Ok(r)) => problems.push(format!(
                "{}: the chosen GPUs were taken meanwhile ({})",
                hosts[*i].label, r.shortfall
            )),
            Some(Err(e)) => problems.push(format!("{}: {e}", hosts[*i].label)),
            None => problems.push(format!("{}: no answer", hosts[*i].label)),
        }
    }
    if problems.is_empty() {
        return Ok(granted);
    }
    // All or nothing over the fleet: give back what this attempt took.
    for (i, leases) in &granted {
        let ids: Vec<String> = leases.iter().map(|l| l.id.clone()).collect();
        let host = hosts[*i].clone();
        let result = Fleet::run(
            std::slice::from_ref(&host),
            connector,
            move |_, mut client| {
                let ids = ids.clone();
                async move {
                    client
                        .release_lease(ReleaseLeaseRequest { lease_ids: ids })
                        .await
                        .map(|_| ())
                        .map_err(HostFailure::from)
                }
            },
        )
        .collect(1)
        .await;
        if let Some(Some(Err(e))) = result.into_iter().next() {
            eprintln!("{}: could not give back a lease: {e}", host.label);
        }
    }
    Err(format!(
        "could not lease the picked GPUs: {}",
        problems.join("; ")
    ))
}

/// What `release` did on one host.
#[derive(Debug, Serialize)]
struct ReleaseRecord<'a> {
    host: &'a str,
    ok: bool,
    released: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Ends the named leases wherever they are held: each host lists its
/// leases and releases those it has.
pub async fn release(
    args: ReleaseArgs,
    hosts: Vec<HostSpec>,
    connector: Connector,
    json: bool,
) -> Exit {
    let wanted = args.leases.clone();
    let fleet = Fleet::run(&hosts, &connector, move |_, mut client| {
        let wanted = wanted.clone();
        async move {
            let live = client
                .list_leases(ListLeasesRequest {})
                .await
                .map_err(HostFailure::from)?
                .into_inner()
                .leases;
            let here: Vec<String> = live
                .into_iter()
                .map(|l| l.id)
                .filter(|id| wanted.contains(id))
                .collect();
            if here.is_empty() {
                return Ok(Vec::new());
            }
            client
                .release_lease(ReleaseLeaseRequest { lease_ids: here })
                .await
                .map(|r| r.into_inner().released.into_iter().map(|l| l.id).collect())
                .map_err(HostFailure::from)
        }
    });
    let answers = fleet.collect(hosts.len()).await;
    let mut out = Output::new();
    let mut failed = false;
    let mut released_all: Vec<String> = Vec::new();
    let mut result = Ok(());
    for (host, answer) in hosts.iter().zip(answers) {
        let (released, error) = match answer {
            Some(Ok(ids)) => (ids, None),
            Some(Err(e)) => (Vec::new(), Some(e.to_string())),
            None => (Vec::new(), Some("no answer".to_owned())),
        };
        failed |= error.is_some();
        released_all.extend(released.iter().cloned());
        let record = ReleaseRecord {
            host: &host.label,
            ok: error.is_none(),
            released,
            error,
        };
        result = if json {
            out.json(&record)
        } else if let Some(e) = &record.error {
            out.line(&format!("{}  FAILED  {e}", record.host))
        } else if !record.released.is_empty() {
            out.line(&format!(
                "{}  released  {}",
                record.host,
                record.released.join(",")
            ))
        } else {
            Ok(())
        };
        if result.is_err() {
            break;
        }
    }
    let missing: Vec<&String> = args
        .leases
        .iter()
        .filter(|id| !released_all.contains(id))
        .collect();
    if !missing.is_empty() {
        failed = true;
        eprintln!(
            "not held on any of these hosts (expired, released, or never granted): {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    failed |= super::finish(&mut out, result);
    Exit::from_failures(failed)
}
