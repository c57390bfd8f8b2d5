//! The binary end to end: `gen` a file, `run` it with 1 and 2 workers, and
//! check every output against the reference and against each other; bad
//! flags and inputs exit 2 with a message.

use serde_json::Value;
use sha2::{Digest, Sha256};
use testkit::outputs::{json_lines, offsets_and_reasons};
use testkit::reference::{expected, expected_live, Rules};
use testkit::{dir_bytes, gen_file, livepipe, run_input, run_ok, Livepipe};

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[test]
fn generated_file_bills_exactly_and_identically_for_1_and_2_workers() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let input_str = input.to_str().unwrap();
    gen_file(input_str, &["--events", "60000", "--seed", "11"]);

    let mut outputs = Vec::new();
    for workers in ["1", "2"] {
        let out = dir.path().join(format!("out-{workers}"));
        run_input(input_str, &out, &["--workers", workers]);
        outputs.push(out);
    }
    let billing: Vec<_> = outputs
        .iter()
        .map(|o| dir_bytes(&o.join("billing")))
        .collect();
    assert_eq!(billing[0], billing[1], "1 and 2 workers differ");

    // Against the reference.
    let bytes = std::fs::read(&input).unwrap();
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last() == Some(&&b""[..]) {
        lines.pop();
    }
    let want = expected(&lines, Rules::DEFAULTS);
    let csvs: BTreeMap<String, Vec<u8>> = billing[0]
        .iter()
        .filter(|(name, _)| name.ends_with(".csv"))
        .map(|(n, b)| (n.clone(), b.clone()))
        .collect();
    assert!(!want.files.is_empty());
    assert_eq!(
        csvs.keys().collect::<Vec<_>>(),
        want.files.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &want.files {
        assert!(csvs[name] == *bytes, "{name} differs from the reference");
    }

    // Markers describe their files exactly.
    let mut billed_rows = 0;
    for (name, csv) in &csvs {
        let marker: Value = serde_json::from_slice(&billing[0][&format!("{name}.done")]).unwrap();
        let rows = csv.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() as u64 - 1;
        assert_eq!(marker["file"], name.as_str());
        assert_eq!(marker["rows"], rows);
        assert_eq!(marker["sha256"], hex::encode(Sha256::digest(csv)));
        billed_rows += rows;
    }

    // The ledger holds each billed id once, and exactly the billed rows.
    let out = &outputs[0];
    let ledger = rusqlite::Connection::open(out.join("ledger.sqlite")).unwrap();
    let (billed, distinct): (i64, i64) = ledger
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT impression_id) FROM finalized WHERE billed = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(billed, distinct);
    assert_eq!(billed as u64, billed_rows);
    let files: i64 = ledger
        .query_row("SELECT COUNT(*) FROM files", [], |r| r.get(0))
        .unwrap();
    assert_eq!(files as usize, csvs.len());

    // Side outputs: every malformed line, with its line number; expired ids.
    let rejected = json_lines(&out.join("rejected.jsonl"));
    let lines_rejected: BTreeSet<u64> = rejected
        .iter()
        .map(|v| v["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(lines_rejected, want.rejected_lines);
    assert!(rejected.iter().all(|v| v["source"] == input_str
        && v["partition"] == 0
        && !v["reason"].as_str().unwrap().is_empty()));
    let expired: BTreeSet<String> = json_lines(&out.join("expired.jsonl"))
        .iter()
        .map(|v| v["impression_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(expired, want.expired);
    assert!(
        !json_lines(&out.join("late.jsonl")).is_empty(),
        "the generator plants late records"
    );

    // live.json: the last snapshot of every stream, sorted by stream_id.
    let live: Vec<Value> =
        serde_json::from_slice(&std::fs::read(out.join("live.json")).unwrap()).unwrap();
    assert!(!live.is_empty());
    let ids: Vec<&str> = live
        .iter()
        .map(|s| s["stream_id"].as_str().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert!(live.iter().any(|s| s["viewers"].as_u64().unwrap() > 0));
    // At the end of a file every event has arrived: the counts are exact.
    let (now, want_live) = expected_live(&lines, 30_000);
    let got_live: BTreeMap<String, (u64, u64)> = live
        .iter()
        .map(|s| {
            assert_eq!(s["as_of"], now);
            let count = |f: &str| s[f].as_u64().unwrap();
            (
                s["stream_id"].as_str().unwrap().to_string(),
                (count("viewers"), count("chat_per_min")),
            )
        })
        .collect();
    assert_eq!(got_live, want_live);
}

#[test]
fn every_reason_code_reaches_the_dead_letter_file_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.jsonl");
    let good = r#"{"type":"join","event_id":"e1","ts":1000,"stream_id":"s","viewer_id":"v"}"#;
    let long = "x".repeat(129);
    let bad: Vec<(String, &str)> = vec![
        ("not json".into(), "not_json"),
        ("".into(), "not_json"),
        ("[1]".into(), "not_object"),
        (r#"{"type":"join","type":"join"}"#.into(), "duplicate_key"),
        (
            r#"{"type":"wave","event_id":"e","ts":1,"stream_id":"s","viewer_id":"v"}"#.into(),
            "unknown_type",
        ),
        (
            r#"{"type":"join","event_id":"e","stream_id":"s","viewer_id":"v"}"#.into(),
            "missing_field:ts",
        ),
        (
            r#"{"type":"join","event_id":"e","ts":2e3,"stream_id":"s","viewer_id":"v"}"#.into(),
            "wrong_type:ts",
        ),
        (
            r#"{"type":"join","event_id":"e","ts":0,"stream_id":"s","viewer_id":"v"}"#.into(),
            "out_of_range:ts",
        ),
        (
            format!(
                r#"{{"type":"join","event_id":"e","ts":1,"stream_id":"{long}","viewer_id":"v"}}"#
            ),
            "too_long:stream_id",
        ),
        (
            r#"{"type":"join","event_id":"","ts":1,"stream_id":"s","viewer_id":"v"}"#.into(),
            "empty:event_id",
        ),
    ];
    let mut content = Vec::new();
    for (line, _) in &bad {
        content.extend_from_slice(good.as_bytes());
        content.push(b'\n');
        content.extend_from_slice(line.as_bytes());
        content.push(b'\n');
    }
    content.extend_from_slice(b"{\"type\":\"join\",\"event_id\":\"\xff\"}\n");
    // A record past the size bound (1 MiB, Kafka's default message size)
    // is rejected without being parsed, and the lines around it are read.
    content.extend_from_slice(good.as_bytes());
    content.push(b'\n');
    content.extend_from_slice(&vec![b'{'; (1 << 20) + 1]);
    content.push(b'\n');
    content.extend_from_slice(good.as_bytes());
    content.push(b'\n');
    std::fs::write(&input, &content).unwrap();
    let out = dir.path().join("out");
    run_input(&input, &out, &["--workers", "2"]);
    let rejected = json_lines(&out.join("rejected.jsonl"));
    let mut got = offsets_and_reasons(&out.join("rejected.jsonl"));
    let mut want: Vec<(u64, String)> = bad
        .iter()
        .enumerate()
        .map(|(i, (_, r))| (2 * i as u64 + 2, r.to_string()))
        .collect();
    want.push((2 * bad.len() as u64 + 1, "bad_utf8".into()));
    want.push((2 * bad.len() as u64 + 3, "too_large".into()));
    // Exactly the bad lines, each once, at its line: no valid record.
    got.sort();
    assert_eq!(got, want);
    let raw = |offset: u64| {
        rejected
            .iter()
            .find(|v| v["offset"].as_u64() == Some(offset))
            .unwrap()["raw"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(raw(2 * bad.len() as u64 + 1).contains('\u{FFFD}'));
    // An oversized record's raw text is cut, not kept whole.
    assert!(raw(2 * bad.len() as u64 + 3).len() <= 4096);
}

#[test]
fn a_character_cut_by_a_line_end_is_bad_utf8_on_both_lines() {
    // Each half alone is not UTF-8, though side by side in the reader's
    // buffer (which holds records without their `\n`) they spell "é".
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cut.jsonl");
    let good = r#"{"type":"join","event_id":"e1","ts":1000,"stream_id":"s","viewer_id":"v"}"#;
    let mut content = format!("{good}\n").into_bytes();
    content.extend_from_slice(b"{\"type\":\"join\",\"event_id\":\"\xC3\n\xA9\"}\n");
    content.extend_from_slice(format!("{good}\n").as_bytes());
    std::fs::write(&input, &content).unwrap();
    for workers in ["1", "2"] {
        let out = dir.path().join(format!("out-{workers}"));
        run_input(&input, &out, &["--workers", workers]);
        let mut got = offsets_and_reasons(&out.join("rejected.jsonl"));
        got.sort();
        assert_eq!(got, [(2, "bad_utf8".into()), (3, "bad_utf8".into())]);
    }
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jsonl");
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--bogus"], "--bogus"),
        (vec!["run", "--workers", "0", "--input", "x"], "--workers"),
        (
            vec!["run", "--billing-period-ms", "0", "--input", "x"],
            "--billing-period-ms",
        ),
        (
            vec!["run", "--input", missing.to_str().unwrap()],
            "missing.jsonl",
        ),
        (
            vec!["run", "--input", dir.path().to_str().unwrap()],
            "directory",
        ),
        (
            vec!["gen", "--output", "x", "--late-rate", "2"],
            "--late-rate",
        ),
        (vec!["frobnicate"], "frobnicate"),
        (vec!["run", "-X", "no-equals-sign"], "-X"),
        (
            vec![
                "run",
                "--brokers",
                "127.0.0.1:1",
                "-X",
                "no.such.property=1",
            ],
            "no.such.property",
        ),
        (vec!["gen", "--events", "10"], "--output"),
        (
            vec!["run", "--input", "x", "--start-offsets", "middle"],
            "--start-offsets",
        ),
        (
            vec!["run", "--input", "x", "--qualify-ms=-1"],
            "--qualify-ms",
        ),
        (
            vec![
                "run",
                "--input",
                empty.to_str().unwrap(),
                "--out",
                "/dev/null/out",
            ],
            "--out",
        ),
    ];
    for (args, mention) in cases {
        let out = livepipe(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(mention),
            "{args:?} should mention {mention}: {stderr}"
        );
    }
}

#[test]
fn kafka_only_flags_without_kafka_exit_2_before_touching_out() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(
        &input,
        "{\"type\":\"join\",\"event_id\":\"e1\",\"ts\":1000,\"stream_id\":\"s\",\"viewer_id\":\"v\"}\n",
    )
    .unwrap();
    let input = input.to_str().unwrap();
    let out = |name: &str| dir.path().join(name);
    let (demo, files, default_topic) = (out("demo"), out("files"), out("default-topic"));
    let cases: Vec<(Vec<&str>, &Path, &[&str])> = vec![
        // Not the demo with the flags dropped: a mistake, named.
        (
            vec![
                "run",
                "-X",
                "no.such.property=1",
                "--start-offsets",
                "latest",
                "--out",
                demo.to_str().unwrap(),
            ],
            &demo,
            &["-X", "--start-offsets", "--brokers"],
        ),
        (
            vec![
                "run",
                "--input",
                input,
                "--topic",
                "t",
                "--out",
                files.to_str().unwrap(),
            ],
            &files,
            &["--topic", "remove it"],
        ),
        // Given is given, even with the default's value.
        (
            vec![
                "run",
                "--input",
                input,
                "--topic",
                "livestream-events",
                "--out",
                default_topic.to_str().unwrap(),
            ],
            &default_topic,
            &["--topic"],
        ),
    ];
    for (args, out, mentions) in cases {
        let output = livepipe(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        for mention in mentions {
            assert!(
                stderr.contains(mention),
                "{args:?} should mention {mention}: {stderr}"
            );
        }
        assert!(!out.exists(), "{args:?} created {}", out.display());
    }
}

#[test]
fn several_files_give_the_same_bytes_for_any_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.jsonl");
    gen_file(
        &whole,
        &["--events", "30000", "--seed", "5", "--rate", "100"],
    );
    // Three partitions, each keeping file order: line n goes to file n % 3.
    let bytes = std::fs::read(&whole).unwrap();
    let mut parts = [Vec::new(), Vec::new(), Vec::new()];
    for (n, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        parts[n % 3].extend_from_slice(line);
    }
    let paths: Vec<String> = parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let path = dir.path().join(format!("part-{i}.jsonl"));
            std::fs::write(&path, part).unwrap();
            path.to_str().unwrap().to_string()
        })
        .collect();
    let mut billing = Vec::new();
    for workers in ["1", "2", "3"] {
        let out = dir.path().join(format!("out-{workers}"));
        let mut args = vec![
            "run",
            "--out",
            out.to_str().unwrap(),
            "--workers",
            workers,
            "--input",
        ];
        args.extend(paths.iter().map(String::as_str));
        run_ok(&args);
        billing.push(dir_bytes(&out.join("billing")));
        let rejected = json_lines(&out.join("rejected.jsonl"));
        assert!(rejected
            .iter()
            .all(|v| v["source"] == paths[v["partition"].as_u64().unwrap() as usize]));
    }
    assert!(billing[0].len() >= 6, "several periods");
    assert_eq!(billing[0], billing[1]);
    assert_eq!(billing[0], billing[2]);
}

#[test]
fn extreme_timestamps_are_handled_without_fault() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("edges.jsonl");
    let now = testkit::now_ms();
    let imp = |eid: &str, ts: u64| {
        format!(
            r#"{{"type":"impression","event_id":"{eid}","ts":{ts},"stream_id":"s","viewer_id":"v","impression_id":"i-{eid}","ad_id":"a","campaign_id":"c","advertiser_id":"d","price_micros":1000000000000}}"#
        )
    };
    let lines = [
        imp("first", 1_700_000_000_000),
        r#"{"type":"ad_progress","event_id":"p","ts":1700000001000,"stream_id":"s","viewer_id":"v","impression_id":"i-first","watched_ms":86400000}"#.to_string(),
        // Far in the past once the watermark has moved: its window is closed.
        imp("ancient", 1),
        // The largest valid ts: far ahead of the wall clock, rejected
        // (event time is never in the future), it moves nothing.
        r#"{"type":"heartbeat","event_id":"h-end","ts":9007199254740991,"stream_id":"s","viewer_id":"v"}"#.to_string(),
        // Today: the watermark jumps from 2023 to the wall clock.
        format!(
            r#"{{"type":"heartbeat","event_id":"h","ts":{now},"stream_id":"s","viewer_id":"v"}}"#
        ),
        imp("after", 1_700_000_002_000),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    run_input(&input, &out, &[]);
    let late: Vec<(String, String)> = json_lines(&out.join("late.jsonl"))
        .iter()
        .map(|v| {
            (
                v["event_id"].as_str().unwrap().into(),
                v["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(late.contains(&("ancient".into(), "window_closed".into())));
    assert!(late.contains(&("after".into(), "window_closed".into())));
    let rejected = offsets_and_reasons(&out.join("rejected.jsonl"));
    assert_eq!(rejected, [(4, "ts_ahead_of_clock".to_string())]);
    let csv = std::fs::read_to_string(out.join("billing/billable-1699999980000-1700000040000.csv"))
        .unwrap();
    assert!(
        csv.ends_with(",1700000000000,1700000001000,1000000000000\n"),
        "{csv}"
    );
    let live: Vec<Value> =
        serde_json::from_slice(&std::fs::read(out.join("live.json")).unwrap()).unwrap();
    assert_eq!(live[0]["as_of"], now);
    assert_eq!(live[0]["viewers"], 1);
}

#[test]
fn addr_file_holds_the_address_the_server_listens_on() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, b"").unwrap();
    let addr_file = dir.path().join("addr");
    let output = Livepipe::new()
        .log("info")
        .args(["run", "--input", input.to_str().unwrap(), "--out"])
        .arg(dir.path().join("out"))
        .args(["--http", "127.0.0.1:0", "--addr-file"])
        .arg(&addr_file)
        .success();
    let written = std::fs::read_to_string(&addr_file).expect("the address file");
    let addr: std::net::SocketAddr = written
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("one line: {written:?}"))
        .parse()
        .expect("HOST:PORT");
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0, "the port picked, not the one asked for");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains(&format!("serving the dashboard at http://{addr}/")),
        "the log still names it: {log}"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".tmp")),
        "no temporary file left: {names:?}"
    );
}

/// `gen --spike`: the same traffic as without it, plus copies with fresh
/// ids of the spiked kinds inside the window only.
#[test]
fn a_generated_spike_adds_copies_and_changes_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, spiked) = (
        dir.path().join("plain.jsonl"),
        dir.path().join("spiked.jsonl"),
    );
    let common = ["--events", "20000", "--seed", "4"];
    gen_file(&plain, &common);
    let spike = ["--spike", "ads", "--spike-at", "2", "--spike-duration", "3"];
    gen_file(&spiked, &[&common[..], &spike[..]].concat());
    let plain = std::fs::read(&plain).unwrap();
    let spiked = std::fs::read(&spiked).unwrap();
    let (copies, rest): (Vec<&[u8]>, Vec<&[u8]>) = spiked
        .split(|&b| b == b'\n')
        .partition(|line| line.windows(2).any(|w| w == b"~s"));
    let plain_lines: Vec<&[u8]> = plain.split(|&b| b == b'\n').collect();
    assert_eq!(
        rest, plain_lines,
        "the traffic under the spike is unchanged"
    );
    let start = 1_700_000_000_000u64;
    for copy in &copies {
        let event: serde_json::Value = serde_json::from_slice(copy).unwrap();
        let kind = event["type"].as_str().unwrap();
        assert!(kind == "impression" || kind == "ad_progress", "{kind}");
        if kind == "impression" {
            let ts = event["ts"].as_u64().unwrap();
            assert!((start + 2_000..start + 5_000).contains(&ts), "{ts}");
        }
    }
    assert!(copies.len() > 100, "{} copies", copies.len());
}
