//! The SQLite ledger in `OUT/ledger.sqlite`: the durable truth of billing.
//!
//! Every finalized impression id (billed *and* expired) is a row keyed by
//! the id, inserted with `INSERT OR IGNORE`: an id is final once, forever,
//! whatever the dataflow says later (a duplicate arriving after its state
//! was retired, or a replay after a restart). Billed rows are also the
//! content of the period files, which list exactly the rows committed here
//! for their period. Every written file is recorded with its checksum, and
//! every input partition's resume position (see
//! `livepipe_dataflow::resume`). Outcomes, files and positions of one
//! commit go in one transaction.
//!
//! Reconciliation (`livepipe report`) reads the ledger alone, so the facts
//! it needs beyond the files are committed here too, in the same
//! transaction as the billing they explain: each final impression's
//! on-time duplicates, and every late record. The schema is versioned with
//! `PRAGMA user_version`; [`MIGRATIONS`] bring a ledger written by an
//! earlier livepipe up to date when it is opened for a run: they add
//! columns and tables, and drop only an index nothing reads (an earlier
//! livepipe still reads and writes what it knows).

use livepipe_dataflow::billing::{LateRecord, Outcome};
use livepipe_dataflow::event::Text;
use livepipe_dataflow::resume::Checkpoint;
use rusqlite::{params, CachedStatement, Connection, OptionalExtension, Transaction};

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

pub const LEDGER_FILE: &str = "ledger.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS finalized (
    impression_id TEXT PRIMARY KEY,
    billed INTEGER NOT NULL,
    period_start INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    ad_id TEXT NOT NULL,
    campaign_id TEXT NOT NULL,
    advertiser_id TEXT NOT NULL,
    stream_id TEXT NOT NULL,
    viewer_id TEXT NOT NULL,
    impression_ts INTEGER NOT NULL,
    qualified_ts INTEGER,
    price_micros INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS finalized_by_period ON finalized (period_start, billed);
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY,
    period_start INTEGER NOT NULL UNIQUE,
    period_end INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    total_price_micros INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    written_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS positions (
    partition INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    next_offset INTEGER NOT NULL,
    byte_offset INTEGER NOT NULL,
    max_ts INTEGER,
    prefix_sha256 TEXT
);
";

/// Schema changes after the first version, in order: migration `n` takes a
/// ledger from `user_version` n to n + 1. Additions (and one unused index
/// dropped), so the inserts of an earlier livepipe still work on a migrated
/// ledger.
const MIGRATIONS: &[&str] = &[
    // 1: what reconciliation needs beyond billed rows. Rows written before
    // have 0 duplicates and no position; their late records were never
    // recorded.
    "ALTER TABLE finalized ADD COLUMN duplicates INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE finalized ADD COLUMN partition INTEGER;
     ALTER TABLE finalized ADD COLUMN record_offset INTEGER;
     CREATE TABLE IF NOT EXISTS late (
         partition INTEGER NOT NULL,
         record_offset INTEGER NOT NULL,
         reason TEXT NOT NULL,
         kind TEXT NOT NULL,
         impression_id TEXT NOT NULL,
         ts INTEGER NOT NULL,
         period_start INTEGER NOT NULL,
         PRIMARY KEY (partition, record_offset)
     ) WITHOUT ROWID;
     CREATE INDEX IF NOT EXISTS late_by_period ON late (period_start);",
    // 2: file prefixes are digested with BLAKE3. This livepipe writes
    // `prefix_blake3` and clears `prefix_sha256`; a position that still has
    // a SHA-256 (written before, or by an earlier livepipe since) is
    // checked with SHA-256 (see `ResumePosition::prefix_sha256`).
    "ALTER TABLE positions ADD COLUMN prefix_blake3 TEXT;",
    // 3: the sink keeps the rows of the periods it has not written yet in
    // memory; nothing looks for the next billed period in the ledger any
    // more, and the index cost every outcome's insert a third B-tree.
    "DROP INDEX IF EXISTS finalized_billed_periods;",
];

/// The page size of a new ledger (SQLite's default: 4,096).
const LEDGER_PAGE_BYTES: i64 = 16 * 1024;

/// The ledger connection's page cache, in KiB (SQLite's default: 2,000).
const LEDGER_CACHE_KIB: i64 = 32 * 1024;

/// The schema version this livepipe writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Where a partition resumes after a restart, as committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumePosition {
    /// The file path or topic the partition belongs to.
    pub source: String,
    pub checkpoint: Checkpoint,
    /// A file position recorded with SHA-256 (by a livepipe before schema
    /// version 2): its `checkpoint` has no BLAKE3 digest; the file's prefix
    /// is checked against this one instead.
    pub prefix_sha256: Option<[u8; 32]>,
}

/// One row of a billing file, in file column order: what the ledger's
/// `finalized` table holds for a billed impression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BilledRow {
    pub impression_id: Text,
    pub ad_id: Text,
    pub campaign_id: Text,
    pub advertiser_id: Text,
    pub stream_id: Text,
    pub viewer_id: Text,
    pub impression_ts: u64,
    pub qualified_ts: u64,
    pub price_micros: u64,
}

impl BilledRow {
    /// The row [`Finalizer::finalize`] records for `outcome`, if it is
    /// billed.
    pub fn of(outcome: &Outcome) -> Option<BilledRow> {
        let qualified_ts = outcome.qualified_ts?;
        let imp = &outcome.impression;
        let ad = &imp.ad;
        Some(BilledRow {
            impression_id: outcome.impression_id.clone(),
            ad_id: ad.ad_id.clone(),
            campaign_id: ad.campaign_id.clone(),
            advertiser_id: ad.advertiser_id.clone(),
            stream_id: ad.stream_id.clone(),
            viewer_id: ad.viewer_id.clone(),
            impression_ts: imp.ts,
            qualified_ts,
            price_micros: ad.price_micros,
        })
    }
}

/// Billed rows by period start, in no particular order within a period.
pub type RowsByPeriod = BTreeMap<u64, Vec<BilledRow>>;

/// Sorts a period's rows as its file lists them: by impression id in byte
/// order (`str`'s order, and SQLite's BINARY collation: `memcmp`).
pub fn sort_rows(rows: &mut [BilledRow]) {
    rows.sort_unstable_by(|a, b| a.impression_id.cmp(&b.impression_id));
}

/// A period file as recorded in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    pub name: String,
    pub period_start: u64,
    pub period_end: u64,
    pub rows: u64,
    pub total_price_micros: u64,
    pub sha256: String,
    pub written_at_ms: u64,
}

pub struct Ledger {
    pub(crate) conn: Connection,
}

impl Ledger {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        create_private_file(path).map_err(|err| {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("{}: {err}", path.display())),
            )
        })?;
        let conn = Connection::open(path)?;
        // busy_timeout first: WAL needs a lock when another reader has it open.
        conn.busy_timeout(Duration::from_secs(10))?;
        // Before anything is written (a ledger that exists keeps its page
        // size): each outcome's row lives in the leaves of a tree keyed by
        // a random id, and with 16 KiB pages instead of SQLite's 4 KiB a
        // commit splits and rewrites a quarter as many of them (the sink
        // bench: a third less time on disk).
        conn.pragma_update(None, "page_size", LEDGER_PAGE_BYTES)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Outcomes land all over the `finalized` tree (it is keyed by a
        // random id): with SQLite's default 2 MiB page cache, most inserts
        // of a large run read their leaf page back from the OS first.
        // Pages are only taken as the ledger grows.
        conn.pragma_update(None, "cache_size", -LEDGER_CACHE_KIB)?;
        // One transaction: a new ledger's schema is one commit (one fsync),
        // not one per statement.
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(SCHEMA)?;
        migrate(&tx)?;
        tx.commit()?;
        Ok(Ledger { conn })
    }

    /// Copies the write-ahead log into the database file, without waiting
    /// for readers (`PRAGMA wal_checkpoint(PASSIVE)`). SQLite checkpoints
    /// when the last connection closes, and that copy of every page written
    /// since the last checkpoint was the end of a run; done while the last
    /// files are being written, it leaves the close next to nothing.
    pub fn checkpoint(&self) -> rusqlite::Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
    }

    /// Starts the one transaction of a commit. A shared borrow (rusqlite's
    /// `unchecked_transaction`), so that the sink can read its own state
    /// while the commit is open; the sink never nests commits, and SQLite
    /// would refuse a nested `BEGIN` at run time anyway.
    pub fn begin(&self) -> rusqlite::Result<Commit<'_>> {
        Ok(Commit {
            tx: self.conn.unchecked_transaction()?,
        })
    }

    /// The period after the last written file (the end of what the files
    /// cover), if any file was written. A file covers one period or a run
    /// of periods, and files cover their range without gaps.
    pub fn next_unwritten_period(&self) -> rusqlite::Result<Option<u64>> {
        self.conn
            .query_row("SELECT MAX(period_end) FROM files", [], |row| {
                row.get::<_, Option<i64>>(0)
            })
            .map(|end| end.map(|end| end as u64))
    }

    fn has_column(&self, table: &str, column: &str) -> bool {
        // Both names are our own constants, never input.
        self.conn
            .prepare(&format!("SELECT {column} FROM {table} LIMIT 0"))
            .is_ok()
    }

    /// The committed resume position of every partition.
    pub fn positions(&self) -> rusqlite::Result<BTreeMap<u32, ResumePosition>> {
        let mut stmt = self
            .conn
            .prepare(if self.has_column("positions", "prefix_blake3") {
                "SELECT partition, source, next_offset, byte_offset, max_ts, prefix_sha256,
                     prefix_blake3 FROM positions"
            } else {
                // Not migrated yet: the job checks a ledger before it
                // changes anything in it, migrations included.
                "SELECT partition, source, next_offset, byte_offset, max_ts, prefix_sha256,
                     NULL FROM positions"
            })?;
        let digest =
            |text: Option<String>| -> Option<[u8; 32]> { hex::decode(text?).ok()?.try_into().ok() };
        let rows = stmt.query_map([], |row| {
            let prefix_sha256 = digest(row.get(5)?);
            // A SHA-256 wins: this livepipe clears it whenever it writes a
            // position, so one that is set was written after any BLAKE3.
            let prefix_blake3 = digest(row.get(6)?).filter(|_| prefix_sha256.is_none());
            Ok((
                row.get::<_, i64>(0)? as u32,
                ResumePosition {
                    source: row.get(1)?,
                    checkpoint: Checkpoint {
                        offset: row.get::<_, i64>(2)? as u64,
                        byte: row.get::<_, i64>(3)? as u64,
                        max_ts: row.get::<_, Option<i64>>(4)?.map(|ts| ts as u64),
                        prefix_blake3,
                    },
                    prefix_sha256,
                },
            ))
        })?;
        rows.collect()
    }

    /// The billed rows of every period from `period_start` on: at open,
    /// the rows an earlier run committed for periods it had not written
    /// yet.
    pub fn billed_rows_from(&self, period_start: u64) -> rusqlite::Result<RowsByPeriod> {
        let mut stmt = self.conn.prepare(
            "SELECT period_start, impression_id, ad_id, campaign_id, advertiser_id, stream_id,
                    viewer_id, impression_ts, qualified_ts, price_micros
             FROM finalized WHERE billed = 1 AND period_start >= ?1",
        )?;
        let mut periods = RowsByPeriod::new();
        let rows = stmt.query_map([period_start as i64], |row| {
            let text = |n| row.get::<_, String>(n).map(Text::from);
            Ok((
                row.get::<_, i64>(0)? as u64,
                BilledRow {
                    impression_id: text(1)?,
                    ad_id: text(2)?,
                    campaign_id: text(3)?,
                    advertiser_id: text(4)?,
                    stream_id: text(5)?,
                    viewer_id: text(6)?,
                    impression_ts: row.get::<_, i64>(7)? as u64,
                    qualified_ts: row.get::<_, i64>(8)? as u64,
                    price_micros: row.get::<_, i64>(9)? as u64,
                },
            ))
        })?;
        for row in rows {
            let (period, row) = row?;
            periods.entry(period).or_default().push(row);
        }
        Ok(periods)
    }

    /// Least and greatest period holding a finalized impression.
    pub fn period_range(&self) -> rusqlite::Result<Option<(u64, u64)>> {
        // Two queries: SQLite answers a lone MIN or MAX from the index, but
        // scans the whole table for both in one SELECT.
        let bound = |sql: &str| {
            self.conn
                .query_row(sql, [], |row| row.get::<_, Option<i64>>(0))
        };
        let min = bound("SELECT MIN(period_start) FROM finalized")?;
        let max = bound("SELECT MAX(period_start) FROM finalized")?;
        Ok(min.zip(max).map(|(a, b)| (a as u64, b as u64)))
    }
}

/// Applies the [`MIGRATIONS`] a ledger lacks and bumps its version, inside
/// the caller's transaction (the one that creates the schema): a crash
/// leaves the old schema or the new one.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    for migration in &MIGRATIONS[version.max(0) as usize..] {
        conn.execute_batch(migration)?;
    }
    // PRAGMA takes no parameters; the value is our own constant.
    conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
}

/// Creates the ledger file empty (a valid new database) and private before
/// SQLite opens it: SQLite would create it world-readable, and gives its
/// WAL and shared-memory files the database file's mode. A link in its
/// place is refused, never followed.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    crate::fsutil::refuse_link(path)?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::fsutil::FILE_MODE)
        .open(path)
    {
        Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => Err(err),
        _ => Ok(()),
    }
}

/// The transaction of one commit: outcomes in, files recorded, then
/// [`Commit::commit`]. Dropped without commit, nothing happened.
pub struct Commit<'l> {
    tx: Transaction<'l>,
}

impl Commit<'_> {
    /// The statement that records final outcomes, prepared once for all of
    /// a commit's outcomes.
    pub fn finalizer(&self) -> rusqlite::Result<Finalizer<'_>> {
        Ok(Finalizer {
            insert: self.tx.prepare_cached(
                "INSERT OR IGNORE INTO finalized (impression_id, billed, period_start, event_id,
                    ad_id, campaign_id, advertiser_id, stream_id, viewer_id,
                    impression_ts, qualified_ts, price_micros, duplicates, partition, record_offset)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?,
        })
    }

    /// Whether `late` (an outcome found already final) is the id's
    /// canonical record itself, read again after a restart: the same input
    /// position (and event id), so nothing late happened. A producer retry
    /// of it has the same event id at another position: late. Rows written
    /// before positions were recorded compare by event id alone.
    pub fn is_replay(&self, late: &LateRecord) -> rusqlite::Result<bool> {
        self.tx
            .prepare_cached(
                "SELECT COUNT(*) FROM finalized WHERE impression_id = ?1 AND event_id = ?2
                     AND (partition IS NULL OR (partition = ?3 AND record_offset = ?4))",
            )?
            .query_row(
                params![
                    late.impression_id.as_str(),
                    late.event_id.as_str(),
                    late.position.partition as i64,
                    late.position.offset as i64,
                ],
                |row| row.get::<_, i64>(0),
            )
            .map(|n| n > 0)
    }

    /// The statement that records late records, prepared once for all of a
    /// commit's.
    pub fn late_recorder(&self) -> rusqlite::Result<LateRecorder<'_>> {
        Ok(LateRecorder {
            insert: self.tx.prepare_cached(
                "INSERT OR IGNORE INTO late (partition, record_offset, reason, kind,
                     impression_id, ts, period_start)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?,
        })
    }

    /// The file covering the period starting at `period_start`, if one was
    /// written: its own, or the header-only file of the run it lies in.
    pub fn file_for(&self, period_start: u64) -> rusqlite::Result<Option<String>> {
        // Files do not overlap: the one starting last at or before the
        // period is the only candidate (one seek on the unique index).
        self.tx
            .query_row(
                "SELECT name FROM (SELECT name, period_end FROM files WHERE period_start <= ?1
                     ORDER BY period_start DESC LIMIT 1)
                 WHERE period_end > ?1",
                [period_start as i64],
                |row| row.get(0),
            )
            .optional()
    }

    /// Records period files that are in place (see `crate::period_files`).
    pub fn record_files(&self, files: &[FileRecord]) -> rusqlite::Result<()> {
        let mut insert = self.tx.prepare_cached(
            "INSERT INTO files (name, period_start, period_end, rows, total_price_micros, sha256, written_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for file in files {
            insert.execute(params![
                file.name,
                file.period_start as i64,
                file.period_end as i64,
                file.rows as i64,
                file.total_price_micros as i64,
                file.sha256,
                file.written_at_ms as i64,
            ])?;
        }
        Ok(())
    }

    /// Records where `partition` resumes; in the same transaction as the
    /// outcomes that made it safe.
    pub fn set_position(&self, partition: u32, position: &ResumePosition) -> rusqlite::Result<()> {
        let checkpoint = &position.checkpoint;
        self.tx
            .prepare_cached(
                "INSERT INTO positions (partition, source, next_offset, byte_offset, max_ts,
                     prefix_blake3, prefix_sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (partition) DO UPDATE SET source = ?2, next_offset = ?3,
                     byte_offset = ?4, max_ts = ?5, prefix_blake3 = ?6, prefix_sha256 = ?7",
            )?
            .execute(params![
                partition as i64,
                position.source,
                checkpoint.offset as i64,
                checkpoint.byte as i64,
                checkpoint.max_ts.map(|ts| ts as i64),
                checkpoint.prefix_blake3.map(hex::encode),
                position.prefix_sha256.map(hex::encode),
            ])?;
        Ok(())
    }

    pub fn commit(self) -> rusqlite::Result<()> {
        self.tx.commit()
    }
}

/// Records final outcomes in a [`Commit`].
pub struct Finalizer<'c> {
    insert: CachedStatement<'c>,
}

impl Finalizer<'_> {
    /// Records a final outcome. Returns false if the id was already final
    /// (then nothing changes).
    pub fn finalize(&mut self, outcome: &Outcome, period_start: u64) -> rusqlite::Result<bool> {
        let imp = &outcome.impression;
        let ad = &imp.ad;
        let inserted = self.insert.execute(params![
            outcome.impression_id.as_str(),
            outcome.is_billed(),
            period_start as i64,
            imp.event_id.as_str(),
            ad.ad_id.as_str(),
            ad.campaign_id.as_str(),
            ad.advertiser_id.as_str(),
            ad.stream_id.as_str(),
            ad.viewer_id.as_str(),
            imp.ts as i64,
            outcome.qualified_ts.map(|ts| ts as i64),
            ad.price_micros as i64,
            outcome.duplicates,
            imp.position.partition as i64,
            imp.position.offset as i64,
        ])?;
        Ok(inserted == 1)
    }
}

/// Records late records in a [`Commit`].
pub struct LateRecorder<'c> {
    insert: CachedStatement<'c>,
}

impl LateRecorder<'_> {
    /// Records a late record for reconciliation, in the period of its own
    /// `ts`. Keyed by its input position: the same record read again after
    /// a restart is not counted twice (the first reason stands).
    pub fn record(&mut self, late: &LateRecord, period_start: u64) -> rusqlite::Result<()> {
        self.insert.execute(params![
            late.position.partition as i64,
            late.position.offset as i64,
            late.reason.code(),
            late.kind.code(),
            late.impression_id.as_str(),
            late.ts as i64,
            period_start as i64,
        ])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema and insert of the livepipe before [`MIGRATIONS`].
    const VERSION_0_INSERT: &str = "INSERT INTO finalized (impression_id, billed, period_start,
        event_id, ad_id, campaign_id, advertiser_id, stream_id, viewer_id, impression_ts,
        qualified_ts, price_micros) VALUES (?1, 1, 0, 'e', 'ad', 'c', 'adv', 's', 'v', 5, 6, 7)";

    #[test]
    fn a_version_0_ledger_is_migrated_on_open_and_old_inserts_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            // Version 0 had this index too (migration 3 drops it).
            conn.execute_batch(
                "CREATE INDEX finalized_billed_periods ON finalized (billed, period_start)",
            )
            .unwrap();
            conn.execute(VERSION_0_INSERT, ["old"]).unwrap();
        }
        let ledger = Ledger::open(&path).unwrap();
        let version: i64 = ledger
            .conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let dropped: i64 = ledger
            .conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'finalized_billed_periods'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(dropped, 0);
        let duplicates: i64 = ledger
            .conn
            .query_row(
                "SELECT duplicates FROM finalized WHERE impression_id = 'old'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(duplicates, 0);
        // An earlier livepipe writing to a migrated ledger still works.
        ledger.conn.execute(VERSION_0_INSERT, ["older"]).unwrap();
        drop(ledger);
        // Opening again changes nothing (the migration ran once).
        let ledger = Ledger::open(&path).unwrap();
        let late: i64 = ledger
            .conn
            .query_row("SELECT COUNT(*) FROM late", [], |row| row.get(0))
            .unwrap();
        assert_eq!(late, 0);
    }
}
