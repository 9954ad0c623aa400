//! `watch` for people: the live table in the terminal's alternate screen.
//!
//! Owns the terminal for as long as it runs: raw mode and the alternate
//! screen are entered through a guard that restores them on every way out
//! (q, Ctrl-C, SIGTERM, an error, a panic), so the shell is left as it was.
//! Redraws happen at most four times a second, and only when something
//! changed (or a reconnect countdown ticks).

use std::{
    io::{self, Stdout},
    sync::{
        Arc, Once,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor::{Hide, Show},
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute,
        terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode},
    },
    layout::{Constraint, Layout},
    text::Line,
    widgets::Paragraph,
};
use tokio::sync::mpsc::{self, error::TryRecvError};

use crate::{
    hosts::HostSpec,
    watch::{
        session::Update,
        view::{Columns, FleetView},
    },
};

/// Shortest time between two redraws.
const FRAME: Duration = Duration::from_millis(250);

/// Why the view ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quit {
    /// q, Esc or Ctrl-C.
    User,
    /// SIGTERM/SIGINT, or `--duration` ran out.
    Stopped,
    /// Every host task ended (cannot happen while they retry forever).
    Closed,
}

/// Puts the terminal back: cooked mode, main screen, visible cursor.
fn restore_terminal() {
    let _ = disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
}

/// Holds the terminal in raw mode and the alternate screen.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> io::Result<Self> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        // The guard exists before the first change, so a failure half-way
        // still restores what was changed.
        let guard = TerminalGuard;
        enable_raw_mode()?;
        execute!(io::stdout(), EnterAlternateScreen, Hide)?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Runs the view on the calling (blocking) thread until the user quits,
/// `stop` is set, or `deadline` passes.
pub fn run(
    mut rx: mpsc::Receiver<Update>,
    hosts: &[HostSpec],
    interval: Duration,
    stop: Arc<AtomicBool>,
    deadline: Option<Instant>,
) -> io::Result<Quit> {
    let _guard = TerminalGuard::enter()?;
    let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    terminal.clear()?;
    let mut view = FleetView::new(hosts, interval);
    let mut scroll: usize = 0;
    let mut dirty = true;
    let mut last_draw: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Quit::Stopped);
        }
        let now = Instant::now();
        loop {
            match rx.try_recv() {
                Ok(update) => {
                    view.apply(update, now);
                    dirty = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(Quit::Closed),
            }
        }
        let since = last_draw.map(|t| now.duration_since(t));
        let countdown_due =
            view.counting_down() && since.is_none_or(|s| s >= Duration::from_secs(1));
        if (dirty || countdown_due) && since.is_none_or(|s| s >= FRAME) {
            draw(&mut terminal, &view, &mut scroll)?;
            last_draw = Some(now);
            dirty = false;
        }
        // Wait for a key until the next redraw could be due.
        if event::poll(FRAME)? {
            match event::read()? {
                Event::Key(key) if key.kind != KeyEventKind::Release => {
                    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL)
                        && matches!(key.code, KeyCode::Char('c') | KeyCode::Char('C'));
                    match key.code {
                        KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => {
                            return Ok(Quit::User);
                        }
                        _ if ctrl_c => return Ok(Quit::User),
                        KeyCode::Down | KeyCode::Char('j') => scroll = scroll.saturating_add(1),
                        KeyCode::Up | KeyCode::Char('k') => scroll = scroll.saturating_sub(1),
                        KeyCode::PageDown | KeyCode::Char(' ') => {
                            scroll = scroll.saturating_add(20)
                        }
                        KeyCode::PageUp => scroll = scroll.saturating_sub(20),
                        KeyCode::Home | KeyCode::Char('g') => scroll = 0,
                        KeyCode::End | KeyCode::Char('G') => scroll = usize::MAX,
                        _ => continue,
                    }
                    dirty = true;
                    last_draw = None;
                }
                Event::Resize(..) => {
                    dirty = true;
                    last_draw = None;
                }
                _ => {}
            }
        }
    }
}

fn draw(
    terminal: &mut Terminal<CrosstermBackend<Stdout>>,
    view: &FleetView,
    scroll: &mut usize,
) -> io::Result<()> {
    let now = Instant::now();
    let clock = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let total = view.body_len();
    terminal.draw(|frame| {
        let [title, header, table, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Min(1),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        let rows = usize::from(table.height);
        let cols = Columns::for_width(table.width);
        let max_scroll = total.saturating_sub(rows);
        *scroll = (*scroll).min(max_scroll);
        let shown = view.body_window(now, *scroll, rows, cols);
        frame.render_widget(Paragraph::new(view.title(&clock)), title);
        frame.render_widget(Paragraph::new(FleetView::header(cols)), header);
        frame.render_widget(Paragraph::new(shown), table);
        let more = if max_scroll > 0 {
            format!(
                "rows {}-{} of {} (↑↓ PgUp PgDn to scroll)",
                *scroll + 1,
                (*scroll + rows).min(total),
                total
            )
        } else {
            String::new()
        };
        frame.render_widget(Paragraph::new(Line::from(more)), footer);
    })?;
    Ok(())
}
