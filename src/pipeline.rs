//! Wires sources -> dataflow -> sinks into one timely job.
//!
//! The two paths split right after ingest and share nothing else: the live
//! path's snapshots go to the [`LiveBoard`] on arrival, the billing path's
//! final outcomes go to the [`BillingSink`] on worker 0. A file run ends when
//! every file is read and every impression final; the last snapshots are
//! then written to `live.json`.

use anyhow::Context;
use livepipe_dataflow::billing::billing;
use livepipe_dataflow::config::PipelineConfig;
use livepipe_dataflow::event::{EventKind, Ingested};
use livepipe_dataflow::live::live;
use livepipe_dataflow::time::Time;
use livepipe_sinks::billing::{BillingSink, BillingStats, TrailingPeriods};
use livepipe_sinks::live::LiveBoard;
use livepipe_sinks::side::SideOutputs;
use livepipe_sources::file::{check_inputs, file_source, FileSourceContext};
use timely::dataflow::operators::vec::Partition;

use std::fs;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A mistake in how the job was started: exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A run over files.
#[derive(Clone, Debug)]
pub struct FileRun {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub workers: usize,
    pub config: PipelineConfig,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// Records per chunk dealt out for parsing; tests use tiny chunks so
    /// that reordering across workers is exercised.
    pub records_per_chunk: usize,
}

/// What a finished run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub records: u64,
    pub rejected: u64,
    pub billed: u64,
    pub expired: u64,
    pub late: u64,
    pub duplicates: u64,
    pub files: u64,
    pub streams: u64,
}

/// Runs the pipeline over `run.inputs` to the end.
pub fn run_files(run: FileRun) -> anyhow::Result<RunSummary> {
    if run.inputs.is_empty() {
        return Err(UsageError("no --input files given".into()).into());
    }
    check_inputs(&run.inputs).map_err(UsageError)?;
    run.config.validate().map_err(UsageError)?;
    fs::create_dir_all(&run.out)
        .map_err(|err| UsageError(format!("--out {}: cannot create: {err}", run.out.display())))?;

    let side = Arc::new(SideOutputs::open(&run.out).context("opening side outputs")?);
    let sources: Vec<Arc<str>> = run
        .inputs
        .iter()
        .map(|path| Arc::from(path.display().to_string()))
        .collect();
    let sink = BillingSink::open(
        &run.out,
        run.config.clone(),
        sources,
        side.clone(),
        TrailingPeriods::UpToLastImpression,
    )
    .with_context(|| format!("opening the billing output in {}", run.out.display()))?;
    let billing_stats = sink.stats();
    let sink = Arc::new(Mutex::new(Some(sink)));
    let board = LiveBoard::default();

    let records_read = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let context = FileSourceContext {
        allowed_lateness_ms: run.config.allowed_lateness_ms,
        time_granularity_ms: run.config.time_granularity_ms,
        max_event_ts: Arc::new(AtomicU64::new(0)),
        records_read: records_read.clone(),
        on_reject: {
            let side = side.clone();
            let rejected = rejected.clone();
            Arc::new(move |record| {
                rejected.fetch_add(1, Ordering::Relaxed);
                if let Err(err) = side.rejected(&record) {
                    fail(format!("writing rejected.jsonl: {err}"));
                }
            })
        },
        on_fatal: Arc::new(|cause| fail(cause)),
        records_per_chunk: run.records_per_chunk,
    };

    let done = Arc::new(AtomicBool::new(false));
    let reporter = run
        .progress
        .then(|| spawn_progress(records_read.clone(), billing_stats.clone(), done.clone()));

    let started = Instant::now();
    let inputs = run.inputs.clone();
    let config = run.config.clone();
    let job_board = board.clone();
    let guards = timely::execute(timely::Config::process(run.workers), move |worker| {
        let index = worker.index();
        let context = context.clone();
        worker.dataflow::<Time, _, _>(|scope| {
            let ingested = file_source(scope, &inputs, context.clone());
            let mut paths = ingested.partition(2, |record: Ingested| {
                let billing = matches!(
                    record.event.kind,
                    EventKind::Impression(_) | EventKind::AdProgress(_)
                );
                (billing as u64, record)
            });
            let billing_in = paths.pop().expect("two partitions");
            let live_in = paths.pop().expect("two partitions");

            let snapshots = live(live_in, &config, context.max_event_ts.clone());
            livepipe_sinks::live::attach(snapshots, (index == 0).then(|| job_board.clone()));

            let outcomes = billing(billing_in, &config);
            let sink = if index == 0 {
                sink.lock().unwrap_or_else(|p| p.into_inner()).take()
            } else {
                None
            };
            livepipe_sinks::billing::attach(outcomes, sink, Arc::new(|cause| fail(cause)));
        });
    })
    .map_err(|err| anyhow::anyhow!("starting timely workers: {err}"))?;
    let results = guards.join();
    done.store(true, Ordering::Relaxed);
    if let Some(reporter) = reporter {
        let _ = reporter.join();
    }
    for result in results {
        result.map_err(|panic| anyhow::anyhow!("a worker failed: {panic}"))?;
    }

    side.flush().context("flushing side outputs")?;
    board
        .write_json(&run.out.join("live.json"))
        .context("writing live.json")?;

    let summary = RunSummary {
        records: records_read.load(Ordering::Relaxed),
        rejected: rejected.load(Ordering::Relaxed),
        billed: billing_stats.billed.load(Ordering::Relaxed),
        expired: billing_stats.expired.load(Ordering::Relaxed),
        late: billing_stats.late.load(Ordering::Relaxed),
        duplicates: billing_stats.duplicates.load(Ordering::Relaxed),
        files: billing_stats.files.load(Ordering::Relaxed),
        streams: board.latest().len() as u64,
    };
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        records = summary.records,
        rejected = summary.rejected,
        billed = summary.billed,
        expired = summary.expired,
        late = summary.late,
        files = summary.files,
        streams = summary.streams,
        seconds = format!("{secs:.2}"),
        records_per_sec = format!("{:.0}", summary.records as f64 / secs.max(1e-9)),
        "run finished"
    );
    Ok(summary)
}

/// A fault the job cannot survive (an input that cannot be read any more,
/// a ledger or output directory that refuses writes): say why and stop the
/// process, exit 1. Outputs are safe to stop at any moment (atomic files,
/// ledger transactions), and stopping, rather than letting a worker wind
/// down, keeps a dropped capability from ever finalizing what is not final.
fn fail(cause: String) -> ! {
    tracing::error!("{cause}");
    eprintln!("error: {cause}");
    std::process::exit(1);
}

fn spawn_progress(
    records: Arc<AtomicU64>,
    billing: Arc<BillingStats>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let started = Instant::now();
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(250));
            let read = records.load(Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            eprint!(
                "\r{read} records ({:.0}/s), {} billed, {} expired, {} files   ",
                read as f64 / secs,
                billing.billed.load(Ordering::Relaxed),
                billing.expired.load(Ordering::Relaxed),
                billing.files.load(Ordering::Relaxed),
            );
        }
        eprintln!();
    })
}
