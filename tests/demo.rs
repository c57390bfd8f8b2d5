//! `livepipe run` with no source flags: the embedded demo starts its own
//! Kafka-protocol broker and traffic, and billing files appear with the
//! default rules (the demo's traffic starts minutes in the past).

mod support;

use support::job::{dir_bytes, http_addr, wait_for, Job};

use std::time::{Duration, Instant};

#[test]
fn the_demo_starts_produces_and_writes_billing_files_with_no_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let log = dir.path().join("demo.log");
    let started = Instant::now();
    let mut job = Job::start(
        &[
            "run",
            "--out",
            out.to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
        ],
        &log,
    );
    // The dashboard's API lists streams with viewers soon after start.
    let live_streams = || -> usize {
        let Some(addr) = http_addr(&log) else {
            return 0;
        };
        let Ok(mut response) = ureq::get(&format!("http://{addr}/api/live")).call() else {
            return 0;
        };
        let body = response.body_mut().read_to_string().unwrap_or_default();
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
