//! The one-shot and control commands: `snapshot`, `ps`, `list`, `events`,
//! `set-power-limit`, `reset-clocks`, `set-threshold`, `pick`, `release`
//! (`watch` has its own module). Each contacts every host at once through [`crate::fleet`] and
//! prints a table or NDJSON; what they share lives here.

pub mod control;
pub mod events;
pub mod history;
pub mod list;
pub mod pick;
pub mod ps;
pub mod snapshot;

use comfy_table::{ContentArrangement, Table, presets};

use crate::{
    app::Exit,
    connect::HostFailure,
    fleet::Fleet,
    hosts::HostSpec,
    output::{Output, OutputClosed},
};

/// One host's answer, or why there is none (`None`: the host never answered).
pub type HostAnswer<T> = Option<Result<T, HostFailure>>;

/// Prints a fleet's answers and gives the exit status. With `json`, each
/// host's records go out as soon as it answers (a dead host never holds the
/// others back); otherwise `write_table` gets every answer, in the order the
/// hosts were given, once all have answered. Any host without a good answer
/// makes the command fail.
pub async fn print_answers<T: Send + 'static>(
    mut fleet: Fleet<T>,
    hosts: &[HostSpec],
    json: bool,
    write_json: impl Fn(&mut Output, &HostSpec, &Result<T, HostFailure>) -> Result<(), OutputClosed>,
    write_table: impl FnOnce(&mut Output, &[HostSpec], &[HostAnswer<T>]) -> Result<(), OutputClosed>,
) -> Exit {
    let mut out = Output::new();
    let mut failed = false;
    let result = if json {
        async {
            while let Some((i, answer)) = fleet.next().await {
                failed |= answer.is_err();
                write_json(&mut out, &hosts[i], &answer)?;
                out.flush()?;
            }
            Ok(())
        }
        .await
    } else {
        let answers = fleet.collect(hosts.len()).await;
        failed |= answers.iter().any(|a| !matches!(a, Some(Ok(_))));
        write_table(&mut out, hosts, &answers)
    };
    failed |= finish(&mut out, result);
    Exit::from_failures(failed)
}

/// A borderless table in the style of `kubectl get`: easy to read and to grep.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    t
}

/// Writes a table without trailing blanks.
pub fn print_table(out: &mut Output, table: &Table) -> Result<(), OutputClosed> {
    for line in table.lines() {
        out.line(line.trim_end())?;
    }
    Ok(())
}

/// Ends a command's output: flushes, and turns a write failure into a
/// failure flag (a closed pipe is none).
pub fn finish(out: &mut Output, result: Result<(), OutputClosed>) -> bool {
    match result.and_then(|()| out.flush()) {
        Ok(()) => false,
        Err(closed) => closed.report(),
    }
}
