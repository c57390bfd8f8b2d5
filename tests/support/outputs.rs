//! Checks of a job's billing output shared by the tests: the files against
//! the independent reference, and the ledger against the files.

use super::job::{dir_bytes, wait_for, Job};
use super::reference::{expected, Expected, Rules};

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

/// The independent reference's answer for `records` under SPEC's rules.
pub fn reference(records: &[Vec<u8>]) -> Expected {
    let lines: Vec<&[u8]> = records.iter().map(|r| &r[..]).collect();
    expected(&lines, Rules::SPEC)
}

/// Waits until `out` holds a marker for every file the reference expects.
pub fn wait_for_all_files(job: &mut Job, out: &Path, want: &Expected, limit: Duration) {
    let markers: BTreeSet<String> = want.files.keys().map(|f| format!("{f}.done")).collect();
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

/// The CSVs are exactly the reference's, byte for byte.
pub fn assert_reference(files: &BTreeMap<String, Vec<u8>>, want: &Expected) {
    let csvs: BTreeSet<&String> = files.keys().filter(|n| n.ends_with(".csv")).collect();
    assert_eq!(
        csvs,
        want.files.keys().collect::<BTreeSet<_>>(),
        "file names"
    );
    for (name, bytes) in &want.files {
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
