//! The deployable pieces agree with each other: the template schedules the functions with the
//! inputs in `events/`, points at the paths `cargo lambda build` writes, and the container image
//! builds the host with the command CI runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

fn read(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn the_schedules_pass_the_sample_scheduler_events() {
    let template = read("infra/template.yaml");
    let inputs: Vec<serde_json::Value> = template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Input: '"))
        .map(|l| json(l.trim_end_matches('\'')))
        .collect();
    for event in [
        "events/campaign-trigger/scheduler.json",
        "events/broadcast-processor/scheduler.json",
    ] {
        let want = json(&read(event));
        assert!(
            inputs.contains(&want),
            "no schedule in infra/template.yaml passes {event} ({want})"
        );
    }
    assert_eq!(inputs.len(), 2);
}

#[test]
fn every_function_deploys_from_its_cargo_lambda_output() {
    let template = read("infra/template.yaml");
    for f in ["campaign-trigger", "broadcast-processor", "message-worker"] {
        assert!(
            template.contains(&format!("CodeUri: ../target/lambda/{f}/")),
            "{f} is not deployed from target/lambda/{f}/"
        );
        assert!(
            read(&format!("functions/{f}/Cargo.toml")).contains(&format!("name = \"{f}\"")),
            "package {f} must be named like its function"
        );
    }
    let test_script = read("infra/test.sh");
    assert!(test_script
        .contains("cargo lambda build --release --locked -p campaign-trigger -p broadcast-processor -p message-worker"));
}

#[test]
fn the_host_image_builds_with_the_command_ci_runs() {
    let dockerfile = read("infra/device-host.Dockerfile");
    let runs: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("RUN cargo "))
        .collect();
    assert_eq!(runs.len(), 1, "one cargo step in the image");
    let command = format!("cargo {}", runs[0]);
    assert!(
        read("infra/test.sh").lines().any(|l| l.trim() == command),
        "infra/test.sh must run `{command}` so the image's build step is exercised"
    );
    assert!(dockerfile.contains("--healthcheck"));
}

#[test]
fn the_queue_keeps_its_records_hidden_six_times_the_worker_timeout() {
    let template = read("infra/template.yaml");
    let mut rows = 0;
    for line in template.lines() {
        // `"30": { VisibilityTimeout: 180 }`
        let Some((key, rest)) = line.trim().split_once(": { VisibilityTimeout: ") else {
            continue;
        };
        let timeout: u32 = key.trim_matches('"').parse().unwrap();
        let visibility: u32 = rest.trim_end_matches(" }").parse().unwrap();
        assert_eq!(visibility, 6 * timeout, "{line}");
        assert!(
            template.contains(&format!("\"{timeout}\", "))
                || template.contains(&format!("\"{timeout}\"]")),
            "{timeout} must be an allowed worker timeout"
        );
        rows += 1;
    }
    assert!(rows >= 4);
}

/// The lines of one resource of the template: from its `  Name:` line to the next resource.
fn resource<'a>(template: &'a str, name: &str) -> Vec<&'a str> {
    let header = format!("  {name}:");
    template
        .lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !(l.starts_with("  ") && !l.starts_with("   ") && l.ends_with(':')))
        .collect()
}

fn number(lines: &[&str], key: &str) -> u64 {
    let values: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{key}: {v}: {e}")))
        .collect();
    assert_eq!(values.len(), 1, "one {key} expected, found {values:?}");
    values[0]
}

/// Drain latency is about a second only if some processor is looping at every second of the
/// minute: each scheduled invocation must outlast the schedule's period (so a late schedule or a
/// cold start leaves no undrained gap), and must finish its last tick before Lambda's timeout.
#[test]
fn the_processors_invocations_overlap_and_end_before_their_timeout() {
    let template = read("infra/template.yaml");
    let processor = resource(&template, "BroadcastProcessor");
    assert!(
        processor
            .iter()
            .any(|l| l.trim() == "ScheduleExpression: rate(1 minute)"),
        "the processor runs every minute: {processor:#?}"
    );
    let run_for_ms = number(&processor, "PROCESSOR_RUN_FOR_S") * 1000;
    let tick_ms = number(&processor, "PROCESSOR_TICK_MS");
    let timeout_ms = number(&processor, "Timeout") * 1000;
    assert!(
        run_for_ms >= 60_000 + 3 * tick_ms,
        "invocations of {run_for_ms} ms with a {tick_ms} ms tick leave part of each minute undrained"
    );
    assert!(
        timeout_ms >= run_for_ms + 10_000,
        "a {timeout_ms} ms timeout leaves no room for the last tick after {run_for_ms} ms"
    );
    assert_eq!(
        broadcast_processor::Settings::default().run_for.as_millis(),
        u128::from(run_for_ms),
        "the code's default and the template agree"
    );
}

/// Every migration newer than the rules follows them (`wabcast_tests::migration_lint`): an index
/// on a big table is built concurrently, alone in a `-- no-transaction` file, `IF NOT EXISTS`.
/// The last file written before the rules, read as if it were new, is refused: it built its
/// `leads` index under a write lock.
#[test]
fn migrations_build_big_tables_indexes_without_blocking_writes() {
    use wabcast_tests::migration_lint::{lint_migration, FIRST_CHECKED};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let mut problems = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        files += 1;
        problems.extend(lint_migration(
            &name,
            &std::fs::read_to_string(&path).unwrap(),
        ));
    }
    assert!(
        files >= 15,
        "read {files} migrations from {}",
        dir.display()
    );
    assert!(problems.is_empty(), "{problems:#?}");

    let last = read("migrations/20261204000001_opt_out_lookups.sql");
    let as_new = format!("{FIRST_CHECKED}_opt_out_lookups.sql");
    let refused = lint_migration(&as_new, &last);
    assert!(
        refused
            .iter()
            .any(|p| p.contains("index on leads without CONCURRENTLY")),
        "{refused:?}"
    );
}
