//! Tracing set-up: JSON lines in the cloud (or when `LOG_FORMAT=json`), readable text locally.
//! The filter comes from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT")
        .map(|v| v == "json")
        .unwrap_or(false)
        || std::env::var("AWS_LAMBDA_FUNCTION_NAME").is_ok();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests, or a binary that calls it twice) is harmless.
    let _ = if json {
        builder.json().with_current_span(false).try_init()
    } else {
        builder.compact().try_init()
    };
}
