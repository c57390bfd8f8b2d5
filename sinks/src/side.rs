//! Side outputs: `rejected.jsonl`, `late.jsonl`, `expired.jsonl` in `OUT/`.
//!
//! Appended as things happen, one JSON object per line. Several workers
//! write to them (rejections are found where records are parsed), so each
//! file sits behind a mutex and every line is written whole. These are for
//! reconciliation, not billing: after a crash and restart a line may repeat.

use livepipe_dataflow::billing::{LateRecord, Outcome};
use livepipe_dataflow::event::RejectedRecord;
use serde::Serialize;

use crate::fsutil::open_append;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

pub struct SideOutputs {
    rejected: Mutex<BufWriter<File>>,
    late: Mutex<BufWriter<File>>,
    expired: Mutex<BufWriter<File>>,
}

#[derive(Serialize)]
struct RejectedLine<'a> {
    source: &'a str,
    partition: u32,
    offset: u64,
    reason: &'a str,
    raw: &'a str,
}

#[derive(Serialize)]
struct LateLine<'a> {
    source: &'a str,
    partition: u32,
    offset: u64,
    reason: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    event_id: &'a str,
    impression_id: &'a str,
    ts: u64,
}

#[derive(Serialize)]
struct ExpiredLine<'a> {
    impression_id: &'a str,
    impression_ts: u64,
    event_id: &'a str,
}

fn append(path: &Path) -> io::Result<Mutex<BufWriter<File>>> {
    let file = open_append(path)
        .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))?;
    Ok(Mutex::new(BufWriter::new(file)))
}

fn write_line(writer: &Mutex<BufWriter<File>>, line: &impl Serialize) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(line)?;
    bytes.push(b'\n');
    // A poisoned lock only means another worker panicked mid-line; the job
    // is going down anyway, and the file stays append-only.
    let mut writer = writer.lock().unwrap_or_else(|poison| poison.into_inner());
    writer.write_all(&bytes)
}

impl SideOutputs {
    /// Opens (appending) the three files in `out_dir`.
    pub fn open(out_dir: &Path) -> io::Result<Self> {
        Ok(SideOutputs {
            rejected: append(&out_dir.join("rejected.jsonl"))?,
            late: append(&out_dir.join("late.jsonl"))?,
            expired: append(&out_dir.join("expired.jsonl"))?,
        })
    }

    pub fn rejected(&self, record: &RejectedRecord) -> io::Result<()> {
        let raw = String::from_utf8_lossy(&record.raw);
        write_line(
            &self.rejected,
            &RejectedLine {
                source: &record.source,
                partition: record.position.partition,
                offset: record.position.offset,
                reason: &record.reason,
                raw: &raw,
            },
        )
    }

    /// `source` names the partition's origin (file path or topic).
    pub fn late(&self, source: &str, late: &LateRecord) -> io::Result<()> {
        write_line(
            &self.late,
            &LateLine {
                source,
                partition: late.position.partition,
                offset: late.position.offset,
                reason: late.reason.code(),
                kind: late.kind.code(),
                event_id: &late.event_id,
                impression_id: &late.impression_id,
                ts: late.ts,
            },
        )
    }

    pub fn expired(&self, outcome: &Outcome) -> io::Result<()> {
        write_line(
            &self.expired,
            &ExpiredLine {
                impression_id: &outcome.impression_id,
                impression_ts: outcome.impression.ts,
                event_id: &outcome.impression.event_id,
            },
        )
    }

    pub fn flush(&self) -> io::Result<()> {
        for writer in [&self.rejected, &self.late, &self.expired] {
            writer
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .flush()?;
        }
        Ok(())
    }
}
