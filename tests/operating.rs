//! Operating safely: ordinary operator actions never change what is billed
//! silently. Each mistake either ends with exit 2, a message naming what
//! differs, and nothing under `--out` changed, or with the correct result.
//!
//! * another file under the same name is refused, an appended one resumes;
//! * changed billing rules are refused, settings that bill nothing are free;
//! * a finished job run again changes no output byte (`live.json` too);
//! * one job per `--out`, and a killed holder never blocks a restart;
//! * a topic re-created, or records deleted before they were read, are
//!   refused; `--accept-data-loss` goes on and records the lost range.

use livepipe_tools::generator::{GenConfig, Generator};
use rdkafka::mocking::MockCluster;
use testkit::kafka::{generated_traffic, loaded_mock_topic, publish_all};
use testkit::outputs::{
    assert_ledger_matches, billing_files, positions_as_sha256, query_strings, reference,
    wait_for_all_files,
};
use testkit::{http_get, livepipe, topic_args, topic_job, wait_for, write_jsonl, Job};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// Only keeps a broken build from hanging CI; nothing here measures speed.
const LIMIT: Duration = Duration::from_secs(120);

fn said(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `livepipe run --input FILE --out OUT ARGS...`.
fn run_file(file: &Path, out: &Path, args: &[&str]) -> Output {
    let mut all = vec![
        "run",
        "--input",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    livepipe(&all)
}

fn assert_exit(output: &Output, code: i32) {
    assert_eq!(output.status.code(), Some(code), "{}", said(output));
}

/// Every output under `out`, path -> bytes: what an operator or a billing
/// reader can see. The lock file (who holds `--out`) and the SQLite file
/// (compared by its rows, see [`ledger_rows`]) are left out.
fn outputs(out: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![out.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                dirs.push(path);
            } else if name != ".lock" && !name.starts_with("ledger.sqlite") {
                found.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    found
}

/// Every row of every ledger table, as text.
fn ledger_rows(out: &Path) -> Vec<String> {
    let tables = query_strings(
        &out.join("ledger.sqlite"),
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
    );
    let ledger = rusqlite::Connection::open(out.join("ledger.sqlite")).unwrap();
    let mut rows = Vec::new();
    for table in tables {
        let mut stmt = ledger.prepare(&format!("SELECT * FROM {table}")).unwrap();
        let columns = stmt.column_count();
        let mut query = stmt.query([]).unwrap();
        while let Some(row) = query.next().unwrap() {
            let values: Vec<String> = (0..columns)
                .map(|i| format!("{:?}", row.get_ref(i).unwrap()))
                .collect();
            rows.push(format!("{table}: {}", values.join(", ")));
        }
    }
    rows.sort();
    rows
}

/// Everything a refused run must leave as it was.
fn state(out: &Path) -> (BTreeMap<PathBuf, Vec<u8>>, Vec<String>) {
    (outputs(out), ledger_rows(out))
}

/// The data rows of every billing CSV, sorted.
fn billed_rows(files: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let mut rows: Vec<String> = files
        .iter()
        .filter(|(name, _)| name.ends_with(".csv"))
        .flat_map(|(_, csv)| {
            String::from_utf8_lossy(csv)
                .lines()
                .skip(1)
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    rows.sort();
    rows
}

/// Generated traffic starting at `start_ts`, as `livepipe gen` writes it.
fn traffic(events: u64, seed: u64, start_ts: u64) -> Vec<Vec<u8>> {
    Generator::new(&GenConfig {
        seed,
        events,
        start_ts,
        rate: 400,
        ..GenConfig::default()
    })
    .collect()
}

const START: u64 = 1_700_000_000_000;

#[test]
fn another_file_under_the_same_name_is_refused_and_an_appended_one_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = (dir.path().join("x.jsonl"), dir.path().join("out"));
    let first = traffic(20_000, 61, START);
    write_jsonl(&file, &first);
    assert_exit(&run_file(&file, &out, &["--workers", "2"]), 0);
    let before = state(&out);
    let first_files = billing_files(&out);

    // Another day's traffic under the same name.
    write_jsonl(&file, &traffic(20_000, 62, START));
    let refused = run_file(&file, &out, &["--workers", "2"]);
    assert_exit(&refused, 2);
    let message = said(&refused);
    assert!(message.contains("belongs to another input"), "{message}");
    assert!(message.contains("x.jsonl"), "names the file: {message}");
    assert!(
        message.contains("fresh --out"),
        "says what to do: {message}"
    );
    assert_eq!(state(&out), before, "nothing under --out changed");

    // A shorter file is not the same file either.
    write_jsonl(&file, &first[..100]);
    assert_exit(&run_file(&file, &out, &[]), 2);
    assert_eq!(state(&out), before, "nothing under --out changed");

    // The same file, grown: an hour later, more traffic was appended.
    let end = START + 20_000 / 400 * 1_000;
    let mut grown = first.clone();
    grown.extend(traffic(20_000, 63, end + 3_600_000));
    write_jsonl(&file, &grown);
    let resumed = run_file(&file, &out, &["--workers", "2"]);
    assert_exit(&resumed, 0);
    let files = billing_files(&out);
    for (name, bytes) in &first_files {
        assert_eq!(files.get(name), Some(bytes), "{name} kept as it was");
    }
    assert_eq!(
        billed_rows(&files),
        billed_rows(&reference(&grown).files),
        "billed as if the whole file had been read at once"
    );
    assert_coverage_without_holes(&files);
    assert_ledger_matches(&out, &files);
}

#[test]
fn positions_an_earlier_livepipe_digested_with_sha256_are_still_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = (dir.path().join("x.jsonl"), dir.path().join("out"));
    let first = traffic(20_000, 65, START);
    write_jsonl(&file, &first);
    assert_exit(&run_file(&file, &out, &["--workers", "2"]), 0);
    positions_as_sha256(&out.join("ledger.sqlite"), &file);
    let before = state(&out);

    write_jsonl(&file, &traffic(20_000, 66, START));
    let refused = run_file(&file, &out, &[]);
    assert_exit(&refused, 2);
    assert!(
        said(&refused).contains("belongs to another input"),
        "{}",
        said(&refused)
    );
    assert_eq!(state(&out), before, "nothing under --out changed");

    let end = START + 20_000 / 400 * 1_000;
    let mut grown = first.clone();
    grown.extend(traffic(20_000, 67, end + 3_600_000));
    write_jsonl(&file, &grown);
    assert_exit(&run_file(&file, &out, &["--workers", "2"]), 0);
    let files = billing_files(&out);
    assert_eq!(
        billed_rows(&files),
        billed_rows(&reference(&grown).files),
        "billed as if the whole file had been read at once"
    );
    // The positions written since carry BLAKE3, and a third run on the
    // same file checks it and changes nothing.
    let conn = rusqlite::Connection::open(out.join("ledger.sqlite")).unwrap();
    let (sha256, blake3): (Option<String>, Option<String>) = conn
        .query_row(
            "SELECT prefix_sha256, prefix_blake3 FROM positions",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!(sha256, None);
    assert_eq!(blake3.map(|hex| hex.len()), Some(64));
    let grown_state = state(&out);
    assert_exit(&run_file(&file, &out, &[]), 0);
    assert_eq!(state(&out), grown_state);
}

/// Markers cover consecutive periods, one after the other.
fn assert_coverage_without_holes(files: &BTreeMap<String, Vec<u8>>) {
    let mut spans: Vec<(u64, u64)> = files
        .iter()
        .filter(|(name, _)| name.ends_with(".done"))
        .map(|(_, marker)| {
            let marker: serde_json::Value = serde_json::from_slice(marker).unwrap();
            (
                marker["period_start_ms"].as_u64().unwrap(),
                marker["period_end_ms"].as_u64().unwrap(),
            )
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "coverage without holes: {spans:?}");
    }
}

#[test]
fn changed_billing_rules_are_refused_and_a_finished_job_run_again_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = (dir.path().join("x.jsonl"), dir.path().join("out"));
    write_jsonl(&file, &generated_traffic(20_000, 64));
    assert_exit(&run_file(&file, &out, &["--workers", "2"]), 0);
    let before = state(&out);
    assert!(
        before.0.contains_key(&out.join("live.json")),
        "live.json written"
    );

    for (flag, value, bound) in [
        ("--qualify-ms", "3000", "2000"),
        ("--qualify-window-ms", "60000", "300000"),
        ("--allowed-lateness-ms", "0", "5000"),
        ("--billing-period-ms", "30000", "60000"),
    ] {
        let refused = run_file(&file, &out, &[flag, value]);
        assert_exit(&refused, 2);
        let message = said(&refused);
        assert!(
            message.contains(&format!("{flag}: {bound} in the ledger, {value} now")),
            "names the rule and both values: {message}"
        );
        assert_eq!(state(&out), before, "{flag}: nothing under --out changed");
    }

    // Settings that cannot change what is billed are free, and a finished
    // job run again (with them or without) leaves every output as it was.
    let again = run_file(
        &file,
        &out,
        &[
            "--workers",
            "1",
            "--presence-ttl-ms",
            "1000",
            "--state-retention-ms",
            "1000",
        ],
    );
    assert_exit(&again, 0);
    assert_eq!(state(&out), before, "a second run changes nothing");
    assert_exit(&run_file(&file, &out, &["--workers", "2"]), 0);
    assert_eq!(state(&out), before, "a third run changes nothing");
}

#[test]
fn one_job_per_out_and_a_killed_holder_never_blocks_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let records = generated_traffic(10_000, 65);
    let want = reference(&records);
    let cluster = loaded_mock_topic(&records, 2);
    let brokers = cluster.bootstrap_servers();
    let out = dir.path().join("out");
    let mut holder = topic_job(&brokers, "events", "2", &out, &dir.path().join("a.log"));
    let pid = holder.pid();
    wait_for(&mut holder, LIMIT, "the lock to name its holder", || {
        lock_holder(&out) == Some(pid)
    });
    let before = outputs(&out);

    let file = dir.path().join("x.jsonl");
    write_jsonl(&file, &records);
    for second in [
        run_file(&file, &out, &[]),
        livepipe(&topic_args(&brokers, "events", &out)),
    ] {
        assert_exit(&second, 2);
        let message = said(&second);
        assert!(
            message.contains(&format!("pid {}", holder.pid())),
            "names the holder: {message}"
        );
        assert!(message.contains("host"), "and its host: {message}");
    }
    holder.assert_running();
    assert!(
        outputs(&out)
            .keys()
            .all(|path| before.contains_key(path) || path.starts_with(out.join("billing"))),
        "the refused jobs created nothing"
    );

    // SIGKILL: the kernel drops the lock with the process.
    holder.signal("KILL");
    let mut restarted = topic_job(&brokers, "events", "2", &out, &dir.path().join("b.log"));
    wait_for_all_files(&mut restarted, &out, &want, LIMIT);
    assert_eq!(lock_holder(&out), Some(restarted.pid()));
    restarted.stop();
    assert_ledger_matches(&out, &billing_files(&out));
}

/// The pid written into `OUT/.lock`, once there is one.
fn lock_holder(out: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(out.join(".lock")).ok()?;
    let holder: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    holder["pid"].as_u64().map(|pid| pid as u32)
}

/// Runs a Kafka job on `out` until every expected file is written, then
/// stops it.
fn bill_topic(brokers: &str, out: &Path, records: &[Vec<u8>], log: &Path) {
    let mut job = topic_job(brokers, "events", "2", out, log);
    wait_for_all_files(&mut job, out, &reference(records), LIMIT);
    // The positions are committed with the outcomes that made them safe:
    // wait until they reach the end of what was loaded.
    let loaded = records.len() as i64;
    wait_for(&mut job, LIMIT, "resume offsets at the end", || {
        resume_offsets(out).values().sum::<i64>() >= loaded
    });
    job.stop();
}

fn resume_offsets(out: &Path) -> BTreeMap<i64, i64> {
    let ledger = rusqlite::Connection::open(out.join("ledger.sqlite")).unwrap();
    let mut stmt = ledger
        .prepare("SELECT partition, next_offset FROM positions")
        .unwrap();
    stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn run_topic(brokers: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = topic_args(brokers, "events", out);
    args.extend_from_slice(extra);
    livepipe(&args)
}

#[test]
fn a_topic_deleted_and_recreated_is_refused_naming_partition_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let records = generated_traffic(10_000, 66);
    let cluster = loaded_mock_topic(&records, 2);
    bill_topic(
        &cluster.bootstrap_servers(),
        &out,
        &records,
        &dir.path().join("a.log"),
    );
    drop(cluster);
    let before = state(&out);

    // The same topic name, re-created with fewer records.
    let recreated = loaded_mock_topic(&records[..1_000], 2);
    let refused = run_topic(&recreated.bootstrap_servers(), &out, &[]);
    assert_exit(&refused, 2);
    let message = said(&refused);
    let offsets = resume_offsets(&out);
    assert!(message.contains("partition 0"), "{message}");
    assert!(
        message.contains(&format!("offset {}", offsets[&0])),
        "names the resume offset: {message}"
    );
    assert!(message.contains("re-created"), "{message}");
    assert!(message.contains("fresh --out"), "{message}");
    assert_eq!(state(&out), before, "nothing under --out changed");
}

#[test]
fn records_deleted_unread_are_refused_unless_the_loss_is_accepted_and_then_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let records = generated_traffic(10_000, 67);
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("events", 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    publish_all(&brokers, "events", &records);
    bill_topic(&brokers, &out, &records, &dir.path().join("a.log"));
    let resume = resume_offsets(&out)[&0];

    // While the job is stopped, retention deletes records it never read
    // (the mock cluster keeps about 5 MiB per partition).
    publish_uncompressed(&brokers, &generated_traffic(60_000, 68));
    let log_start = log_start(&brokers);
    assert!(log_start > resume, "the mock purged past {resume}");
    let before = state(&out);

    let refused = run_topic(&brokers, &out, &[]);
    assert_exit(&refused, 2);
    let message = said(&refused);
    let range = format!("offsets {resume}..{}", log_start - 1);
    assert!(message.contains(&range), "names {range}: {message}");
    assert!(message.contains("--accept-data-loss"), "{message}");
    assert_eq!(state(&out), before, "nothing under --out changed");

    let mut args = topic_args(&brokers, "events", &out);
    args.extend(["--idle-timeout-ms", "1000", "--accept-data-loss"]);
    let mut accepted = Job::start(&args, &dir.path().join("b.log"));
    let lost = (log_start - resume).to_string();
    let addr = accepted.addr();
    wait_for(&mut accepted, LIMIT, "the lost records on /metrics", || {
        http_get(&addr, "/metrics")
            .1
            .lines()
            .any(|line| line == format!("livepipe_input_lost_records_total {lost}"))
    });
    accepted.stop();
    let gaps = std::fs::read_to_string(out.join("gaps.jsonl")).unwrap();
    let gap: serde_json::Value = serde_json::from_str(gaps.trim()).unwrap();
    assert_eq!(gap["partition"], 0);
    assert_eq!(gap["first_offset"].as_i64(), Some(resume));
    assert_eq!(gap["end_offset"].as_i64(), Some(log_start));
    assert!(
        ledger_rows(&out)
            .iter()
            .any(|row| row.starts_with("gaps: ") && row.contains(&format!("Integer({resume})"))),
        "the gap is in the ledger"
    );
}

/// Sends `records` without compression, so that they fill the mock's
/// retention quickly.
fn publish_uncompressed(brokers: &str, records: &[Vec<u8>]) {
    use livepipe_tools::publish::{producer_config, publish, Pace, PublishStats};
    let stats = std::sync::Arc::new(PublishStats::default());
    let properties = [("compression.type".to_string(), "none".to_string())];
    publish(
        &producer_config(brokers, &properties),
        "events",
        records.iter().cloned(),
        Pace {
            max_rate: None,
            follow_clock: false,
        },
        &std::sync::atomic::AtomicBool::new(false),
        stats,
        Duration::from_secs(60),
    )
    .expect("published");
}

fn log_start(brokers: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    consumer
        .fetch_watermarks("events", 0, Duration::from_secs(10))
        .unwrap()
        .0
}
