//! The daemon's black-box suites, one module each, in one test binary (so a
//! change relinks one binary, not twenty): the real `gpuwatch-server` on
//! loopback ports, started through the test kit, talked to over gRPC and
//! HTTP; plus the suites that drive the daemon's library directly (governor
//! scenarios, configuration fuzzing, the NVML backend over the stand-in
//! libnvidia-ml.so).
//!
//! Run one suite with `cargo test -p gpuwatch-server --test it daemon_api::`.

mod http_support;
mod nvml_support;
mod support;

mod attribution;
mod control_faults;
mod daemon_api;
mod daemon_budget;
mod daemon_edges;
mod daemon_governor;
mod daemon_latency;
mod daemon_lifecycle;
mod daemon_persistence;
mod daemon_reliability;
mod daemon_security;
mod deploy_config;
mod deploy_files;
mod fault_injection;
mod fuzz_config;
mod fuzz_requests;
mod governor_scenarios;
mod history;
mod http_auth;
mod http_dashboard;
mod http_dcgm;
mod http_hardening;
mod http_metrics;
mod leases;
mod nvml_backend;
mod nvml_control;
mod nvml_faults;
mod nvml_mig;
mod soak;
mod state_faults;
mod upgrade;
