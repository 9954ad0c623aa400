//! The CLI's black-box suites, one module each, in one test binary: the real
//! `gpuwatch-client` against real `gpuwatch-server` daemons on loopback
//! ports, both started through the test kit.
//!
//! The daemon binary comes from the same target directory; `cargo test
//! --workspace` builds it. Run one suite with
//! `cargo test -p gpuwatch-client --test it watch::`.

mod support;

mod control;
mod fleet_bench;
mod history;
mod pick;
mod ps;
mod record;
mod security;
mod snapshot;
mod tls;
mod tui;
mod watch;
