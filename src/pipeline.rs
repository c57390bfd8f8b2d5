//! Wires sources -> dataflow -> sinks into one timely job.
//!
//! The two paths split right after ingest and share nothing else: the live
//! path's snapshots go to the [`LiveBoard`] on arrival, the billing path's
//! final outcomes go to the [`BillingSink`] on worker 0. A file run ends when
//! every file is read and every impression final; the last snapshots are
//! then written to `live.json`. A Kafka run goes on until it is stopped
//! (SIGINT/SIGTERM), and stopping finalizes nothing that is not final.

use anyhow::Context;
use livepipe_dataflow::billing::billing;
use livepipe_dataflow::config::PipelineConfig;
use livepipe_dataflow::event::RejectedRecord;
use livepipe_dataflow::event::{EventKind, Ingested};
use livepipe_dataflow::live::live;
use livepipe_dataflow::probe::Probes;
use livepipe_dataflow::resume::{Checkpoint, Checkpoints};
use livepipe_dataflow::time::Time;
use livepipe_sinks::billing::{BillingSink, BillingStats};
use livepipe_sinks::http::{self, HttpState};
use livepipe_sinks::live::LiveBoard;
use livepipe_sinks::metrics::{EventsIn, JobMetrics, PartitionRow, RejectedByReason};
use livepipe_sinks::side::SideOutputs;
use livepipe_sources::file::{check_inputs, file_source, FileSourceContext};
use livepipe_sources::kafka::{
    discover_partitions, kafka_source, KafkaSettings, KafkaSourceContext, KafkaStatus, SetupError,
};
use livepipe_sources::SourceContext;
use timely::dataflow::operators::vec::Partition;

use std::collections::BTreeMap;
use std::fs;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A mistake in how the job was started: exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Where the events come from.
#[derive(Clone, Debug)]
pub enum Input {
    /// Files read to the end; the job ends when everything is final.
    Files {
        paths: Vec<PathBuf>,
        /// Records per chunk dealt out for parsing; tests use tiny chunks
        /// so that reordering across workers is exercised.
        records_per_chunk: usize,
    },
    /// A Kafka topic, read until the job is stopped.
    Kafka(KafkaSettings),
}

/// One run of the pipeline.
#[derive(Clone, Debug)]
pub struct Job {
    pub input: Input,
    pub out: PathBuf,
    pub workers: usize,
    pub config: PipelineConfig,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// Log a line about the live board now and then (for unbounded runs).
    pub live_log: bool,
    /// Serve the dashboard, API and metrics here.
    pub http: Option<SocketAddr>,
    /// Set (by a signal handler) to stop: every worker stops stepping and
    /// drops the dataflow between two steps. What was final is committed
    /// already; nothing that is not final gets finalized.
    pub stop: Arc<AtomicBool>,
}

/// A run over files (the shape the tests use).
#[derive(Clone, Debug)]
pub struct FileRun {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub workers: usize,
    pub config: PipelineConfig,
    pub progress: bool,
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
    /// The job was stopped before its input ended.
    pub stopped: bool,
}

/// Runs the pipeline over `run.inputs` to the end.
pub fn run_files(run: FileRun) -> anyhow::Result<RunSummary> {
    run_job(Job {
        input: Input::Files {
            paths: run.inputs,
            records_per_chunk: run.records_per_chunk,
        },
        out: run.out,
        workers: run.workers,
        config: run.config,
        progress: run.progress,
        live_log: false,
        http: None,
        stop: Arc::new(AtomicBool::new(false)),
    })
}

/// How long to wait for the brokers' first answer at start.
const KAFKA_SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs the pipeline: a file input to its end, a Kafka input until `stop`.
pub fn run_job(job: Job) -> anyhow::Result<RunSummary> {
    job.config.validate().map_err(UsageError)?;
    // Check the input before touching --out: a typo must not leave files.
    let sources: Vec<Arc<str>> = match &job.input {
        Input::Files { paths, .. } => {
            if paths.is_empty() {
                return Err(UsageError("no --input files given".into()).into());
            }
            check_inputs(paths).map_err(UsageError)?;
            paths
                .iter()
                .map(|path| Arc::from(path.display().to_string()))
                .collect()
        }
        Input::Kafka(settings) => {
            let partitions = match discover_partitions(settings, KAFKA_SETUP_TIMEOUT) {
                Ok(partitions) => partitions,
                Err(SetupError::Usage(message)) => return Err(UsageError(message).into()),
                Err(SetupError::Unavailable(message)) => anyhow::bail!(message),
            };
            tracing::info!(
                topic = %settings.topic,
                brokers = %settings.brokers,
                partitions = partitions.len(),
                "reading Kafka"
            );
            let topic: Arc<str> = Arc::from(settings.topic.as_str());
            let count = partitions.iter().max().map_or(0, |p| *p as usize + 1);
            let names = vec![topic; count];
            return run_dataflow(job, names, partitions);
        }
    };
    run_dataflow(job, sources, Vec::new())
}

/// Builds and runs the dataflow. `sources` names each partition (for the
/// side outputs); `partitions` lists the Kafka partitions (empty for files).
fn run_dataflow(
    job: Job,
    sources: Vec<Arc<str>>,
    partitions: Vec<i32>,
) -> anyhow::Result<RunSummary> {
    let listener = match job.http {
        Some(addr) => Some(http::bind(addr).map_err(|err| {
            UsageError(format!(
                "--http {addr}: cannot listen: {err}; pick a free port (127.0.0.1:0 picks one)"
            ))
        })?),
        None => None,
    };
    fs::create_dir_all(&job.out)
        .map_err(|err| UsageError(format!("--out {}: cannot create: {err}", job.out.display())))?;

    let side = Arc::new(SideOutputs::open(&job.out).context("opening side outputs")?);
    let checkpoints = Arc::new(Checkpoints::default());
    let sink = BillingSink::open(
        &job.out,
        job.config.clone(),
        sources.clone(),
        side.clone(),
        checkpoints.clone(),
    )
    .with_context(|| format!("opening the billing output in {}", job.out.display()))?;
    let resume = resume_positions(&sink, &sources, &job.out)?;
    let billing_stats = sink.stats();
    let sink = Arc::new(Mutex::new(Some(sink)));
    let board = LiveBoard::default();

    let records_read = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let rejected_by_reason = RejectedByReason::default();
    let events_in = Arc::new(EventsIn::new(job.workers));
    let probes = Arc::new(Probes::default());
    let kafka_status = KafkaStatus::default();
    let metrics = JobMetrics {
        events_in: events_in.clone(),
        rejected: rejected_by_reason.clone(),
        billing: billing_stats.clone(),
        probes: probes.clone(),
        partitions: {
            let status = kafka_status.clone();
            Arc::new(move || {
                let status = status.lock().unwrap_or_else(|p| p.into_inner());
                status
                    .iter()
                    .map(|(partition, s)| PartitionRow {
                        partition: *partition,
                        offset: s.next_offset,
                        lag: s.lag,
                        idle: s.idle,
                    })
                    .collect()
            })
        },
        sse_clients: Arc::default(),
        live_streams: {
            let board = board.clone();
            Arc::new(move || board.latest().len())
        },
    };
    let _server = match listener {
        Some(listener) => {
            let server = http::serve(
                listener,
                HttpState {
                    board: board.clone(),
                    metrics,
                },
            )
            .context("starting the HTTP server")?;
            tracing::info!(addr = %server.addr(), "serving the dashboard at http://{}/", server.addr());
            Some(server)
        }
        None => None,
    };
    let context = SourceContext {
        allowed_lateness_ms: job.config.allowed_lateness_ms,
        time_granularity_ms: job.config.time_granularity_ms,
        max_event_ts: Arc::new(AtomicU64::new(0)),
        records_read: records_read.clone(),
        on_reject: {
            let side = side.clone();
            let rejected = rejected.clone();
            Arc::new(move |record: RejectedRecord| {
                rejected.fetch_add(1, Ordering::Relaxed);
                *rejected_by_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(record.reason.clone())
                    .or_default() += 1;
                if let Err(err) = side.rejected(&record) {
                    fail(format!("writing rejected.jsonl: {err}"));
                }
            })
        },
        on_fatal: Arc::new(|cause| fail(cause)),
        checkpoints,
        resume: Arc::new(resume),
    };

    let done = Arc::new(AtomicBool::new(false));
    let reporter = job
        .progress
        .then(|| spawn_progress(records_read.clone(), billing_stats.clone(), done.clone()));
    let live_logger = job
        .live_log
        .then(|| spawn_live_log(board.clone(), billing_stats.clone(), done.clone()));

    let started = Instant::now();
    let input = job.input.clone();
    let config = job.config.clone();
    let stop = job.stop.clone();
    let job_board = board.clone();
    let guards = timely::execute(timely::Config::process(job.workers), move |worker| {
        let index = worker.index();
        let context = context.clone();
        worker.dataflow::<Time, _, _>(|scope| {
            let ingested = match &input {
                Input::Files {
                    paths,
                    records_per_chunk,
                } => file_source(
                    scope,
                    paths,
                    FileSourceContext {
                        source: context.clone(),
                        records_per_chunk: *records_per_chunk,
                    },
                ),
                Input::Kafka(settings) => kafka_source(
                    scope,
                    KafkaSourceContext {
                        source: context.clone(),
                        settings: settings.clone(),
                        partitions: partitions.clone(),
                        idle_timeout_ms: config.idle_timeout_ms,
                        status: kafka_status.clone(),
                    },
                ),
            };
            let counts = events_in.clone();
            let mut paths = ingested.partition(2, move |record: Ingested| {
                counts.worker(index).count(&record.event.kind);
                let billing = matches!(
                    record.event.kind,
                    EventKind::Impression(_) | EventKind::AdProgress(_)
                );
                (billing as u64, record)
            });
            let billing_in = paths.pop().expect("two partitions");
            let live_in = paths.pop().expect("two partitions");

            let snapshots = live(
                live_in,
                &config,
                context.max_event_ts.clone(),
                probes.clone(),
            );
            livepipe_sinks::live::attach(snapshots, (index == 0).then(|| job_board.clone()));

            let outcomes = billing(billing_in, &config, probes.clone());
            let sink = if index == 0 {
                sink.lock().unwrap_or_else(|p| p.into_inner()).take()
            } else {
                None
            };
            livepipe_sinks::billing::attach(outcomes, sink, Arc::new(|cause| fail(cause)));
        });
        // Step until the input ends (files) or we are told to stop. The
        // timeout only bounds how late a stop is noticed.
        while worker.has_dataflows() {
            if stop.load(Ordering::Relaxed) {
                // Dropping the dataflow, unlike letting its sources end,
                // never empties a frontier: nothing pending is finalized.
                for dataflow in worker.installed_dataflows() {
                    worker.drop_dataflow(dataflow);
                }
                break;
            }
            worker.step_or_park(Some(STOP_CHECK));
        }
    })
    .map_err(|err| anyhow::anyhow!("starting timely workers: {err}"))?;
    let results = guards.join();
    done.store(true, Ordering::Relaxed);
    for thread in reporter.into_iter().chain(live_logger) {
        let _ = thread.join();
    }
    for result in results {
        result.map_err(|panic| anyhow::anyhow!("a worker failed: {panic}"))?;
    }

    side.flush().context("flushing side outputs")?;
    let stopped = job.stop.load(Ordering::Relaxed);
    // live.json is the final word of a finite input; a stopped or
    // unbounded run has no final word.
    if !stopped {
        board
            .write_json(&job.out.join("live.json"))
            .context("writing live.json")?;
    }

    let summary = RunSummary {
        records: records_read.load(Ordering::Relaxed),
        rejected: rejected.load(Ordering::Relaxed),
        billed: billing_stats.billed.load(Ordering::Relaxed),
        expired: billing_stats.expired.load(Ordering::Relaxed),
        late: billing_stats.late.load(Ordering::Relaxed),
        duplicates: billing_stats.duplicates.load(Ordering::Relaxed),
        files: billing_stats.files.load(Ordering::Relaxed),
        streams: board.latest().len() as u64,
        stopped,
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
        stopped,
        seconds = format!("{secs:.2}"),
        records_per_sec = format!("{:.0}", summary.records as f64 / secs.max(1e-9)),
        "run finished"
    );
    Ok(summary)
}

/// The positions an earlier run on this `--out` committed, checked to be of
/// the same inputs: resuming another job's ledger would skip or misjudge
/// records.
fn resume_positions(
    sink: &BillingSink,
    sources: &[Arc<str>],
    out: &std::path::Path,
) -> anyhow::Result<BTreeMap<u32, Checkpoint>> {
    let positions = sink
        .resume_positions()
        .context("reading resume positions from the ledger")?;
    let mut resume = BTreeMap::new();
    for (partition, position) in positions {
        let expected = sources.get(partition as usize).map(|s| &**s);
        if expected != Some(position.source.as_str()) {
            return Err(UsageError(format!(
                "--out {}: its ledger belongs to another input (partition {partition} was `{}`, \
                 now `{}`); resume with the same inputs, or use a fresh --out",
                out.display(),
                position.source,
                expected.unwrap_or("absent"),
            ))
            .into());
        }
        resume.insert(partition, position.checkpoint);
    }
    if !resume.is_empty() {
        tracing::info!(
            partitions = resume.len(),
            "resuming from the ledger's positions"
        );
    }
    Ok(resume)
}

/// How often a parked worker looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

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

/// How often an unbounded run logs the live board.
const LIVE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Logs the live board's totals and top streams every [`LIVE_LOG_EVERY`].
fn spawn_live_log(
    board: LiveBoard,
    billing: Arc<BillingStats>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut last = Instant::now();
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            if last.elapsed() < LIVE_LOG_EVERY {
                continue;
            }
            last = Instant::now();
            let latest = board.latest();
            let mut streams: Vec<_> = latest.values().collect();
            streams.sort_by(|a, b| {
                b.viewers
                    .cmp(&a.viewers)
                    .then(a.stream_id.cmp(&b.stream_id))
            });
            let top: Vec<String> = streams
                .iter()
                .take(3)
                .map(|s| {
                    format!(
                        "{} {} viewers {} chat/min",
                        s.stream_id, s.viewers, s.chat_per_min
                    )
                })
                .collect();
            tracing::info!(
                streams = streams.len(),
                viewers = streams.iter().map(|s| s.viewers).sum::<u64>(),
                billed = billing.billed.load(Ordering::Relaxed),
                expired = billing.expired.load(Ordering::Relaxed),
                files = billing.files.load(Ordering::Relaxed),
                "live: top {}",
                top.join("; ")
            );
        }
    })
}
