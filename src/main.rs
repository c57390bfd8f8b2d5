//! `livepipe`: parse the command line, run, map failures to exit codes
//! (0 done, 2 bad usage or config, 1 a fault it could not survive).

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use livepipe::cli::{
    kafka_properties, read_http_token, Command, GenArgs, RunArgs, RunPaths, Source, StartFrom,
    DEFAULT_TOPIC,
};
use livepipe::cluster::ClusterSpec;
use livepipe::logs;
use livepipe::pipeline::{run_job, Input, Job, UsageError};
use livepipe::settings::{self, ParseFailure, Parsed};
use livepipe_dataflow::config::PipelineConfig;
use livepipe_sinks::http::Token;
use livepipe_sources::file::RECORDS_PER_CHUNK;
use livepipe_sources::kafka::{group_id, KafkaSettings, SetupError, StartOffsets};
use livepipe_tools::demo::{Demo, DemoSettings};
use livepipe_tools::generator::spike::{Spike, Spiked};
use livepipe_tools::generator::{write_jsonl, GenConfig, Generator};
use livepipe_tools::publish::{ensure_topic, producer_config, publish, Pace, PublishStats};
use signal_hook::consts::{SIGINT, SIGTERM};

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

// The dataflow allocates and frees many small strings and batch vectors;
// glibc's allocator spent over a third of a profile consolidating them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Flags, then LIVEPIPE_* variables, then --config. clap exits 2 on a
    // usage error, 0 for --help / --version.
    let Parsed { cli, origins } = match settings::parse_with_origins(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(ParseFailure::Clap(err)) => err.exit(),
        Err(ParseFailure::Config(message)) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    logs::init(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Gen(args) => gen(args),
        // Its exit code is the reconciliation's verdict.
        Command::Report(args) => return livepipe::report::report(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<UsageError>() => {
            // The flag a message names may not be on the command line.
            let note = match origins.is_empty() {
                true => String::new(),
                false => format!(" (set outside the command line: {})", origins.join(", ")),
            };
            logs::exit_error(&format!("{err}{note}"));
            ExitCode::from(2)
        }
        Err(err) => {
            logs::exit_error(&format!("{err:#}"));
            ExitCode::from(1)
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // First: a stop that comes while the job is still starting (an
    // orchestrator stopping a cluster as it forms) is a clean stop, not a
    // death by the default handler.
    let stop = stop_on_signals()?;
    let config = args.rules.to_config().map_err(UsageError)?;
    let cluster = cluster_spec(&args)?;
    // After the cluster flags' own checks (a bad hostfile is named as
    // such), before anything touches --out.
    let source = args.source().map_err(UsageError)?;
    let http_token = args
        .http_token_file
        .as_deref()
        .map(read_http_token)
        .transpose()
        .map_err(UsageError)?
        .map(|token| Token::new(&token));
    let workers = args
        .workers
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let bounded = matches!(source, Source::Files(_));
    // A file run stopped before its end exits 1, a Kafka or demo run 0
    // (see the end of this function).
    exit_if_stop_hangs(stop.clone(), if bounded { 1 } else { 0 });

    if let Source::Files(paths) = &source {
        tracing::info!(inputs = paths.len(), workers, out = %args.out.display(), "reading files");
    }
    let (input, demo) = open_input(source, &args, &config)?;
    // A file replay ends on its own; it serves HTTP only when asked to.
    // Processes of a cluster on one machine must not fight over one port.
    let process = cluster.as_ref().map_or(0, |c| c.process);
    let http = if bounded {
        args.http
    } else {
        Some(args.http.unwrap_or_else(|| default_http(process)))
    };
    let summary = run_job(Job {
        input,
        out: args.out.clone(),
        workers,
        config,
        // Not between JSON lines.
        progress: bounded && std::io::stderr().is_terminal() && !logs::json(),
        live_log: !bounded,
        http,
        http_allowed_hosts: args.http_allowed_hosts.clone(),
        http_token,
        addr_file: args.addr_file.clone(),
        stop,
        cluster,
        paths: args.paths,
    });
    // The consumers are gone: the demo broker may go too.
    if let Some(demo) = demo {
        demo.stop();
    }
    let summary = summary?;
    if bounded && summary.stopped {
        anyhow::bail!(
            "stopped before the input was read to the end; {} holds what was final",
            args.out.display()
        );
    }
    if args.paths.billing() {
        tracing::info!(
            billing = %args.out.join("billing").display(),
            "outputs written"
        );
    }
    Ok(())
}

/// The cluster this process belongs to, if the cluster flags say so.
fn cluster_spec(args: &RunArgs) -> Result<Option<ClusterSpec>, UsageError> {
    match (args.processes, args.process, &args.hostfile) {
        (Some(processes), Some(process), Some(hostfile)) => ClusterSpec::load(
            processes,
            process,
            hostfile,
            Duration::from_secs(args.cluster_timeout),
            args.cluster_secret_file.as_deref(),
        )
        .map(Some)
        .map_err(UsageError),
        // clap requires all three together.
        _ => Ok(None),
    }
}

/// The job's input, and the demo's broker when the input is the demo.
fn open_input(
    source: Source,
    args: &RunArgs,
    config: &PipelineConfig,
) -> anyhow::Result<(Input, Option<Demo>)> {
    let input = match source {
        Source::Files(paths) => Input::Files {
            paths,
            records_per_chunk: RECORDS_PER_CHUNK,
        },
        Source::Kafka {
            brokers,
            topic,
            start,
        } => {
            let overrides = kafka_properties(args.kafka_config.as_deref(), &args.kafka_property)
                .map_err(UsageError)?;
            Input::Kafka(KafkaSettings {
                brokers,
                topic,
                start: start_offsets(start, args, config),
                overrides,
                accept_data_loss: args.accept_data_loss,
                group_id: group_id(args.paths.name()),
            })
        }
        Source::Demo => {
            let (started, settings) = start_demo(args, config)?;
            return Ok((Input::Demo(settings), Some(started)));
        }
    };
    Ok((input, None))
}

/// Starts the demo's in-process broker and producer, and says where to look.
fn start_demo(args: &RunArgs, config: &PipelineConfig) -> anyhow::Result<(Demo, KafkaSettings)> {
    let settings = DemoSettings {
        topic: DEFAULT_TOPIC.to_string(),
        allowed_lateness_ms: config.allowed_lateness_ms,
        ..DemoSettings::default()
    };
    let partitions = settings.partitions;
    let started = Demo::start(settings).map_err(anyhow::Error::msg)?;
    // A live-only demo writes nothing under --out: no paths to show.
    let outputs = match args.paths.billing() {
        true => format!(
            "\n  billing files: {}\n  ledger:        {}\n  side outputs:  {}/{{rejected,late,expired}}.jsonl",
            args.out.join("billing").display(),
            args.out.join("ledger.sqlite").display(),
            args.out.display(),
        ),
        false => String::new(),
    };
    logs::say(&format!(
        "livepipe demo: an in-process Kafka broker at {} with topic `{DEFAULT_TOPIC}` ({partitions} partitions), \
         fed with live traffic{outputs}\nCtrl-C stops.",
        started.brokers(),
    ));
    let settings = KafkaSettings {
        brokers: started.brokers().to_string(),
        topic: DEFAULT_TOPIC.to_string(),
        start: StartOffsets::Earliest,
        overrides: Vec::new(),
        accept_data_loss: false,
        group_id: group_id(args.paths.name()),
    };
    Ok((started, settings))
}

/// Where partitions without a ledger position start: as `--start-offsets`
/// says, or for a live-only job that was not told, at the records of the
/// last max(presence TTL, 60 s): enough history for every viewer still
/// present to be counted within a second of the start, and no more to
/// read (docs/contract.md, "One path per job").
fn start_offsets(start: StartFrom, args: &RunArgs, config: &PipelineConfig) -> StartOffsets {
    if args.paths == RunPaths::Live && args.start_offsets.is_none() {
        return StartOffsets::Since {
            back_ms: live_window_ms(config.presence_ttl_ms),
        };
    }
    match start {
        StartFrom::Earliest => StartOffsets::Earliest,
        StartFrom::Latest => StartOffsets::Latest,
    }
}

/// How far back a live-only job starts reading: max(presence TTL, 60 s).
fn live_window_ms(presence_ttl_ms: u64) -> u64 {
    presence_ttl_ms.max(60_000)
}

/// Where the dashboard is served by default: loopback only (docs/contract.md, Live path), port
/// 8080 (8080 + i for process i of a cluster).
fn default_http(process: usize) -> std::net::SocketAddr {
    let port = u16::try_from(8080 + process).unwrap_or(0);
    std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port))
}

/// The flag that SIGINT and SIGTERM set for a graceful stop; a second
/// signal ends the process at once (exit 1).
///
/// The job also sets the returned flag when a peer of its cluster
/// announces a stop, so a second signal is counted on a flag of its own:
/// an orchestrator that signals every process at once must not turn the
/// stop a process heard from its peer into a forced exit.
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let signalled = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Order matters: the conditional shutdown sees the flag set by an
        // earlier signal before this one sets it again.
        signal_hook::flag::register_conditional_shutdown(signal, 1, signalled.clone())
            .context("installing signal handlers")?;
        signal_hook::flag::register(signal, signalled.clone())
            .context("installing signal handlers")?;
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    Ok(stop)
}

/// How long a stopping run may take before `exit_if_stop_hangs` ends it.
const STOP_GRACE: Duration = Duration::from_millis(1500);

/// The backstop of a graceful stop: once `stop` is set (SIGINT/SIGTERM),
/// a process still alive `STOP_GRACE` later exits at once with `code`, the
/// code the graceful stop would have had. An operator (or an orchestrator
/// with its own kill timeout) must be able to count on a signal being
/// obeyed within 2 s, yet a stop can be slow for reasons outside the
/// workers' stop check: a sink thread working off a backlog of billing
/// files, a broker call that waits for its timeout, a demo broker shutting
/// down. Cutting that short is safe: every output is crash-safe (files are
/// renamed into place whole, the ledger commits in transactions; the job
/// survives kill -9 at any moment and the next run resumes exactly). The
/// exit is `_exit`, like the second signal's: atexit handlers of C
/// libraries must not run under threads that are still busy in them.
fn exit_if_stop_hangs(stop: Arc<AtomicBool>, code: i32) {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(STOP_GRACE);
        tracing::warn!(
            "did not stop within 1.5 s of the signal; exiting, the outputs are consistent \
             (the next run resumes)"
        );
        signal_hook::low_level::exit(code);
    });
}

fn gen(args: GenArgs) -> anyhow::Result<()> {
    let to_kafka = args.brokers.is_some();
    let events = match (args.events, args.duration) {
        (Some(events), _) => events,
        (None, Some(_)) => u64::MAX,
        (None, None) => 100_000,
    };
    let start_ts = args.start_ts.unwrap_or_else(|| {
        if to_kafka {
            livepipe_dataflow::time::wall_clock_ms()
        } else {
            DEFAULT_FILE_START_TS
        }
    });
    let config = GenConfig {
        seed: args.seed,
        events,
        start_ts,
        rate: args.rate,
        streams: args.streams,
        duplicate_rate: args.duplicate_rate,
        late_rate: args.late_rate,
        malformed_rate: args.malformed_rate,
        never_qualify_rate: args.never_qualify_rate,
        allowed_lateness_ms: args.allowed_lateness_ms,
    };
    let spikes = args.spikes(start_ts);
    match (&args.output, &args.brokers) {
        (Some(output), _) => gen_file(&config, output, spikes),
        (None, Some(brokers)) => gen_kafka(&config, brokers, &args, spikes),
        (None, None) => unreachable!("clap requires --output or --brokers"),
    }
}

/// Event time of a generated file's first record: fixed, so that a seed
/// names the same bytes on every machine and day.
const DEFAULT_FILE_START_TS: u64 = 1_700_000_000_000;

fn gen_file(
    config: &GenConfig,
    output: &std::path::Path,
    spikes: Vec<Spike>,
) -> anyhow::Result<()> {
    let file = File::create(output).map_err(|err| {
        UsageError(format!(
            "--output {}: cannot create: {err}",
            output.display()
        ))
    })?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let summary = if spikes.is_empty() {
        write_jsonl(config, &mut out)?
    } else {
        // The summary counts the traffic under the spike, not its copies.
        let mut records = Spiked::new(Generator::new(config), spikes);
        for record in records.by_ref() {
            out.write_all(&record)?;
            out.write_all(b"\n")?;
        }
        records.inner().summary()
    };
    out.flush()?;
    logs::say(&format!(
        "wrote {} records to {} ({} impressions, {} retries, {} late, {} malformed)",
        summary.records,
        output.display(),
        summary.impressions,
        summary.duplicates,
        summary.late,
        summary.malformed
    ));
    Ok(())
}

fn gen_kafka(
    config: &GenConfig,
    brokers: &str,
    args: &GenArgs,
    spikes: Vec<Spike>,
) -> anyhow::Result<()> {
    let properties =
        kafka_properties(args.kafka_config.as_deref(), &args.kafka_property).map_err(UsageError)?;
    let producer = producer_config(brokers, &properties);
    let partitions = match ensure_topic(
        &producer,
        &args.topic,
        args.partitions,
        Duration::from_secs(15),
    ) {
        Ok(partitions) => partitions,
        Err(SetupError::Usage(message)) => return Err(UsageError(message).into()),
        Err(SetupError::Unavailable(message)) => anyhow::bail!(message),
    };
    let stop = stop_on_signals()?;
    if let Some(seconds) = args.duration {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(seconds));
            stop.store(true, Ordering::Relaxed);
        });
    }
    let stats = Arc::new(PublishStats::default());
    // Not between JSON lines.
    let bar = (std::io::stderr().is_terminal() && !logs::json())
        .then(|| progress_bar(config.events, stats.clone()));
    // A spike adds records to the same event time: capping the send rate at
    // --rate would make it fall behind the clock.
    let default_send_rate = spikes.is_empty().then_some(args.rate);
    let generator = Spiked::new(Generator::new(config), spikes);
    let started = std::time::Instant::now();
    let result = publish(
        &producer,
        &args.topic,
        generator,
        Pace {
            max_rate: match args.send_rate {
                Some(0) => None,
                Some(rate) => Some(rate),
                None => default_send_rate,
            },
            follow_clock: true,
        },
        &stop,
        stats.clone(),
        Duration::from_secs(30),
    );
    if let Some((bar, done)) = bar {
        done.store(true, Ordering::Relaxed);
        let _ = bar.join();
    }
    let sent = stats.sent.load(Ordering::Relaxed);
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let failed = stats.failed.load(Ordering::Relaxed);
    // Neither acknowledged nor refused when the flush gave up.
    let unconfirmed = sent.saturating_sub(delivered + failed);
    logs::say(&format!(
        "sent {sent} records to topic `{}` ({partitions} partitions) in {:.1} s: \
         {delivered} delivered, {failed} failed, {unconfirmed} unconfirmed",
        args.topic,
        started.elapsed().as_secs_f64(),
    ));
    result.map_err(anyhow::Error::msg)?;
    if failed + unconfirmed > 0 {
        anyhow::bail!("{} records were not delivered", failed + unconfirmed);
    }
    Ok(())
}

/// Draws a progress bar from the publisher's counters until told to stop.
fn progress_bar(
    total: u64,
    stats: Arc<PublishStats>,
) -> (std::thread::JoinHandle<()>, Arc<AtomicBool>) {
    let done = Arc::new(AtomicBool::new(false));
    let handle = {
        let done = done.clone();
        std::thread::spawn(move || {
            let bar = if total == u64::MAX {
                ProgressBar::new_spinner()
            } else {
                ProgressBar::new(total)
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} sent ({per_sec}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            while !done.load(Ordering::Relaxed) {
                bar.set_position(stats.sent.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "{} delivered, {} failed",
                    stats.delivered.load(Ordering::Relaxed),
                    stats.failed.load(Ordering::Relaxed)
                ));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        })
    };
    (handle, done)
}
