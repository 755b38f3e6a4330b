//! local-emulator: plays EventBridge and the SQS event source against `cargo lambda watch`.
//!
//! - EventBridge: invokes `campaign-trigger` every `--trigger-every` seconds (at once on start),
//!   and `broadcast-processor` back to back (each invocation loops with its own tick for
//!   `--processor-run-for` seconds, as the minute schedule does in the cloud);
//! - SQS event source: `--pollers` loops receive up to `--batch-size` records from the queue,
//!   invoke `message-worker` with an `SqsEvent`, delete the records that succeeded and leave the
//!   reported failures to reappear after the visibility timeout; the queue dead-letters a record
//!   after its maximum receive count.
//!
//! All through the invoke URL `http://<addr>/2015-03-31/functions/<name>/invocations`.

use anyhow::{Context, Result};
use aws_lambda_events::event::sqs::SqsBatchResponse;
use clap::Parser;
use shared::queue::{to_sqs_event, Queue};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

#[derive(Parser, Clone)]
#[command(
    name = "local-emulator",
    about = "EventBridge and the SQS event source, locally"
)]
struct Args {
    /// Where `cargo lambda watch` serves the functions.
    #[arg(
        long,
        env = "LAMBDA_INVOKE_URL",
        default_value = "http://127.0.0.1:9000"
    )]
    invoke_url: String,
    #[arg(long, default_value_t = 60)]
    trigger_every: u64,
    #[arg(long, default_value_t = 10)]
    processor_run_for: u64,
    #[arg(long, default_value_t = 250)]
    processor_tick_ms: u64,
    #[arg(long, default_value_t = 4)]
    pollers: usize,
    #[arg(long, default_value_t = 10)]
    batch_size: usize,
    /// Seconds a received record stays hidden (the SQS queue's visibility timeout).
    #[arg(long, default_value_t = 60)]
    visibility_timeout: u64,
    /// Stop after this many seconds (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    #[arg(
        long,
        default_value = "arn:aws:sqs:local:000000000000:wabcast-messages.fifo"
    )]
    queue_arn: String,
}

fn invoke_url(base: &str, function: &str) -> String {
    format!(
        "{}/2015-03-31/functions/{function}/invocations",
        base.trim_end_matches('/')
    )
}

async fn invoke(
    http: &reqwest::Client,
    base: &str,
    function: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    let resp = http
        .post(invoke_url(base, function))
        .json(body)
        .send()
        .await
        .with_context(|| format!("invoking {function}"))?;
    let status = resp.status();
    let function_error = resp.headers().contains_key("x-amz-function-error");
    let text = resp.text().await?;
    if !status.is_success() || function_error {
        anyhow::bail!("{function} answered {status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// Invokes the trigger every `trigger_every` seconds; a failed invocation is retried after a few
/// seconds rather than a whole interval (EventBridge Scheduler retries too).
async fn scheduler(http: reqwest::Client, args: Args) {
    let every = Duration::from_secs(args.trigger_every.max(1));
    loop {
        let event = serde_json::json!({ "source": "wabcast.local-emulator", "function": "campaign-trigger" });
        match invoke(&http, &args.invoke_url, "campaign-trigger", &event).await {
            Ok(r) => {
                info!(report = %r, "campaign-trigger");
                tokio::time::sleep(every).await;
            }
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "campaign-trigger failed; retrying in 2 s"
                );
                tokio::time::sleep(Duration::from_secs(2).min(every)).await;
            }
        }
    }
}

/// Waits until the invoke endpoint accepts connections (cargo lambda watch may still be starting).
async fn wait_for(url: &str) {
    let Ok(parsed) = url::Url::parse(url) else {
        return;
    };
    let (Some(host), Some(port)) = (
        parsed.host_str().map(str::to_string),
        parsed.port_or_known_default(),
    ) else {
        return;
    };
    for _ in 0..600 {
        if tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    warn!(%url, "invoke endpoint still not reachable; starting anyway");
}

async fn processor(http: reqwest::Client, args: Args) {
    loop {
        let event = serde_json::json!({
            "source": "wabcast.local-emulator",
            "run_for_seconds": args.processor_run_for,
            "tick_ms": args.processor_tick_ms,
        });
        match invoke(&http, &args.invoke_url, "broadcast-processor", &event).await {
            Ok(r) => info!(report = %r, "broadcast-processor"),
            Err(e) => {
                warn!(error = format!("{e:#}"), "broadcast-processor failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn poller(http: reqwest::Client, args: Args, queue: Arc<dyn Queue>) {
    let visibility = Duration::from_secs(args.visibility_timeout);
    loop {
        let msgs = match queue.receive(args.batch_size, visibility).await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "queue receive failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if msgs.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let event = to_sqs_event(&msgs, &args.queue_arn);
        let body = match serde_json::to_value(&event) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "could not encode SqsEvent");
                continue;
            }
        };
        let failed: HashSet<String> = match invoke(&http, &args.invoke_url, "message-worker", &body)
            .await
        {
            Ok(v) => match serde_json::from_value::<SqsBatchResponse>(v) {
                Ok(r) => r
                    .batch_item_failures
                    .into_iter()
                    .map(|f| f.item_identifier)
                    .collect(),
                Err(e) => {
                    warn!(error = %e, "unreadable worker response; the batch reappears after the visibility timeout");
                    msgs.iter().map(|m| m.message_id.clone()).collect()
                }
            },
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "message-worker failed; the batch reappears after the visibility timeout"
                );
                msgs.iter().map(|m| m.message_id.clone()).collect()
            }
        };
        let done: Vec<String> = msgs
            .iter()
            .filter(|m| !failed.contains(&m.message_id))
            .map(|m| m.receipt_handle.clone())
            .collect();
        if let Err(e) = queue.delete_batch(&done).await {
            warn!(error = %e, "delete failed; the records will be delivered again (the worker ignores duplicates)");
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    shared::telemetry::init();
    let args = Args::parse();
    let queue = shared::queue::QueueConfig::from_env()?.connect().await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.processor_run_for + 120))
        .build()?;
    wait_for(&args.invoke_url).await;
    info!(invoke_url = %args.invoke_url, pollers = args.pollers, "local emulator running");
    let mut tasks = vec![
        tokio::spawn(scheduler(http.clone(), args.clone())),
        tokio::spawn(processor(http.clone(), args.clone())),
    ];
    for _ in 0..args.pollers.max(1) {
        tasks.push(tokio::spawn(poller(
            http.clone(),
            args.clone(),
            queue.clone(),
        )));
    }
    let stop = async {
        if args.duration > 0 {
            tokio::time::sleep(Duration::from_secs(args.duration)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = stop => info!("duration reached; stopping"),
        _ = tokio::signal::ctrl_c() => info!("interrupted; stopping"),
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}
