//! `--paths live|billing|all`: one path per job (docs/contract.md, "One
//! path per job"). A billing-only job bills byte for byte like a job that
//! runs both paths; a live-only job counts like it and touches nothing of
//! the billing output; the two run side by side on one topic, and the live
//! one keeps ticking while the billing one is killed and resumes.

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use testkit::http::try_get;
use testkit::kafka::{generated_traffic, mock_cluster, publish_all};
use testkit::outputs::{assert_ledger_matches, assert_reference, billing_files, reference};
use testkit::reference::{expected, Rules};
use testkit::{now_ms, run_input, topic_args, wait_for, write_jsonl, Job};

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Long enough for a debug build on a loaded 2-core machine; only a guard
/// against hanging.
const LIMIT: Duration = Duration::from_secs(240);

/// `live.json` without its wall-clock stamps.
fn live_json(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("live.json")).expect("live.json");
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    for snapshot in value.as_array_mut().expect("a list") {
        snapshot.as_object_mut().unwrap().remove("emitted_at");
    }
    value
}

#[test]
fn each_path_alone_writes_what_the_two_together_write() {
    let dir = tempfile::tempdir().unwrap();
    let records = generated_traffic(30_000, 41);
    let input = dir.path().join("events.jsonl");
    write_jsonl(&input, &records);
    let want = reference(&records);
    assert!(want.files.len() > 1);
    let run = |paths: &str| {
        let out = dir.path().join(format!("out-{paths}"));
        run_input(&input, &out, &["--workers", "2", "--paths", paths]);
        out
    };
    let (all, billing, live) = (run("all"), run("billing"), run("live"));

    let from_all = billing_files(&all);
    assert_eq!(billing_files(&billing), from_all, "billing-only vs all");
    let csvs: BTreeMap<String, Vec<u8>> = from_all
        .into_iter()
        .filter(|(name, _)| name.ends_with(".csv"))
        .collect();
    assert_eq!(csvs, want.files, "the reference's files, byte for byte");
    assert!(
        !billing.join("live.json").exists(),
        "billing-only: no live.json"
    );

    // Live-only: live.json and nothing else, the same counts.
    let names: Vec<String> = std::fs::read_dir(&live)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["live.json"], "live-only writes only live.json");
    assert_eq!(live_json(&live), live_json(&all));
}

/// A producer that picks partitions and message timestamps itself.
fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer")
}

/// Sends a heartbeat of `viewer` on `stream` with `ts` as both the event
/// time and the Kafka message timestamp.
fn heartbeat(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: i32,
    stream: &str,
    viewer: &str,
    ts: u64,
) {
    let payload = format!(
        r#"{{"type":"heartbeat","event_id":"h-{stream}-{viewer}-{ts}","ts":{ts},"stream_id":"{stream}","viewer_id":"{viewer}"}}"#
    );
    let record = BaseRecord::<(), str>::to(topic)
        .partition(partition)
        .payload(payload.as_str())
        .timestamp(ts as i64);
    producer.send(record).map_err(|(err, _)| err).expect("sent");
    producer.flush(Duration::from_secs(10)).expect("flushed");
}

/// The live job's board: stream id -> (viewers, as_of); empty until it
/// answers.
fn board(addr: &str) -> BTreeMap<String, (u64, u64)> {
    let Ok(response) = try_get(addr, "/api/live?limit=1000") else {
        return BTreeMap::new();
    };
    if response.status != 200 {
        return BTreeMap::new();
    }
    let list: Vec<serde_json::Value> = serde_json::from_str(&response.body).unwrap_or_default();
    list.iter()
        .map(|s| {
            let id = s["stream_id"].as_str().unwrap_or_default().to_string();
            (
                id,
                (
                    s["viewers"].as_u64().unwrap_or(0),
                    s["as_of"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

/// Keeps a live stream going while a job is waited on. On one partition
/// only: the others' older records still hold billing's watermark back,
/// so its files are finalized one after the other as they are read.
struct Beats<'p> {
    producer: &'p ThreadedProducer<DefaultProducerContext>,
    sent: u64,
}

impl Beats<'_> {
    fn beat(&mut self) {
        self.sent += 1;
        let viewer = format!("v{}", self.sent % 5);
        heartbeat(self.producer, "events", 3, "live-s", &viewer, now_ms());
    }
}

/// Names of the finalized billing files so far (names only: a file being
/// renamed into place may vanish between listing and reading).
fn markers(out: &Path) -> usize {
    std::fs::read_dir(out.join("billing")).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".done"))
            .count()
    })
}

/// Short periods and windows: files are finalized one after the other
/// while the topic is read, so that the kill lands between two.
const SHORT: Rules = Rules {
    period: 5_000,
    window: 20_000,
    ..Rules::DEFAULTS
};
const SHORT_FLAGS: [&str; 4] = [
    "--billing-period-ms",
    "5000",
    "--qualify-window-ms",
    "20000",
];

#[test]
fn a_live_job_keeps_ticking_while_the_billing_job_beside_it_is_killed_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    // Enough periods that the kill likely lands halfway (not asserted: a
    // kill after the last file tests the restart all the same).
    let records = generated_traffic(60_000, 43);
    let lines: Vec<&[u8]> = records.iter().map(|r| &r[..]).collect();
    let want = expected(&lines, SHORT);
    let input = dir.path().join("events.jsonl");
    write_jsonl(&input, &records);
    let all_out = dir.path().join("out-all");
    let mut all_args = vec!["--workers", "2"];
    all_args.extend(SHORT_FLAGS);
    run_input(&input, &all_out, &all_args);
    let from_all = billing_files(&all_out);

    let cluster = mock_cluster("events", 4);
    let brokers = cluster.bootstrap_servers();
    publish_all(&brokers, "events", &records);
    let producer = producer(&brokers);
    let mut beats = Beats {
        producer: &producer,
        sent: 0,
    };
    // One --out for both: a live-only job takes nothing there.
    let out = dir.path().join("out");
    let job = |paths: &str, log: &str| {
        let mut args = topic_args(&brokers, "events", &out);
        args.extend([
            "--paths",
            paths,
            "--workers",
            "2",
            "--idle-timeout-ms",
            "1000",
        ]);
        args.extend(SHORT_FLAGS);
        Job::start(&args, &dir.path().join(log))
    };
    let mut live = job("live", "live.log");
    let mut billing = job("billing", "billing-1.log");
    let live_addr = live.addr();
    let billing_addr = billing.addr();

    let mut as_of = 0;
    wait_for(&mut live, LIMIT, "the live stream on /api/live", || {
        beats.beat();
        as_of = board(&live_addr).get("live-s").map_or(0, |s| s.1);
        as_of > 0
    });
    wait_for(&mut billing, LIMIT, "a first billing file", || {
        beats.beat();
        markers(&out) > 0
    });
    let (status, body) = testkit::http_get(&billing_addr, "/api/live");
    assert_eq!(status, 404, "billing-only serves no live API: {body}");
    let (status, body) = testkit::http_get(&billing_addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    let at_kill = markers(&out);
    billing.signal("KILL");
    eprintln!(
        "killed the billing job at {at_kill} of {} files",
        want.files.len()
    );

    // The live job does not notice: its board goes on moving.
    let before = as_of;
    wait_for(&mut live, LIMIT, "live ticks after the kill", || {
        beats.beat();
        as_of = board(&live_addr).get("live-s").map_or(0, |s| s.1);
        as_of > before + 1_000
    });
    let (status, body) = testkit::http_get(&live_addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("not run here"), "{body}");

    let mut billing = job("billing", "billing-2.log");
    testkit::outputs::wait_for_all_files(&mut billing, &out, &want, LIMIT);
    // Up (signals handled) before it is stopped.
    billing.addr();
    billing.stop();
    live.stop();
    let files = billing_files(&out);
    assert_reference(&files, &want);
    assert_ledger_matches(&out, &files);
    for (name, bytes) in files.iter().filter(|(n, _)| n.ends_with(".csv")) {
        assert!(
            from_all.get(name) == Some(bytes),
            "{name} differs from the all job's"
        );
    }
    assert!(!out.join("live.json").exists());
}

/// A live-only job starts at the records of the last max(TTL, 60 s) by
/// their Kafka timestamps (`offsets_for_times`). No broker at hand answers
/// that lookup by the producer's timestamps: librdkafka's mock cluster
/// answers "none" to every time (its ListOffsets has no timestamp index),
/// so a live-only job starts at the end there, and tansu answers offset 0
/// (it does not index the records' create times). What can be checked is
/// the half that matters most: nothing older than the window is read, at
/// the first start and at a restart; the offset computation itself is
/// unit-tested in `livepipe_sources::kafka`.
fn starts_at_the_window(brokers: &str, topic: &str) {
    let dir = tempfile::tempdir().unwrap();
    let producer = producer(brokers);
    let now = now_ms();
    // Three minutes old: outside the 2 min window, yet a stream that would
    // still be on the board (for 2 TTLs) had it been read.
    for viewer in ["a", "b", "c"] {
        heartbeat(&producer, topic, 0, "old-s", viewer, now - 180_000);
    }
    // Twenty seconds old: inside the window and the TTL (counted where the
    // broker finds offsets by time).
    for viewer in ["a", "b"] {
        heartbeat(&producer, topic, 1, "recent-s", viewer, now - 20_000);
    }
    let out = dir.path().join("out");
    // Twice: the window is taken again at a restart.
    for run in 0..2 {
        let seen = live_board_at_start(brokers, topic, &out, &producer, &[]);
        assert!(!seen.contains_key("old-s"), "run {run}: {seen:?}");
        assert!(!out.exists(), "a live-only Kafka run writes nothing");
    }
    // The check above can fail: read from the start, the old stream shows
    // (and an explicit --start-offsets wins over the window).
    let seen = live_board_at_start(
        brokers,
        topic,
        &out,
        &producer,
        &["--start-offsets", "earliest"],
    );
    assert!(seen.contains_key("old-s"), "{seen:?}");
}

/// Starts a live-only job with a 2 min TTL (so a 2 min window: the recent
/// records stay present however slowly it starts), sends a stream after
/// its start, and returns its board once that stream is on it.
fn live_board_at_start(
    brokers: &str,
    topic: &str,
    out: &Path,
    producer: &ThreadedProducer<DefaultProducerContext>,
    extra: &[&str],
) -> BTreeMap<String, (u64, u64)> {
    let mut args = topic_args(brokers, topic, out);
    args.extend(["--paths", "live", "--presence-ttl-ms", "120000"]);
    args.extend(["--workers", "1"]);
    args.extend(extra);
    let log = out.with_extension(format!("{}.log", now_ms()));
    let mut job = Job::start(&args, &log);
    let addr = job.addr();
    let mut seen = BTreeMap::new();
    let mut sent = 0;
    wait_for(&mut job, LIMIT, "a stream sent after the start", || {
        sent += 1;
        heartbeat(producer, topic, sent % 2, "after-s", "z", now_ms());
        seen = board(&addr);
        seen.contains_key("after-s")
    });
    // Where it started, for a failure's notes.
    for line in job.log().lines().filter(|l| l.contains("starting at")) {
        eprintln!("{line}");
    }
    job.stop();
    seen
}

#[test]
fn a_live_only_job_reads_no_records_older_than_its_window() {
    let cluster = mock_cluster("window", 2);
    starts_at_the_window(&cluster.bootstrap_servers(), "window");
}

/// `--paths` also comes from `LIVEPIPE_PATHS` and from the `--config` file,
/// like every flag.
#[test]
fn the_mode_comes_from_the_environment_and_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    write_jsonl(&input, &generated_traffic(2_000, 47));
    let from_env = dir.path().join("out-env");
    testkit::Livepipe::new()
        .log("warn")
        .env("LIVEPIPE_PATHS", "live")
        .args(testkit::input_args(&input, &from_env))
        .success();
    assert!(from_env.join("live.json").exists());
    assert!(!from_env.join("ledger.sqlite").exists(), "live-only by env");

    let config = dir.path().join("livepipe.toml");
    std::fs::write(&config, "paths = \"billing\"\n").unwrap();
    let from_file = dir.path().join("out-file");
    let mut args = testkit::input_args(&input, &from_file);
    args.extend(["--config", config.to_str().unwrap()]);
    testkit::run_ok(&args);
    assert!(from_file.join("ledger.sqlite").exists());
    assert!(
        !from_file.join("live.json").exists(),
        "billing-only by file"
    );
}
