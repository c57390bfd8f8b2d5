//! Reconciliation from the ledger alone (`livepipe report`).
//!
//! Billing is asked "what did campaign X cost between Monday and Friday,
//! and what was expired, late or duplicated" long after the job ran, and
//! sometimes while it runs. The ledger is the durable truth, so the answer
//! comes from it: a read-only SQLite connection, which never blocks the
//! writer of a running job (WAL readers see the last commit) and takes no
//! output lock. The completion markers are read too, to check that what
//! the ledger says was billed is what the files say they hold.
//!
//! Attribution: billed, expired and duplicates belong to the period and
//! campaign of their canonical impression. A late record belongs to the
//! period of its own `ts`, and to the campaign of its impression id when the
//! ledger holds that id final; otherwise (an impression whose window had
//! closed, progress for an id never seen) to the key [`UNKNOWN_KEY`].

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::billing::{CampaignTotal, Marker};
use crate::ledger::LEDGER_FILE;

/// The key of what cannot be attributed to a campaign (or advertiser, or
/// stream).
pub const UNKNOWN_KEY: &str = "*";

/// What the report groups a period's numbers by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Campaign,
    Advertiser,
    Stream,
}

impl GroupBy {
    /// The ledger column; a constant, never user text, so it may be
    /// spliced into SQL.
    fn column(self) -> &'static str {
        match self {
            GroupBy::Campaign => "campaign_id",
            GroupBy::Advertiser => "advertiser_id",
            GroupBy::Stream => "stream_id",
        }
    }
}

/// One period's numbers for one key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub billed_rows: u64,
    pub billed_price_micros: u64,
    pub expired: u64,
    /// On-time impression records dropped for a canonical one.
    pub duplicates: u64,
    /// Late records by reason code.
    pub late: BTreeMap<String, u64>,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.billed_rows += other.billed_rows;
        self.billed_price_micros += other.billed_price_micros;
        self.expired += other.expired;
        self.duplicates += other.duplicates;
        for (reason, n) in &other.late {
            *self.late.entry(reason.clone()).or_default() += n;
        }
    }
}

/// Numbers per (period start, key).
pub type Table = BTreeMap<(u64, String), Counts>;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Nothing to report on: a usage error.
    #[error("{0}")]
    NoLedger(String),
    #[error("reading the ledger {path}: {source}")]
    Ledger {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// A marker or side output that cannot be read.
    #[error("reading {path}: {cause}")]
    Marker { path: PathBuf, cause: String },
}

/// A read-only view of `OUT/ledger.sqlite`.
pub struct LedgerReader {
    conn: Connection,
    path: PathBuf,
    /// False for a ledger written before reconciliation was recorded
    /// (schema version 0): no duplicates column, no late table.
    has_reconciliation: bool,
}

impl LedgerReader {
    /// Opens the ledger of `out` read-only; an error if there is none.
    pub fn open(out: &Path) -> Result<Self, ReportError> {
        let path = out.join(LEDGER_FILE);
        if !path.is_file() {
            return Err(ReportError::NoLedger(format!(
                "no ledger at {}: --out must name the output directory of a livepipe run",
                path.display()
            )));
        }
        let wrap = |source| ReportError::Ledger {
            path: path.clone(),
            source,
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&path, flags).map_err(wrap)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(wrap)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(wrap)?;
        Ok(LedgerReader {
            conn,
            path,
            has_reconciliation: version >= 1,
        })
    }

    /// Whether the ledger records duplicates and late records (a ledger
    /// last written by an earlier livepipe does not).
    pub fn has_reconciliation(&self) -> bool {
        self.has_reconciliation
    }

    fn error(&self, source: rusqlite::Error) -> ReportError {
        ReportError::Ledger {
            path: self.path.clone(),
            source,
        }
    }

    /// The billing period the ledger is bound to (`--billing-period-ms`).
    pub fn period_ms(&self) -> Result<u64, ReportError> {
        let rules: Option<String> = self
            .conn
            .query_row("SELECT value FROM binding WHERE key = 'rules'", [], |row| {
                row.get(0)
            })
            .optional()
            .map_err(|err| self.error(err))?;
        let period = rules
            .and_then(|text| serde_json::from_str::<BTreeMap<String, String>>(&text).ok())
            .and_then(|rules| rules.get("--billing-period-ms")?.parse::<u64>().ok())
            .filter(|&ms| ms > 0);
        period.ok_or_else(|| {
            ReportError::NoLedger(format!(
                "{} records no --billing-period-ms: it was not written by this livepipe",
                self.path.display()
            ))
        })
    }

    /// Where the written files end: periods before it are final and
    /// covered by a file (`None`: no file yet).
    pub fn files_end(&self) -> Result<Option<u64>, ReportError> {
        self.conn
            .query_row("SELECT MAX(period_end) FROM files", [], |row| {
                row.get::<_, Option<i64>>(0)
            })
            .map(|end| end.map(|end| end as u64))
            .map_err(|err| self.error(err))
    }

    /// Billed, expired, duplicates and late per period and key, for the
    /// periods starting in `[from, to)`.
    pub fn table(&self, by: GroupBy, from: u64, to: u64) -> Result<Table, ReportError> {
        let mut table = Table::new();
        self.finalized_counts(by, from, to, &mut table)
            .map_err(|err| self.error(err))?;
        if self.has_reconciliation {
            self.late_counts(by, from, to, &mut table)
                .map_err(|err| self.error(err))?;
        }
        Ok(table)
    }

    fn finalized_counts(
        &self,
        by: GroupBy,
        from: u64,
        to: u64,
        table: &mut Table,
    ) -> rusqlite::Result<()> {
        let duplicates = if self.has_reconciliation {
            "SUM(duplicates)"
        } else {
            "0"
        };
        let sql = format!(
            "SELECT period_start, {key}, SUM(billed),
                    SUM(CASE WHEN billed = 1 THEN price_micros ELSE 0 END),
                    SUM(1 - billed), {duplicates}
             FROM finalized WHERE period_start >= ?1 AND period_start < ?2
             GROUP BY period_start, {key}",
            key = by.column()
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut rows = stmt.query([clamp(from), clamp(to)])?;
        while let Some(row) = rows.next()? {
            let counts = table
                .entry((row.get::<_, i64>(0)? as u64, row.get(1)?))
                .or_default();
            counts.billed_rows += row.get::<_, i64>(2)? as u64;
            counts.billed_price_micros += row.get::<_, i64>(3)? as u64;
            counts.expired += row.get::<_, i64>(4)? as u64;
            counts.duplicates += row.get::<_, i64>(5)? as u64;
        }
        Ok(())
    }

    fn late_counts(
        &self,
        by: GroupBy,
        from: u64,
        to: u64,
        table: &mut Table,
    ) -> rusqlite::Result<()> {
        let sql = format!(
            "SELECT late.period_start, COALESCE(finalized.{key}, ?3), late.reason, COUNT(*)
             FROM late LEFT JOIN finalized ON finalized.impression_id = late.impression_id
             WHERE late.period_start >= ?1 AND late.period_start < ?2
             GROUP BY 1, 2, 3",
            key = by.column()
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut rows = stmt.query(rusqlite::params![clamp(from), clamp(to), UNKNOWN_KEY])?;
        while let Some(row) = rows.next()? {
            let counts = table
                .entry((row.get::<_, i64>(0)? as u64, row.get(1)?))
                .or_default();
            counts
                .late
                .insert(row.get(2)?, row.get::<_, i64>(3)? as u64);
        }
        Ok(())
    }

    /// Billed rows and money per campaign over the periods in
    /// `[start, end)`: what a marker spanning them must say.
    pub fn billed_by_campaign(
        &self,
        start: u64,
        end: u64,
    ) -> Result<BTreeMap<String, CampaignTotal>, ReportError> {
        let query = || -> rusqlite::Result<BTreeMap<String, CampaignTotal>> {
            let mut stmt = self.conn.prepare(
                "SELECT campaign_id, COUNT(*), SUM(price_micros) FROM finalized
                 WHERE billed = 1 AND period_start >= ?1 AND period_start < ?2
                 GROUP BY campaign_id",
            )?;
            let rows = stmt.query_map([clamp(start), clamp(end)], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    CampaignTotal {
                        rows: row.get::<_, i64>(1)? as u64,
                        price_micros: row.get::<_, i64>(2)? as u64,
                    },
                ))
            })?;
            rows.collect()
        };
        query().map_err(|err| self.error(err))
    }
}

/// SQLite integers are signed; event times beyond `i64::MAX` do not occur
/// (`ts` is at most 2^53 - 1), but an open `--to` is `u64::MAX`.
fn clamp(ms: u64) -> i64 {
    ms.min(i64::MAX as u64) as i64
}

/// Every completion marker in `OUT/billing`, sorted by period start.
pub fn read_markers(out: &Path) -> Result<Vec<Marker>, ReportError> {
    let dir = out.join("billing");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => {
            return Err(ReportError::Marker {
                path: dir,
                cause: err.to_string(),
            })
        }
    };
    let mut markers = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|err| ReportError::Marker {
                path: dir.clone(),
                cause: err.to_string(),
            })?
            .path();
        if !path.to_string_lossy().ends_with(".csv.done") {
            continue;
        }
        let marker = std::fs::read(&path)
            .map_err(|err| err.to_string())
            .and_then(|bytes| serde_json::from_slice::<Marker>(&bytes).map_err(|e| e.to_string()))
            .map_err(|cause| ReportError::Marker {
                path: path.clone(),
                cause,
            })?;
        markers.push(marker);
    }
    markers.sort_by_key(|marker| (marker.period_start_ms, marker.period_end_ms));
    Ok(markers)
}

/// A marker that disagrees with the ledger, or a billed period the ledger
/// holds inside the written range that no marker covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub period_start_ms: u64,
    pub period_end_ms: u64,
    /// The marker's CSV, if there is a marker.
    pub file: Option<String>,
    pub what: String,
}

/// Checks every marker overlapping `[from, to)` against the ledger: rows
/// and money, and per campaign when the marker carries campaigns.
pub fn check_markers(
    ledger: &LedgerReader,
    markers: &[Marker],
    from: u64,
    to: u64,
) -> Result<(usize, Vec<Mismatch>), ReportError> {
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for marker in markers
        .iter()
        .filter(|m| m.period_start_ms < to && m.period_end_ms > from)
    {
        checked += 1;
        let ledger_campaigns =
            ledger.billed_by_campaign(marker.period_start_ms, marker.period_end_ms)?;
        if let Some(what) = compare(marker, &ledger_campaigns) {
            mismatches.push(Mismatch {
                period_start_ms: marker.period_start_ms,
                period_end_ms: marker.period_end_ms,
                file: Some(marker.file.clone()),
                what,
            });
        }
    }
    mismatches.extend(uncovered(ledger, markers, from, to)?);
    Ok((checked, mismatches))
}

/// What differs between a marker and the ledger's billed rows over its
/// range, if anything.
fn compare(marker: &Marker, ledger: &BTreeMap<String, CampaignTotal>) -> Option<String> {
    let rows: u64 = ledger.values().map(|total| total.rows).sum();
    let money: u64 = ledger.values().map(|total| total.price_micros).sum();
    if (marker.rows, marker.total_price_micros) != (rows, money) {
        return Some(format!(
            "the marker says {} rows, {} price_micros; the ledger {rows} rows, {money} price_micros",
            marker.rows, marker.total_price_micros
        ));
    }
    // Markers written before they carried campaigns have none to compare.
    if marker.campaigns.is_empty() || marker.campaigns == *ledger {
        return None;
    }
    let campaign = marker
        .campaigns
        .keys()
        .chain(ledger.keys())
        .find(|id| marker.campaigns.get(*id) != ledger.get(*id))?;
    let show = |total: Option<&CampaignTotal>| {
        let total = total.copied().unwrap_or_default();
        format!("{} rows, {} price_micros", total.rows, total.price_micros)
    };
    Some(format!(
        "campaign {campaign:?}: the marker says {}; the ledger {}",
        show(marker.campaigns.get(campaign)),
        show(ledger.get(campaign))
    ))
}

/// Periods in `[from, to)` before the end of the written files that hold
/// billed rows in the ledger but lie in no marker (a marker removed).
fn uncovered(
    ledger: &LedgerReader,
    markers: &[Marker],
    from: u64,
    to: u64,
) -> Result<Vec<Mismatch>, ReportError> {
    let Some(end) = ledger.files_end()? else {
        return Ok(Vec::new());
    };
    let period_ms = ledger.period_ms()?;
    let table = ledger.table(GroupBy::Campaign, from, to.min(end))?;
    let mut billed: BTreeMap<u64, u64> = BTreeMap::new();
    for ((period, _), counts) in &table {
        *billed.entry(*period).or_default() += counts.billed_rows;
    }
    Ok(billed
        .into_iter()
        .filter(|&(period, rows)| {
            rows > 0
                && !markers
                    .iter()
                    .any(|m| m.period_start_ms <= period && period < m.period_end_ms)
        })
        .map(|(period, rows)| Mismatch {
            period_start_ms: period,
            period_end_ms: period + period_ms,
            file: None,
            what: format!("the ledger holds {rows} billed rows but no marker covers the period"),
        })
        .collect())
}

/// Rejected records per reason code, from `OUT/rejected.jsonl` (`None` if
/// there is none). They are not in the ledger: a rejected record has no
/// trusted event time or campaign, so it belongs to no period or key. The
/// file may repeat lines after a restart; a record is counted once by its
/// position (source, partition, offset). A line cut short by a crash is
/// skipped (its record is read again and written whole by the restart).
pub fn rejected_by_reason(out: &Path) -> Result<Option<BTreeMap<String, u64>>, ReportError> {
    use std::io::BufRead;
    let path = out.join("rejected.jsonl");
    let error = |err: std::io::Error| ReportError::Marker {
        path: path.clone(),
        cause: err.to_string(),
    };
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(error(err)),
    };
    #[derive(serde::Deserialize)]
    struct Line {
        source: String,
        partition: u64,
        offset: u64,
        reason: String,
    }
    let mut seen = std::collections::HashSet::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = serde_json::from_str::<Line>(&line.map_err(error)?) else {
            continue;
        };
        if seen.insert((line.source, line.partition, line.offset)) {
            *counts.entry(line.reason).or_default() += 1;
        }
    }
    Ok(Some(counts))
}
