//! `livepipe run` with no source flags: the embedded demo starts its own
//! Kafka-protocol broker and traffic, and billing files appear with the
//! default rules (the demo's traffic starts minutes in the past).

use testkit::{demo_args, dir_bytes, wait_for, Job, Livepipe};

use std::time::{Duration, Instant};

#[test]
fn the_demo_starts_produces_and_writes_billing_files_with_no_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let log = dir.path().join("demo.log");
    let started = Instant::now();
    let mut job = Job::start(&demo_args(&out), &log);
    // The dashboard's API lists streams with viewers soon after start.
    let addr = job.addr();
    let live_streams = || -> usize {
        let Ok(response) = testkit::http::try_get(&addr, "/api/live") else {
            return 0;
        };
        if response.status != 200 {
            return 0;
        }
        let body = response.body;
        let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        list.iter()
            .filter(|s| s["viewers"].as_u64().unwrap_or(0) > 0)
            .count()
    };
    wait_for(
        &mut job,
        Duration::from_secs(120),
        "streams on /api/live",
        || live_streams() >= 10,
    );
    // A figure for the notes (debug build, tests in parallel), not a bound.
    eprintln!(
        "/api/live listed streams with viewers {:?} after start",
        started.elapsed()
    );
    wait_for(
        &mut job,
        Duration::from_secs(300),
        "a finalized billing period",
        || {
            dir_bytes(&out.join("billing"))
                .keys()
                .any(|name| name.ends_with(".csv.done"))
        },
    );
    let log = job.log();
    job.stop();
    assert!(log.contains("in-process Kafka broker"), "{log}");

    let files = dir_bytes(&out.join("billing"));
    let rows: usize = files
        .iter()
        .filter(|(name, _)| name.ends_with(".csv"))
        .map(|(_, csv)| csv.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() - 1)
        .sum();
    assert!(rows > 0, "the demo bills impressions");
    // The traffic plants malformed records; they are dead-lettered with
    // their Kafka position.
    let rejected = std::fs::read_to_string(out.join("rejected.jsonl")).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(rejected.lines().next().expect("a rejected record")).unwrap();
    assert_eq!(first["source"], "livestream-events");
    assert!(first["partition"].as_u64().unwrap() < 4);
    assert!(first["offset"].is_u64());
}

#[test]
fn the_demo_runs_again_on_its_own_output_but_never_replaces_another_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let demo = |log: &str| Job::start(&demo_args(&out), &dir.path().join(log));
    let has_ledger = || out.join("ledger.sqlite").exists();
    for log in ["first.log", "second.log"] {
        let mut job = demo(log);
        wait_for(
            &mut job,
            Duration::from_secs(120),
            "the demo's ledger",
            has_ledger,
        );
        // Up and serving: the earlier output (if any) was replaced.
        job.addr();
        job.stop();
    }
    assert!(
        std::fs::read_to_string(dir.path().join("second.log"))
            .unwrap()
            .contains("replacing the earlier demo's output"),
        "the second run said what it did"
    );

    // An --out that holds a file job's ledger is never the demo's to replace.
    let file_out = dir.path().join("files");
    let input = dir.path().join("x.jsonl");
    std::fs::write(&input, b"").unwrap();
    let livepipe = |args: &[&str]| Livepipe::new().args(args).output();
    let out_arg = file_out.to_str().unwrap();
    let done = livepipe(&["run", "--input", input.to_str().unwrap(), "--out", out_arg]);
    assert_eq!(done.status.code(), Some(0));
    let refused = livepipe(&["run", "--out", out_arg, "--http", "127.0.0.1:0"]);
    let said = testkit::refused(&refused);
    assert!(said.contains("the embedded demo now"), "{said}");
    assert!(file_out.join("ledger.sqlite").exists(), "left as it was");
}
