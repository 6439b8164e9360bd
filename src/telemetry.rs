//! Structured logging with tracing: text for people, JSON for log pipelines.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::settings::LogFormat;

/// Installs the global subscriber; `RUST_LOG` filters (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry.with(fmt::layer().json().flatten_event(true).with_current_span(true)).try_init(),
        LogFormat::Text => registry.with(fmt::layer()).try_init(),
    };
    // A subscriber may already be set (tests, embedding); keep that one.
    let _ = result;
}
