//! Coverage of billing periods when traffic jumps: a run of periods with
//! nothing billed costs one header-only file, however long it is.

use testkit::outputs::{assert_coverage, assert_ledger_matches, assert_reference, billing_files};
use testkit::reference::{expected, Expected, Rules};
use testkit::{gen_file, run_input};

use std::path::Path;
use std::time::{Duration, Instant};

const START: u64 = 1_700_000_000_000;
/// 2 years and 11 months (1,065 days): the second part stays in the past of
/// the wall clock (records more than 10 minutes ahead of it are rejected).
const JUMP: u64 = 1_065 * 24 * 3_600_000;

/// `livepipe gen` into `path`, returning its lines.
fn generate(path: &Path, start_ts: u64, seed: &str) -> Vec<Vec<u8>> {
    gen_file(
        path,
        &[
            "--events",
            "20000",
            "--rate",
            "100",
            "--seed",
            seed,
            "--start-ts",
            &start_ts.to_string(),
        ],
    );
    std::fs::read(path)
        .unwrap()
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Runs the file with 2 workers and checks its billing output against the
/// reference: the same files byte for byte, coverage without gaps, the
/// ledger billing exactly the files' rows. Returns the reference.
fn run_and_check(dir: &Path, lines: &[Vec<u8>]) -> Expected {
    let input = dir.join("events.jsonl");
    let mut bytes = lines.join(&b'\n');
    bytes.push(b'\n');
    std::fs::write(&input, bytes).unwrap();
    let out = dir.join("out");
    let started = Instant::now();
    run_input(&input, &out, &["--workers", "2"]);
    let took = started.elapsed();

    let raw: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
    let want = expected(&raw, Rules::DEFAULTS);
    let files = billing_files(&out);
    let csvs = files.keys().filter(|n| n.ends_with(".csv")).count();
    assert_eq!(csvs, want.files.len(), "as many files as the reference");
    assert_reference(&files, &want);
    assert_ledger_matches(&out, &files);
    let covered = assert_coverage(&files).expect("some files");
    let ranges = ranges(&want);
    assert_eq!(covered, (ranges[0].0, ranges[ranges.len() - 1].1));

    // Bounded: a file per billable period and at most one per gap.
    let billable = want
        .files
        .values()
        .filter(|csv| csv.iter().filter(|&&b| b == b'\n').count() > 1)
        .count();
    assert!(billable >= 4, "several billable periods: {billable}");
    assert!(
        want.files.len() < 2 * billable + 2,
        "{} files for {billable} billable periods",
        want.files.len()
    );
    eprintln!(
        "{} records, {} files ({billable} billable), run took {took:?}",
        lines.len(),
        want.files.len()
    );
    // Seconds, not the minutes a file per empty period took.
    assert!(took < Duration::from_secs(60), "run took {took:?}");
    want
}

#[test]
fn traffic_jumping_three_years_costs_one_file_for_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = generate(&dir.path().join("a.jsonl"), START, "1");
    // The generator numbers ids from 1: the second part gets ids of its own,
    // or its impressions would be duplicates of the first part's.
    let second = generate(&dir.path().join("b.jsonl"), START + JUMP, "2");
    lines.extend(second.iter().map(|line| {
        String::from_utf8_lossy(line)
            .replace("\"imp-", "\"imp-b")
            .replace("\"e-", "\"e-b")
            .into_bytes()
    }));
    let want = run_and_check(dir.path(), &lines);
    // One header-only file spans the jump: it starts before the second
    // part's first period and ends at a billable one after it.
    let spans: Vec<&String> = want
        .files
        .iter()
        .filter(|(name, csv)| {
            let (start, end) = range(name);
            csv.iter().filter(|&&b| b == b'\n').count() == 1
                && start < START + 3_600_000
                && end > START + JUMP - 3_600_000
        })
        .map(|(name, _)| name)
        .collect();
    assert_eq!(spans.len(), 1, "{:?}", want.files.keys());
}

#[test]
fn an_impression_at_the_start_of_the_epoch_costs_one_file_for_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    // Billed at ts 1000 (period [0, 60000)), then 2023 traffic: 28 million
    // empty periods between.
    let mut lines = vec![
        br#"{"type":"impression","event_id":"early","ts":1000,"stream_id":"s","viewer_id":"v","impression_id":"early","ad_id":"a","campaign_id":"c","advertiser_id":"d","price_micros":5}"#.to_vec(),
        br#"{"type":"ad_progress","event_id":"early-p","ts":4000,"stream_id":"s","viewer_id":"v","impression_id":"early","watched_ms":3000}"#.to_vec(),
    ];
    lines.extend(generate(&dir.path().join("a.jsonl"), START, "3"));
    let want = run_and_check(dir.path(), &lines);
    let ranges = ranges(&want);
    assert_eq!(ranges[0], (0, 60_000));
    assert_eq!(ranges[1].0, 60_000, "one file covers the gap: {ranges:?}");
    assert!(ranges[1].1 > START - 60_000);
}

/// The reference's file ranges, in time order.
fn ranges(want: &Expected) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = want.files.keys().map(|name| range(name)).collect();
    ranges.sort();
    ranges
}

/// `billable-<start>-<end>.csv` -> (start, end).
fn range(name: &str) -> (u64, u64) {
    let mut parts = name
        .trim_start_matches("billable-")
        .trim_end_matches(".csv")
        .split('-')
        .map(|n| n.parse::<u64>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}
