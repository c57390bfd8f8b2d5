//! `livepipe report` end to end: a generated file is run, then reconciled
//! from the ledger alone. Per-key totals must equal sums over the billing
//! CSVs computed here independently, the side outputs must agree with the
//! expired and late counts, the marker check must say "match" until a
//! marker is tampered with, `--from`/`--to` must select whole periods, and
//! a ledger of the previous schema must still be read and resumed.

use serde_json::Value;
use testkit::{gen_file, run_input, Livepipe};

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

/// 2025-11-30T00:00:00Z: the generated traffic starts here.
const START_MS: u64 = 1_764_460_800_000;
const MINUTE: u64 = 60_000;

fn report(out: &Path, args: &[&str]) -> Output {
    Livepipe::new()
        .log("warn")
        .arg("report")
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
}

fn report_json(out: &Path, args: &[&str]) -> Value {
    let output = report(out, &[&["--format", "json"], args].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("markers: match"), "{stderr}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// About four minutes of event time (four default billing periods), with
/// duplicates and late records, run to its end.
fn generated_run(dir: &Path) -> std::path::PathBuf {
    let input = dir.join("events.jsonl");
    let start = START_MS.to_string();
    gen_file(
        &input,
        &[
            "--events",
            "20000",
            "--rate",
            "80",
            "--seed",
            "7",
            "--start-ts",
            &start,
            "--duplicate-rate",
            "0.03",
            "--late-rate",
            "0.01",
        ],
    );
    let out = dir.join("out");
    run_input(&input, &out, &[]);
    out
}

/// (rows, price_micros) per value of CSV column `column`, over every
/// billing file, read with the csv crate.
fn csv_sums(out: &Path, column: usize) -> BTreeMap<String, (u64, u64)> {
    let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for entry in std::fs::read_dir(out.join("billing")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "csv") {
            continue;
        }
        for record in csv::Reader::from_path(&path).unwrap().records() {
            let record = record.unwrap();
            let sum = sums.entry(record[column].to_string()).or_default();
            sum.0 += 1;
            sum.1 += record[8].parse::<u64>().unwrap();
        }
    }
    sums
}

fn report_sums(report: &Value) -> BTreeMap<String, (u64, u64)> {
    report["totals"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(key, t)| {
            let sum = (
                t["billed_rows"].as_u64().unwrap(),
                t["billed_price_micros"].as_u64().unwrap(),
            );
            (key.clone(), sum)
        })
        .filter(|(_, (rows, _))| *rows > 0)
        .collect()
}

fn lines(path: &Path) -> u64 {
    std::fs::read_to_string(path).unwrap().lines().count() as u64
}

#[test]
fn report_agrees_with_the_files_the_side_outputs_and_the_markers() {
    let dir = tempfile::tempdir().unwrap();
    let out = generated_run(dir.path());

    let by_campaign = report_json(&out, &[]);
    assert_eq!(by_campaign["by"], "campaign");
    assert_eq!(by_campaign["markers"]["result"], "match");
    assert!(by_campaign["markers"]["checked"].as_u64().unwrap() >= 3);
    let want = csv_sums(&out, 2);
    assert!(want.len() > 5, "{want:?}");
    assert_eq!(report_sums(&by_campaign), want);
    for (by, column) in [("advertiser", 3), ("stream", 4)] {
        let report = report_json(&out, &["--by", by]);
        assert_eq!(report["by"], by);
        assert_eq!(report_sums(&report), csv_sums(&out, column), "--by {by}");
    }

    // A run without a crash writes each side line once: the ledger's
    // counts are the side outputs' lines.
    let total = &by_campaign["total"];
    assert_eq!(total["expired"], lines(&out.join("expired.jsonl")));
    let late: u64 = total["late"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(late > 0);
    assert_eq!(late, lines(&out.join("late.jsonl")));
    assert!(total["duplicates"].as_u64().unwrap() > 0);
    let rejected: u64 = by_campaign["rejected"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(rejected > 0);
    assert_eq!(rejected, lines(&out.join("rejected.jsonl")));
    let micros = total["billed_price_micros"].as_u64().unwrap();
    let amount = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
    assert_eq!(total["billed_amount"], amount.as_str());

    // CSV: one line per JSON period line; the table ends with the verdict.
    let csv = report(&out, &["--format", "csv"]);
    assert_eq!(csv.status.code(), Some(0));
    let csv_rows = csv::Reader::from_reader(&csv.stdout[..]).records().count();
    assert_eq!(csv_rows, by_campaign["periods"].as_array().unwrap().len());
    let table = report(&out, &["--by", "stream"]);
    let table_text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.status.code(), Some(0), "{table_text}");
    assert!(table_text.starts_with("period_start_ms"), "{table_text}");
    assert!(
        table_text
            .trim_end()
            .ends_with("billed rows and money equal the ledger's)"),
        "{table_text}"
    );
}

#[test]
fn from_and_to_select_whole_periods() {
    let dir = tempfile::tempdir().unwrap();
    let out = generated_run(dir.path());
    let all = report_json(&out, &[]);
    let (from, to) = (START_MS + MINUTE, START_MS + 3 * MINUTE);
    let periods = |report: &Value| -> Vec<(u64, String)> {
        report["periods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["period_start_ms"].as_u64().unwrap(),
                    p["key"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let inside: Vec<_> = periods(&all)
        .into_iter()
        .filter(|(start, _)| *start >= from && *start + MINUTE <= to)
        .collect();
    assert!(inside.iter().any(|(start, _)| *start == from));
    assert!(inside.iter().any(|(start, _)| *start == from + MINUTE));

    // RFC 3339 and epoch ms say the same; a bound inside a period leaves
    // that period out.
    let rfc = report_json(
        &out,
        &[
            "--from",
            "2025-11-30T00:01:00Z",
            "--to",
            "2025-11-30T01:03:00+01:00",
        ],
    );
    assert_eq!(periods(&rfc), inside);
    let ms = report_json(
        &out,
        &[
            "--from",
            &(from - 1).to_string(),
            "--to",
            &(to + 1).to_string(),
        ],
    );
    assert_eq!(periods(&ms), inside);
    let late_bound = report_json(
        &out,
        &["--from", &(from + 1).to_string(), "--to", &to.to_string()],
    );
    assert!(periods(&late_bound)
        .iter()
        .all(|(start, _)| *start == from + MINUTE));
}

#[test]
fn a_tampered_marker_is_a_mismatch_naming_its_period() {
    let dir = tempfile::tempdir().unwrap();
    let out = generated_run(dir.path());
    let marker_path = std::fs::read_dir(out.join("billing"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".csv.done"))
        .find(|p| {
            let marker: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            marker["rows"].as_u64().unwrap() > 0
        })
        .unwrap();
    let mut marker: Value = serde_json::from_slice(&std::fs::read(&marker_path).unwrap()).unwrap();
    let start = marker["period_start_ms"].as_u64().unwrap();
    let campaign = marker["campaigns"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();

    // Per-campaign money moved between campaigns: the totals still agree.
    marker["campaigns"][&campaign]["price_micros"] = (marker["campaigns"][&campaign]
        ["price_micros"]
        .as_u64()
        .unwrap()
        + 1)
    .into();
    std::fs::write(&marker_path, serde_json::to_vec(&marker).unwrap()).unwrap();
    let output = report(&out, &["--format", "json"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("MISMATCH") && stderr.contains(&start.to_string()),
        "{stderr}"
    );
    assert!(stderr.contains(&campaign), "{stderr}");
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["markers"]["result"], "mismatch");
    assert_eq!(json["markers"]["mismatches"][0]["period_start_ms"], start);

    marker["rows"] = (marker["rows"].as_u64().unwrap() + 1).into();
    std::fs::write(&marker_path, serde_json::to_vec(&marker).unwrap()).unwrap();
    let table = report(&out, &[]);
    assert_eq!(table.status.code(), Some(1));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains(&format!("MISMATCH in period [{start}, ")),
        "{text}"
    );

    // A missing marker is a mismatch too, naming the period.
    std::fs::remove_file(&marker_path).unwrap();
    let gone = report(&out, &[]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stdout).contains(&format!("[{start}, ")));
}

#[test]
fn bad_flags_exit_2_saying_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--by", "region"], "--by"),
        (&["--format", "xml"], "--format"),
        (&["--from", "yesterday"], "RFC 3339"),
        (&["--from", "2000", "--to", "1000"], "must be before --to"),
        (&[], "no ledger at"),
    ];
    for (args, says) in cases {
        let output = report(dir.path(), args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// Takes a ledger back to the schema of the livepipe before the report
/// (version 0: no duplicates column, no late table, SHA-256 positions), as
/// if that version wrote it.
fn downgrade(ledger: &Path, input: &Path) {
    testkit::outputs::positions_as_sha256(ledger, input);
    let conn = rusqlite::Connection::open(ledger).unwrap();
    conn.execute_batch(
        "DROP TABLE late; ALTER TABLE finalized DROP COLUMN duplicates;
         ALTER TABLE finalized DROP COLUMN partition;
         ALTER TABLE finalized DROP COLUMN record_offset; PRAGMA user_version = 0;",
    )
    .unwrap();
}

#[test]
fn a_ledger_of_the_previous_schema_is_reported_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let out = generated_run(dir.path());
    let before = report_json(&out, &[]);
    downgrade(&out.join("ledger.sqlite"), &dir.path().join("events.jsonl"));

    let old = report_json(&out, &[]);
    assert_eq!(report_sums(&old), report_sums(&before));
    assert_eq!(old["total"]["duplicates"], 0);
    let notes = old["notes"].to_string();
    assert!(notes.contains("earlier livepipe"), "{notes}");

    // A run on it resumes (nothing more to do: same input) and migrates.
    let input = dir.path().join("events.jsonl");
    run_input(&input, &out, &[]);
    let conn = rusqlite::Connection::open(out.join("ledger.sqlite")).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 3);
    let after = report_json(&out, &[]);
    assert_eq!(report_sums(&after), report_sums(&before));
    assert!(!after["notes"].to_string().contains("earlier livepipe"));
}
