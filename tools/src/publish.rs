//! Writes records into a Kafka topic through a real rdkafka producer: the
//! load generator's Kafka mode (`livepipe gen --brokers`) and the embedded
//! demo's traffic.
//!
//! Messages are keyed by `stream_id` (docs/contract.md, Events in: producers' choice, so all of
//! a stream's events share a partition); records that are not valid events
//! (the planted malformed ones) go without a key. The producer is
//! idempotent, so librdkafka's own retries neither duplicate nor reorder
//! messages within a partition: the topic holds exactly the generated
//! sequence, which is what lets a test compare a topic run with a file run.

use livepipe_dataflow::parse::parse_event;
use livepipe_dataflow::time::wall_clock_ms;
use livepipe_sources::kafka::{client_config_error, SetupError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The producer configuration: ours, then `-X` overrides.
pub fn producer_config(brokers: &str, overrides: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in overrides {
        config.set(key, value);
    }
    config
}

/// Creates `topic` with `partitions` partitions unless it exists; returns
/// the number of partitions it has.
///
/// Existence is checked by listing all topics: a metadata request naming
/// the topic would make a broker with `auto.create.topics.enable` create it
/// with its default partition count.
pub fn ensure_topic(
    config: &ClientConfig,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<i32, SetupError> {
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .map_err(|err| SetupError::Usage(client_config_error(&err)))?;
    let count = |admin: &AdminClient<DefaultClientContext>| {
        admin
            .inner()
            .fetch_metadata(None, timeout)
            .map(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| t.partitions().len() as i32)
            })
            .map_err(|err| SetupError::Unavailable(format!("listing the topics: {err}")))
    };
    if let Some(existing) = count(&admin)? {
        if existing != partitions {
            tracing::warn!(
                topic,
                has = existing,
                asked = partitions,
                "topic exists with a different number of partitions; using it as it is"
            );
        }
        return Ok(existing);
    }
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|err| SetupError::Unavailable(format!("starting a runtime: {err}")))?;
    let results = runtime
        .block_on(admin.create_topics([&new_topic], &options))
        .map_err(|err| SetupError::Unavailable(format!("creating topic `{topic}`: {err}")))?;
    for result in results {
        match result {
            Ok(_) => tracing::info!(topic, partitions, "created topic"),
            // Someone else was quicker.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(SetupError::Unavailable(format!(
                    "creating topic `{topic}`: {code}"
                )))
            }
        }
    }
    // Creation takes a moment to show in metadata.
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(created) = count(&admin)? {
            return Ok(created);
        }
        if Instant::now() >= deadline {
            return Err(SetupError::Unavailable(format!(
                "topic `{topic}` was created but does not show in the metadata"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How fast to send.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// At most this many records per second of wall clock.
    pub max_rate: Option<u64>,
    /// Hold a record back until the wall clock reaches its `ts`, so traffic
    /// generated from "now" arrives as it happens.
    pub follow_clock: bool,
}

/// Counters of a running publisher.
#[derive(Debug, Default)]
pub struct PublishStats {
    /// Records handed to the producer.
    pub sent: AtomicU64,
    /// Records the broker acknowledged.
    pub delivered: AtomicU64,
    /// Records the producer gave up on.
    pub failed: AtomicU64,
}

struct Deliveries {
    stats: Arc<PublishStats>,
    first_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.stats.delivered.fetch_add(1, Ordering::Relaxed),
            Err((err, _)) => {
                let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
                if first.is_none() {
                    tracing::warn!("Kafka delivery failed: {err}");
                    *first = Some(err.to_string());
                }
                self.stats.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Sends `records` to `topic` until they run out or `stop` is set, then
/// waits (up to `flush_timeout`) for every delivery report.
pub fn publish(
    config: &ClientConfig,
    topic: &str,
    records: impl Iterator<Item = Vec<u8>>,
    pace: Pace,
    stop: &AtomicBool,
    stats: Arc<PublishStats>,
    flush_timeout: Duration,
) -> Result<(), String> {
    let producer: ThreadedProducer<Deliveries> = config
        .create_with_context(Deliveries {
            stats: stats.clone(),
            first_error: Default::default(),
        })
        .map_err(|err| format!("creating the Kafka producer: {}", client_config_error(&err)))?;
    let started = Instant::now();
    let mut sent: u64 = 0;
    for record in records {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let event = parse_event(&record).ok();
        if let Some(rate) = pace.max_rate {
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            if !wait_until(due, stop) {
                break;
            }
        }
        if let (true, Some(event)) = (pace.follow_clock, event.as_ref()) {
            let now = wall_clock_ms();
            if event.ts > now {
                let due = Instant::now() + Duration::from_millis(event.ts - now);
                if !wait_until(due, stop) {
                    break;
                }
            }
        }
        let key = event.as_ref().map(|event| event.stream_id.as_bytes());
        let mut message = BaseRecord::<[u8], [u8]>::to(topic).payload(&record[..]);
        if let Some(key) = key {
            message = message.key(key);
        }
        loop {
            match producer.send(message) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: the broker is slower than
                    // we are. Wait for deliveries instead of dropping.
                    message = back;
                    std::thread::sleep(Duration::from_millis(1));
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                Err((err, _)) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("Kafka send failed: {err}");
                    break;
                }
            }
        }
        sent += 1;
        stats.sent.store(sent, Ordering::Relaxed);
    }
    producer
        .flush(flush_timeout)
        .map_err(|err| format!("waiting for Kafka deliveries: {err}"))
}

/// Sleeps until `due` unless `stop` is set first; false if stopped.
fn wait_until(due: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= due {
            return true;
        }
        std::thread::sleep((due - now).min(Duration::from_millis(50)));
    }
}
