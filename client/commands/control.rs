//! The control commands: `set-power-limit`, `set-power-budget`,
//! `reset-clocks`, `set-threshold`.
//!
//! The same request goes to every named host at once; each host's answer is
//! printed as its own result lines (one per GPU), and a host that fails says
//! so on its own line without stopping the others. Any failure makes the
//! exit code 1.

use gpuwatch_api::names;
use gpuwatch_api::{
    ResetClocksRequest, ResetOutcome, SetPowerBudgetRequest, SetPowerLimitRequest,
    SetThresholdRequest, set_power_budget_request, set_power_limit_request, set_threshold_request,
};
use serde::Serialize;

use crate::{
    app::Exit,
    cli::{ResetClocksArgs, SetPowerBudgetArgs, SetPowerLimitArgs, SetThresholdArgs, selectors},
    commands::finish,
    connect::{Client, Connector, HostFailure},
    fleet::Fleet,
    hosts::HostSpec,
    output::{Output, OutputClosed},
    record::Exact,
    units,
};

/// One GPU's result, or one host's failure, as printed.
#[derive(Debug, Serialize)]
struct ResultRecord<'a, D: Serialize> {
    host: &'a str,
    action: &'static str,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    detail: Option<D>,
}

/// A GPU's result: its identity, whether it worked, the JSON detail, and
/// the words for the terminal.
struct GpuResult<D> {
    index: u32,
    uuid: String,
    ok: bool,
    error: Option<String>,
    detail: D,
    text: String,
}

/// Runs `call` on every host and prints the results.
async fn apply<D, F, Fut>(
    action: &'static str,
    hosts: Vec<HostSpec>,
    connector: Connector,
    json: bool,
    call: F,
) -> Exit
where
    D: Serialize + Send + 'static,
    F: Fn(Client) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<GpuResult<D>>, HostFailure>> + Send + 'static,
{
    let mut fleet = Fleet::run(&hosts, &connector, move |_, client| call.clone()(client));
    let mut out = Output::new();
    let mut failed = false;
    // Results are printed as hosts answer: a slow host delays only itself.
    let result: Result<(), OutputClosed> = async {
        while let Some((i, answer)) = fleet.next().await {
            let host = &hosts[i].label;
            match answer {
                Ok(results) => {
                    if results.is_empty() {
                        failed = true;
                        let error = "the daemon changed no GPU".to_owned();
                        print_failure::<D>(&mut out, json, host, action, &error, None)?;
                    }
                    for r in results {
                        failed |= !r.ok;
                        if json {
                            out.json(&ResultRecord {
                                host,
                                action,
                                ok: r.ok,
                                index: Some(r.index),
                                uuid: Some(&r.uuid),
                                error: r.error.clone(),
                                code: None,
                                detail: Some(r.detail),
                            })?;
                        } else {
                            let status = if r.ok { "ok" } else { "FAILED" };
                            out.line(&format!("{host}  GPU {}  {status}  {}", r.index, r.text))?;
                        }
                    }
                }
                Err(e) => {
                    failed = true;
                    print_failure::<D>(
                        &mut out,
                        json,
                        host,
                        action,
                        &e.to_string(),
                        e.code_name(),
                    )?;
                }
            }
            out.flush()?;
        }
        Ok(())
    }
    .await;
    failed |= finish(&mut out, result);
    Exit::from_failures(failed)
}

fn print_failure<D: Serialize>(
    out: &mut Output,
    json: bool,
    host: &str,
    action: &'static str,
    error: &str,
    code: Option<&'static str>,
) -> Result<(), OutputClosed> {
    if json {
        out.json(&ResultRecord::<D> {
            host,
            action,
            ok: false,
            index: None,
            uuid: None,
            error: Some(error.to_owned()),
            code,
            detail: None,
        })
    } else {
        out.line(&format!("{host}  FAILED  {error}"))
    }
}

#[derive(Debug, Serialize)]
struct PowerDetail {
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_ceiling_w: Option<Exact>,
    ceiling_w: Exact,
    applied_limit_w: Exact,
    written: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    note: String,
}

pub async fn set_power_limit(
    args: SetPowerLimitArgs,
    hosts: Vec<HostSpec>,
    connector: Connector,
    json: bool,
) -> Exit {
    let target = match args.watts {
        Some(w) if !args.default => set_power_limit_request::Target::Watts(w),
        _ => set_power_limit_request::Target::RestoreDefault(true),
    };
    let gpus = selectors(&args.target.gpu);
    apply(
        "set_power_limit",
        hosts,
        connector,
        json,
        move |mut client| {
            let request = SetPowerLimitRequest {
                gpus: gpus.clone(),
                target: Some(target),
            };
            async move {
                let response = client.set_power_limit(request).await?.into_inner();
                Ok(response
                    .results
                    .into_iter()
                    .map(|r| {
                        let was = r.previous_ceiling_mw.map_or_else(
                            || "device default".to_owned(),
                            |mw| format!("{} W", units::watts_value(mw)),
                        );
                        let mut text = format!(
                            "ceiling {} W (was {was}) · limit {} W{}",
                            units::watts_value(r.ceiling_mw),
                            units::watts_value(r.applied_limit_mw),
                            if r.written {
                                " written"
                            } else {
                                " (unchanged)"
                            }
                        );
                        if !r.note.is_empty() {
                            text.push_str(&format!(" · {}", r.note));
                        }
                        GpuResult {
                            index: r.index,
                            uuid: r.uuid,
                            ok: true,
                            error: None,
                            detail: PowerDetail {
                                previous_ceiling_w: r.previous_ceiling_mw.map(Exact::watts),
                                ceiling_w: Exact::watts(r.ceiling_mw),
                                applied_limit_w: Exact::watts(r.applied_limit_mw),
                                written: r.written,
                                note: r.note,
                            },
                            text,
                        }
                    })
                    .collect())
            }
        },
    )
    .await
}

#[derive(Debug, Serialize)]
struct BudgetDetail {
    /// The budget now in force (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_budget_w: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    share_before_w: Option<Exact>,
    #[serde(skip_serializing_if = "Option::is_none")]
    share_w: Option<Exact>,
}

/// `set-power-budget`: one line per GPU with its share before and after.
pub async fn set_power_budget(
    args: SetPowerBudgetArgs,
    hosts: Vec<HostSpec>,
    connector: Connector,
    json: bool,
) -> Exit {
    let target = match args.watts {
        Some(w) if !args.default => set_power_budget_request::Target::Watts(w),
        _ => set_power_budget_request::Target::RestoreDefault(true),
    };
    apply(
        "set_power_budget",
        hosts,
        connector,
        json,
        move |mut client| {
            let request = SetPowerBudgetRequest {
                target: Some(target),
            };
            async move {
                let response = client.set_power_budget(request).await?.into_inner();
                let budget_w = response.power_budget.as_ref().map(|b| b.watts);
                let previous_budget_w = response.previous.as_ref().map(|b| b.watts);
                let words = |w: Option<f64>| w.map_or("none".to_owned(), |w| format!("{w:.0} W"));
                Ok(response
                    .shares
                    .into_iter()
                    .map(|s| {
                        let share = |mw: Option<u32>| {
                            mw.map_or("none".to_owned(), |mw| {
                                format!("{} W", units::watts_value(mw))
                            })
                        };
                        let text = format!(
                            "budget {} (was {}) · share {} (was {})",
                            words(budget_w),
                            words(previous_budget_w),
                            share(s.after_mw),
                            share(s.before_mw)
                        );
                        GpuResult {
                            index: s.index,
                            uuid: s.uuid,
                            ok: true,
                            error: None,
                            detail: BudgetDetail {
                                budget_w,
                                previous_budget_w,
                                share_before_w: s.before_mw.map(Exact::watts),
                                share_w: s.after_mw.map(Exact::watts),
                            },
                            text,
                        }
                    })
                    .collect())
            }
        },
    )
    .await
}

#[derive(Debug, Serialize)]
struct ResetDetail {
    application_clocks: String,
    locked_gpu_clocks: String,
    locked_memory_clocks: String,
}

pub async fn reset_clocks(
    args: ResetClocksArgs,
    hosts: Vec<HostSpec>,
    connector: Connector,
    json: bool,
) -> Exit {
    let gpus = selectors(&args.target.gpu);
    apply("reset_clocks", hosts, connector, json, move |mut client| {
        let request = ResetClocksRequest { gpus: gpus.clone() };
        async move {
            let response = client.reset_clocks(request).await?.into_inner();
            Ok(response
                .results
                .into_iter()
                .map(|r| {
                    let parts = [
                        r.application_clocks,
                        r.locked_gpu_clocks,
                        r.locked_memory_clocks,
                    ];
                    let ok = r.error.is_none() && !parts.contains(&(ResetOutcome::Failed as i32));
                    let detail = ResetDetail {
                        application_clocks: names::name_of::<gpuwatch_api::ResetOutcome>(
                            r.application_clocks,
                        ),
                        locked_gpu_clocks: names::name_of::<gpuwatch_api::ResetOutcome>(
                            r.locked_gpu_clocks,
                        ),
                        locked_memory_clocks: names::name_of::<gpuwatch_api::ResetOutcome>(
                            r.locked_memory_clocks,
                        ),
                    };
                    let mut text = format!(
                        "application clocks: {} · locked clocks: {} · locked memory clocks: {}",
                        detail.application_clocks,
                        detail.locked_gpu_clocks,
                        detail.locked_memory_clocks
                    );
                    if let Some(e) = &r.error {
                        text.push_str(&format!(" · {e}"));
                    }
                    GpuResult {
                        index: r.index,
                        uuid: r.uuid,
                        ok,
                        error: r.error,
                        detail,
                        text,
                    }
                })
                .collect())
        }
    })
    .await
}

#[derive(Debug, Serialize)]
struct ThresholdDetail {
    previous_threshold_c: u32,
    threshold_c: u32,
    hysteresis_c: u32,
    threshold_source: String,
}

pub async fn set_threshold(
    args: SetThresholdArgs,
    hosts: Vec<HostSpec>,
    connector: Connector,
    json: bool,
) -> Exit {
    let target = match args.celsius {
        Some(c) if !args.default => set_threshold_request::Target::Celsius(c),
        _ => set_threshold_request::Target::RestoreDefault(true),
    };
    let gpus = selectors(&args.target.gpu);
    let hysteresis = args.hysteresis;
    apply(
        "set_threshold",
        hosts,
        connector,
        json,
        move |mut client| {
            let request = SetThresholdRequest {
                gpus: gpus.clone(),
                target: Some(target),
                hysteresis_c: hysteresis,
            };
            async move {
                let response = client.set_threshold(request).await?.into_inner();
                Ok(response
                    .results
                    .into_iter()
                    .map(|r| {
                        let detail = ThresholdDetail {
                            previous_threshold_c: r.previous_threshold_c,
                            threshold_c: r.threshold_c,
                            hysteresis_c: r.hysteresis_c,
                            threshold_source: names::name_of::<gpuwatch_api::ThresholdSource>(
                                r.threshold_source,
                            ),
                        };
                        let text = format!(
                            "threshold {} °C (was {} °C) · hysteresis {} °C · source {}",
                            r.threshold_c,
                            r.previous_threshold_c,
                            r.hysteresis_c,
                            detail.threshold_source
                        );
                        GpuResult {
                            index: r.index,
                            uuid: r.uuid,
                            ok: true,
                            error: None,
                            detail,
                            text,
                        }
                    })
                    .collect())
            }
        },
    )
    .await
}
