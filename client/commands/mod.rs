//! The one-shot and control commands: `snapshot`, `list`, `events`,
//! `set-power-limit`, `reset-clocks`, `set-threshold` (`watch` has its own
//! module). Each contacts every host at once through [`crate::fleet`] and
//! prints a table or NDJSON; what they share lives here.

pub mod control;
pub mod events;
pub mod list;
pub mod snapshot;

use comfy_table::{ContentArrangement, Table, presets};

use crate::output::{Output, OutputClosed};

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
