//! Wires sources -> dataflow -> sinks into one timely job.
//!
//! The two paths split right after ingest and share nothing else: the live
//! path's snapshots go to the [`LiveBoard`] on arrival, the billing path's
//! final outcomes go to the [`BillingSink`] on worker 0. A file run ends when
//! every file is read and every impression final; the last snapshots are
//! then written to `live.json`. A Kafka run goes on until it is stopped
//! (SIGINT/SIGTERM), and stopping finalizes nothing that is not final. In a
//! cluster a signal to any process stops every process at the same point
//! ([`crate::stop`]).
//!
//! `--paths` ([`RunPaths`]) builds one of the two sub-graphs only, so that
//! each path can run as its own job on the same topic: a live-only job
//! opens nothing under `--out` (no lock, ledger, billing files or side
//! outputs; `live.json` alone at the end of a finite input), a
//! billing-only job serves no dashboard.
//!
//! In a cluster ([`crate::cluster`]) worker 0 lives in process 0, so that
//! process alone holds the billing output, the ledger, `live.json` and the
//! dashboard; what the others need from the ledger (where to resume) reaches
//! them through the dataflow before the job starts, and their sources'
//! checkpoints reach the sink the same way. Each process writes the records
//! its own workers reject: process 0 into `--out`, process `i` into
//! `--out/process-i/`.

use crate::cli::RunPaths;
use crate::cluster::{self, ClusterSpec, JobShape};
use crate::stop::{step_until_done, OutputsDone, StopAgreement, STOP_CHECK};
use anyhow::Context;
use livepipe_dataflow::billing::billing;
use livepipe_dataflow::config::PipelineConfig;
use livepipe_dataflow::event::{Ingested, RejectedRecord};
use livepipe_dataflow::live::live;
use livepipe_dataflow::probe::Probes;
use livepipe_dataflow::resume::{ship_checkpoints, Checkpoint, CheckpointOutbox, Checkpoints};
use livepipe_dataflow::route::{split_paths, RouteKey};
use livepipe_dataflow::time::Time;
use livepipe_sinks::billing::{BillingSink, BillingStats, SinkInput, SinkThread};
use livepipe_sinks::binding::{self, BindError, Binding, BoundInput};
use livepipe_sinks::fsutil::refuse_link;
use livepipe_sinks::gaps::{self, Gap};
use livepipe_sinks::http::{self, HttpState};
use livepipe_sinks::ledger::ResumePosition;
use livepipe_sinks::live::LiveBoard;
use livepipe_sinks::metrics::{EventsIn, JobMetrics, PartitionRow, RejectedByReason};
use livepipe_sinks::out_lock::{LockError, OutDirLock, LOCK_FILE};
use livepipe_sinks::process::ProcessStats;
use livepipe_sinks::side::SideOutputs;
use livepipe_sources::file::{check_inputs, file_source, FileSourceContext};
use livepipe_sources::kafka::{
    check_resume_offsets, discover_partitions, kafka_source, partition_bounds,
    spawn_high_watermarks, BrokerHealth, KafkaSettings, KafkaSourceContext, KafkaStatus,
    SetupError,
};
use livepipe_sources::prefix::{prefix_digest, prefix_sha256};
use livepipe_sources::SourceContext;
use timely::communication::AllocatorBuilder;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::vec::Input as _;
use timely::dataflow::operators::Inspect;
use timely::dataflow::operators::Probe;
use timely::dataflow::{Scope, StreamVec};
use timely::worker::Worker;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
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
    /// The embedded demo's topic: read like Kafka, but its broker starts
    /// empty on every run, so its output cannot be resumed; an earlier
    /// demo's output in `--out` is replaced (never another job's).
    Demo(KafkaSettings),
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
    /// `--http-allowed-hosts`: the only names HTTP requests may give as
    /// `Host` (empty: any).
    pub http_allowed_hosts: Vec<String>,
    /// `--http-token-file`'s token: when set, every HTTP route but
    /// `/healthz` wants it. Never logged.
    pub http_token: Option<http::Token>,
    /// `--addr-file`: where to write the HTTP server's address once it
    /// listens.
    pub addr_file: Option<PathBuf>,
    /// Set (by a signal handler) to stop: every worker stops stepping and
    /// drops the dataflow between two steps. What was final is committed
    /// already; nothing that is not final gets finalized.
    pub stop: Arc<AtomicBool>,
    /// This process's place in a multi-process cluster (`None`: alone).
    pub cluster: Option<ClusterSpec>,
    /// `--paths`: which paths run. A live-only job never touches the
    /// ledger, the billing files or the side outputs.
    pub paths: RunPaths,
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
        Input::Kafka(settings) | Input::Demo(settings) => {
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
///
/// The order is the contract: nothing is written before the outputs are
/// open and checked, and nothing starts before the cluster has formed, so
/// a refused job leaves as little behind as it can.
fn run_dataflow(
    job: Job,
    sources: Vec<Arc<str>>,
    partitions: Vec<i32>,
) -> anyhow::Result<RunSummary> {
    // Process 0 (or a process alone) holds the billing output and the board.
    let process = job.cluster.as_ref().map_or(0, |c| c.process);
    let first = process == 0;
    let listener = bind_http(&job)?;
    // Its lock is held until the run ends, with `outputs`.
    let outputs = match job.paths.billing() {
        true => open_outputs(&job, process, &sources, &partitions)?,
        false => Outputs::live_only(),
    };
    let (side, billing_stats) = (outputs.side, outputs.billing_stats);
    let (sink_input, sink_thread, outputs_done) = spawn_sink(outputs.sink, &job.stop);
    let board = LiveBoard::default();
    let gauges = Gauges::new(job.workers);
    let metrics = job_metrics(&job, &gauges, &board, &billing_stats, outputs.lost_records);
    let _server = start_http(listener, &job, first, &board, metrics)?;
    if !job.paths.billing() {
        tracing::info!("live path only (--paths live): no ledger, no billing files");
    }
    let context = source_context(&job, &gauges, &side, outputs.ledger_positions);
    let comm = connect(&job)?;
    let wiring = Wiring {
        context,
        resume: Arc::new(outputs.resume),
        input: job.input.clone(),
        config: job.config.clone(),
        partitions,
        gauges: gauges.clone(),
        workers: job.workers,
        route: RouteKey::new(comm.routing.words()),
        board: board.clone(),
        sink_input: Arc::new(Mutex::new(sink_input)),
        stop: job.stop.clone(),
        paths: job.paths,
        cluster: job.cluster.clone().map(Arc::new),
    };
    let done = Arc::new(AtomicBool::new(false));
    let reporters = spawn_reporters(&job, first, &wiring, &billing_stats, comm.health, &done);

    let started = Instant::now();
    let guards = timely::execute::execute_from(
        comm.builders,
        comm.network,
        timely::WorkerConfig::default(),
        move |worker| {
            let index = worker.index();
            let resume = share_resume(worker, &wiring.resume);
            let mut agreement = StopAgreement::install(worker);
            let main = worker.next_dataflow_index();
            worker.dataflow::<Time, _, _>(|scope| build_dataflow(scope, index, resume, &wiring));
            step_until_done(
                worker,
                main,
                &mut agreement,
                &wiring.stop,
                &outputs_done,
                |announcer| wiring.heard_stop(announcer),
                || wiring.finished_part(index),
            );
        },
    )
    .map_err(|err| anyhow::anyhow!("starting timely workers: {err}"))?;
    wind_down(guards, sink_thread, &done, reporters)?;
    let side = side.as_deref();
    finish(&job, first, side, &board, &gauges, &billing_stats, started)
}

/// What every worker closure needs, in one handle: timely hands the same
/// closure to every worker thread, so it must own (and share) all of it.
#[derive(Clone)]
struct Wiring {
    /// The sources' context; each worker fills in its outbox and resume.
    context: SourceContext,
    /// Process 0's ledger, for [`share_resume`].
    resume: Arc<BTreeMap<u32, Checkpoint>>,
    input: Input,
    config: PipelineConfig,
    partitions: Vec<i32>,
    gauges: Gauges,
    /// Workers per process.
    workers: usize,
    route: RouteKey,
    board: LiveBoard,
    /// Taken by worker 0; the sink thread ends once it is dropped.
    sink_input: Arc<Mutex<Option<SinkInput>>>,
    stop: Arc<AtomicBool>,
    /// Which sub-graphs [`build_dataflow`] builds.
    paths: RunPaths,
    /// Who the peers are, to name the one that announced a stop.
    cluster: Option<Arc<ClusterSpec>>,
}

impl Wiring {
    /// This process learnt from worker `announcer` that the job is
    /// stopping: said once, so that an operator reading this process's log
    /// knows why it stopped although nobody signalled it.
    fn heard_stop(&self, announcer: usize) {
        let process = announcer / self.workers.max(1);
        let who = self
            .cluster
            .as_ref()
            .map_or_else(|| format!("process {process}"), |c| c.describe(process));
        tracing::info!(
            "{who} was told to stop (SIGINT/SIGTERM): the whole cluster stops with it; \
             nothing pending is finalized, and a restart of every process resumes"
        );
    }

    /// Worker `index` has read its part of the input and (in process 0)
    /// committed the billing output. Said once per process in a cluster, so
    /// that an operator knows why a process that read its part keeps
    /// running: it waits for the others, and a stop still stops them all.
    fn finished_part(&self, index: usize) {
        if self.cluster.is_some() && index.is_multiple_of(self.workers.max(1)) {
            tracing::info!(
                "this process's part of the job is done; waiting for every process of the \
                 cluster to finish its part (SIGTERM to any process still stops them all)"
            );
        }
    }
}

/// The counters and status cells shared by sources, workers, reporters and
/// the HTTP server: each is written in one place and read in the others.
#[derive(Clone)]
struct Gauges {
    records_read: Arc<AtomicU64>,
    rejected: Arc<AtomicU64>,
    rejected_by_reason: RejectedByReason,
    events_in: Arc<EventsIn>,
    probes: Arc<Probes>,
    kafka_status: KafkaStatus,
    brokers: BrokerHealth,
}

impl Gauges {
    fn new(workers: usize) -> Self {
        Gauges {
            records_read: Arc::new(AtomicU64::new(0)),
            rejected: Arc::new(AtomicU64::new(0)),
            rejected_by_reason: RejectedByReason::default(),
            events_in: Arc::new(EventsIn::new(workers)),
            probes: Arc::new(Probes::default()),
            kafka_status: KafkaStatus::default(),
            brokers: BrokerHealth::default(),
        }
    }
}

/// The sink commits on a thread of its own: worker 0 never waits on the
/// disk, and a billing output that refuses writes stalls billing only.
/// The workers wait for it only once their dataflow has ended (see
/// [`OutputsDone`]).
fn spawn_sink(
    sink: Option<BillingSink>,
    stop: &Arc<AtomicBool>,
) -> (Option<SinkInput>, Option<SinkThread>, OutputsDone) {
    match sink {
        Some(sink) => {
            let done = OutputsDone::default();
            let on_end = done.clone();
            let (input, thread) = SinkThread::spawn(sink, stop.clone(), move || on_end.set());
            (Some(input), Some(thread), done)
        }
        None => (None, None, OutputsDone::already()),
    }
}

/// Binds `--http` before `--out` is touched: a taken port is a usage
/// mistake, and it must not leave files behind.
fn bind_http(job: &Job) -> anyhow::Result<Option<std::net::TcpListener>> {
    Ok(match job.http {
        Some(addr) => Some(http::bind(addr).map_err(|err| {
            UsageError(format!(
                "--http {addr}: cannot listen: {err}; pick a free port (127.0.0.1:0 picks one)"
            ))
        })?),
        None => None,
    })
}

/// The metrics read through views of the shared cells, so that serving
/// them never waits on a worker.
fn job_metrics(
    job: &Job,
    gauges: &Gauges,
    board: &LiveBoard,
    billing_stats: &Arc<BillingStats>,
    lost_records: u64,
) -> JobMetrics {
    JobMetrics {
        events_in: gauges.events_in.clone(),
        rejected: gauges.rejected_by_reason.clone(),
        billing: billing_stats.clone(),
        probes: gauges.probes.clone(),
        partitions: {
            let status = gauges.kafka_status.clone();
            let topic: Arc<str> = match &job.input {
                Input::Kafka(settings) | Input::Demo(settings) => settings.topic.as_str().into(),
                Input::Files { .. } => "".into(),
            };
            Arc::new(move || {
                let status = status.lock().unwrap_or_else(|p| p.into_inner());
                status
                    .iter()
                    .map(|(partition, s)| PartitionRow {
                        topic: topic.clone(),
                        partition: *partition,
                        offset: (s.next_offset >= 0).then_some(s.next_offset),
                        high_watermark: (s.high_watermark >= 0).then_some(s.high_watermark),
                        idle: s.idle,
                    })
                    .collect()
            })
        },
        sse_clients: Arc::default(),
        live_streams: {
            let board = board.clone();
            Arc::new(move || board.len())
        },
        live_streams_dropped: board.streams_dropped_counter(),
        input_problem: {
            let brokers = gauges.brokers.clone();
            Arc::new(move || brokers.lock().unwrap_or_else(|p| p.into_inner()).clone())
        },
        lost_records,
        process: Arc::new(ProcessStats::current),
    }
}

/// Serves on the bound listener; only process 0 has a dashboard to serve,
/// the others answer health checks and metrics.
fn start_http(
    listener: Option<std::net::TcpListener>,
    job: &Job,
    first: bool,
    board: &LiveBoard,
    metrics: JobMetrics,
) -> anyhow::Result<Option<http::HttpServer>> {
    let Some(listener) = listener else {
        return Ok(None);
    };
    let server = http::serve(
        listener,
        HttpState {
            board: board.clone(),
            metrics,
            dashboard: first && job.paths.live(),
            live_path: job.paths.live(),
            billing_path: job.paths.billing(),
            allowed_hosts: job.http_allowed_hosts.clone(),
            token: job.http_token.clone(),
        },
    )
    .context("starting the HTTP server")?;
    if first && job.paths.live() {
        tracing::info!(addr = %server.addr(), "serving the dashboard at http://{}/", server.addr());
    } else if !job.paths.live() {
        tracing::info!(addr = %server.addr(), "serving /healthz and /metrics (--paths billing: no dashboard)");
    } else {
        tracing::info!(addr = %server.addr(), "serving /healthz and /metrics (the dashboard is process 0's)");
    }
    if let Some(path) = &job.addr_file {
        write_addr_file(path, server.addr())
            .with_context(|| format!("writing the HTTP address to {}", path.display()))?;
    }
    Ok(Some(server))
}

/// Writes `addr` and a newline to `path` atomically: a reader sees no file
/// or the whole line, never a part of it.
fn write_addr_file(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.tmp", std::process::id()));
    let temp = path.with_file_name(temp_name);
    std::fs::write(&temp, format!("{addr}\n"))?;
    std::fs::rename(&temp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })
}

/// A rejected record is counted and written here, in the process whose
/// worker rejected it; a record that cannot be written stops the job.
fn source_context(
    job: &Job,
    gauges: &Gauges,
    side: &Option<Arc<SideOutputs>>,
    ledger_positions: Arc<Checkpoints>,
) -> SourceContext {
    SourceContext {
        probes: gauges.probes.clone(),
        allowed_lateness_ms: job.config.allowed_lateness_ms,
        time_granularity_ms: job.config.time_granularity_ms(),
        records_read: gauges.records_read.clone(),
        on_reject: {
            let side = side.clone();
            let rejected = gauges.rejected.clone();
            let rejected_by_reason = gauges.rejected_by_reason.clone();
            Arc::new(move |record: RejectedRecord| {
                rejected.fetch_add(1, Ordering::Relaxed);
                *rejected_by_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(record.reason.clone())
                    .or_default() += 1;
                // A live-only job writes no side outputs: counted only.
                if let Some(Err(err)) = side.as_ref().map(|side| side.rejected(&record)) {
                    fail(format!("writing rejected.jsonl: {err}"));
                }
            })
        },
        on_fatal: Arc::new(|cause| fail(cause)),
        // Each worker gets its own outbox in `build_dataflow`.
        checkpoints: Arc::default(),
        committed: ledger_positions,
        // Each worker gets what process 0 read from its ledger there too.
        resume: Arc::default(),
    }
}

/// timely's communication, alone or across the cluster.
struct Communication {
    builders: Vec<AllocatorBuilder>,
    network: Box<dyn std::any::Any + Send>,
    /// The peers' health, watched while the job runs (cluster only).
    health: Option<Arc<cluster::PeerHealth>>,
    routing: cluster::RoutingKey,
}

/// Connects before anything starts: a cluster that cannot form leaves
/// nothing behind but the side outputs' empty files.
fn connect(job: &Job) -> anyhow::Result<Communication> {
    Ok(match &job.cluster {
        None => {
            let (builders, network) = timely::CommunicationConfig::Process(job.workers)
                .try_build()
                .map_err(|err| anyhow::anyhow!("starting timely workers: {err}"))?;
            Communication {
                builders,
                network,
                health: None,
                routing: cluster::RoutingKey::random(),
            }
        }
        Some(spec) => {
            let formed = cluster::form(spec, job.workers, &job_shape(job), job.stop.clone())
                .map_err(|err| match err {
                    cluster::ClusterError::Usage(message) => UsageError(message).into(),
                    cluster::ClusterError::Unreachable(message) => anyhow::anyhow!(message),
                })?;
            Communication {
                builders: formed.builders,
                network: formed.guard,
                health: Some(formed.health),
                routing: formed.routing_key,
            }
        }
    })
}

/// The threads that watch the run from outside (progress, live log, peer
/// watch); each ends once `done` is set.
fn spawn_reporters(
    job: &Job,
    first: bool,
    wiring: &Wiring,
    billing_stats: &Arc<BillingStats>,
    health: Option<Arc<cluster::PeerHealth>>,
    done: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let reporter = job.progress.then(|| {
        spawn_progress(
            wiring.gauges.records_read.clone(),
            billing_stats.clone(),
            done.clone(),
        )
    });
    let live_logger = (job.live_log && first && job.paths.live())
        .then(|| spawn_live_log(wiring.board.clone(), billing_stats.clone(), done.clone()));
    // Not joined: its thread ends on its own once `done` is set, and a
    // stop must not wait on a broker's answer.
    if let Input::Kafka(settings) | Input::Demo(settings) = &job.input {
        if let Err(err) =
            spawn_high_watermarks(settings, wiring.gauges.kafka_status.clone(), done.clone())
        {
            tracing::warn!("partition lag will not be reported: {err}");
        }
    }
    let peer_watch = health.map(|health| {
        let probes = wiring.gauges.probes.clone();
        let stop = job.stop.clone();
        cluster::watch_peers(
            health,
            move || stop.load(Ordering::Relaxed) || probes.inputs_ended.load(Ordering::Relaxed),
            done.clone(),
            |message| fail(message),
        )
    });
    reporter
        .into_iter()
        .chain(live_logger)
        .chain(peer_watch)
        .collect()
}

/// One worker's dataflow: the source, split at once into the live path
/// (to the board, on worker 0) and the billing path (to the sink, on
/// worker 0, along with the sources' checkpoints).
fn build_dataflow(
    scope: Scope<'_, Time>,
    index: usize,
    resume: BTreeMap<u32, Checkpoint>,
    wiring: &Wiring,
) {
    let outbox = Arc::new(CheckpointOutbox::default());
    let mut context = wiring.context.clone();
    context.resume = Arc::new(resume);
    context.checkpoints = outbox.clone();
    let ingested = read_input(scope, context, wiring);
    // Counters are per process, one slot per local worker.
    let counts = wiring.gauges.events_in.clone();
    let local = index % wiring.workers;
    let probes = &wiring.gauges.probes;
    let paths = split_paths(ingested, probes.clone(), move |kind| {
        counts.worker(local).count(kind)
    });

    // The path not run gets nothing: its stream ends here, unread.
    if wiring.paths.live() {
        let snapshots = live(
            paths.live,
            paths.clock,
            &wiring.config,
            wiring.route,
            probes.clone(),
        );
        livepipe_sinks::live::attach(snapshots, (index == 0).then(|| wiring.board.clone()));
    }
    // Shipped either way: it drains the sources' outbox, which would grow
    // without end in a live-only job.
    let checkpoints = ship_checkpoints(scope, outbox);
    if !wiring.paths.billing() {
        return;
    }
    let outcomes = billing(paths.billing, &wiring.config, wiring.route, probes.clone());
    let sink = if index == 0 {
        wiring
            .sink_input
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    } else {
        None
    };
    livepipe_sinks::billing::attach(outcomes, checkpoints, sink);
}

/// The job's source, files or Kafka, as one stream of ingested records.
fn read_input<'s>(
    scope: Scope<'s, Time>,
    context: SourceContext,
    wiring: &Wiring,
) -> StreamVec<'s, Time, Ingested> {
    match &wiring.input {
        Input::Files {
            paths,
            records_per_chunk,
        } => file_source(
            scope,
            paths,
            FileSourceContext {
                source: context,
                records_per_chunk: *records_per_chunk,
                workers_per_process: wiring.workers,
            },
        ),
        Input::Kafka(settings) | Input::Demo(settings) => kafka_source(
            scope,
            KafkaSourceContext {
                source: context,
                settings: settings.clone(),
                partitions: wiring.partitions.clone(),
                idle_timeout_ms: wiring.config.idle_timeout_ms,
                status: wiring.gauges.kafka_status.clone(),
                brokers: wiring.gauges.brokers.clone(),
            },
        ),
    }
}

/// Waits for the workers, then the sink, then the reporters; a worker's
/// failure is reported only once everything else has ended.
fn wind_down(
    guards: timely::communication::WorkerGuards<()>,
    sink_thread: Option<SinkThread>,
    done: &AtomicBool,
    reporters: Vec<std::thread::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let results = guards.join();
    // What the workers handed the sink is committed before the run counts
    // as finished (or abandoned on a stop while billing is stalled).
    if let Some(thread) = sink_thread {
        thread.join();
    }
    done.store(true, Ordering::Relaxed);
    for thread in reporters {
        let _ = thread.join();
    }
    for result in results {
        result.map_err(|panic| anyhow::anyhow!("a worker failed: {panic}"))?;
    }
    Ok(())
}

/// Flushes what is left, writes the final `live.json` when there is a
/// final word, and logs the run's totals.
fn finish(
    job: &Job,
    first: bool,
    side: Option<&SideOutputs>,
    board: &LiveBoard,
    gauges: &Gauges,
    billing_stats: &BillingStats,
    started: Instant,
) -> anyhow::Result<RunSummary> {
    if let Some(side) = side {
        side.flush().context("flushing side outputs")?;
    }
    let stopped = job.stop.load(Ordering::Relaxed);
    // live.json is the final word of a finite input; a stopped or
    // unbounded run has no final word. A run that read nothing (a finished
    // job run again) has no new word: the last one stands.
    let read_nothing = gauges.records_read.load(Ordering::Relaxed) == 0;
    let live_json = job.out.join("live.json");
    if !stopped && first && job.paths.live() && !(read_nothing && live_json.exists()) {
        // A live-only job has taken nothing else under --out.
        std::fs::create_dir_all(&job.out)
            .with_context(|| format!("creating {}", job.out.display()))?;
        board.write_json(&live_json).context("writing live.json")?;
    }

    let summary = RunSummary {
        records: gauges.records_read.load(Ordering::Relaxed),
        rejected: gauges.rejected.load(Ordering::Relaxed),
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

/// Hands the resume positions process 0 read from its ledger to every
/// worker of every process, through a small dataflow of its own that runs
/// to completion before the job's starts.
fn share_resume(
    worker: &mut Worker,
    ledger: &BTreeMap<u32, Checkpoint>,
) -> BTreeMap<u32, Checkpoint> {
    let received = Rc::new(RefCell::new(BTreeMap::new()));
    let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
        let (input, positions) = scope.new_input::<(u32, Checkpoint)>();
        let into = received.clone();
        let (probe, _) = positions
            .broadcast()
            .inspect(move |(partition, checkpoint)| {
                into.borrow_mut().insert(*partition, *checkpoint);
            })
            .probe();
        (input, probe)
    });
    // Worker 0 is in process 0, the only one that read a ledger.
    if worker.index() == 0 {
        for (&partition, &checkpoint) in ledger {
            input.send((partition, checkpoint));
        }
    }
    input.close();
    while !probe.done() {
        worker.step_or_park(Some(STOP_CHECK));
    }
    received.take()
}

/// What every process of a cluster must agree on: a process with other
/// workers, another input or other rules would route, judge or bill
/// differently. Broker lists may differ (each machine may know its own).
fn job_shape(job: &Job) -> JobShape {
    let mut shape = JobShape::new();
    let mut set = |flag: &str, value: String| {
        shape.insert(flag.to_string(), value);
    };
    set("--workers", job.workers.to_string());
    // A cluster runs one mode: a process without the billing path would
    // drop the impressions routed to its workers.
    set("--paths", job.paths.name().to_string());
    match &job.input {
        Input::Files { paths, .. } => {
            let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            set("--input", paths.join(" "));
        }
        Input::Kafka(settings) | Input::Demo(settings) => {
            set("--topic", settings.topic.clone());
            set(
                "--start-offsets",
                format!("{:?}", settings.start).to_lowercase(),
            );
        }
    }
    // Every rule, from the config itself: a rule added later cannot be
    // left out. Named as their flags (granularity and tick are not flags
    // today; only another build could differ in them).
    let rules = serde_json::to_value(&job.config).expect("the config serializes");
    for (field, value) in rules.as_object().into_iter().flatten() {
        set(&format!("--{}", field.replace('_', "-")), value.to_string());
    }
    shape
}

/// This process's outputs, open: `--out` locked for the run, the ledger
/// checked against this job (process 0), the side outputs and the billing
/// sink.
struct Outputs {
    /// Held until the run ends (dropped with the rest of `Outputs`);
    /// none for a live-only job, which takes nothing under `--out`.
    _lock: Option<OutDirLock>,
    side: Option<Arc<SideOutputs>>,
    sink: Option<BillingSink>,
    billing_stats: Arc<BillingStats>,
    /// Where each partition resumes: process 0's ledger (empty elsewhere).
    resume: BTreeMap<u32, Checkpoint>,
    /// Input records lost over the ledger's life (`gaps`).
    lost_records: u64,
    /// The positions the sink commits, for sources that report them.
    ledger_positions: Arc<Checkpoints>,
}

impl Outputs {
    /// A live-only job's: nothing opened, locked or created under `--out`
    /// (two live-only jobs, or a live-only and a billing job, may share
    /// it); rejected records are only counted.
    fn live_only() -> Outputs {
        Outputs {
            _lock: None,
            side: None,
            sink: None,
            billing_stats: Arc::new(BillingStats::default()),
            resume: BTreeMap::new(),
            lost_records: 0,
            ledger_positions: Arc::new(Checkpoints::default()),
        }
    }
}

/// Opens this process's outputs in the order that keeps a refused job
/// from changing anything: links refused, `--out` locked, the ledger
/// checked against the job, and only then anything written.
fn open_outputs(
    job: &Job,
    process: usize,
    sources: &[Arc<str>],
    partitions: &[i32],
) -> anyhow::Result<Outputs> {
    let first = process == 0;
    let side_dir = if first {
        job.out.clone()
    } else {
        job.out.join(format!("process-{process}"))
    };
    // Outputs go only into real directories: through a planted link they
    // would land, and temp files be cleaned up, somewhere else.
    let own_dir = if first {
        job.out.join("billing")
    } else {
        side_dir.clone()
    };
    refuse_link(&own_dir)
        .map_err(|err| UsageError(format!("--out {}: {err}", job.out.display())))?;
    // One job per --out, locked before anything there changes; held for
    // the whole run (see `Outputs`).
    let mut lock = OutDirLock::acquire(&side_dir).map_err(|err| match err {
        LockError::Held(message) => anyhow::Error::from(UsageError(message)),
        LockError::Io(err) => UsageError(format!(
            "--out {}: cannot create or lock: {err}",
            side_dir.display()
        ))
        .into(),
    })?;
    // Process 0 holds the ledger: it must belong to this job and its input.
    let (resume, lost_records) = if first {
        prepare_ledger(job, sources, partitions)?
    } else {
        (BTreeMap::new(), 0)
    };
    lock.announce(livepipe_dataflow::time::wall_clock_ms())
        .with_context(|| format!("writing {}", side_dir.join(LOCK_FILE).display()))?;

    let side = Arc::new(SideOutputs::open(&side_dir).context("opening side outputs")?);
    let ledger_positions = Arc::new(Checkpoints::default());
    let (sink, billing_stats) = if first {
        let sink = BillingSink::open(
            &job.out,
            job.config.clone(),
            sources.to_vec(),
            side.clone(),
            ledger_positions.clone(),
        )
        .with_context(|| format!("opening the billing output in {}", job.out.display()))?;
        let stats = sink.stats();
        (Some(sink), stats)
    } else {
        (None, Arc::new(BillingStats::default()))
    };
    Ok(Outputs {
        _lock: Some(lock),
        side: Some(side),
        sink,
        billing_stats,
        resume,
        lost_records,
        ledger_positions,
    })
}

/// Binds `--out`'s ledger to this job's rules and input (see
/// `livepipe_sinks::binding`) and checks the input against the ledger's
/// resume positions: each file must still hold the bytes before its
/// position, each Kafka partition the offset. Returns where each partition
/// resumes and the input records lost over the ledger's life. A refusal
/// (exit 2) changes nothing under `--out`.
fn prepare_ledger(
    job: &Job,
    sources: &[Arc<str>],
    partitions: &[i32],
) -> anyhow::Result<(BTreeMap<u32, Checkpoint>, u64)> {
    let input = match &job.input {
        Input::Files { .. } => BoundInput::Files {
            paths: sources.iter().map(|s| s.to_string()).collect(),
        },
        Input::Kafka(settings) => BoundInput::Kafka {
            topic: settings.topic.clone(),
        },
        Input::Demo(_) => {
            replace_earlier_demo(&job.out)?;
            BoundInput::Demo
        }
    };
    let positions =
        binding::bind(&job.out, &Binding::new(&job.config, input)).map_err(|err| match err {
            BindError::Mismatch(message) => anyhow::Error::from(UsageError(message)),
            BindError::Ledger(err) => {
                anyhow::anyhow!("reading the ledger in {}: {err}", job.out.display())
            }
        })?;
    let mut resume: BTreeMap<u32, Checkpoint> = positions
        .iter()
        .map(|(&partition, position)| (partition, position.checkpoint))
        .collect();
    let gaps = match &job.input {
        Input::Files { paths, .. } => {
            check_file_prefixes(&job.out, paths, &positions, &mut resume)?;
            Vec::new()
        }
        Input::Kafka(settings) => resume_kafka(settings, partitions, &mut resume)?,
        Input::Demo(_) => Vec::new(),
    };
    let lost = gaps::record(&job.out, &gaps)?;
    if !resume.is_empty() {
        tracing::info!(
            partitions = resume.len(),
            "resuming from the ledger's positions"
        );
    }
    Ok((resume, lost))
}

/// Removes an earlier demo's output from `out`, so that the demo can run
/// again on the same `--out`: its broker starts empty on every run, so
/// nothing of the earlier run could be resumed. Only a ledger bound to the
/// demo qualifies; anything else is left for `binding::bind` to refuse.
fn replace_earlier_demo(out: &std::path::Path) -> anyhow::Result<()> {
    let bound = binding::bound_input(out)
        .with_context(|| format!("reading the ledger in {}", out.display()))?;
    if bound != Some(BoundInput::Demo) {
        return Ok(());
    }
    tracing::info!(
        out = %out.display(),
        "replacing the earlier demo's output (the embedded broker starts empty on every run)"
    );
    let billing = out.join("billing");
    if billing.exists() {
        std::fs::remove_dir_all(&billing)
            .with_context(|| format!("removing {}", billing.display()))?;
    }
    for name in [
        "ledger.sqlite",
        "ledger.sqlite-wal",
        "ledger.sqlite-shm",
        "rejected.jsonl",
        "late.jsonl",
        "expired.jsonl",
        "gaps.jsonl",
        "live.json",
    ] {
        match std::fs::remove_file(out.join(name)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(err).with_context(|| format!("removing {}", out.join(name).display()))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every file must still start with the bytes the ledger's position was
/// taken on (its digest is in the position): a file that grew resumes,
/// another file under the same name is another input. A position digested
/// with SHA-256 (an older ledger) is checked with it, and its checkpoint in
/// `resume` is given the BLAKE3 digest of the same bytes, the one the file
/// source compares and records from then on.
fn check_file_prefixes(
    out: &std::path::Path,
    paths: &[PathBuf],
    positions: &BTreeMap<u32, ResumePosition>,
    resume: &mut BTreeMap<u32, Checkpoint>,
) -> anyhow::Result<()> {
    let mut differ = Vec::new();
    for (&partition, position) in positions {
        let (Some(path), checkpoint) = (paths.get(partition as usize), &position.checkpoint) else {
            continue; // the number of files is bound: checked before
        };
        if checkpoint.byte == 0 {
            continue;
        }
        let cannot_read = |err: std::io::Error| {
            UsageError(format!("--input {}: cannot read: {err}", path.display()))
        };
        let digest = prefix_digest(path, checkpoint.byte).map_err(cannot_read)?;
        let same = match position.prefix_sha256 {
            Some(sha256) => {
                let same =
                    prefix_sha256(path, checkpoint.byte).map_err(cannot_read)? == Some(sha256);
                if let Some(resumed) = resume.get_mut(&partition).filter(|_| same) {
                    resumed.prefix_blake3 = digest;
                }
                same
            }
            None => digest.is_some() && digest == checkpoint.prefix_blake3,
        };
        if !same {
            differ.push(format!(
                "{}: its first {} bytes ({} lines) are not the ones the ledger read from `{}`{}",
                path.display(),
                checkpoint.byte,
                checkpoint.offset - 1,
                position.source,
                if digest.is_none() {
                    " (it is shorter)"
                } else {
                    ""
                },
            ));
        }
    }
    if differ.is_empty() {
        return Ok(());
    }
    Err(UsageError(format!(
        "--out {} belongs to another input:\n  {}\nA file that only grew (lines appended) \
         resumes; another file is another input: use a fresh --out for it (docs/operations.md: \
         \"Changing rules, inputs and topics safely\")",
        out.display(),
        differ.join("\n  ")
    ))
    .into())
}

/// Checks the ledger's resume offsets against what the topic holds now;
/// with `--accept-data-loss`, partitions whose records were deleted unread
/// resume from their log start, and the lost ranges are returned.
fn resume_kafka(
    settings: &KafkaSettings,
    partitions: &[i32],
    resume: &mut BTreeMap<u32, Checkpoint>,
) -> anyhow::Result<Vec<Gap>> {
    if resume.is_empty() {
        return Ok(Vec::new());
    }
    let in_topic = resume
        .iter()
        .map(|(&p, c)| (p as i32, c.offset))
        .filter(|(p, _)| partitions.contains(p))
        .collect();
    let bounds =
        partition_bounds(settings, &in_topic, KAFKA_SETUP_TIMEOUT).map_err(|err| match err {
            SetupError::Usage(message) => anyhow::Error::from(UsageError(message)),
            SetupError::Unavailable(message) => anyhow::anyhow!(message),
        })?;
    let offsets = resume.iter().map(|(&p, c)| (p, c.offset)).collect();
    let lost = check_resume_offsets(
        &settings.topic,
        &offsets,
        &bounds,
        settings.accept_data_loss,
    )
    .map_err(UsageError)?;
    let now = livepipe_dataflow::time::wall_clock_ms();
    let mut gaps = Vec::new();
    for range in lost {
        tracing::warn!(
            topic = %settings.topic,
            partition = range.partition,
            first = range.first,
            end = range.end,
            "records deleted before they were read: going on from the log start \
             (--accept-data-loss); the range is recorded in gaps.jsonl and the ledger"
        );
        if let Some(checkpoint) = resume.get_mut(&range.partition) {
            checkpoint.offset = range.end;
        }
        gaps.push(Gap {
            source: settings.topic.clone(),
            partition: range.partition,
            first_offset: range.first,
            end_offset: range.end,
            records: range.end - range.first,
            detected_at_ms: now,
        });
    }
    Ok(gaps)
}

/// A fault the job cannot survive (an input that cannot be read any more,
/// a dead-letter file that refuses writes, a lost cluster peer): say why
/// and stop the process, exit 1. (A billing output that refuses writes is
/// not one: the sink thread retries, see `SinkThread`.) Outputs are safe to stop at any moment (atomic files,
/// ledger transactions), and stopping, rather than letting a worker wind
/// down, keeps a dropped capability from ever finalizing what is not final.
fn fail(cause: String) -> ! {
    tracing::error!("{cause}");
    // Logged already when every line is JSON; otherwise also said plainly.
    if !crate::logs::json() {
        eprintln!("error: {cause}");
    }
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

#[cfg(test)]
mod tests {
    use super::{job_shape, Input, Job, RunPaths};
    use livepipe_dataflow::config::PipelineConfig;

    fn job(paths: RunPaths) -> Job {
        Job {
            input: Input::Files {
                paths: vec!["a.jsonl".into()],
                records_per_chunk: 1,
            },
            out: "out".into(),
            workers: 2,
            config: PipelineConfig::default(),
            progress: false,
            live_log: false,
            http: None,
            http_allowed_hosts: Vec::new(),
            http_token: None,
            addr_file: None,
            stop: Default::default(),
            cluster: None,
            paths,
        }
    }

    /// Processes of one cluster compare shapes: a mode mixed in is named.
    #[test]
    fn the_paths_are_part_of_the_cluster_shape() {
        let all = job_shape(&job(RunPaths::All));
        assert_eq!(all["--paths"], "all");
        for other in [RunPaths::Live, RunPaths::Billing] {
            let shape = job_shape(&job(other));
            assert_ne!(shape, all);
            assert_eq!(shape["--paths"], other.name());
            let mut same = shape.clone();
            same.remove("--paths");
            let mut all_but = all.clone();
            all_but.remove("--paths");
            assert_eq!(same, all_but, "nothing else differs");
        }
    }
}
