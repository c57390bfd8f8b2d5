//! Records an input lost before they were read, never silently.
//!
//! When Kafka's retention deletes records a stopped job had not read yet,
//! a resume finds its offset below the partition's log start. The job
//! refuses to start unless the operator accepts the loss
//! (`--accept-data-loss`); then every lost range is written to the ledger
//! (table `gaps`) and to `OUT/gaps.jsonl`, so reconciliation sees exactly
//! what was never billed, and `/metrics` counts the lost records.

use rusqlite::params;
use serde::Serialize;

use std::io::Write;
use std::path::Path;

use crate::fsutil::open_append;
use crate::ledger::{Ledger, LEDGER_FILE};

pub const GAPS_FILE: &str = "gaps.jsonl";

const GAPS_TABLE: &str = "CREATE TABLE IF NOT EXISTS gaps (
    source TEXT NOT NULL,
    partition INTEGER NOT NULL,
    first_offset INTEGER NOT NULL,
    end_offset INTEGER NOT NULL,
    records INTEGER NOT NULL,
    detected_at_ms INTEGER NOT NULL,
    PRIMARY KEY (partition, first_offset)
)";

/// Offsets `[first_offset, end_offset)` of one partition, gone unread.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// The topic.
    pub source: String,
    pub partition: u32,
    pub first_offset: u64,
    /// Exclusive: the log start the run goes on from.
    pub end_offset: u64,
    pub records: u64,
    pub detected_at_ms: u64,
}

/// Adds `gaps` to the ledger under `out` and to `OUT/gaps.jsonl`. A gap
/// recorded before (a restart that found the same log start) is not
/// added again. Returns the records lost over the ledger's whole life.
pub fn record(out: &Path, gaps: &[Gap]) -> Result<u64, GapError> {
    let mut ledger = Ledger::open(&out.join(LEDGER_FILE))?;
    let tx = ledger.conn.transaction()?;
    tx.execute(GAPS_TABLE, [])?;
    let mut new = Vec::new();
    for gap in gaps {
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO gaps
                 (source, partition, first_offset, end_offset, records, detected_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                gap.source,
                gap.partition as i64,
                gap.first_offset as i64,
                gap.end_offset as i64,
                gap.records as i64,
                gap.detected_at_ms as i64,
            ],
        )?;
        if inserted == 1 {
            new.push(gap);
        }
    }
    let total: i64 = tx.query_row("SELECT COALESCE(SUM(records), 0) FROM gaps", [], |row| {
        row.get(0)
    })?;
    // The lines first: a crash between the two repeats a line on restart
    // (side outputs are at-least-once), it never loses one.
    if !new.is_empty() {
        let path = out.join(GAPS_FILE);
        let mut file = open_append(&path)?;
        let mut lines = Vec::new();
        for gap in new {
            serde_json::to_writer(&mut lines, gap).map_err(std::io::Error::from)?;
            lines.push(b'\n');
        }
        file.write_all(&lines)?;
        file.sync_all()?;
    }
    tx.commit()?;
    Ok(total as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum GapError {
    #[error("recording lost records in the ledger: {0}")]
    Ledger(#[from] rusqlite::Error),
    #[error("writing gaps.jsonl: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_recorded_once_in_the_ledger_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let gap = Gap {
            source: "t".into(),
            partition: 2,
            first_offset: 100,
            end_offset: 250,
            records: 150,
            detected_at_ms: 1,
        };
        assert_eq!(record(dir.path(), std::slice::from_ref(&gap)).unwrap(), 150);
        assert_eq!(record(dir.path(), std::slice::from_ref(&gap)).unwrap(), 150);
        let lines = std::fs::read_to_string(dir.path().join(GAPS_FILE)).unwrap();
        assert_eq!(
            lines,
            "{\"source\":\"t\",\"partition\":2,\"first_offset\":100,\"end_offset\":250,\
             \"records\":150,\"detected_at_ms\":1}\n"
        );
    }
}
