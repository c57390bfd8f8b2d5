//! Period files, written on a thread of their own, a commit behind the
//! ledger.
//!
//! A commit of the billing sink decides which periods are final and which
//! rows their files list. Writing those files (two new files per period,
//! each created, fsynced and renamed into place) took as long as the
//! commit's SQLite work, and the sink thread did both in turn: at the end
//! of a replay it was the last thread of the job still running. So the sink
//! hands each commit's files to a [`PeriodFiles`] writer once the commit
//! holds their rows, goes on with the next commit, and records the files in
//! the ledger in a later commit, once the writer reports them in place.
//!
//! That is as safe as writing them inside the commit, because the ledger
//! still records a file only after it is durable and in place. A crash
//! between the two leaves committed rows that no recorded file covers:
//! that is the ledger's state between any two commits (rows wait there
//! until their period is final), so the next run reads those rows back at
//! open and, when its replay makes the periods final again, writes the
//! same files again, over themselves, with the same bytes (a file is a
//! function of its period's committed rows), and records them.
//!
//! While the billing directory refuses writes, the writer retries with
//! backoff and reports the stall in [`BillingStats`]; the sink keeps
//! committing outcomes meanwhile. A stop abandons the writer between two
//! files; what it installed before is still reported, so a stopped job
//! records every file it left in place.

use serde::Serialize;
use sha2::{Digest, Sha256};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use crate::billing::{
    campaign_totals, render_csv, retry_until_done, BillingStats, Marker, SinkError,
};
use crate::fsutil::{sync_dir, StagedFiles};
use crate::ledger::{BilledRow, FileRecord};
use livepipe_dataflow::time::wall_clock_ms;

/// One file to write: a period and its billed rows (sorted), or a run of
/// periods without any (no rows).
#[derive(Debug)]
pub struct PeriodFile {
    pub start: u64,
    /// Exclusive.
    pub end: u64,
    pub rows: Vec<BilledRow>,
}

/// Period files (each with its marker) made durable and renamed into place
/// together, then reported: bounds the open descriptors of a batch, and how
/// much of it a stop or a failure leaves to do again.
const FILES_PER_INSTALL: usize = 64;

/// What the writer reports: files in place, and whether they end a batch.
struct Installed {
    files: Vec<FileRecord>,
    ends_batch: bool,
}

/// The sink's handle on the writer thread, started with the first batch.
pub struct PeriodFiles {
    billing_dir: PathBuf,
    writer: Option<Writer>,
    /// Files in place, not yet recorded in the ledger.
    installed: Vec<FileRecord>,
    /// Batches handed over and not yet reported whole.
    batches_in_flight: usize,
}

struct Writer {
    batches: mpsc::Sender<Vec<PeriodFile>>,
    reports: mpsc::Receiver<Installed>,
    thread: std::thread::JoinHandle<()>,
}

impl PeriodFiles {
    pub fn new(billing_dir: PathBuf) -> Self {
        PeriodFiles {
            billing_dir,
            writer: None,
            installed: Vec::new(),
            batches_in_flight: 0,
        }
    }

    /// Hands a commit's files to the writer, in order after those handed
    /// over before.
    pub fn write(
        &mut self,
        files: Vec<PeriodFile>,
        stats: &Arc<BillingStats>,
        stop: &Arc<AtomicBool>,
    ) -> Result<(), SinkError> {
        if files.is_empty() {
            return Ok(());
        }
        let billing_dir = &self.billing_dir;
        let writer = self
            .writer
            .get_or_insert_with(|| Writer::spawn(billing_dir.clone(), stats.clone(), stop.clone()));
        writer.batches.send(files).map_err(|_| SinkError::Stopped)?;
        self.batches_in_flight += 1;
        Ok(())
    }

    /// The files in place and not recorded yet, as far as the writer has
    /// reported them (it is not waited for).
    pub fn installed(&mut self) -> &[FileRecord] {
        if let Some(writer) = &self.writer {
            for report in writer.reports.try_iter() {
                self.batches_in_flight -= usize::from(report.ends_batch);
                self.installed.extend(report.files);
            }
        }
        &self.installed
    }

    /// What [`PeriodFiles::installed`] listed last, without asking again.
    pub fn reported(&self) -> &[FileRecord] {
        &self.installed
    }

    /// Waits until every file handed over is in place; then
    /// [`PeriodFiles::installed`] lists them all. [`SinkError::Stopped`]
    /// if the writer gave up on a stop first.
    pub fn wait_installed(&mut self) -> Result<(), SinkError> {
        while self.batches_in_flight > 0 {
            let writer = self.writer.as_ref().ok_or(SinkError::Stopped)?;
            let report = writer.reports.recv().map_err(|_| SinkError::Stopped)?;
            self.batches_in_flight -= usize::from(report.ends_batch);
            self.installed.extend(report.files);
        }
        Ok(())
    }

    /// Whether files are being written or wait to be recorded.
    pub fn pending(&self) -> bool {
        self.batches_in_flight > 0 || !self.installed.is_empty()
    }

    /// The ledger has recorded the first `n` files
    /// [`PeriodFiles::installed`] listed.
    pub fn recorded(&mut self, n: usize) {
        self.installed.drain(..n);
    }

    /// Ends the writer: it finishes what it was handed (or gives up on a
    /// stop), and what it installed is then in [`PeriodFiles::installed`].
    pub fn finish(&mut self) {
        if let Some(writer) = self.writer.take() {
            drop(writer.batches);
            let _ = writer.thread.join();
            for report in writer.reports.try_iter() {
                self.installed.extend(report.files);
            }
            self.batches_in_flight = 0;
        }
    }
}

impl Drop for PeriodFiles {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Writer {
    fn spawn(billing_dir: PathBuf, stats: Arc<BillingStats>, stop: Arc<AtomicBool>) -> Writer {
        let (batches, to_write) = mpsc::channel::<Vec<PeriodFile>>();
        let (report, reports) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("billing-files".into())
            .spawn(move || {
                for batch in to_write {
                    let mut chunks = batch.chunks(FILES_PER_INSTALL).peekable();
                    while let Some(chunk) = chunks.next() {
                        let mut files = Vec::new();
                        if !retry_until_done(&stats, &stop, || {
                            files = install(&billing_dir, chunk, &stop)?;
                            Ok(())
                        }) {
                            return;
                        }
                        let ends_batch = chunks.peek().is_none();
                        if report.send(Installed { files, ends_batch }).is_err() {
                            return;
                        }
                    }
                }
            })
            .expect("spawning the billing files thread");
        Writer {
            batches,
            reports,
            thread,
        }
    }
}

/// Writes `files` (each with its marker), makes them durable and renames
/// them into place, in order. What an abandoned or failed attempt staged is
/// removed; what it renamed is written again, with the same bytes, by the
/// next attempt.
fn install(
    billing_dir: &Path,
    files: &[PeriodFile],
    stop: &AtomicBool,
) -> Result<Vec<FileRecord>, SinkError> {
    let mut staged = StagedFiles::default();
    let mut records = Vec::with_capacity(files.len());
    for file in files {
        if stop.load(Ordering::Relaxed) {
            return Err(SinkError::Stopped);
        }
        records.push(stage(billing_dir, &mut staged, file)?);
    }
    staged.install()?;
    sync_dir(billing_dir)?;
    Ok(records)
}

/// Stages a period file, then its marker; returns the file's ledger record.
fn stage(
    billing_dir: &Path,
    staged: &mut StagedFiles,
    file: &PeriodFile,
) -> Result<FileRecord, SinkError> {
    let (csv, total_price_micros) = render_csv(&file.rows)?;
    let name = format!("billable-{}-{}.csv", file.start, file.end);
    let sha256 = hex::encode(Sha256::digest(&csv));
    staged.stage(&billing_dir.join(&name), &csv)?;
    let marker = Marker {
        file: name.clone(),
        period_start_ms: file.start,
        period_end_ms: file.end,
        rows: file.rows.len() as u64,
        total_price_micros,
        sha256: sha256.clone(),
        campaigns: campaign_totals(&file.rows),
    };
    staged.stage(
        &billing_dir.join(format!("{name}.done")),
        &marker_bytes(&marker)?,
    )?;
    Ok(FileRecord {
        name,
        period_start: file.start,
        period_end: file.end,
        rows: file.rows.len() as u64,
        total_price_micros,
        sha256,
        written_at_ms: wall_clock_ms(),
    })
}

fn marker_bytes(marker: &impl Serialize) -> Result<Vec<u8>, SinkError> {
    let mut bytes = serde_json::to_vec_pretty(marker).map_err(std::io::Error::from)?;
    bytes.push(b'\n');
    Ok(bytes)
}
