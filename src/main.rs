//! `livepipe`: parse the command line, run, map failures to exit codes
//! (0 done, 2 bad usage or config, 1 a fault it could not survive).

use clap::Parser;
use livepipe::cli::{Cli, Command, GenArgs, RunArgs};
use livepipe::pipeline::{run_files, FileRun, UsageError};
use livepipe_sources::file::RECORDS_PER_CHUNK;
use livepipe_sources::generator::{write_jsonl, GenConfig};

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::process::ExitCode;

// The dataflow allocates and frees many small strings and batch vectors;
// glibc's allocator spent over a third of a profile consolidating them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // clap exits 2 on a usage error, 0 for --help / --version.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Gen(args) => gen(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<UsageError>() => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = args.rules.to_config().map_err(UsageError)?;
    if args.processes.is_some_and(|n| n > 1) {
        return Err(UsageError(
            "multi-process clusters (--processes > 1) are not supported by this build yet; \
             run one process with --workers N"
                .into(),
        )
        .into());
    }
    if args.brokers.is_some() {
        return Err(UsageError(
            "the Kafka source is not in this build yet; read files with --input FILE.jsonl".into(),
        )
        .into());
    }
    if args.input.is_empty() {
        return Err(UsageError(
            "the embedded Kafka demo is not in this build yet; make a file with \
             `livepipe gen --output events.jsonl` and run `livepipe run --input events.jsonl`"
                .into(),
        )
        .into());
    }
    let workers = args
        .workers
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    tracing::info!(
        inputs = args.input.len(),
        workers,
        out = %args.out.display(),
        "reading files"
    );
    run_files(FileRun {
        inputs: args.input,
        out: args.out.clone(),
        workers,
        config,
        progress: std::io::stderr().is_terminal(),
        records_per_chunk: RECORDS_PER_CHUNK,
    })?;
    tracing::info!(
        billing = %args.out.join("billing").display(),
        live = %args.out.join("live.json").display(),
        "outputs written"
    );
    Ok(())
}

fn gen(args: GenArgs) -> anyhow::Result<()> {
    let config = GenConfig {
        seed: args.seed,
        events: args.events,
        start_ts: args.start_ts,
        rate: args.rate,
        streams: args.streams,
        duplicate_rate: args.duplicate_rate,
        late_rate: args.late_rate,
        malformed_rate: args.malformed_rate,
        never_qualify_rate: args.never_qualify_rate,
        allowed_lateness_ms: args.allowed_lateness_ms,
    };
    let file = File::create(&args.output).map_err(|err| {
        UsageError(format!(
            "--output {}: cannot create: {err}",
            args.output.display()
        ))
    })?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let summary = write_jsonl(&config, &mut out)?;
    out.flush()?;
    eprintln!(
        "wrote {} records to {} ({} impressions, {} retries, {} late, {} malformed)",
        summary.records,
        args.output.display(),
        summary.impressions,
        summary.duplicates,
        summary.late,
        summary.malformed
    );
    Ok(())
}
