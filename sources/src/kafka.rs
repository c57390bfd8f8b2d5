//! Kafka source: one topic, its partitions assigned statically to workers.
//!
//! Partitions are discovered from the topic's metadata once, at start, and
//! partition `p` belongs to worker `p % workers` (counting all workers of
//! all processes). Each worker reads its partitions with its own
//! `BaseConsumer` and a manual `assign`: no consumer-group rebalancing, so
//! a partition's records are always read, parsed and stamped in offset
//! order by one worker, which is what makes its watermark well defined.
//!
//! # Watermarks (docs/contract.md, Billing rules)
//!
//! A partition's watermark is its highest valid `ts` so far minus the
//! allowed lateness. A partition is **idle** once it is caught up (the
//! consumer reached its end: librdkafka's partition-EOF event, which needs
//! no high-watermark arithmetic) and nothing new arrived for
//! `idle_timeout_ms` of wall clock; idle partitions stop holding time back.
//! The worker's watermark is the least watermark of its partitions that are
//! not idle, or, when all of them are idle, the wall clock minus the
//! allowed lateness: a timer, not the next event, closes the windows of a
//! quiet topic. Timely takes the minimum over workers.
//!
//! The worker's watermark never goes back, but a partition that wakes up
//! may be behind it. Each event is therefore stamped with
//! `max(its partition's watermark, the worker's watermark)` and travels at
//! the coarse version of that (the invariant of `livepipe_dataflow::time`):
//! records of a partition that woke up with old data are judged against
//! the time that already passed, and are late if their impressions are
//! final.
//!
//! # Resuming
//!
//! A partition with a position in the ledger starts there (whatever
//! `--start-offsets` says), with its watermark seeded from it, so replayed
//! records are judged exactly as the first time. Checkpoints are recorded
//! after every poll; the billing sink commits the safe ones. The same
//! offsets are committed to the consumer group (`group.id`, default
//! `livepipe`, see [`group_id`]) every few seconds for lag tools; the ledger
//! stays the truth.
//!
//! # Staying responsive
//!
//! An activation polls with a budget (records and time) and never blocks.
//! librdkafka wakes the worker through a non-empty-queue callback when
//! records arrive, and a timer wakes it to notice idleness and follow the
//! wall clock.

use crate::stamp::{Batch, Output, PartitionClock, StampRules};
use crate::SourceContext;
use livepipe_dataflow::event::{Ingested, Position, RejectedRecord, RAW_KEEP_BYTES};
use livepipe_dataflow::parse::{check_clock, parse_event};
use livepipe_dataflow::resume::{Checkpoint, Checkpoints};
use livepipe_dataflow::time::{coarse, wall_clock_ms, Time};
use livepipe_dataflow::turns::Path;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::Capability;
use timely::dataflow::{Scope, StreamVec};

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Records one activation may take before yielding to other operators.
const POLL_BUDGET_RECORDS: usize = 4096;
/// Time one activation may spend polling.
const POLL_BUDGET: Duration = Duration::from_millis(5);
/// How often an activation runs when nothing arrives: bounds how late an
/// idle partition or the wall clock is noticed.
const TIMER: Duration = Duration::from_millis(100);
/// How long a seek back (see [`ResumeSeek`]) may block the worker.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the ledger's resume offsets are committed to the group.
const GROUP_COMMIT_EVERY: Duration = Duration::from_secs(5);
/// How often the per-partition positions are logged.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Where consumption starts when there is no committed position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartOffsets {
    /// The oldest record the broker still holds.
    Earliest,
    /// Only records produced from now on.
    Latest,
    /// The records of the last `back_ms` of wall clock, by their Kafka
    /// timestamps, found with `offsets_for_times` as the consumer opens
    /// (so again at every restart); a partition with no record that recent
    /// starts at its end. What a live-only job needs: the presence TTL's
    /// worth of history and no more.
    Since { back_ms: u64 },
}

/// How to reach and read the topic.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    pub topic: String,
    pub start: StartOffsets,
    /// librdkafka properties given as `-X key=value`, applied last, so they
    /// override ours (SASL, TLS, timeouts, `group.id`, ...).
    pub overrides: Vec<(String, String)>,
    /// Resume below a partition's log start (records deleted unread) from
    /// the log start, recording the lost range, instead of refusing.
    pub accept_data_loss: bool,
    /// `group.id` unless `-X group.id=...` says otherwise ([`group_id`]).
    pub group_id: String,
}

/// Consumer group used for committed offsets unless `-X group.id=...`
/// says otherwise. Partitions are assigned manually; the group only names
/// where offsets are kept.
pub const DEFAULT_GROUP_ID: &str = "livepipe";

/// The default consumer group of a job that runs `paths` (`all`, `live`
/// or `billing`): `livepipe` for both paths, so that existing deployments
/// keep their committed offsets, and `livepipe-live` / `livepipe-billing`
/// for one path alone, so that two jobs on one topic never share a group
/// (lag tools then show each job's own position). `-X group.id` still wins.
pub fn group_id(paths: &str) -> String {
    match paths {
        "all" => DEFAULT_GROUP_ID.to_string(),
        one => format!("{DEFAULT_GROUP_ID}-{one}"),
    }
}

impl KafkaSettings {
    /// The consumer configuration: ours, then the `-X` overrides.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Caught-up detection (idle partitions) without trusting the
            // broker's high watermark.
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            // The live path wants records within a second: don't let the
            // broker sit on a fetch for the default 500 ms.
            .set("fetch.wait.max.ms", "100")
            // Whether any broker is up, for /healthz and metrics.
            .set("statistics.interval.ms", "1000")
            // Bounds what librdkafka buffers ahead of the dataflow.
            .set("queued.max.messages.kbytes", "65536")
            .set_log_level(RDKafkaLogLevel::Warning);
        for (key, value) in &self.overrides {
            config.set(key, value);
        }
        config
    }
}

/// Why the topic could not be set up for reading.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A mistake in the settings (a bad `-X` property, a missing topic):
    /// the operator must change the command line.
    #[error("{0}")]
    Usage(String),
    /// The brokers could not be reached or answered with an error.
    #[error("{0}")]
    Unavailable(String),
}

/// Asks the brokers for the topic's partitions.
pub fn discover_partitions(
    settings: &KafkaSettings,
    timeout: Duration,
) -> Result<Vec<i32>, SetupError> {
    let consumer: BaseConsumer<SetupContext> = settings
        .consumer_config()
        .create_with_context(SetupContext)
        .map_err(|err| SetupError::Usage(client_config_error(&err)))?;
    let metadata = consumer
        .fetch_metadata(Some(&settings.topic), timeout)
        .map_err(|err| {
            SetupError::Unavailable(format!(
                "could not read the metadata of topic `{}` from {} within {} s: {err} \
                 (are the brokers up and is --brokers right?)",
                settings.topic,
                settings.brokers,
                timeout.as_secs()
            ))
        })?;
    let topic = metadata
        .topics()
        .iter()
        .find(|topic| topic.name() == settings.topic)
        .ok_or_else(|| SetupError::Unavailable("metadata without the topic".into()))?;
    match topic.error() {
        None => {}
        Some(code) if RDKafkaErrorCode::from(code) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            return Err(SetupError::Usage(format!(
                "topic `{}` does not exist on {}; create it (e.g. `livepipe gen --brokers {} \
                 --topic {} --partitions 4`) or fix --topic",
                settings.topic, settings.brokers, settings.brokers, settings.topic
            )))
        }
        Some(code) => {
            return Err(SetupError::Unavailable(format!(
                "topic `{}`: {}",
                settings.topic,
                RDKafkaErrorCode::from(code)
            )))
        }
    }
    let mut partitions: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    if partitions.is_empty() {
        return Err(SetupError::Unavailable(format!(
            "topic `{}` has no partitions",
            settings.topic
        )));
    }
    Ok(partitions)
}

/// Each resumed partition's log start and end, as the brokers hold them
/// now: `resume` maps partition -> the ledger's resume offset.
///
/// The end is the broker's high watermark, except where that is below the
/// resume offset: some Kafka-protocol brokers under-report it (tansu 0.6
/// answered 1 for a partition holding 6,290 records), so before the job
/// calls the topic truncated, a fetch must confirm that the record before
/// the resume offset is really gone (see [`holds_record`]).
pub fn partition_bounds(
    settings: &KafkaSettings,
    resume: &BTreeMap<i32, u64>,
    timeout: Duration,
) -> Result<BTreeMap<i32, (i64, i64)>, SetupError> {
    let consumer: BaseConsumer<SetupContext> = settings
        .consumer_config()
        .create_with_context(SetupContext)
        .map_err(|err| SetupError::Usage(client_config_error(&err)))?;
    let mut bounds = BTreeMap::new();
    for (&partition, &offset) in resume {
        let (low, high) = consumer
            .fetch_watermarks(&settings.topic, partition, timeout)
            .map_err(|err| {
                SetupError::Unavailable(format!(
                    "reading the offsets of partition {partition} of `{}`: {err}",
                    settings.topic
                ))
            })?;
        let offset = offset as i64;
        let end = if offset > high && holds_record(settings, partition, low, offset - 1)? {
            tracing::debug!(
                partition,
                high,
                offset,
                "the broker's high watermark is below records it holds; trusting the records"
            );
            offset
        } else {
            high
        };
        bounds.insert(partition, (low, end));
    }
    Ok(bounds)
}

/// How far before the wanted record [`holds_record`] starts reading first.
const PROBE_BACK: i64 = 4096;
/// How long each of [`holds_record`]'s attempts may wait for the record.
const PROBE_WAIT: [Duration; 2] = [Duration::from_secs(3), Duration::from_secs(10)];

/// Whether `partition` still holds a record at `offset` or later, found by
/// fetching rather than by trusting the reported high watermark: first a
/// little before it, then (a broker may answer a fetch from the middle of
/// a batch with nothing, see [`ResumeSeek`]) from the log start `low`. An
/// out-of-range answer, or no such record within the wait, is a no.
fn holds_record(
    settings: &KafkaSettings,
    partition: i32,
    low: i64,
    offset: i64,
) -> Result<bool, SetupError> {
    let near = (offset - PROBE_BACK).max(low).max(0);
    let starts = if near > low {
        vec![near, low]
    } else {
        vec![near]
    };
    for (start, wait) in starts.into_iter().zip(PROBE_WAIT) {
        if let Some(found) = probe(settings, partition, start, offset, wait)? {
            return Ok(found);
        }
    }
    Ok(false)
}

/// Reads `partition` from `start` until a record at `offset` or later
/// (`Some(true)`), an out-of-range answer (`Some(false)`), or `wait` is
/// over (`None`).
fn probe(
    settings: &KafkaSettings,
    partition: i32,
    start: i64,
    offset: i64,
    wait: Duration,
) -> Result<Option<bool>, SetupError> {
    let unavailable =
        |err: KafkaError| SetupError::Unavailable(format!("probing partition {partition}: {err}"));
    let consumer: BaseConsumer<SetupContext> = settings
        .consumer_config()
        .set("auto.offset.reset", "error")
        .set("statistics.interval.ms", "0")
        .create_with_context(SetupContext)
        .map_err(|err| SetupError::Usage(client_config_error(&err)))?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&settings.topic, partition, Offset::Offset(start))
        .map_err(unavailable)?;
    consumer.assign(&assignment).map_err(unavailable)?;
    let started = Instant::now();
    while started.elapsed() < wait {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) if message.offset() >= offset => return Ok(Some(true)),
            Some(Err(err))
                if matches!(
                    err.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset)
                ) =>
            {
                return Ok(Some(false))
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Offsets `[first, end)` of a partition that retention deleted before
/// they were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostRange {
    pub partition: u32,
    pub first: u64,
    pub end: u64,
}

/// Checks the ledger's resume offsets (`resume`: partition -> offset)
/// against what the partitions hold now (`bounds`: partition -> (log
/// start, high watermark)).
///
/// A resume offset past the high watermark means the records the ledger
/// billed are not in this topic any more (deleted and re-created, or
/// truncated): refused. One below the log start means records were deleted
/// unread: refused unless `accept_data_loss`, and then returned as lost
/// ranges, for the caller to record and to resume from the log start.
/// Every problem is named in one message.
pub fn check_resume_offsets(
    topic: &str,
    resume: &BTreeMap<u32, u64>,
    bounds: &BTreeMap<i32, (i64, i64)>,
    accept_data_loss: bool,
) -> Result<Vec<LostRange>, String> {
    let mut refused = Vec::new();
    let mut lost = Vec::new();
    for (&partition, &offset) in resume {
        let Some(&(low, high)) = bounds.get(&(partition as i32)) else {
            refused.push(format!(
                "partition {partition} is in the ledger but the topic has {} partitions now: \
                 it was deleted and re-created",
                bounds.len()
            ));
            continue;
        };
        let (low, high) = (low.max(0) as u64, high.max(0) as u64);
        if offset > high {
            refused.push(format!(
                "partition {partition}: the ledger resumes at offset {offset}, but the partition \
                 ends at offset {high} (its high watermark): the topic was deleted and \
                 re-created, or truncated"
            ));
        } else if offset < low {
            let range = LostRange {
                partition,
                first: offset,
                end: low,
            };
            if !accept_data_loss {
                refused.push(format!(
                    "partition {partition}: offsets {offset}..{} ({} records) were deleted \
                     (retention) before this job read them; the partition now starts at {low}",
                    low - 1,
                    low - offset
                ));
            }
            lost.push(range);
        }
    }
    if refused.is_empty() {
        return Ok(lost);
    }
    let loss_only = refused.len() == lost.len() && !accept_data_loss;
    let advice = if loss_only {
        "The lost records cannot be billed. To go on from the log start and record every lost \
         range in OUT/gaps.jsonl and the ledger, run again with --accept-data-loss."
    } else {
        "This --out billed another topic's records: use a fresh --out for this topic."
    };
    Err(format!(
        "topic `{topic}` does not hold what this --out's ledger read:\n  {}\n{advice}",
        refused.join("\n  ")
    ))
}

/// What is known about one partition, for logs and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionStatus {
    /// The next offset to read (-1 until known: a record read, or the
    /// ledger's resume offset).
    pub next_offset: i64,
    /// The broker's high watermark as last fetched by
    /// [`spawn_high_watermarks`] (-1 before its first answer).
    pub high_watermark: i64,
    /// Records read from it.
    pub records: u64,
    pub idle: bool,
    /// The partition's watermark (ms).
    pub watermark: u64,
}

impl PartitionStatus {
    /// Records on the broker not read yet (high watermark minus the next
    /// offset), once both are known; never negative (the two are taken at
    /// different moments).
    pub fn lag(&self) -> Option<i64> {
        (self.next_offset >= 0 && self.high_watermark >= 0)
            .then(|| (self.high_watermark - self.next_offset).max(0))
    }
}

/// How often [`spawn_high_watermarks`] asks the brokers.
pub const HIGH_WATERMARK_EVERY: Duration = Duration::from_secs(1);
/// How long one partition's answer may take before the round goes on
/// without it (the last value stays).
const HIGH_WATERMARK_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps the high watermark of every partition in `status` fresh, asking
/// the brokers (a ListOffsets request per partition) every
/// [`HIGH_WATERMARK_EVERY`] from a thread and consumer of its own, until
/// `done` is set.
///
/// Why not librdkafka's statistics (`hi_offset`, `consumer_lag`): they come
/// from fetch responses, so they go stale exactly when the consumer stops
/// fetching a partition (its local queue full, i.e. when the job is behind),
/// and `consumer_lag` counts from the group's committed offset, which this
/// job commits from the ledger, not from what it has read. And not on a
/// worker: the request blocks for a round trip.
pub fn spawn_high_watermarks(
    settings: &KafkaSettings,
    status: KafkaStatus,
    done: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let consumer: BaseConsumer = settings
        .consumer_config()
        .set("statistics.interval.ms", "0")
        .create()
        .map_err(|err| {
            format!(
                "creating the high-watermark consumer: {}",
                client_config_error(&err)
            )
        })?;
    let topic = settings.topic.clone();
    std::thread::Builder::new()
        .name("kafka-high-watermarks".into())
        .spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let round = Instant::now();
                fetch_high_watermarks(&consumer, &topic, &status, &done);
                while round.elapsed() < HIGH_WATERMARK_EVERY && !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
        .map_err(|err| format!("starting the high-watermark thread: {err}"))
}

/// One round of [`spawn_high_watermarks`]: each partition's high watermark
/// into `status`; a partition whose answer fails keeps its last value.
fn fetch_high_watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    status: &KafkaStatus,
    done: &AtomicBool,
) {
    let partitions: Vec<i32> = status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .copied()
        .collect();
    for partition in partitions {
        if done.load(Ordering::Relaxed) {
            return;
        }
        match consumer.fetch_watermarks(topic, partition, HIGH_WATERMARK_TIMEOUT) {
            Ok((_low, high)) => {
                let mut status = status.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(entry) = status.get_mut(&partition) {
                    entry.high_watermark = high;
                }
            }
            Err(err) => tracing::debug!(topic, partition, "fetching the high watermark: {err}"),
        }
    }
}

/// Per-partition status of every partition this process reads.
pub type KafkaStatus = Arc<Mutex<BTreeMap<i32, PartitionStatus>>>;

/// A client that could not be created, said without the property's value:
/// librdkafka's own message repeats it, and `-X` values are often secrets
/// (`sasl.password`, `ssl.key.password`).
pub fn client_config_error(err: &KafkaError) -> String {
    match err {
        KafkaError::ClientConfig(_, description, key, value) => {
            let description = if value.is_empty() {
                description.clone()
            } else {
                description.replace(value.as_str(), "<value>")
            };
            format!("Kafka client configuration: {description} (-X {key}=<value>)")
        }
        other => format!("Kafka client: {other}"),
    }
}

/// Why the brokers cannot be reached right now (`None`: they can), as
/// librdkafka's statistics and errors tell it, for `/healthz` and
/// `/metrics`. librdkafka reconnects on its own; nothing read is lost while
/// they are away, the job just waits.
pub type BrokerHealth = Arc<Mutex<Option<String>>>;

/// Keeps whether any broker is up, from librdkafka's statistics and errors
/// (the partitions' high watermarks come from [`spawn_high_watermarks`]).
struct StatsContext {
    brokers: BrokerHealth,
}

impl ClientContext for StatsContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        // A failed connection attempt, once per retry while a broker is
        // away: the state change is logged once by `set_broker_health`.
        if facility == "FAIL" {
            tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}");
        } else {
            DefaultClientContext.log(level, facility, message);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        match code {
            // Reaching the end of a partition is how idleness is noticed,
            // not a problem; librdkafka reports it as a "global error" too.
            Some(RDKafkaErrorCode::PartitionEOF) => {}
            // Reported on every reconnect attempt; the state change is
            // logged once (see `set_broker_health`).
            Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::Resolve) => {
                tracing::debug!("Kafka: {error}: {reason}");
            }
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                tracing::debug!("Kafka: {error}: {reason}");
                self.set_broker_health(Some(format!("all brokers down: {reason}")));
            }
            _ => tracing::warn!("Kafka: {error}: {reason}"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        tracing::debug!(
            brokers = statistics.brokers.len(),
            "Kafka: client statistics"
        );
        // Reachable while any real broker (not a bootstrap address) is up.
        let known: Vec<_> = statistics
            .brokers
            .values()
            .filter(|b| b.nodeid >= 0)
            .collect();
        if !known.is_empty() {
            let up = known.iter().any(|b| b.state == "UP");
            self.set_broker_health(if up {
                None
            } else {
                let states: Vec<String> = known
                    .iter()
                    .map(|b| format!("{} {}", b.nodename, b.state))
                    .collect();
                Some(format!("no broker is up ({})", states.join(", ")))
            });
        }
    }
}

impl StatsContext {
    /// Records whether the brokers can be reached (`None`: they can), and
    /// logs one line when that changes: librdkafka retries on its own
    /// every few hundred ms, and an outage must not flood the log. The
    /// health is shared by every worker's consumer, so the first one to
    /// see a change logs it, once per process.
    fn set_broker_health(&self, problem: Option<String>) {
        let mut brokers = self.brokers.lock().unwrap_or_else(|p| p.into_inner());
        match (brokers.is_some(), &problem) {
            (false, Some(why)) => tracing::warn!(
                "Kafka: brokers unreachable ({why}); reconnecting, reading resumes where it stopped"
            ),
            (true, None) => tracing::info!("Kafka: brokers reachable again"),
            _ => {}
        }
        *brokers = problem;
    }
}

/// The context of the short-lived consumers that read metadata and offsets
/// at start: librdkafka's defaults, but its statistics (every second, from
/// `consumer_config`) at DEBUG, where the default logs a whole dump at INFO.
pub struct SetupContext;

impl ClientContext for SetupContext {
    fn stats(&self, statistics: Statistics) {
        tracing::debug!("Kafka client statistics: {statistics:?}");
    }
}

impl ConsumerContext for SetupContext {}

impl ConsumerContext for StatsContext {}

/// One partition as its worker reads it.
struct PartitionState {
    id: i32,
    clock: PartitionClock,
    next_offset: i64,
    records: u64,
    /// The consumer reached the end of what the broker holds, and nothing
    /// arrived since.
    at_end: bool,
    last_record: Instant,
    /// Set until the resume offset's record is seen.
    resume: Option<ResumeSeek>,
}

/// Making sure a resumed partition really starts at its resume offset.
///
/// A Kafka broker answers a fetch at offset N with the record batch that
/// contains N, and the client drops the records below N. Some
/// Kafka-protocol brokers answer with the first batch that *starts* at or
/// after N instead (tansu 0.6's memory engine: a fetch at 1,000 came back
/// from 7,851), which would silently skip the rest of N's batch. So until
/// the record at N is seen, records below N are dropped, and a first record
/// past N makes the source seek back further (doubling), until the record
/// at N comes, the start of the partition is reached, or the re-reading
/// bound is hit (then the gap is taken as real).
#[derive(Clone, Copy, Debug)]
struct ResumeSeek {
    target: i64,
    /// How far before the target the last seek-back went.
    back: i64,
}

/// How far back a check may seek before taking a gap as real: bounds the
/// re-reading a genuine gap (transaction markers, compaction) costs.
const MAX_SEEK_BACK: i64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResumeCheck {
    /// Read before the crash: drop it.
    Below,
    /// The resume offset itself: carry on normally.
    Found,
    /// Past the target: seek back to this offset.
    SeekBack(i64),
    /// Past the target and nothing earlier to be had: the records are gone.
    Gap,
}

impl ResumeSeek {
    fn new(target: i64) -> Self {
        ResumeSeek { target, back: 0 }
    }

    fn check(&mut self, offset: i64) -> ResumeCheck {
        if offset < self.target {
            return ResumeCheck::Below;
        }
        if offset == self.target {
            return ResumeCheck::Found;
        }
        // The same answer after seeking back proves nothing: the batch
        // holding the target may start further back still. Only the start
        // of the partition (or a bound on the re-reading) ends the search.
        if self.back > 0 && (self.target - self.back <= 0 || self.back >= MAX_SEEK_BACK) {
            return ResumeCheck::Gap;
        }
        self.back = (self.back * 2).max(1024);
        ResumeCheck::SeekBack((self.target - self.back).max(0))
    }
}

impl PartitionState {
    fn is_idle(&self, idle_timeout: Duration) -> bool {
        self.at_end && self.last_record.elapsed() >= idle_timeout
    }

    /// The partitions a worker owns, as it starts reading them; records
    /// the resumed ones' checkpoints.
    fn resumed(source: &SourceContext, owned: &[i32]) -> BTreeMap<i32, PartitionState> {
        let now = Instant::now();
        owned
            .iter()
            .map(|&id| {
                // A resumed partition's watermark starts where it was.
                let resume = source.resume.get(&(id as u32));
                if let Some(checkpoint) = resume {
                    source.checkpoints.record(id as u32, *checkpoint);
                }
                (
                    id,
                    PartitionState {
                        id,
                        clock: PartitionClock::resumed(resume.and_then(|c| c.max_ts)),
                        next_offset: resume.map_or(-1, |c| c.offset as i64),
                        records: 0,
                        at_end: false,
                        last_record: now,
                        resume: resume.map(|c| ResumeSeek::new(c.offset as i64)),
                    },
                )
            })
            .collect()
    }

    /// Counts the record at `offset` as read at `now`.
    fn read(
        &mut self,
        offset: i64,
        now: Instant,
        idle_timeout: Duration,
        topic: &str,
        source: &SourceContext,
    ) {
        if self.records == 0 {
            // Re-readable from before its first record of this run.
            source.checkpoints.record(
                self.id as u32,
                Checkpoint {
                    offset: offset as u64,
                    max_ts: self.clock.max_ts(),
                    ..Checkpoint::default()
                },
            );
        }
        self.next_offset = offset + 1;
        self.records += 1;
        if self.is_idle(idle_timeout) {
            // Its records are now judged against a watermark that moved on
            // without it: worth knowing when it happens.
            tracing::warn!(
                topic = %topic,
                partition = self.id,
                offset,
                "partition woke up after being idle"
            );
        }
        self.at_end = false;
        self.last_record = now;
    }

    /// Whether the record at `offset` is to be read: not while a resumed
    /// partition is still looking for its resume offset (see [`ResumeSeek`]),
    /// which seeks back when the broker answered from further on.
    fn check_resume(
        &mut self,
        offset: i64,
        consumer: &BaseConsumer<StatsContext>,
        topic: &str,
    ) -> bool {
        let Some(resume) = self.resume.as_mut() else {
            return true;
        };
        match resume.check(offset) {
            ResumeCheck::Below => false,
            ResumeCheck::Found => {
                self.resume = None;
                true
            }
            ResumeCheck::SeekBack(seek_to) => {
                tracing::debug!(
                    topic = %topic,
                    partition = self.id,
                    resume_at = resume.target,
                    got = offset,
                    seek_to,
                    "the broker answered a fetch from further on than asked; \
                     seeking back and skipping what was read before"
                );
                // Synchronous, so that records fetched before the seek are
                // discarded rather than mistaken for the broker's new
                // answer. Rare: a resume, or a gap in the offsets.
                if let Err(err) =
                    consumer.seek(topic, self.id, Offset::Offset(seek_to), SEEK_TIMEOUT)
                {
                    tracing::warn!("seeking partition {}: {err}", self.id);
                }
                false
            }
            ResumeCheck::Gap => {
                tracing::warn!(
                    topic = %topic,
                    partition = self.id,
                    resume_at = resume.target,
                    first = offset,
                    "records between the resume offset and the first one the \
                     broker holds are gone (retention?)"
                );
                self.resume = None;
                true
            }
        }
    }
}

/// The Kafka source's settings beyond [`SourceContext`].
#[derive(Clone)]
pub struct KafkaSourceContext {
    pub source: SourceContext,
    pub settings: KafkaSettings,
    /// All partitions of the topic; this worker reads `p % peers == index`.
    pub partitions: Vec<i32>,
    pub idle_timeout_ms: u64,
    /// Filled in as partitions are read.
    pub status: KafkaStatus,
    /// Set while no broker can be reached.
    pub brokers: BrokerHealth,
}

/// Builds the source on this worker: a consumer for the partitions it owns.
pub fn kafka_source<'s>(
    scope: Scope<'s, Time>,
    context: KafkaSourceContext,
) -> StreamVec<'s, Time, Ingested> {
    let index = scope.index();
    let peers = scope.peers();
    let owned: Vec<i32> = context
        .partitions
        .iter()
        .copied()
        .filter(|p| *p as usize % peers == index)
        .collect();
    source(scope, "KafkaSource", move |capability, info| {
        let activator = scope.activator_for(info.address.clone());
        let wake = scope.worker().sync_activator_for(info.address.to_vec());
        let mut capability = Some(capability);
        let probes = context.source.probes.clone();
        let mut reader = KafkaReader::start(context, index, &owned, wake, &mut capability);
        move |output| {
            let _turn = probes.turns.time(Path::Source);
            let (Some(cap), Some(reader)) = (capability.as_mut(), reader.as_mut()) else {
                return;
            };
            let polled = reader.poll(output, cap, POLL_BUDGET_RECORDS, POLL_BUDGET);
            reader.advance(cap, &polled);
            reader.report();
            if polled.exhausted {
                // librdkafka's callback wakes us when records arrive.
                activator.activate_after(TIMER);
            } else {
                activator.activate();
            }
        }
    })
}

/// One worker's reading of its partitions, across activations.
struct KafkaReader {
    context: KafkaSourceContext,
    /// This worker's index.
    index: usize,
    /// Shared so that a polled message (which borrows the consumer) can be
    /// handled by `&mut self` methods.
    consumer: Rc<BaseConsumer<StatsContext>>,
    partitions: BTreeMap<i32, PartitionState>,
    topic: Arc<str>,
    rules: StampRules,
    idle_timeout: Duration,
    /// The worker's watermark (exact ms); the capability sits at its
    /// coarse version.
    promised: u64,
    last_group_commit: Instant,
    last_log: Instant,
    last_error: Option<String>,
}

/// What one activation's polling did.
struct Polled {
    /// Messages taken from the consumer (records, whether kept or not).
    taken: usize,
    /// The consumer had nothing more to give.
    exhausted: bool,
    /// The wall clock when the activation started.
    wall_ms: u64,
}

impl KafkaReader {
    /// Opens the consumer for the partitions this worker owns, or says why
    /// there is nothing to read: `None` when it owns none (then the
    /// capability is dropped) or when the consumer cannot be opened (then
    /// the job is failed, and the capability kept).
    fn start(
        context: KafkaSourceContext,
        index: usize,
        owned: &[i32],
        wake: timely::scheduling::SyncActivator,
        capability: &mut Option<Capability<Time>>,
    ) -> Option<KafkaReader> {
        if owned.is_empty() {
            // Nothing to read: hold no time back.
            *capability = None;
            context.source.checkpoints.close();
            return None;
        }
        let consumer = match open_consumer(&context, owned, wake) {
            Ok(consumer) => Some(consumer),
            Err(cause) => {
                // Keep the capability: an emptied frontier would
                // finalize impressions that are not final.
                (context.source.on_fatal)(cause);
                None
            }
        };
        let partitions = PartitionState::resumed(&context.source, owned);
        Some(KafkaReader {
            index,
            consumer: Rc::new(consumer?),
            partitions,
            last_group_commit: Instant::now(),
            topic: Arc::from(context.settings.topic.as_str()),
            rules: StampRules {
                allowed_lateness_ms: context.source.allowed_lateness_ms,
                time_granularity_ms: context.source.time_granularity_ms,
            },
            idle_timeout: Duration::from_millis(context.idle_timeout_ms),
            promised: 0,
            last_log: Instant::now(),
            last_error: None,
            context,
        })
    }

    /// One activation's polling: at most `budget_records` messages and
    /// about `budget` of time, never blocking.
    fn poll(
        &mut self,
        output: &mut Output<'_>,
        cap: &Capability<Time>,
        budget_records: usize,
        budget: Duration,
    ) -> Polled {
        let consumer = Rc::clone(&self.consumer);
        let started = Instant::now();
        let wall_ms = wall_clock_ms();
        let mut taken = 0;
        let mut exhausted = false;
        let mut batch = Batch::new(cap);
        while taken < budget_records && started.elapsed() < budget {
            let message = match consumer.poll(Duration::ZERO) {
                None => {
                    exhausted = true;
                    break;
                }
                Some(Ok(message)) => message,
                Some(Err(KafkaError::PartitionEOF(id))) => {
                    if let Some(partition) = self.partitions.get_mut(&id) {
                        partition.at_end = true;
                    }
                    continue;
                }
                Some(Err(err)) => {
                    // Broker trouble is retried by librdkafka; say so
                    // once per distinct error, not once per poll.
                    let text = err.to_string();
                    if self.last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(topic = %self.topic, "Kafka: {text}");
                        self.last_error = Some(text);
                    }
                    continue;
                }
            };
            taken += 1;
            self.handle(&message, started, wall_ms, &mut batch, output);
        }
        batch.flush(output);
        self.context
            .source
            .records_read
            .fetch_add(taken as u64, Ordering::Relaxed);
        Polled {
            taken,
            exhausted,
            wall_ms,
        }
    }

    /// One record: dropped if read before a resume, else parsed, checked
    /// against the clock and stamped into `batch`, or rejected.
    fn handle(
        &mut self,
        message: &BorrowedMessage<'_>,
        started: Instant,
        wall_ms: u64,
        batch: &mut Batch<'_>,
        output: &mut Output<'_>,
    ) {
        let Some(partition) = self.partitions.get_mut(&message.partition()) else {
            return;
        };
        if !partition.check_resume(message.offset(), &self.consumer, &self.topic) {
            return;
        }
        partition.read(
            message.offset(),
            started,
            self.idle_timeout,
            &self.topic,
            &self.context.source,
        );
        let position = Position {
            partition: message.partition() as u32,
            offset: message.offset() as u64,
        };
        let raw = message.payload().unwrap_or_default();
        let parsed =
            parse_event(raw).and_then(|event| check_clock(event.ts, wall_ms).map(|_| event));
        match parsed {
            Ok(event) => {
                let (time, ingested) =
                    partition
                        .clock
                        .stamp(self.rules, event, position, wall_ms, self.promised);
                batch.push(output, time, ingested);
            }
            Err(rejection) => (self.context.source.on_reject)(RejectedRecord {
                source: self.topic.clone(),
                position,
                reason: rejection.code(),
                raw: raw[..raw.len().min(RAW_KEEP_BYTES)].to_vec(),
            }),
        }
    }

    /// Moves the worker's watermark on (never back), downgrades the
    /// capability to it, and records checkpoints after a poll that took
    /// records.
    fn advance(&mut self, cap: &mut Capability<Time>, polled: &Polled) {
        let holding = self.partitions.values().map(|p| {
            (
                p.is_idle(self.idle_timeout),
                p.clock
                    .watermark_at(self.rules.allowed_lateness_ms, polled.wall_ms),
            )
        });
        self.promised = worker_watermark(
            self.promised,
            holding,
            wall_clock_ms(),
            self.rules.allowed_lateness_ms,
        );
        cap.downgrade(&coarse(self.promised, self.rules.time_granularity_ms));

        if polled.taken > 0 {
            for partition in self.partitions.values().filter(|p| p.next_offset >= 0) {
                self.context.source.checkpoints.record(
                    partition.id as u32,
                    Checkpoint {
                        offset: partition.next_offset as u64,
                        max_ts: partition.clock.max_ts(),
                        ..Checkpoint::default()
                    },
                );
            }
        }
    }

    /// Commits the group offsets now and then, publishes the partitions'
    /// status, and logs their positions now and then.
    fn report(&mut self) {
        // The ledger's positions are known where the billing sink runs,
        // process 0; its worker 0 reports them all.
        if self.index == 0 && self.last_group_commit.elapsed() >= GROUP_COMMIT_EVERY {
            self.last_group_commit = Instant::now();
            commit_group_offsets(&self.consumer, &self.topic, &self.context.source.committed);
        }
        publish_status(
            &self.context.status,
            &self.partitions,
            self.idle_timeout,
            self.rules.allowed_lateness_ms,
        );
        if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            log_positions(
                &self.topic,
                &self.context.status,
                &self.partitions,
                self.promised,
            );
        }
    }
}

/// The worker's next watermark: the least watermark of its partitions that
/// are not idle, or the wall clock minus the lateness once all are idle;
/// never less than what it already promised. `partitions` yields
/// `(idle, watermark)` per partition.
fn worker_watermark(
    promised: u64,
    partitions: impl Iterator<Item = (bool, u64)>,
    wall_ms: u64,
    lateness: u64,
) -> u64 {
    let holding = partitions
        .filter(|(idle, _)| !idle)
        .map(|(_, watermark)| watermark)
        .min();
    promised.max(holding.unwrap_or_else(|| wall_ms.saturating_sub(lateness)))
}

fn open_consumer(
    context: &KafkaSourceContext,
    owned: &[i32],
    wake: timely::scheduling::SyncActivator,
) -> Result<BaseConsumer<StatsContext>, String> {
    let settings = &context.settings;
    let mut consumer: BaseConsumer<StatsContext> = settings
        .consumer_config()
        .create_with_context(StatsContext {
            brokers: context.brokers.clone(),
        })
        .map_err(|err| format!("creating the Kafka consumer: {}", client_config_error(&err)))?;
    let starts = start_offsets(&consumer, settings, owned)?;
    let mut assignment = TopicPartitionList::new();
    {
        let mut status = context.status.lock().unwrap_or_else(|p| p.into_inner());
        for (&partition, &start) in owned.iter().zip(&starts) {
            // The ledger's position wins over --start-offsets.
            let offset = context
                .source
                .resume
                .get(&(partition as u32))
                .map_or(start, |c| Offset::Offset(c.offset as i64));
            assignment
                .add_partition_offset(&settings.topic, partition, offset)
                .map_err(|err| format!("assigning partition {partition}: {err}"))?;
            status.insert(
                partition,
                PartitionStatus {
                    next_offset: -1,
                    high_watermark: -1,
                    ..PartitionStatus::default()
                },
            );
        }
    }
    consumer.assign(&assignment).map_err(|err| {
        format!(
            "assigning partitions {owned:?} of `{}`: {err}",
            settings.topic
        )
    })?;
    consumer.set_nonempty_callback(move || {
        // The worker may be gone at shutdown; nothing to wake then.
        let _ = wake.activate();
    });
    tracing::info!(topic = %settings.topic, partitions = ?owned, "reading Kafka partitions");
    Ok(consumer)
}

/// How long `offsets_for_times` may take at start.
const OFFSETS_FOR_TIMES_TIMEOUT: Duration = Duration::from_secs(15);

/// Where each of `owned` starts without a ledger position, in order.
fn start_offsets(
    consumer: &BaseConsumer<StatsContext>,
    settings: &KafkaSettings,
    owned: &[i32],
) -> Result<Vec<Offset>, String> {
    let back_ms = match settings.start {
        StartOffsets::Earliest => return Ok(vec![Offset::Beginning; owned.len()]),
        StartOffsets::Latest => return Ok(vec![Offset::End; owned.len()]),
        StartOffsets::Since { back_ms } => back_ms,
    };
    let since = wall_clock_ms().saturating_sub(back_ms);
    let mut query = TopicPartitionList::new();
    for &partition in owned {
        query
            .add_partition_offset(&settings.topic, partition, Offset::Offset(since as i64))
            .map_err(|err| format!("asking for partition {partition}'s offsets: {err}"))?;
    }
    let found = consumer
        .offsets_for_times(query, OFFSETS_FOR_TIMES_TIMEOUT)
        .map_err(|err| {
            format!(
                "finding the offsets of `{}` at {since} ms (now - {back_ms} ms): {err}",
                settings.topic
            )
        })?;
    let starts: Vec<Offset> = owned
        .iter()
        .map(|&partition| {
            let answer = found
                .find_partition(&settings.topic, partition)
                .map(|elem| elem.offset());
            window_start(answer)
        })
        .collect();
    tracing::info!(
        topic = %settings.topic,
        since_ms = since,
        starts = ?owned.iter().zip(&starts).collect::<Vec<_>>(),
        "starting at the records of the last {back_ms} ms"
    );
    Ok(starts)
}

/// Where a partition starts given the broker's answer to
/// `offsets_for_times`: at the first record at or after the time, or at
/// the end when it has none that recent (the broker answers -1, which
/// librdkafka gives as `End`), or gave no answer for it.
fn window_start(answer: Option<Offset>) -> Offset {
    match answer {
        Some(Offset::Offset(offset)) if offset >= 0 => Offset::Offset(offset),
        _ => Offset::End,
    }
}

/// Commits the ledger's resume offsets as the consumer group's offsets, so
/// that standard lag tools see where the job stands. The ledger stays the
/// truth: a restart reads its positions, not these.
fn commit_group_offsets(consumer: &BaseConsumer<StatsContext>, topic: &str, ledger: &Checkpoints) {
    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in ledger.committed() {
        let _ =
            offsets.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64));
    }
    if offsets.count() > 0 {
        if let Err(err) = consumer.commit(&offsets, CommitMode::Async) {
            tracing::debug!("committing consumer-group offsets: {err}");
        }
    }
}

fn publish_status(
    status: &KafkaStatus,
    readings: &BTreeMap<i32, PartitionState>,
    idle_timeout: Duration,
    lateness: u64,
) {
    let mut status = status.lock().unwrap_or_else(|p| p.into_inner());
    for reading in readings.values() {
        let entry = status.entry(reading.id).or_default();
        entry.next_offset = reading.next_offset;
        entry.records = reading.records;
        entry.idle = reading.is_idle(idle_timeout);
        entry.watermark = reading.clock.watermark_at(lateness, wall_clock_ms());
    }
}

fn log_positions(
    topic: &str,
    status: &KafkaStatus,
    readings: &BTreeMap<i32, PartitionState>,
    watermark: u64,
) {
    let status = status.lock().unwrap_or_else(|p| p.into_inner());
    let positions: Vec<String> = readings
        .keys()
        .filter_map(|id| status.get(id).map(|s| (id, s)))
        .map(|(id, s)| {
            let lag = s
                .lag()
                .map_or_else(|| "unknown".to_string(), |lag| lag.to_string());
            format!(
                "{id}: offset {} lag {lag}{}",
                s.next_offset,
                if s.idle { " idle" } else { "" }
            )
        })
        .collect();
    tracing::info!(topic, watermark, "partitions [{}]", positions.join(", "));
}

#[cfg(test)]
mod tests {
    use super::{
        check_resume_offsets, group_id, window_start, worker_watermark, LostRange, ResumeCheck,
        ResumeSeek, DEFAULT_GROUP_ID,
    };
    use rdkafka::Offset;
    use std::collections::BTreeMap;

    #[test]
    fn a_resume_that_lands_on_its_offset_goes_on() {
        let mut seek = ResumeSeek::new(5_000);
        assert_eq!(seek.check(5_000), ResumeCheck::Found);
    }

    #[test]
    fn a_broker_answering_from_further_on_is_sought_back_until_it_gives_the_offset() {
        let mut seek = ResumeSeek::new(5_000);
        assert_eq!(seek.check(7_851), ResumeCheck::SeekBack(3_976));
        // The same answer again: the batch may start further back still.
        assert_eq!(seek.check(7_851), ResumeCheck::SeekBack(2_952));
        assert_eq!(seek.check(7_851), ResumeCheck::SeekBack(904));
        assert_eq!(seek.check(7_851), ResumeCheck::SeekBack(0));
        assert_eq!(
            seek.check(7_851),
            ResumeCheck::Gap,
            "nothing earlier at all"
        );
        let mut seek = ResumeSeek::new(5_000);
        assert_eq!(seek.check(7_851), ResumeCheck::SeekBack(3_976));
        assert_eq!(seek.check(6_000), ResumeCheck::SeekBack(2_952));
        assert_eq!(seek.check(2_990), ResumeCheck::Below);
        assert_eq!(seek.check(4_999), ResumeCheck::Below);
        assert_eq!(seek.check(5_000), ResumeCheck::Found);
    }

    #[test]
    fn records_gone_below_the_log_start_are_a_gap() {
        let mut seek = ResumeSeek::new(100);
        assert_eq!(seek.check(500), ResumeCheck::SeekBack(0));
        assert_eq!(seek.check(400), ResumeCheck::Gap);
        let mut seek = ResumeSeek::new(1 << 40);
        for _ in 0..11 {
            assert!(matches!(seek.check(1 << 41), ResumeCheck::SeekBack(_)));
        }
        assert_eq!(seek.check(1 << 41), ResumeCheck::Gap, "bounded re-reading");
    }

    fn offsets(pairs: &[(u32, u64)]) -> BTreeMap<u32, u64> {
        pairs.iter().copied().collect()
    }

    fn bounds(pairs: &[(i32, i64, i64)]) -> BTreeMap<i32, (i64, i64)> {
        pairs
            .iter()
            .map(|&(p, low, high)| (p, (low, high)))
            .collect()
    }

    #[test]
    fn resume_offsets_within_the_partitions_go_on() {
        let held = bounds(&[(0, 0, 100), (1, 50, 60)]);
        let resume = offsets(&[(0, 100), (1, 50)]);
        assert_eq!(check_resume_offsets("t", &resume, &held, false), Ok(vec![]));
    }

    #[test]
    fn a_resume_offset_past_the_end_is_refused_naming_partition_and_offsets() {
        let said = check_resume_offsets(
            "t",
            &offsets(&[(0, 5), (3, 5_000)]),
            &bounds(&[(0, 0, 10), (3, 0, 1_200)]),
            true,
        )
        .unwrap_err();
        assert!(said.contains("partition 3"), "{said}");
        assert!(said.contains("5000") && said.contains("1200"), "{said}");
        assert!(said.contains("fresh --out"), "{said}");
        let said = check_resume_offsets("t", &offsets(&[(7, 1)]), &bounds(&[(0, 0, 10)]), false)
            .unwrap_err();
        assert!(said.contains("partition 7 is in the ledger"), "{said}");
    }

    #[test]
    fn records_deleted_unread_are_refused_unless_the_loss_is_accepted() {
        let held = bounds(&[(0, 400, 900), (1, 0, 10)]);
        let resume = offsets(&[(0, 100), (1, 3)]);
        let said = check_resume_offsets("t", &resume, &held, false).unwrap_err();
        assert!(said.contains("offsets 100..399 (300 records)"), "{said}");
        assert!(said.contains("--accept-data-loss"), "{said}");
        assert_eq!(
            check_resume_offsets("t", &resume, &held, true),
            Ok(vec![LostRange {
                partition: 0,
                first: 100,
                end: 400
            }])
        );
    }

    const WALL: u64 = 1_000_000;

    #[test]
    fn a_window_starts_at_the_found_offset_or_else_at_the_end() {
        assert_eq!(window_start(Some(Offset::Offset(42))), Offset::Offset(42));
        assert_eq!(window_start(Some(Offset::Offset(0))), Offset::Offset(0));
        // No record at or after the time: the broker says -1.
        assert_eq!(window_start(Some(Offset::End)), Offset::End);
        assert_eq!(window_start(Some(Offset::Invalid)), Offset::End);
        assert_eq!(window_start(None), Offset::End);
    }

    #[test]
    fn each_single_path_mode_has_its_own_group() {
        assert_eq!(group_id("all"), DEFAULT_GROUP_ID);
        assert_eq!(group_id("live"), "livepipe-live");
        assert_eq!(group_id("billing"), "livepipe-billing");
    }

    #[test]
    fn the_least_busy_partition_holds_the_watermark() {
        let partitions = [(false, 500), (false, 300), (true, 100)];
        assert_eq!(worker_watermark(0, partitions.into_iter(), WALL, 5), 300);
    }

    #[test]
    fn all_idle_follows_the_wall_clock() {
        let partitions = [(true, 500), (true, 300)];
        assert_eq!(
            worker_watermark(400, partitions.into_iter(), WALL, 5),
            WALL - 5
        );
    }

    #[test]
    fn a_partition_waking_up_behind_does_not_move_it_back() {
        // Partition 1 was idle while the others moved on; now it has a
        // record again, from long ago.
        let partitions = [(false, 900), (false, 200)];
        assert_eq!(worker_watermark(700, partitions.into_iter(), WALL, 5), 700);
    }
}
