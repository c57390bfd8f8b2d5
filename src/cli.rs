//! The command line (SPEC §4). Flags are checked here so that a mistake is a
//! usage error (exit 2) with a message naming the flag, before anything runs.

use clap::{Args, Parser, Subcommand};
use livepipe_dataflow::config::PipelineConfig;

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "livepipe",
    version,
    about = "Live creator metrics and exactly-once ad billing from one livestream event stream",
    long_about = "Reads livestream events (JSON) and serves two consumers: creators get viewers and \
                  chat rate per stream every second, ads billing gets every impression billed \
                  exactly once, in finalized period files and a SQLite ledger."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the pipeline: on files (--input), on Kafka (--brokers), or the embedded demo.
    Run(RunArgs),
    /// Write synthetic livestream traffic (JSON lines) with planted faults.
    Gen(GenArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Read these JSON-lines files to the end, finalize everything, write all outputs and exit.
    /// Each file is one partition with its own watermark, read in file order.
    #[arg(long, num_args = 1.., value_name = "FILE", conflicts_with = "brokers")]
    pub input: Vec<PathBuf>,

    /// Kafka bootstrap servers to read from instead of files.
    #[arg(long, value_name = "HOST:PORT[,...]")]
    pub brokers: Option<String>,

    /// Kafka topic to read (the demo's topic when --brokers is not given).
    #[arg(long, default_value = "livestream-events", value_name = "TOPIC")]
    pub topic: String,

    /// Where to start reading Kafka partitions.
    #[arg(long, value_enum, default_value_t = StartFrom::Earliest, value_name = "WHERE")]
    pub start_offsets: StartFrom,

    /// A librdkafka property for the consumer, like kcat's -X (repeatable):
    /// -X security.protocol=SASL_SSL -X sasl.mechanism=PLAIN ...
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_property)]
    pub kafka_property: Vec<(String, String)>,

    /// A file of librdkafka properties, KEY=VALUE per line (like kcat's -F): keeps
    /// secrets off the command line. -X properties apply after it.
    #[arg(long, value_name = "FILE")]
    pub kafka_config: Option<PathBuf>,

    /// Kafka: when retention deleted records before they were read (a resume offset
    /// below a partition's log start), go on from the log start and record every lost
    /// range in OUT/gaps.jsonl and the ledger, instead of refusing to start.
    #[arg(long)]
    pub accept_data_loss: bool,

    /// Output directory: billing/ files, ledger.sqlite, live.json and the side outputs.
    #[arg(long, default_value = "./out", value_name = "DIR")]
    pub out: PathBuf,

    /// Timely worker threads in this process [default: the number of cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    /// Address of the HTTP server (dashboard, API, metrics); 127.0.0.1:0 picks a free port
    /// [default: 127.0.0.1:8080 for Kafka and the demo; a file run serves only when given].
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,

    #[command(flatten)]
    pub rules: RuleArgs,

    /// Number of processes of a multi-process timely cluster.
    #[arg(long, value_name = "N", requires_all = ["process", "hostfile"])]
    pub processes: Option<usize>,

    /// Index of this process in the cluster (0-based).
    #[arg(long, value_name = "I", requires = "processes")]
    pub process: Option<usize>,

    /// File with one host:port per line, one line per process (process 0 first);
    /// each process listens on its own line's port.
    #[arg(long, value_name = "FILE", requires = "processes")]
    pub hostfile: Option<PathBuf>,

    /// How long a cluster process keeps trying to reach the others at start.
    #[arg(
        long,
        default_value_t = 120,
        value_name = "SECS",
        requires = "processes"
    )]
    pub cluster_timeout: u64,
}

/// The business rules; defaults are SPEC's.
#[derive(Debug, Args)]
pub struct RuleArgs {
    /// An ad_progress qualifies with watched_ms at least this.
    #[arg(long, default_value_t = 2_000, value_name = "MS")]
    pub qualify_ms: u64,

    /// A qualifying ad_progress has ts within [impression ts, impression ts + this].
    #[arg(long, default_value_t = 300_000, value_name = "MS")]
    pub qualify_window_ms: u64,

    /// Per-partition watermark = highest ts seen minus this.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    pub allowed_lateness_ms: u64,

    /// Length of a billing period (one file each), aligned to the epoch.
    #[arg(long, default_value_t = 60_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub billing_period_ms: u64,

    /// A viewer counts while its latest join/heartbeat/chat is newer than now minus this.
    #[arg(long, default_value_t = 30_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub presence_ttl_ms: u64,

    /// A caught-up Kafka partition with nothing new for this long stops holding the watermark back.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub idle_timeout_ms: u64,

    /// How long billing keeps an impression's records after it is final, to tell late
    /// duplicates and progress apart in the dataflow (the ledger guards beyond that).
    #[arg(long, default_value_t = 600_000, value_name = "MS")]
    pub state_retention_ms: u64,
}

impl RuleArgs {
    pub fn to_config(&self) -> Result<PipelineConfig, String> {
        let config = PipelineConfig {
            qualify_ms: self.qualify_ms,
            qualify_window_ms: self.qualify_window_ms,
            allowed_lateness_ms: self.allowed_lateness_ms,
            billing_period_ms: self.billing_period_ms,
            presence_ttl_ms: self.presence_ttl_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            state_retention_ms: self.state_retention_ms,
            ..PipelineConfig::default()
        };
        config.validate()?;
        Ok(config)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StartFrom {
    /// The oldest records the brokers hold.
    Earliest,
    /// Only records produced after the start.
    Latest,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["output", "brokers"])))]
pub struct GenArgs {
    /// Write JSON lines to this file.
    #[arg(long, value_name = "FILE.jsonl")]
    pub output: Option<PathBuf>,

    /// Send to Kafka instead: bootstrap servers.
    #[arg(long, value_name = "HOST:PORT[,...]", conflicts_with = "output")]
    pub brokers: Option<String>,

    /// Kafka topic to send to (created if missing).
    #[arg(
        long,
        default_value = "livestream-events",
        value_name = "TOPIC",
        requires = "brokers"
    )]
    pub topic: String,

    /// Partitions of the topic, if it has to be created.
    #[arg(long, default_value_t = 4, value_name = "N", requires = "brokers",
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: i32,

    /// A librdkafka property for the producer, like kcat's -X (repeatable).
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = parse_property, requires = "brokers")]
    pub kafka_property: Vec<(String, String)>,

    /// A file of librdkafka properties, KEY=VALUE per line; -X applies after it.
    #[arg(long, value_name = "FILE", requires = "brokers")]
    pub kafka_config: Option<PathBuf>,

    /// Number of records to write [default: 100000 to a file; unlimited to Kafka
    /// with --duration].
    #[arg(long, value_name = "N")]
    pub events: Option<u64>,

    /// Kafka: stop after this many seconds of sending.
    #[arg(long, value_name = "SECONDS", requires = "brokers")]
    pub duration: Option<u64>,

    /// Seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Records per second of event time; to Kafka, also the send rate.
    #[arg(long, default_value_t = 2_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: u64,

    /// Kafka: records per second to send [default: --rate]; 0 sends as fast as the
    /// brokers take them (records are still never sent before their ts).
    #[arg(long, value_name = "N", requires = "brokers")]
    pub send_rate: Option<u64>,

    /// Event time of the first record (ms since the epoch) [default: 1700000000000 to a
    /// file, now to Kafka].
    #[arg(long, value_name = "MS")]
    pub start_ts: Option<u64>,

    /// Number of live streams.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub streams: u32,

    /// Fraction of records re-sent as producer retries.
    #[arg(long, default_value_t = 0.01, value_name = "RATE", value_parser = parse_rate)]
    pub duplicate_rate: f64,

    /// Fraction of records sent hours late.
    #[arg(long, default_value_t = 0.001, value_name = "RATE", value_parser = parse_rate)]
    pub late_rate: f64,

    /// Fraction of malformed lines.
    #[arg(long, default_value_t = 0.001, value_name = "RATE", value_parser = parse_rate)]
    pub malformed_rate: f64,

    /// Fraction of impressions whose watch never qualifies.
    #[arg(long, default_value_t = 0.3, value_name = "RATE", value_parser = parse_rate)]
    pub never_qualify_rate: f64,

    /// Arrival order is shuffled within this bound (planted late records aside).
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    pub allowed_lateness_ms: u64,
}

/// `KEY=VALUE` of a `-X` librdkafka property.
fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!(
            "`{text}` is not KEY=VALUE; give a librdkafka property like -X security.protocol=SSL"
        )),
    }
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number; give a fraction between 0 and 1"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!(
            "{rate} is out of range; give a fraction between 0 and 1"
        ))
    }
}

/// The librdkafka properties of `--kafka-config FILE` (if given) followed
/// by the `-X` ones, which win. The file holds `KEY=VALUE` lines; blank
/// lines and `#` comments are skipped. Errors name the file and line, never
/// a value (values are often secrets).
pub fn kafka_properties(
    file: Option<&std::path::Path>,
    flags: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
    let mut properties = Vec::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("--kafka-config {}: cannot read: {err}", path.display()))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => {
                    properties.push((key.trim().to_string(), value.trim().to_string()))
                }
                _ => {
                    return Err(format!(
                        "--kafka-config {}: line {} is not KEY=VALUE",
                        path.display(),
                        number + 1
                    ))
                }
            }
        }
    }
    properties.extend_from_slice(flags);
    Ok(properties)
}
