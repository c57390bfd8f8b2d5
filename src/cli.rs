//! The command line (docs/contract.md, Command line). Flags are checked
//! here so that a mistake is a usage error (exit 2) with a message naming
//! the flag, before anything runs.

use clap::{Args, Parser, Subcommand};
use livepipe_dataflow::config::PipelineConfig;
use livepipe_tools::generator::spike::{Spike, SpikeKind};

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

    /// How log lines on stderr look: `text` for people, `json` (one object per line) for
    /// log collectors. Which lines: RUST_LOG [default: info]; colour only on a terminal and
    /// never with NO_COLOR set.
    #[arg(long, global = true, env = "LIVEPIPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,

    /// Read flag values from this TOML file, keys named as the long flags (`workers = 2`,
    /// `out = "/data/out"`). A flag on the command line wins over its LIVEPIPE_* environment
    /// variable, which wins over the file.
    #[arg(long, global = true, env = "LIVEPIPE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line: timestamp, level, message, fields, target.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the pipeline: on files (--input), on Kafka (--brokers), or the embedded demo.
    Run(RunArgs),
    /// Write synthetic livestream traffic (JSON lines) with planted faults.
    Gen(GenArgs),
    /// Reconcile an output directory from its ledger: billed, expired, late and duplicates per
    /// period and campaign (or advertiser, stream), checked against the billing files' markers.
    Report(crate::report::ReportArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Read these JSON-lines files to the end, finalize everything, write all outputs and exit.
    /// Each file is one partition with its own watermark, read in file order.
    #[arg(long, env = "LIVEPIPE_INPUT", num_args = 1.., value_name = "FILE", conflicts_with = "brokers")]
    pub input: Vec<PathBuf>,

    /// Kafka bootstrap servers to read from instead of files.
    #[arg(long, env = "LIVEPIPE_BROKERS", value_name = "HOST:PORT[,...]")]
    pub brokers: Option<String>,

    /// Kafka only: the topic to read [default: livestream-events].
    // Options without clap defaults, here and for every Kafka-only flag, so
    // that `source` sees whether they were given (see `Source`).
    #[arg(long, env = "LIVEPIPE_TOPIC", value_name = "TOPIC")]
    pub topic: Option<String>,

    /// Kafka only: where to start reading partitions [default: earliest].
    #[arg(long, env = "LIVEPIPE_START_OFFSETS", value_enum, value_name = "WHERE")]
    pub start_offsets: Option<StartFrom>,

    /// Kafka only: a librdkafka property for the consumer, like kcat's -X (repeatable):
    /// -X security.protocol=SASL_SSL -X sasl.mechanism=PLAIN ...
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = PropertyParser)]
    pub kafka_property: Vec<(String, String)>,

    /// Kafka only: a file of librdkafka properties, KEY=VALUE per line (like kcat's -F):
    /// keeps secrets off the command line. -X properties apply after it.
    #[arg(long, env = "LIVEPIPE_KAFKA_CONFIG", value_name = "FILE")]
    pub kafka_config: Option<PathBuf>,

    /// Kafka only: when retention deleted records before they were read (a resume offset
    /// below a partition's log start), go on from the log start and record every lost
    /// range in OUT/gaps.jsonl and the ledger, instead of refusing to start.
    #[arg(long, env = "LIVEPIPE_ACCEPT_DATA_LOSS")]
    pub accept_data_loss: bool,

    /// Output directory: billing/ files, ledger.sqlite, live.json and the side outputs.
    #[arg(
        long,
        env = "LIVEPIPE_OUT",
        default_value = "./out",
        value_name = "DIR"
    )]
    pub out: PathBuf,

    /// Timely worker threads in this process [default: the number of cores].
    #[arg(long, env = "LIVEPIPE_WORKERS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    /// Address of the HTTP server (dashboard, API, metrics); 127.0.0.1:0 picks a free port
    /// [default: 127.0.0.1:8080 for Kafka and the demo; a file run serves only when given].
    #[arg(long, env = "LIVEPIPE_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,

    /// Serve HTTP only to requests whose Host is one of these names (port stripped), against
    /// DNS rebinding; others get 421. An IP address as Host, and /healthz, are always served.
    #[arg(long, env = "LIVEPIPE_HTTP_ALLOWED_HOSTS", value_name = "HOST[,HOST...]", value_delimiter = ',', value_parser = allowed_host)]
    pub http_allowed_hosts: Vec<String>,

    /// Once the HTTP server listens, write its address (HOST:PORT and a newline) to FILE,
    /// atomically (a temporary file in the same directory, renamed): how scripts and tests
    /// learn the port `--http 127.0.0.1:0` picked without reading the log.
    #[arg(long, env = "LIVEPIPE_ADDR_FILE", value_name = "FILE")]
    pub addr_file: Option<PathBuf>,

    /// Require `Authorization: Bearer TOKEN` on every HTTP route but /healthz, TOKEN being
    /// this file's contents (trailing whitespace ignored); browsers and EventSource may pass
    /// `?access_token=TOKEN` instead. Others get 401.
    #[arg(long, env = "LIVEPIPE_HTTP_TOKEN_FILE", value_name = "FILE")]
    pub http_token_file: Option<PathBuf>,

    /// Which paths this job runs: `all` (live and billing), `live` (viewer and chat counts and
    /// the dashboard only: no ledger, no billing files; on Kafka it starts at the records of
    /// the last max(presence TTL, 60 s)) or `billing` (billing files and ledger only; serves
    /// /metrics and /healthz). Two jobs, one per path, can share a topic; each single-path mode
    /// has its own consumer group.
    #[arg(long, env = "LIVEPIPE_PATHS", value_enum, default_value_t = RunPaths::All, value_name = "PATHS")]
    pub paths: RunPaths,

    #[command(flatten)]
    pub rules: RuleArgs,

    /// Number of processes of a multi-process timely cluster.
    #[arg(long, env = "LIVEPIPE_PROCESSES", value_name = "N", requires_all = ["process", "hostfile"])]
    pub processes: Option<usize>,

    /// Index of this process in the cluster (0-based).
    #[arg(
        long,
        env = "LIVEPIPE_PROCESS",
        value_name = "I",
        requires = "processes"
    )]
    pub process: Option<usize>,

    /// File with one host:port per line, one line per process (process 0 first);
    /// each process listens on its own line's port.
    #[arg(
        long,
        env = "LIVEPIPE_HOSTFILE",
        value_name = "FILE",
        requires = "processes"
    )]
    pub hostfile: Option<PathBuf>,

    /// How long a cluster process keeps trying to reach the others at start.
    #[arg(
        long,
        env = "LIVEPIPE_CLUSTER_TIMEOUT",
        default_value_t = 120,
        value_name = "SECS",
        requires = "processes"
    )]
    pub cluster_timeout: u64,

    /// File holding the secret every process of the cluster shares (at least 16 bytes,
    /// surrounding whitespace ignored): a process must prove it holds it to join. Required
    /// for a cluster; make one with `head -c 32 /dev/urandom | base64 > FILE`.
    #[arg(
        long,
        env = "LIVEPIPE_CLUSTER_SECRET_FILE",
        value_name = "FILE",
        requires = "processes"
    )]
    pub cluster_secret_file: Option<PathBuf>,
}

/// The topic Kafka runs read unless `--topic` says otherwise, and always
/// the embedded demo's.
pub const DEFAULT_TOPIC: &str = "livestream-events";

/// What `livepipe run` reads, decided by [`RunArgs::source`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--input`: these files, to their end.
    Files(Vec<PathBuf>),
    /// `--brokers`: a Kafka topic, until stopped; defaults applied.
    Kafka {
        brokers: String,
        topic: String,
        start: StartFrom,
    },
    /// No source flag and no Kafka-only flag: the embedded demo, on
    /// [`DEFAULT_TOPIC`] from the earliest offsets.
    Demo,
}

impl RunArgs {
    /// The Kafka-only flags that were given, as they are spelled on the
    /// command line. `--accept-data-loss` is a switch and `-X` a list: both
    /// are given exactly when set or non-empty; the others are `Option`s
    /// with no clap default for this reason.
    pub fn kafka_only_flags(&self) -> Vec<&'static str> {
        let given = [
            ("-X", !self.kafka_property.is_empty()),
            ("--kafka-config", self.kafka_config.is_some()),
            ("--start-offsets", self.start_offsets.is_some()),
            ("--idle-timeout-ms", self.rules.idle_timeout_ms.is_some()),
            ("--topic", self.topic.is_some()),
            ("--accept-data-loss", self.accept_data_loss),
        ];
        given
            .into_iter()
            .filter_map(|(flag, given)| given.then_some(flag))
            .collect()
    }

    /// Decides what this run reads, or why these flags make no sense
    /// together (a usage error: exit 2, before anything runs or touches
    /// `--out`). Pure: reads no file.
    ///
    /// * `--input` reads files; Kafka-only flags are refused (not ignored).
    /// * `--brokers` reads Kafka, with the Kafka-only flags' defaults applied.
    /// * Neither: the embedded demo, but only when no Kafka-only flag is
    ///   given either (`-X ... --start-offsets latest` alone is a mistake,
    ///   not a request for the demo), and no cluster flag (the demo runs as
    ///   one process).
    ///
    /// (`--input` with `--brokers` is refused by clap already.)
    pub fn source(&self) -> Result<Source, String> {
        if let Some(brokers) = &self.brokers {
            return Ok(Source::Kafka {
                brokers: brokers.clone(),
                topic: self.topic.as_deref().unwrap_or(DEFAULT_TOPIC).to_string(),
                start: self.start_offsets.unwrap_or(StartFrom::Earliest),
            });
        }
        let kafka_only = self.kafka_only_flags();
        if !kafka_only.is_empty() {
            let flags = kafka_only
                .iter()
                .map(|flag| format!("`{flag}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let (applies, them) = match kafka_only.len() {
                1 => ("applies", "it"),
                _ => ("apply", "them"),
            };
            return Err(if self.input.is_empty() {
                format!(
                    "{flags} {applies} to Kafka only (--brokers); remove {them} to run the \
                     embedded demo, or read Kafka with --brokers"
                )
            } else {
                format!(
                    "{flags} {applies} to Kafka only (--brokers), not to --input files; \
                     remove {them}, or read Kafka with --brokers instead of --input"
                )
            });
        }
        if !self.input.is_empty() {
            return Ok(Source::Files(self.input.clone()));
        }
        if self.processes.is_some() {
            return Err("the embedded demo runs as one process: the cluster flags \
                        (`--processes`, `--process`, `--hostfile`, `--cluster-timeout`, \
                        `--cluster-secret-file`) do not apply to it; give the cluster --brokers \
                        and --topic, or --input files"
                .into());
        }
        Ok(Source::Demo)
    }
}

/// The business rules, with the contract's defaults.
#[derive(Debug, Args)]
pub struct RuleArgs {
    /// An ad_progress qualifies with watched_ms at least this.
    #[arg(
        long,
        env = "LIVEPIPE_QUALIFY_MS",
        default_value_t = 2_000,
        value_name = "MS"
    )]
    pub qualify_ms: u64,

    /// A qualifying ad_progress has ts within [impression ts, impression ts + this].
    #[arg(
        long,
        env = "LIVEPIPE_QUALIFY_WINDOW_MS",
        default_value_t = 300_000,
        value_name = "MS"
    )]
    pub qualify_window_ms: u64,

    /// Per-partition watermark = highest ts seen minus this.
    #[arg(
        long,
        env = "LIVEPIPE_ALLOWED_LATENESS_MS",
        default_value_t = 5_000,
        value_name = "MS"
    )]
    pub allowed_lateness_ms: u64,

    /// Length of a billing period (one file each), aligned to the epoch.
    #[arg(long, env = "LIVEPIPE_BILLING_PERIOD_MS", default_value_t = 60_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub billing_period_ms: u64,

    /// A viewer counts while its latest join/heartbeat/chat is newer than now minus this.
    #[arg(long, env = "LIVEPIPE_PRESENCE_TTL_MS", default_value_t = 30_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub presence_ttl_ms: u64,

    /// Kafka only: a caught-up partition with nothing new for this long stops holding the
    /// watermark back [default: 10000].
    #[arg(long, env = "LIVEPIPE_IDLE_TIMEOUT_MS", value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,

    /// How long billing keeps an impression's records after it is final, to tell late
    /// duplicates and progress apart in the dataflow (the ledger guards beyond that).
    #[arg(
        long,
        env = "LIVEPIPE_STATE_RETENTION_MS",
        default_value_t = 600_000,
        value_name = "MS"
    )]
    pub state_retention_ms: u64,
}

impl RuleArgs {
    pub fn to_config(&self) -> Result<PipelineConfig, String> {
        let defaults = PipelineConfig::default();
        let config = PipelineConfig {
            qualify_ms: self.qualify_ms,
            qualify_window_ms: self.qualify_window_ms,
            allowed_lateness_ms: self.allowed_lateness_ms,
            billing_period_ms: self.billing_period_ms,
            presence_ttl_ms: self.presence_ttl_ms,
            idle_timeout_ms: self.idle_timeout_ms.unwrap_or(defaults.idle_timeout_ms),
            state_retention_ms: self.state_retention_ms,
            ..defaults
        };
        config.validate()?;
        Ok(config)
    }
}

/// `--paths`: which of the two paths a job runs (docs/contract.md, "One
/// path per job"). They share only ingest, so either can run alone, as its
/// own job on the same topic, when one path's load must never slow the
/// other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RunPaths {
    /// Only the live path: counts, dashboard, live API.
    Live,
    /// Only the billing path: billing files and ledger.
    Billing,
    /// Both paths in one job.
    #[default]
    All,
}

impl RunPaths {
    /// Whether the live path runs.
    pub fn live(self) -> bool {
        self != RunPaths::Billing
    }

    /// Whether the billing path (and so the ledger and `--out`'s billing
    /// files) runs.
    pub fn billing(self) -> bool {
        self != RunPaths::Live
    }

    /// As the flag spells it.
    pub fn name(self) -> &'static str {
        match self {
            RunPaths::Live => "live",
            RunPaths::Billing => "billing",
            RunPaths::All => "all",
        }
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
    #[arg(long, env = "LIVEPIPE_OUTPUT", value_name = "FILE.jsonl")]
    pub output: Option<PathBuf>,

    /// Send to Kafka instead: bootstrap servers.
    #[arg(
        long,
        env = "LIVEPIPE_BROKERS",
        value_name = "HOST:PORT[,...]",
        conflicts_with = "output"
    )]
    pub brokers: Option<String>,

    /// Kafka topic to send to (created if missing).
    #[arg(
        long, env = "LIVEPIPE_TOPIC",
        default_value = DEFAULT_TOPIC,
        value_name = "TOPIC",
        requires = "brokers"
    )]
    pub topic: String,

    /// Partitions of the topic, if it has to be created.
    #[arg(long, env = "LIVEPIPE_PARTITIONS", default_value_t = 4, value_name = "N", requires = "brokers",
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: i32,

    /// A librdkafka property for the producer, like kcat's -X (repeatable).
    #[arg(short = 'X', value_name = "KEY=VALUE", value_parser = PropertyParser, requires = "brokers")]
    pub kafka_property: Vec<(String, String)>,

    /// A file of librdkafka properties, KEY=VALUE per line; -X applies after it.
    #[arg(
        long,
        env = "LIVEPIPE_KAFKA_CONFIG",
        value_name = "FILE",
        requires = "brokers"
    )]
    pub kafka_config: Option<PathBuf>,

    /// Number of records to write [default: 100000 to a file; unlimited to Kafka
    /// with --duration].
    #[arg(long, env = "LIVEPIPE_EVENTS", value_name = "N")]
    pub events: Option<u64>,

    /// Kafka: stop after this many seconds of sending.
    #[arg(
        long,
        env = "LIVEPIPE_DURATION",
        value_name = "SECONDS",
        requires = "brokers"
    )]
    pub duration: Option<u64>,

    /// Seed: the same seed gives the same bytes.
    #[arg(long, env = "LIVEPIPE_SEED", default_value_t = 1)]
    pub seed: u64,

    /// Records per second of event time; to Kafka, also the send rate.
    #[arg(long, env = "LIVEPIPE_RATE", default_value_t = 2_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: u64,

    /// Kafka: records per second to send [default: --rate]; 0 sends as fast as the
    /// brokers take them (records are still never sent before their ts).
    #[arg(
        long,
        env = "LIVEPIPE_SEND_RATE",
        value_name = "N",
        requires = "brokers"
    )]
    pub send_rate: Option<u64>,

    /// Event time of the first record (ms since the epoch) [default: 1700000000000 to a
    /// file, now to Kafka].
    #[arg(long, env = "LIVEPIPE_START_TS", value_name = "MS")]
    pub start_ts: Option<u64>,

    /// Number of live streams.
    #[arg(long, env = "LIVEPIPE_STREAMS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub streams: u32,

    /// Fraction of records re-sent as producer retries.
    #[arg(long, env = "LIVEPIPE_DUPLICATE_RATE", default_value_t = 0.01, value_name = "RATE", value_parser = parse_rate)]
    pub duplicate_rate: f64,

    /// Fraction of records sent hours late.
    #[arg(long, env = "LIVEPIPE_LATE_RATE", default_value_t = 0.001, value_name = "RATE", value_parser = parse_rate)]
    pub late_rate: f64,

    /// Fraction of malformed lines.
    #[arg(long, env = "LIVEPIPE_MALFORMED_RATE", default_value_t = 0.001, value_name = "RATE", value_parser = parse_rate)]
    pub malformed_rate: f64,

    /// Fraction of impressions whose watch never qualifies.
    #[arg(long, env = "LIVEPIPE_NEVER_QUALIFY_RATE", default_value_t = 0.3, value_name = "RATE", value_parser = parse_rate)]
    pub never_qualify_rate: f64,

    /// Arrival order is shuffled within this bound (planted late records aside).
    #[arg(
        long,
        env = "LIVEPIPE_ALLOWED_LATENESS_MS",
        default_value_t = 5_000,
        value_name = "MS"
    )]
    pub allowed_lateness_ms: u64,

    /// A spike: from --spike-at for --spike-duration seconds of event time, `ads`
    /// (impressions and their ad_progress) or `chat` (chat and joins, from new viewers) come
    /// --spike-multiplier times as often, as copies with fresh ids; the rest is unchanged
    /// (--events counts the records before the copies). To Kafka, the send rate then follows
    /// the clock [default --send-rate: 0].
    #[arg(long, env = "LIVEPIPE_SPIKE", value_enum, value_name = "KIND")]
    pub spike: Option<SpikeArg>,

    /// Seconds of event time after the first record at which the spike starts.
    #[arg(
        long,
        env = "LIVEPIPE_SPIKE_AT",
        default_value_t = 60,
        value_name = "SECONDS"
    )]
    pub spike_at: u64,

    /// Seconds of event time the spike lasts.
    #[arg(
        long,
        env = "LIVEPIPE_SPIKE_DURATION",
        default_value_t = 60,
        value_name = "SECONDS"
    )]
    pub spike_duration: u64,

    /// How many times their usual rate the spiked kinds come.
    #[arg(long, env = "LIVEPIPE_SPIKE_MULTIPLIER", default_value_t = 10, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub spike_multiplier: u32,
}

/// What `livepipe gen --spike` multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SpikeArg {
    /// Impressions and their ad_progress.
    Ads,
    /// Chat and joins.
    Chat,
}

impl GenArgs {
    /// The spike asked for, laid out from the first record's `start_ts`.
    pub fn spikes(&self, start_ts: u64) -> Vec<Spike> {
        let Some(kind) = self.spike else {
            return Vec::new();
        };
        let from_ts = start_ts.saturating_add(self.spike_at.saturating_mul(1000));
        vec![Spike {
            kind: match kind {
                SpikeArg::Ads => SpikeKind::Ads,
                SpikeArg::Chat => SpikeKind::ChatJoin,
            },
            multiplier: self.spike_multiplier,
            from_ts,
            until_ts: from_ts.saturating_add(self.spike_duration.saturating_mul(1000)),
        }]
    }
}

/// `KEY=VALUE` of a `-X` librdkafka property. A malformed one is refused
/// without echoing it (clap's own value errors quote the value): `-X
/// sasl.password:secret`, a typo for `=`, holds a secret.
#[derive(Clone, Copy, Debug)]
struct PropertyParser;

impl clap::builder::TypedValueParser for PropertyParser {
    type Value = (String, String);

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        match value.to_str().and_then(|text| text.split_once('=')) {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_string(), value.to_string()))
            }
            _ => Err(clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                "-X takes KEY=VALUE, a librdkafka property like -X security.protocol=SSL; one \
                 -X argument has no `=` or no key (not shown here: it may hold a secret)\n",
            )
            .with_cmd(cmd)),
        }
    }
}

/// One `--http-allowed-hosts` name, lowercase: a DNS name or an address,
/// without scheme or port (`Host` is compared with its port stripped).
fn allowed_host(text: &str) -> Result<String, String> {
    let host = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let name = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    let address = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok();
    if name || address {
        Ok(host)
    } else {
        Err(format!(
            "`{text}` is not a host name; give names without scheme or port, like \
             dash.example.com,localhost (internationalized names in their xn-- form)"
        ))
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

/// The token of `--http-token-file`: the file's contents without trailing
/// whitespace (the newline an editor or `echo` adds). Errors name the file,
/// never its contents.
pub fn read_http_token(path: &std::path::Path) -> Result<String, String> {
    let bytes = std::fs::read(path)
        .map_err(|err| format!("--http-token-file {}: cannot read: {err}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        format!(
            "--http-token-file {}: not UTF-8 text; write a printable token, e.g. \
             `head -c 32 /dev/urandom | base64 > FILE`",
            path.display()
        )
    })?;
    let token = text.trim_end();
    if token.is_empty() {
        return Err(format!(
            "--http-token-file {}: the file is empty; write a token into it, e.g. \
             `head -c 32 /dev/urandom | base64 > FILE`",
            path.display()
        ));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn a_malformed_kafka_property_is_refused_without_echoing_it() {
        for command in ["run", "gen"] {
            let err = Cli::try_parse_from([
                "livepipe",
                command,
                "--brokers",
                "b:9092",
                "-X",
                "sasl.password:hunter2",
            ])
            .unwrap_err();
            let said = err.to_string();
            assert_eq!(err.exit_code(), 2);
            assert!(said.contains("KEY=VALUE"), "{said}");
            assert!(!said.contains("hunter2"), "echoed a secret: {said}");
        }
    }

    /// What `livepipe run SOURCE FLAG` must come to.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Want {
        Files,
        Kafka,
        Demo,
        Refused,
    }
    use Want::{Demo as D, Files as F, Kafka as K, Refused as R};

    /// The three sources, as command-line flags.
    const SOURCES: [(&str, &str); 3] = [
        ("files", "--input a.jsonl"),
        ("Kafka", "--brokers 127.0.0.1:9092"),
        ("demo", ""),
    ];

    /// Every `run` flag with a valid value (split on spaces; the first word
    /// is the flag), and what it comes to with files, Kafka and the demo.
    const TABLE: &[(&str, [Want; 3])] = &[
        // A second file is one more partition; files and Kafka conflict
        // (clap); --brokers cannot be given twice.
        ("--input b.jsonl", [F, R, F]),
        ("--brokers h:9092", [R, R, K]),
        // Kafka only; refused even with the default's value.
        ("--topic t", [R, K, R]),
        ("--topic livestream-events", [R, K, R]),
        ("--start-offsets latest", [R, K, R]),
        ("--start-offsets earliest", [R, K, R]),
        ("-X client.id=x", [R, K, R]),
        ("--kafka-config k.properties", [R, K, R]),
        ("--accept-data-loss", [R, K, R]),
        ("--idle-timeout-ms 1000", [R, K, R]),
        ("--idle-timeout-ms 10000", [R, K, R]),
        // Everywhere.
        ("--out d", [F, K, D]),
        ("--workers 2", [F, K, D]),
        ("--paths live", [F, K, D]),
        ("--paths billing", [F, K, D]),
        ("--http 127.0.0.1:0", [F, K, D]),
        ("--http-allowed-hosts localhost,dash.example.com", [F, K, D]),
        ("--addr-file a", [F, K, D]),
        ("--http-token-file t", [F, K, D]),
        ("--qualify-ms 1000", [F, K, D]),
        ("--qualify-window-ms 60000", [F, K, D]),
        ("--allowed-lateness-ms 0", [F, K, D]),
        ("--billing-period-ms 1000", [F, K, D]),
        ("--presence-ttl-ms 1000", [F, K, D]),
        ("--state-retention-ms 1000", [F, K, D]),
        // A cluster (these go together): not for the demo.
        ("--processes 2 --process 0 --hostfile h", [F, K, R]),
        ("--process 0 --processes 2 --hostfile h", [F, K, R]),
        ("--hostfile h --processes 2 --process 0", [F, K, R]),
        (
            "--cluster-timeout 5 --processes 2 --process 0 --hostfile h",
            [F, K, R],
        ),
        (
            "--cluster-secret-file s --processes 2 --process 0 --hostfile h",
            [F, K, R],
        ),
    ];

    /// `livepipe run ARGS` parsed and its source decided, or the message.
    fn decide(args: &[&str]) -> Result<Source, String> {
        let cli = Cli::try_parse_from(["livepipe", "run"].iter().chain(args))
            .map_err(|err| err.to_string())?;
        match cli.command {
            Command::Run(run) => {
                run.rules.to_config()?;
                run.source()
            }
            Command::Gen(_) | Command::Report(_) => unreachable!("parsed `run`"),
        }
    }

    #[test]
    fn every_run_flag_is_accepted_or_refused_with_every_source() {
        // The table has a row for every flag `run` has.
        let command = Cli::command();
        let run = command.find_subcommand("run").expect("run");
        for arg in run.get_arguments() {
            let name = match (arg.get_long(), arg.get_short()) {
                (Some("help"), _) => continue,
                (Some(long), _) => format!("--{long}"),
                (None, Some(short)) => format!("-{short}"),
                (None, None) => unreachable!("run has no positional arguments"),
            };
            assert!(
                TABLE
                    .iter()
                    .any(|(args, _)| args.split_whitespace().next() == Some(&name)),
                "{name} has no row in the table"
            );
        }
        for (flag_args, wants) in TABLE {
            let flag = flag_args.split_whitespace().next().unwrap();
            for ((source, source_args), want) in SOURCES.iter().zip(wants) {
                let args: Vec<&str> = source_args
                    .split_whitespace()
                    .chain(flag_args.split_whitespace())
                    .collect();
                let got = decide(&args);
                match (want, &got) {
                    (R, Err(message)) => assert!(
                        message.contains(flag),
                        "{source}: run {args:?}: the refusal does not name {flag}: {message}"
                    ),
                    (F, Ok(Source::Files(_)))
                    | (K, Ok(Source::Kafka { .. }))
                    | (D, Ok(Source::Demo)) => {}
                    _ => panic!("{source}: run {args:?}: want {want:?}, got {got:?}"),
                }
            }
        }
    }

    #[test]
    fn kafka_only_refusals_say_what_to_do() {
        let files = decide(&["--input", "f.jsonl", "--topic", "t"]).unwrap_err();
        assert!(files.contains("remove it"), "{files}");
        assert!(files.contains("--brokers instead of --input"), "{files}");
        // Every Kafka-only flag given is named, not only the first.
        let demo = decide(&["-X", "no.such.property=1", "--start-offsets", "latest"]).unwrap_err();
        assert!(demo.contains("`-X`, `--start-offsets` apply"), "{demo}");
        assert!(
            demo.contains("remove them to run the embedded demo"),
            "{demo}"
        );
    }

    #[test]
    fn kafka_defaults_apply_where_the_flags_are_not_given() {
        assert_eq!(
            decide(&["--brokers", "h:9092"]),
            Ok(Source::Kafka {
                brokers: "h:9092".into(),
                topic: DEFAULT_TOPIC.into(),
                start: StartFrom::Earliest,
            })
        );
        assert_eq!(
            decide(&[
                "--brokers",
                "h:9092",
                "--topic",
                "t",
                "--start-offsets",
                "latest"
            ]),
            Ok(Source::Kafka {
                brokers: "h:9092".into(),
                topic: "t".into(),
                start: StartFrom::Latest,
            })
        );
        let idle = |args: &[&str]| {
            let cli = Cli::try_parse_from(["livepipe", "run"].iter().chain(args)).unwrap();
            let Command::Run(run) = cli.command else {
                unreachable!()
            };
            run.rules.to_config().unwrap().idle_timeout_ms
        };
        assert_eq!(idle(&["--brokers", "h:9092"]), 10_000);
        assert_eq!(
            idle(&["--brokers", "h:9092", "--idle-timeout-ms", "1000"]),
            1_000
        );
    }
}
