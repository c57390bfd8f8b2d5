//! `livepipe run` with no source flags: the embedded demo starts its own
//! Kafka-protocol broker and traffic, and billing files appear with the
//! default rules (the demo's traffic starts minutes in the past).

mod support;

use support::job::{dir_bytes, wait_for, Job};

use std::time::Duration;

#[test]
fn the_demo_starts_produces_and_writes_billing_files_with_no_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut job = Job::start(
        &[
            "run",
            "--out",
            out.to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
        ],
        &dir.path().join("demo.log"),
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
