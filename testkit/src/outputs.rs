//! Checks of a job's billing output shared by the tests: the files against
//! the independent reference, and the ledger against the files.

use crate::job::{dir_bytes, wait_for, Job};
use crate::reference::{expected, Expected, Rules};

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

/// The independent reference's answer for `records` under the default rules.
pub fn reference(records: &[Vec<u8>]) -> Expected {
    let lines: Vec<&[u8]> = records.iter().map(|r| &r[..]).collect();
    expected(&lines, Rules::DEFAULTS)
}

/// Waits until `out` holds a marker for every file the reference expects
/// (but the open run's, which only the end of a finite input writes).
pub fn wait_for_all_files(job: &mut Job, out: &Path, want: &Expected, limit: Duration) {
    let markers: BTreeSet<String> = want
        .files
        .keys()
        .filter(|f| want.open_run.as_ref() != Some(*f))
        .map(|f| format!("{f}.done"))
        .collect();
    wait_for(job, limit, "every expected billing file", || {
        let names: BTreeSet<String> = billing_files(out).into_keys().collect();
        markers.is_subset(&names)
    });
}

/// Billing files (no temp files), name -> bytes.
pub fn billing_files(out: &Path) -> BTreeMap<String, Vec<u8>> {
    dir_bytes(&out.join("billing"))
        .into_iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .collect()
}

/// The CSVs are exactly the reference's, byte for byte. The open run (the
/// header-only file after the last billable period) may be missing: a live
/// topic never writes it, a file run writes it at its end (the tests of
/// file runs that compare with `want.files` directly check that).
pub fn assert_reference(files: &BTreeMap<String, Vec<u8>>, want: &Expected) {
    let csvs: BTreeSet<&String> = files.keys().filter(|n| n.ends_with(".csv")).collect();
    let mut names: BTreeSet<&String> = want.files.keys().collect();
    if let Some(open) = &want.open_run {
        if !csvs.contains(open) {
            names.remove(open);
        }
    }
    assert_eq!(csvs, names, "file names");
    for (name, bytes) in want.files.iter().filter(|(name, _)| names.contains(name)) {
        if files[name] != *bytes {
            let lines = |b: &[u8]| -> BTreeSet<String> {
                String::from_utf8_lossy(b)
                    .lines()
                    .map(String::from)
                    .collect()
            };
            let (got, want) = (lines(&files[name]), lines(bytes));
            let extra: Vec<_> = got.difference(&want).take(5).collect();
            let missing: Vec<_> = want.difference(&got).take(5).collect();
            panic!("{name} differs from the reference: extra {extra:?}, missing {missing:?}");
        }
    }
}

/// The ledger bills each id once and exactly the rows of the files.
pub fn assert_ledger_matches(out: &Path, files: &BTreeMap<String, Vec<u8>>) {
    let ledger = rusqlite::Connection::open(out.join("ledger.sqlite")).unwrap();
    let billed: i64 = ledger
        .query_row("SELECT COUNT(*) FROM finalized WHERE billed = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    let rows: usize = files
        .iter()
        .filter(|(name, _)| name.ends_with(".csv"))
        .map(|(_, csv)| csv.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() - 1)
        .sum();
    assert_eq!(billed as usize, rows, "ledger rows vs file rows");
}

/// Coverage: sorted by start, each marker's `[period_start_ms,
/// period_end_ms)` begins where the previous one ended, names its CSV, and
/// every CSV has a marker. Returns the covered range.
pub fn assert_coverage(files: &BTreeMap<String, Vec<u8>>) -> Option<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (name, bytes) in files.iter().filter(|(n, _)| n.ends_with(".csv.done")) {
        let marker: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        let csv = name.trim_end_matches(".done");
        assert_eq!(marker["file"], csv, "{name}");
        assert!(files.contains_key(csv), "{name} without its CSV");
        let (start, end) = (
            marker["period_start_ms"].as_u64().unwrap(),
            marker["period_end_ms"].as_u64().unwrap(),
        );
        assert_eq!(csv, format!("billable-{start}-{end}.csv"));
        ranges.push((start, end));
    }
    let csvs = files.keys().filter(|n| n.ends_with(".csv")).count();
    assert_eq!(ranges.len(), csvs, "every CSV has a marker");
    ranges.sort();
    for pair in ranges.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "{:?} then {:?}", pair[0], pair[1]);
    }
    ranges.first().zip(ranges.last()).map(|(a, b)| (a.0, b.1))
}

/// The records of a JSON-lines file (a side output); fails the test if it
/// is missing.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
    parse_lines(&text)
}

/// [`json_lines`], but none while the file is not there yet (for polling a
/// running job).
pub fn json_lines_so_far(path: &Path) -> Vec<serde_json::Value> {
    parse_lines(&std::fs::read_to_string(path).unwrap_or_default())
}

/// `(offset, reason)` of each record of a side output (`late.jsonl`,
/// `rejected.jsonl`), in file order.
pub fn offsets_and_reasons(path: &Path) -> Vec<(u64, String)> {
    json_lines(path)
        .iter()
        .map(|v| {
            (
                v["offset"].as_u64().unwrap(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The first column of every row `sql` selects from the SQLite database at
/// `path` (a ledger), as text.
pub fn query_strings(path: &Path, sql: &str) -> Vec<String> {
    let db = rusqlite::Connection::open(path).unwrap();
    let mut stmt = db.prepare(sql).unwrap();
    stmt.query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn parse_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Takes a file job's ledger resume positions back to what a livepipe before
/// schema version 2 wrote: SHA-256 prefix digests, no BLAKE3 column.
pub fn positions_as_sha256(ledger: &Path, input: &Path) {
    use sha2::Digest;
    let conn = rusqlite::Connection::open(ledger).unwrap();
    let positions: Vec<(i64, i64)> = conn
        .prepare("SELECT partition, byte_offset FROM positions")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let bytes = std::fs::read(input).unwrap();
    for (partition, byte) in positions {
        let digest = hex::encode(sha2::Sha256::digest(&bytes[..byte as usize]));
        conn.execute(
            "UPDATE positions SET prefix_sha256 = ?1 WHERE partition = ?2",
            rusqlite::params![digest, partition],
        )
        .unwrap();
    }
    conn.execute_batch("ALTER TABLE positions DROP COLUMN prefix_blake3; PRAGMA user_version = 1;")
        .unwrap();
}
