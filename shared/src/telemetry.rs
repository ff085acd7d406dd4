//! One telemetry setup for every Meridian binary: an env filter from
//! `RUST_LOG` (default `info`) and plain or JSON output (`MERIDIAN_LOG_FORMAT=json`).

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global tracing subscriber. Safe to call more than once (later calls are no-ops).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("MERIDIAN_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
