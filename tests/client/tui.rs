//! The live `watch` view in a real terminal: tmux runs the client against
//! real daemons, the screen is read back with `capture-pane`, and `q` and
//! Ctrl-C must leave the shell as it was (main screen, cooked mode, cursor).
//!
//! Needs tmux; without it the test says so and passes (`.ci/client.sh`
//! installs tmux and runs it for real).

use crate::support::{CONSUMER_FLEET, Tmux, client_bin};

/// Runs `watch` in the pane, checks the table, quits with `keys`, and checks
/// the terminal is back to normal.
fn watch_then_quit(tmux: &Tmux, hosts: &[String], keys: &str, run: usize) {
    let marker = format!("EXIT{run}=");
    tmux.type_line(&format!(
        "clear; {} watch --interval 200ms {}; echo {marker}$?",
        client_bin().display(),
        hosts.join(" ")
    ));
    let screen = tmux.wait_screen("every GPU of both hosts", |s| {
        s.contains("H100")
            && s.contains("RTX 4070 Laptop GPU")
            && s.matches("● connected").count() == 2
            && s.contains("°C")
    });
    assert_eq!(
        tmux.format("#{alternate_on}"),
        "1",
        "the view runs in the alternate screen"
    );
    for host in hosts {
        assert!(screen.contains(host.as_str()), "{host} missing:\n{screen}");
    }
    for column in ["TEMP", "POWER / LIMIT", "MEMORY", "THROTTLE", "GOVERNOR"] {
        assert!(screen.contains(column), "{column} missing:\n{screen}");
    }
    assert!(
        screen.contains(" W") && screen.contains("MHz") && screen.contains("GiB"),
        "{screen}"
    );
    // 4 demo GPUs + 2 consumer GPUs, one row each, each with a temperature.
    assert!(screen.matches("°C").count() >= 6, "{screen}");
    // Who is on each GPU, under its row: the demo fleet's pod on GPU 0,
    // its Slurm step on GPU 1, the A100's MIG instances and the notebook
    // allocated one of them but running nothing, the unit on GPU 3 (the
    // demo fleet's workloads, server/backend/sim/mod.rs).
    let screen = tmux.wait_screen("who is on each GPU", |s| {
        s.contains("ml/trainer-0/main") && s.contains("render-farm.service")
    });
    for owner in [
        "↳ ml/trainer-0/main",
        "slurm:81723.0",
        "3 MIG",
        "idle: research/notebook-5",
    ] {
        assert!(screen.contains(owner), "{owner} missing:\n{screen}");
    }

    tmux.tmux(&["send-keys", keys]);
    let screen = tmux.wait_screen("the exit status", |s| s.contains(&marker));
    assert!(
        screen.contains(&format!("{marker}0")),
        "watch exited non-zero:\n{screen}"
    );
    assert_eq!(
        tmux.format("#{alternate_on}"),
        "0",
        "left the alternate screen"
    );
    assert_eq!(
        tmux.format("#{cursor_flag}"),
        "1",
        "the cursor is visible again"
    );
    // Cooked mode is back: stty reports canonical input and echo.
    tmux.type_line(&format!(
        "echo \"MODE{run}=$(stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | sort | tr '\\n' ,)END\""
    ));
    let prefix = format!("MODE{run}=");
    let is_output = |l: &str| l.starts_with(&prefix) && l.trim_end().ends_with("END");
    let screen = tmux.wait_screen("stty output", |s| s.lines().any(is_output));
    let mode = screen
        .lines()
        .find(|l| is_output(l))
        .unwrap_or_default()
        .trim_end();
    assert_eq!(
        mode,
        format!("{prefix}echo,icanon,END"),
        "terminal left in raw mode:\n{screen}"
    );
}

#[test]
fn live_view_shows_every_gpu_and_quits_cleanly() {
    if !Tmux::available() {
        // .ci/client.sh sets this so a missing tmux fails instead of skipping.
        assert!(
            std::env::var_os("GPUWATCH_REQUIRE_TMUX").is_none(),
            "tmux is required (GPUWATCH_REQUIRE_TMUX is set) but not installed"
        );
        eprintln!(
            "SKIPPED live_view_shows_every_gpu_and_quits_cleanly: tmux is not installed (run .ci/client.sh)"
        );
        return;
    }
    let a = crate::support::start(None);
    let b = crate::support::start(Some(CONSUMER_FLEET));
    let hosts = [a.host(), b.host()];
    let tmux = Tmux::start("tui");
    watch_then_quit(&tmux, &hosts, "q", 1);
    watch_then_quit(&tmux, &hosts, "C-c", 2);
}
