//! Billing sink: final outcomes into the ledger, period files out of it.
//!
//! All billing output is written by one worker (worker 0, in process 0 of a
//! cluster), so files do not depend on the number of workers or processes.
//! Outcomes arrive already final; the sink commits them to the [`Ledger`]
//! and, once its input frontier shows that a whole period is final, renders
//! the period's file from the billed rows it committed (kept in memory until
//! then, read back from the ledger at open). The files are written by a
//! thread of their own and recorded in the ledger by a later commit, once
//! they are in place ([`crate::period_files`]):
//!
//! ```text
//! OUT/billing/billable-<start_ms>-<end_ms>.csv        the rows, sorted by impression_id
//! OUT/billing/billable-<start_ms>-<end_ms>.csv.done   completion marker (JSON)
//! ```
//!
//! The CSV is written atomically first, then the marker; a reader that finds
//! the marker can trust the CSV (row count, total price and SHA-256 of the
//! exact bytes are in the marker).
//!
//! Coverage: from the first period that held a finalized impression to the
//! latest final one, every period is covered by exactly one file, so "nothing
//! to bill" is distinguishable from "not final yet". A period with billed
//! rows has a file of its own; a maximal run of consecutive periods with
//! none has one header-only file spanning the run (its name and marker give
//! the run's start and end). A run is written once the period after it is
//! final, together with that period's file; at the end of a finite input the
//! run up to the last period that held a finalized impression is written
//! too. So an hour without billing, or a jump of three years, costs one file,
//! and the work of a commit is proportional to the files it writes.

use livepipe_dataflow::billing::{BillingEvent, LateRecord, Outcome};
use livepipe_dataflow::config::PipelineConfig;
use livepipe_dataflow::policy::{BillingPolicy, Coverage};
use livepipe_dataflow::resume::{Checkpoint, Checkpoints};
use livepipe_dataflow::time::{wall_clock_ms, Time};
use serde::Serialize;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::StreamVec;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fsutil::{create_private_dir, TEMP_PREFIX};
use crate::ledger::{
    sort_rows, BilledRow, Commit, Ledger, ResumePosition, RowsByPeriod, LEDGER_FILE,
};
use crate::period_files::{PeriodFile, PeriodFiles};
use crate::side::SideOutputs;

pub const CSV_HEADER: &str = "impression_id,ad_id,campaign_id,advertiser_id,stream_id,viewer_id,impression_ts,qualified_ts,price_micros";

/// The completion marker, `<csv>.done`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Marker {
    /// The CSV's file name (no directory).
    pub file: String,
    pub period_start_ms: u64,
    /// Exclusive.
    pub period_end_ms: u64,
    /// Data rows, header not counted.
    pub rows: u64,
    pub total_price_micros: u64,
    /// Lower-case hex SHA-256 of the CSV's bytes.
    pub sha256: String,
    /// Rows and money per campaign id, so that a reader can reconcile a
    /// campaign without parsing the CSV. Absent from markers written before
    /// it existed (then empty).
    #[serde(default)]
    pub campaigns: BTreeMap<String, CampaignTotal>,
}

/// One campaign's share of a billing file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CampaignTotal {
    pub rows: u64,
    pub price_micros: u64,
}

/// Per-campaign totals of a period's rows, for its marker.
pub fn campaign_totals(rows: &[BilledRow]) -> BTreeMap<String, CampaignTotal> {
    let mut totals: BTreeMap<String, CampaignTotal> = BTreeMap::new();
    for row in rows {
        let total = totals.entry(row.campaign_id.to_string()).or_default();
        total.rows += 1;
        total.price_micros += row.price_micros;
    }
    totals
}

/// Counters a caller can read while the job runs.
#[derive(Default, Debug)]
pub struct BillingStats {
    pub billed: AtomicU64,
    /// The `price_micros` of the billed impressions, summed.
    pub billed_micros: AtomicU64,
    pub expired: AtomicU64,
    pub late: AtomicU64,
    pub duplicates: AtomicU64,
    pub files: AtomicU64,
    /// The sink's input frontier (coarse event-time ms); 0 before the first
    /// move, `u64::MAX` once the input is exhausted.
    pub frontier_ms: AtomicU64,
    /// Set while the billing output refuses writes.
    pub stall: Mutex<Option<Stall>>,
}

/// Why billing is not committing, and since when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    pub cause: String,
    /// Wall-clock ms of the first failed attempt.
    pub since_ms: u64,
}

impl BillingStats {
    /// Why billing is stalled, if it is.
    pub fn stall(&self) -> Option<Stall> {
        self.stall.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Billing's watermark as far as the sink knows it.
    pub fn watermark(&self) -> Option<u64> {
        match self.frontier_ms.load(Ordering::Relaxed) {
            0 | u64::MAX => None,
            ms => Some(ms),
        }
    }
}

pub struct BillingSink {
    ledger: Ledger,
    policy: BillingPolicy,
    /// Writes the files of final periods, which a later commit records.
    files: PeriodFiles,
    side: Arc<SideOutputs>,
    /// Source name per partition, for `late.jsonl`.
    sources: Vec<Arc<str>>,
    buffered: Vec<Outcome>,
    /// Late records already in `late.jsonl`, for the ledger's next commit.
    late: Vec<LateRecord>,
    coverage: Coverage,
    /// The committed billed rows of the periods no file covers yet: what
    /// their files will list. Kept here as they are committed (and read
    /// from the ledger at open), so a file is rendered without reading its
    /// rows back from SQLite.
    unwritten: RowsByPeriod,
    stats: Arc<BillingStats>,
    /// Where the sources can resume; the safe ones are committed with the
    /// outcomes.
    checkpoints: Arc<Checkpoints>,
    /// Set when the job stops: a commit in progress is abandoned (see
    /// [`SinkThread`]).
    stop: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("billing ledger: {0}")]
    Ledger(#[from] rusqlite::Error),
    #[error("billing output: {0}")]
    Io(#[from] std::io::Error),
    /// The job is stopping: the commit in progress was abandoned.
    #[error("billing stopped before committing")]
    Stopped,
}

impl BillingSink {
    /// Opens the ledger and the billing directory under `out_dir`, removing
    /// temp files a crash may have left.
    pub fn open(
        out_dir: &Path,
        config: PipelineConfig,
        sources: Vec<Arc<str>>,
        side: Arc<SideOutputs>,
        checkpoints: Arc<Checkpoints>,
    ) -> Result<Self, SinkError> {
        let billing_dir = out_dir.join("billing");
        create_private_dir(&billing_dir)?;
        for entry in fs::read_dir(&billing_dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                fs::remove_file(entry.path())?;
            }
        }
        let ledger = Ledger::open(&out_dir.join(LEDGER_FILE))?;
        let coverage = Coverage::resumed(ledger.next_unwritten_period()?, ledger.period_range()?);
        let unwritten = match coverage.first_uncovered() {
            Some(period) => ledger.billed_rows_from(period)?,
            None => RowsByPeriod::new(),
        };
        let stats = Arc::<BillingStats>::default();
        Ok(BillingSink {
            ledger,
            policy: BillingPolicy::new(&config),
            files: PeriodFiles::new(billing_dir),
            side,
            sources,
            buffered: Vec::new(),
            late: Vec::new(),
            coverage,
            unwritten,
            stats,
            checkpoints,
            stop: Arc::default(),
        })
    }

    /// The resume positions committed by an earlier run on this `--out`.
    pub fn resume_positions(&self) -> Result<BTreeMap<u32, ResumePosition>, SinkError> {
        Ok(self.ledger.positions()?)
    }

    pub fn stats(&self) -> Arc<BillingStats> {
        self.stats.clone()
    }

    /// Takes one event from the billing path. Late records are written at
    /// once, retried while the output refuses writes (until the job stops:
    /// then [`SinkError::Stopped`]); outcomes wait for
    /// [`BillingSink::advance`].
    pub fn accept(&mut self, event: BillingEvent) -> Result<(), SinkError> {
        match event {
            BillingEvent::Final(outcome) => self.buffered.push(outcome),
            BillingEvent::Late(late) => {
                let stop = self.stop.clone();
                if !self.retry(&stop, |sink| sink.record_late(&late)) {
                    return Err(SinkError::Stopped);
                }
            }
        }
        Ok(())
    }

    /// Writes a late record to `late.jsonl`; the ledger gets it with the
    /// next commit (with the positions past it, so a crash before that
    /// reads it again).
    fn record_late(&mut self, late: &LateRecord) -> Result<(), SinkError> {
        self.side
            .late(source_name(&self.sources, late.position.partition), late)?;
        self.stats.late.fetch_add(1, Ordering::Relaxed);
        self.late.push(late.clone());
        Ok(())
    }

    /// Commits buffered outcomes, the files written since the last commit
    /// and the positions now safe, in one ledger transaction, then hands the
    /// writer the files of every period that `frontier` (the sink's input
    /// frontier; `None` once the input is exhausted) shows to be final. At
    /// the end of the input it waits for them and records them too.
    pub fn advance(&mut self, frontier: Option<Time>) -> Result<(), SinkError> {
        self.stats
            .frontier_ms
            .store(frontier.unwrap_or(u64::MAX), Ordering::Relaxed);
        self.commit(frontier)?;
        if frontier.is_none() {
            self.ledger.checkpoint()?;
            self.files.wait_installed()?;
            self.commit(frontier)?;
        }
        Ok(())
    }

    /// One ledger transaction (see [`BillingSink::advance`]).
    fn commit(&mut self, frontier: Option<Time>) -> Result<(), SinkError> {
        // Most frontier moves finalize nothing: skip the transaction (and its
        // fsync) unless there are outcomes to record, a period to write,
        // written files to record, or positions to move on: sources move on
        // while nothing is final (a quiet topic, periods without
        // impressions).
        let period_due = self.coverage.due(&self.policy, frontier).is_some();
        let safe = self.checkpoints.safe(self.policy.resume_bound(frontier));
        let positions_moved = !self.checkpoints.holds(&safe);
        let written = self.files.installed().len();
        if self.buffered.is_empty()
            && self.late.is_empty()
            && !period_due
            && !positions_moved
            && written == 0
        {
            self.side.flush()?;
            return Ok(());
        }
        // Nothing changes outside the transaction until it has committed:
        // a failed attempt (disk full, say) can simply be tried again.
        let commit = self.ledger.begin()?;
        let mut coverage = self.coverage;
        let mut recorded = self.record_outcomes(&commit, &mut coverage)?;
        self.record_late_in_ledger(&commit, &recorded)?;
        tracing::debug!(?frontier, ?coverage, "billing commit");
        commit.record_files(&self.files.reported()[..written])?;
        let final_files = self.final_files(&mut coverage, frontier, &recorded.billed_rows);
        self.record_positions(&commit, &safe)?;
        // Side lines go out, and every rejected line so far is flushed,
        // before the commit: a crash right after it then loses none (the
        // lines of a commit that fails or is abandoned are written again
        // by the retry or the next run; side outputs may repeat a line).
        for outcome in &recorded.expired {
            self.side.expired(outcome)?;
        }
        for late in &recorded.already_final {
            self.side
                .late(source_name(&self.sources, late.position.partition), late)?;
        }
        self.side.flush()?;
        commit.commit()?;

        let billed_rows = std::mem::take(&mut recorded.billed_rows);
        self.checkpoints.mark_committed(&safe);
        let stats = &self.stats;
        stats.billed.fetch_add(recorded.billed, Ordering::Relaxed);
        stats
            .billed_micros
            .fetch_add(recorded.billed_micros, Ordering::Relaxed);
        stats
            .expired
            .fetch_add(recorded.expired.len() as u64, Ordering::Relaxed);
        let again = recorded.already_final.len() as u64;
        stats
            .duplicates
            .fetch_add(recorded.duplicates + again, Ordering::Relaxed);
        stats.late.fetch_add(again, Ordering::Relaxed);
        self.coverage = coverage;
        self.keep_unwritten(billed_rows);
        self.buffered.clear();
        self.late.clear();
        self.files_recorded(written);
        let stop = self.stop.clone();
        self.files.write(final_files, &self.stats, &stop)
    }

    /// After a commit: adds its billed rows to those waiting for a file,
    /// and lets go of the periods the commit wrote.
    fn keep_unwritten(&mut self, committed: RowsByPeriod) {
        for (period, rows) in committed {
            self.unwritten.entry(period).or_default().extend(rows);
        }
        if let Some(first) = self.coverage.first_uncovered() {
            self.unwritten = self.unwritten.split_off(&first);
        }
    }

    /// Records this commit's late records in the ledger: those the dataflow
    /// reported, and the outcomes found already final, except replays (the
    /// canonical record itself read again after a restart: nothing late
    /// happened, and counting it would make the report depend on crashes).
    fn record_late_in_ledger(
        &self,
        commit: &Commit<'_>,
        recorded: &Recorded<'_>,
    ) -> Result<(), SinkError> {
        let policy = &self.policy;
        let mut recorder = commit.late_recorder()?;
        for late in &self.late {
            recorder.record(late, policy.period_start(late.ts))?;
        }
        for late in &recorded.already_final {
            if !commit.is_replay(late)? {
                recorder.record(late, policy.period_start(late.ts))?;
            }
        }
        Ok(())
    }

    /// Inserts the buffered outcomes into the ledger (in `commit`), noting
    /// in `coverage` the periods they finalize.
    fn record_outcomes<'a>(
        &'a self,
        commit: &Commit<'_>,
        coverage: &mut Coverage,
    ) -> Result<Recorded<'a>, SinkError> {
        let mut recorded = Recorded::default();
        let mut finalizer = commit.finalizer()?;
        // In id order, the order of the ledger's key: consecutive inserts
        // then mostly land on the leaf pages the last ones touched, instead
        // of all over the tree. Stable: of two outcomes of one id, the
        // first still stands.
        let mut in_key_order: Vec<&Outcome> = self.buffered.iter().collect();
        in_key_order.sort_by(|a, b| a.impression_id.cmp(&b.impression_id));
        for (n, outcome) in in_key_order.into_iter().enumerate() {
            if n % 4096 == 4095 && self.stop.load(Ordering::Relaxed) {
                // Dropping `commit` rolls the transaction back.
                return Err(SinkError::Stopped);
            }
            let period = self.policy.period_start(outcome.impression.ts);
            recorded.duplicates += u64::from(outcome.duplicates);
            if coverage.covers(period) || !finalizer.finalize(outcome, period)? {
                // Already final (state retired long ago, or a replay), or
                // its period is: the first answer stands.
                recorded
                    .already_final
                    .push(LateRecord::already_final(outcome));
                continue;
            }
            coverage.saw(period);
            if let Some(row) = BilledRow::of(outcome) {
                recorded.billed += 1;
                recorded.billed_micros += row.price_micros;
                recorded.billed_rows.entry(period).or_default().push(row);
            } else {
                recorded.expired.push(outcome);
            }
        }
        Ok(recorded)
    }

    /// The files [`Coverage`] says are due at `frontier`, to be written once
    /// the commit that holds their rows is. A period's rows are those
    /// committed before ([`BillingSink::unwritten`]) and this commit's
    /// (`billed`); the next billable period is one map seek away, so a
    /// commit's work follows the files it finalizes, not the number of
    /// periods it passes.
    fn final_files(
        &self,
        coverage: &mut Coverage,
        frontier: Option<Time>,
        billed: &RowsByPeriod,
    ) -> Vec<PeriodFile> {
        let mut files = Vec::new();
        while let Some(due) = coverage.due(&self.policy, frontier) {
            let first_from = |rows: &RowsByPeriod| rows.range(due..).next().map(|(&p, _)| p);
            let next_billed = match (first_from(&self.unwritten), first_from(billed)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let Some(next) = coverage.take_files(&self.policy, next_billed, frontier) else {
                break;
            };
            if let Some((start, end)) = next.empty_run {
                files.push(PeriodFile {
                    start,
                    end,
                    rows: Vec::new(),
                });
            }
            if let Some((start, end)) = next.billed {
                let mut rows: Vec<BilledRow> = [&self.unwritten, billed]
                    .into_iter()
                    .filter_map(|rows| rows.get(&start))
                    .flatten()
                    .cloned()
                    .collect();
                sort_rows(&mut rows);
                files.push(PeriodFile { start, end, rows });
            }
        }
        files
    }

    /// Records in `commit` the resume positions that are `safe` (at the
    /// frontier of this commit).
    fn record_positions(
        &self,
        commit: &Commit<'_>,
        safe: &BTreeMap<u32, Checkpoint>,
    ) -> Result<(), SinkError> {
        for (&partition, checkpoint) in safe {
            let position = ResumePosition {
                source: source_name(&self.sources, partition).to_string(),
                checkpoint: *checkpoint,
                prefix_sha256: None,
            };
            commit.set_position(partition, &position)?;
        }
        Ok(())
    }
}

/// What one commit did with the buffered outcomes.
#[derive(Default)]
struct Recorded<'a> {
    billed: u64,
    billed_micros: u64,
    duplicates: u64,
    expired: Vec<&'a Outcome>,
    /// Outcomes whose id or period was already final: late.
    already_final: Vec<LateRecord>,
    /// The rows of the outcomes billed by this commit.
    billed_rows: RowsByPeriod,
}

fn source_name(sources: &[Arc<str>], partition: u32) -> &str {
    sources
        .get(partition as usize)
        .map_or("unknown", |name| name)
}

/// The exact bytes of a period file: header, rows, `\n` line ends, fields
/// quoted only when they hold `,` `"` `\r` or `\n`.
pub fn render_csv(rows: &[BilledRow]) -> Result<(Vec<u8>, u64), std::io::Error> {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .quote_style(csv::QuoteStyle::Necessary)
        .from_writer(Vec::with_capacity(64 + rows.len() * 96));
    let mut total = 0u64;
    writer.write_record(CSV_HEADER.split(','))?;
    for row in rows {
        total += row.price_micros;
        writer.write_record([
            row.impression_id.as_str(),
            &row.ad_id,
            &row.campaign_id,
            &row.advertiser_id,
            &row.stream_id,
            &row.viewer_id,
            &row.impression_ts.to_string(),
            &row.qualified_ts.to_string(),
            &row.price_micros.to_string(),
        ])?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    Ok((bytes, total))
}

/// What worker 0 hands the sink thread, in dataflow order.
enum SinkMessage {
    Events(Vec<BillingEvent>),
    Checkpoints(Vec<(u32, Checkpoint)>),
    /// The sink's input frontier moved (`None`: the input is exhausted).
    Frontier(Option<Time>),
}

/// The dataflow's end of the sink thread (worker 0 holds it).
pub struct SinkInput {
    sender: mpsc::Sender<SinkMessage>,
}

/// The billing sink on a thread of its own.
///
/// The dataflow never waits for the disk: worker 0 hands over final
/// outcomes and frontier moves and goes on (it also runs the live path).
/// The thread commits them in order, at most once per
/// [`MIN_COMMIT_INTERVAL`] until the input ends, and hands the files they
/// complete to the period files' writer ([`crate::period_files`]); when a
/// commit or a file fails (disk full, a directory that refuses writes) it
/// says so in [`BillingStats`] and tries again, with backoff, until it
/// succeeds or the job stops. Nothing changes outside a transaction that
/// failed, and a file is recorded only once it is in place, so catching up
/// bills exactly once. While stalled, final outcomes queue in memory.
///
/// Once `stop` is set the thread ends after at most the transaction in
/// progress, without draining what is queued: it looks at `stop` between
/// messages, a commit abandons (rolls back) when it sees it every few
/// thousand outcomes, and the writer between two files; the files already
/// in place are recorded. Nothing uncommitted counts; a restart resumes
/// from the committed positions.
pub struct SinkThread {
    thread: std::thread::JoinHandle<()>,
}

/// Least time from one commit to the next, unless the input has ended.
///
/// Every commit rewrites the ledger pages it touches (the outcomes' ids
/// are spread over the whole `finalized` tree) and fsyncs: a replay moves
/// the frontier every few milliseconds, and committing each move made the
/// sink the job's third-busiest thread. A tenth of a second delays a
/// period file by at most that, and lets one commit take what several
/// moves finalized.
const MIN_COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// Longest pause between attempts while the billing output refuses writes.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(10);

impl SinkThread {
    /// Starts the thread. It ends when the [`SinkInput`] is dropped and
    /// everything sent is committed, or soon after `stop` is set; `on_end`
    /// is called then (also if the thread panics), so that whoever waits for
    /// the outputs to be complete need not poll.
    pub fn spawn(
        mut sink: BillingSink,
        stop: Arc<AtomicBool>,
        on_end: impl FnOnce() + Send + 'static,
    ) -> (SinkInput, SinkThread) {
        let (sender, receiver) = mpsc::channel::<SinkMessage>();
        sink.stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("billing-sink".into())
            .spawn(move || {
                let _on_end = scopeguard::guard((), |()| on_end());
                run(&mut sink, &receiver, &stop);
                sink.record_files_left();
            })
            .expect("spawning the billing sink thread");
        (SinkInput { sender }, SinkThread { thread })
    }

    /// Waits for the thread to commit what it was sent (or to give up on a
    /// stop).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// The sink thread's work until the dataflow is gone or the job stops:
/// messages in order, a commit per frontier move at most once per
/// [`MIN_COMMIT_INTERVAL`], and one when files were written since the last.
fn run(sink: &mut BillingSink, receiver: &mpsc::Receiver<SinkMessage>, stop: &AtomicBool) {
    // The frontier waiting for its commit, the last one committed, and when
    // the last commit started. Everything waiting is taken at once: after a
    // stall, or between two commits, the backlog is committed in one
    // transaction, not one per frontier move.
    let mut due: Option<Option<Time>> = None;
    let mut committed: Option<Option<Time>> = None;
    let mut last_commit: Option<Instant> = None;
    loop {
        let next_commit = last_commit.map(|at| at + MIN_COMMIT_INTERVAL);
        let wait = match (due, next_commit) {
            (Some(_), Some(at)) => Some(at.saturating_duration_since(Instant::now())),
            // Files are being written: look again for some to record.
            _ if sink.files.pending() => Some(MIN_COMMIT_INTERVAL),
            _ => None,
        };
        let first = match wait {
            Some(wait) => match receiver.recv_timeout(wait) {
                Ok(message) => Some(message),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
            None => match receiver.recv() {
                Ok(message) => Some(message),
                Err(_) => break,
            },
        };
        for message in first.into_iter().chain(receiver.try_iter()) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match message {
                SinkMessage::Events(events) => {
                    for event in events {
                        if sink.accept(event).is_err() {
                            return;
                        }
                    }
                }
                SinkMessage::Checkpoints(checkpoints) => {
                    for (partition, checkpoint) in checkpoints {
                        sink.checkpoints.record(partition, checkpoint);
                    }
                }
                SinkMessage::Frontier(moved) => due = Some(moved),
            }
        }
        // Written files are recorded by the next commit, also when no
        // frontier moves (a quiet topic).
        if due.is_none() && !sink.files.installed().is_empty() {
            due = committed;
        }
        let Some(frontier) = due else { continue };
        // The end of the input is committed at once; other moves wait for
        // the interval since the last commit.
        let waited = next_commit.is_none_or(|at| Instant::now() >= at);
        if frontier.is_some() && !waited {
            continue;
        }
        last_commit = Some(Instant::now());
        committed = Some(frontier);
        due = None;
        if stop.load(Ordering::Relaxed) || !sink.retry(stop, |sink| sink.advance(frontier)) {
            return;
        }
    }
    // The dataflow is gone (its last move, the end of the input, is
    // committed above); a move still waiting gets its commit.
    if let Some(frontier) = due {
        if !stop.load(Ordering::Relaxed) {
            sink.retry(stop, |sink| sink.advance(frontier));
        }
    }
}

impl BillingSink {
    /// When the thread ends: waits for the files' writer (which gives up
    /// between two files on a stop) and records the files it put in place,
    /// so that a stopped job's ledger lists every file it left. Best effort:
    /// a file not recorded is written again by the next run.
    fn record_files_left(&mut self) {
        self.files.finish();
        if let Err(err) = self.record_written_files() {
            tracing::warn!(
                "billing files in place but not recorded ({err}); the next run writes them again"
            );
        }
    }

    /// Waits until every file handed to the writer is in place, and records
    /// them. (A running sink records them with its next commit.)
    pub fn wait_for_files(&mut self) -> Result<(), SinkError> {
        self.files.wait_installed()?;
        self.record_written_files()
    }

    /// Records the files the writer reported in place, in a transaction of
    /// their own.
    fn record_written_files(&mut self) -> Result<(), SinkError> {
        let written = self.files.installed().len();
        if written == 0 {
            return Ok(());
        }
        let commit = self.ledger.begin()?;
        commit.record_files(self.files.reported())?;
        commit.commit()?;
        self.files_recorded(written);
        Ok(())
    }

    /// After a commit: the first `n` files the writer reported are in the
    /// ledger.
    fn files_recorded(&mut self, n: usize) {
        self.stats.files.fetch_add(n as u64, Ordering::Relaxed);
        self.files.recorded(n);
    }

    /// Runs `attempt` until it succeeds ([`retry_until_done`]).
    fn retry(
        &mut self,
        stop: &AtomicBool,
        mut attempt: impl FnMut(&mut Self) -> Result<(), SinkError>,
    ) -> bool {
        let stats = self.stats.clone();
        retry_until_done(&stats, stop, || attempt(self))
    }
}

/// Runs `attempt` until it succeeds, reporting the stall in `stats`
/// meanwhile. False if the job was stopped first (or `attempt` gave up on
/// it). The ledger's commits and the period files' writer each retry on
/// their own; each clears only a stall it reported.
pub(crate) fn retry_until_done(
    stats: &BillingStats,
    stop: &AtomicBool,
    mut attempt: impl FnMut() -> Result<(), SinkError>,
) -> bool {
    let mut pause = Duration::from_millis(100);
    let mut stalled = false;
    loop {
        match attempt() {
            Ok(()) => {
                if stalled
                    && stats
                        .stall
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take()
                        .is_some()
                {
                    tracing::info!("billing output writable again: caught up");
                }
                return true;
            }
            Err(SinkError::Stopped) => return false,
            Err(err) => {
                stalled = true;
                let cause = err.to_string();
                let mut stall = stats.stall.lock().unwrap_or_else(|p| p.into_inner());
                if stall.as_ref().is_none_or(|s| s.cause != cause) {
                    tracing::error!(
                        "billing stalled: {cause}; the live path goes on, billing retries \
                         and catches up once the output takes writes again"
                    );
                }
                let since = stall.as_ref().map_or_else(wall_clock_ms, |s| s.since_ms);
                *stall = Some(Stall {
                    cause,
                    since_ms: since,
                });
            }
        }
        if stop.load(Ordering::Relaxed) {
            tracing::warn!(
                "stopped while billing was stalled: the ledger keeps what was committed"
            );
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
    }
}

/// Attaches the sink to the billing stream and the sources' checkpoints:
/// everything goes to worker 0, which hands outcomes, checkpoints and every
/// move of the outcomes' frontier to the [`SinkThread`]. Workers other than
/// 0 pass `None`.
pub fn attach<'s>(
    events: StreamVec<'s, Time, BillingEvent>,
    checkpoints: StreamVec<'s, Time, (u32, Checkpoint)>,
    sink: Option<SinkInput>,
) {
    let mut builder = OperatorBuilder::new("BillingSink".to_owned(), events.scope());
    let mut events = builder.new_input(events, Exchange::new(|_| 0));
    let mut checkpoints = builder.new_input(checkpoints, Exchange::new(|_| 0));
    let mut last_frontier: Option<Option<Time>> = None;
    builder.build(move |_capabilities| {
        move |frontiers| {
            let mut received = false;
            events.for_each_stamp(|_, batches| {
                for batch in batches {
                    received |= !batch.is_empty();
                    if let Some(sink) = sink.as_ref() {
                        let _ = sink.sender.send(SinkMessage::Events(std::mem::take(batch)));
                    } else {
                        batch.clear();
                    }
                }
            });
            let mut new_checkpoints = false;
            checkpoints.for_each_stamp(|_, batches| {
                for batch in batches {
                    new_checkpoints |= !batch.is_empty();
                    if let Some(sink) = sink.as_ref() {
                        let _ = sink
                            .sender
                            .send(SinkMessage::Checkpoints(std::mem::take(batch)));
                    } else {
                        batch.clear();
                    }
                }
            });
            let current = frontiers[0].frontier().first().copied();
            // Checkpoints alone wait for the next commit, except after the
            // end, when there is no next one.
            let finished_with_news = current.is_none() && new_checkpoints;
            if received || last_frontier != Some(current) || finished_with_news {
                last_frontier = Some(current);
                if let Some(sink) = sink.as_ref() {
                    // The thread ends only after this operator is gone.
                    let _ = sink.sender.send(SinkMessage::Frontier(current));
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use livepipe_dataflow::billing::{AdDetails, ImpressionFact, Outcome};
    use livepipe_dataflow::event::Position as EventPosition;

    fn billed(id: usize, ts: u64) -> BillingEvent {
        BillingEvent::Final(Outcome {
            impression_id: format!("i{id}").into(),
            impression: ImpressionFact {
                ts,
                event_id: format!("e{id}").into(),
                watermark: 0,
                position: EventPosition {
                    partition: 0,
                    offset: id as u64,
                },
                ad: AdDetails {
                    ad_id: "ad".into(),
                    campaign_id: "c".into(),
                    advertiser_id: "adv".into(),
                    stream_id: "s".into(),
                    viewer_id: "v".into(),
                    price_micros: 7,
                }
                .into(),
            },
            qualified_ts: Some(ts + 1),
            duplicates: 0,
        })
    }

    fn open(out: &Path) -> BillingSink {
        let config = PipelineConfig {
            billing_period_ms: 1_000,
            qualify_window_ms: 500,
            time_granularity: Some(100),
            ..PipelineConfig::default()
        };
        let side = Arc::new(SideOutputs::open(out).unwrap());
        BillingSink::open(out, config, vec![Arc::from("f")], side, Arc::default()).unwrap()
    }

    #[test]
    fn positions_are_committed_while_nothing_becomes_final() {
        // A quiet topic: records that bill nothing still move the sources
        // on, and a restart must not read them again forever.
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(dir.path());
        for offset in [10, 20] {
            let checkpoint = Checkpoint {
                offset,
                max_ts: Some(offset * 1_000),
                ..Checkpoint::default()
            };
            sink.checkpoints.record(0, checkpoint);
            sink.advance(Some(1_000_000)).unwrap();
            let committed = sink.resume_positions().unwrap();
            assert_eq!(committed[&0].checkpoint, checkpoint);
        }
        assert_eq!(sink.stats().files.load(Ordering::Relaxed), 0);
    }

    fn accept_ten_thousand_in_five_periods(sink: &mut BillingSink) {
        for id in 0..10_000 {
            sink.accept(billed(id, 1_000 + (id % 5) as u64 * 1_000))
                .unwrap();
        }
    }

    #[test]
    fn a_stop_abandons_the_commit_in_progress_and_nothing_of_it_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(dir.path());
        accept_ten_thousand_in_five_periods(&mut sink);
        sink.stop.store(true, Ordering::Relaxed);
        assert!(matches!(sink.advance(None), Err(SinkError::Stopped)));
        drop(sink);
        let ledger = Ledger::open(&dir.path().join(LEDGER_FILE)).unwrap();
        assert_eq!(ledger.period_range().unwrap(), None, "no outcome committed");
        assert_eq!(ledger.next_unwritten_period().unwrap(), None);

        // The next run commits it all.
        let mut sink = open(dir.path());
        accept_ten_thousand_in_five_periods(&mut sink);
        sink.advance(None).unwrap();
        assert_eq!(sink.stats().billed.load(Ordering::Relaxed), 10_000);
        assert_eq!(sink.stats().files.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn files_handed_over_but_not_written_before_a_crash_are_written_by_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let billing = dir.path().join("billing");
        let aside = dir.path().join("billing.aside");
        let mut sink = open(dir.path());
        // The billing directory refuses files (moved aside, a plain file in
        // its place): the commit goes through, its files' writer stalls.
        fs::rename(&billing, &aside).unwrap();
        fs::write(&billing, b"in the way").unwrap();
        accept_ten_thousand_in_five_periods(&mut sink);
        sink.advance(Some(10_000)).unwrap();
        // Bounded, so that a writer that never stalls fails the test
        // instead of hanging it.
        for _ in 0..3_000 {
            if sink.stats().stall().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let stall = sink
            .stats()
            .stall()
            .expect("the files' writer reports the stall");
        assert!(stall.cause.contains("directory"), "{}", stall.cause);
        // The job dies before the files are in place.
        sink.stop.store(true, Ordering::Relaxed);
        drop(sink);
        let ledger = Ledger::open(&dir.path().join(LEDGER_FILE)).unwrap();
        assert_eq!(ledger.period_range().unwrap(), Some((1_000, 5_000)));
        assert_eq!(
            ledger.next_unwritten_period().unwrap(),
            None,
            "no file recorded"
        );
        drop(ledger);

        // The next run reads the same input again: every id is final
        // already, and the files come from the rows the ledger holds.
        fs::remove_file(&billing).unwrap();
        fs::rename(&aside, &billing).unwrap();
        let mut sink = open(dir.path());
        accept_ten_thousand_in_five_periods(&mut sink);
        sink.advance(None).unwrap();
        assert_eq!(sink.stats().billed.load(Ordering::Relaxed), 0);
        assert_eq!(sink.stats().files.load(Ordering::Relaxed), 5);
        for period in (1_000..6_000).step_by(1_000) {
            let csv = billing.join(format!("billable-{period}-{}.csv", period + 1_000));
            let rows = fs::read_to_string(csv).unwrap().lines().count() - 1;
            assert_eq!(rows, 2_000);
        }
        let ledger = Ledger::open(&dir.path().join(LEDGER_FILE)).unwrap();
        assert_eq!(ledger.next_unwritten_period().unwrap(), Some(6_000));
    }

    #[test]
    fn a_stop_is_seen_between_period_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = open(dir.path());
        for id in 0..100 {
            sink.accept(billed(id, 1_000 + id as u64 * 1_000)).unwrap();
        }
        sink.stop.store(true, Ordering::Relaxed);
        assert!(matches!(sink.advance(None), Err(SinkError::Stopped)));
        assert_eq!(fs::read_dir(dir.path().join("billing")).unwrap().count(), 0);
        assert_eq!(sink.stats().files.load(Ordering::Relaxed), 0);
    }
}
