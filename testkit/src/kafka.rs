//! Kafka helpers shared by the tests and benches: librdkafka's mock
//! cluster, loading a topic, generated traffic, and the separate broker
//! process (`LIVEPIPE_TEST_KAFKA`, started by `.ci/run`).

use crate::now_ms;
use livepipe_tools::generator::spike::{Spike, Spiked};
use livepipe_tools::generator::{GenConfig, Generator};
use livepipe_tools::publish::{ensure_topic, producer_config, publish, Pace, PublishStats};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// librdkafka's mock cluster in this process.
pub type Mock = MockCluster<'static, DefaultProducerContext>;

/// A one-broker mock cluster with an empty `topic` of `partitions`
/// partitions.
pub fn mock_cluster(topic: &str, partitions: i32) -> Mock {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(topic, partitions, 1).expect("topic");
    cluster
}

/// Sends `records` keyed by stream, as `livepipe gen --brokers` does, and
/// checks that every one was delivered.
pub fn publish_all(brokers: &str, topic: &str, records: &[Vec<u8>]) {
    let stats = Arc::new(PublishStats::default());
    publish(
        &producer_config(brokers, &[]),
        topic,
        records.iter().cloned(),
        Pace {
            max_rate: None,
            follow_clock: false,
        },
        &AtomicBool::new(false),
        stats.clone(),
        Duration::from_secs(60),
    )
    .expect("published");
    let delivered = stats.delivered.load(Ordering::Relaxed);
    assert_eq!(delivered, records.len() as u64, "every record delivered");
}

/// The separate broker's address, or `None` (the test then skips).
/// Under `CI=true` a missing broker is a failure, never a silent skip.
pub fn separate_broker() -> Option<String> {
    match std::env::var("LIVEPIPE_TEST_KAFKA") {
        Ok(brokers) => Some(brokers),
        Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
            "CI=true but LIVEPIPE_TEST_KAFKA is not set: .ci/run must start the separate \
             Kafka-protocol broker (tansu) and export its address"
        ),
        Err(_) => {
            eprintln!("skipped: set LIVEPIPE_TEST_KAFKA=host:port of a Kafka-protocol broker");
            None
        }
    }
}

/// The separate broker and a fresh topic `<prefix>-<now>` of `partitions`
/// partitions on it, or `None` (the test then skips; see
/// [`separate_broker`]).
pub fn separate_topic(prefix: &str, partitions: i32) -> Option<(String, String)> {
    let brokers = separate_broker()?;
    let topic = fresh_topic(&brokers, prefix, partitions);
    Some((brokers, topic))
}

/// Creates a topic named `<prefix>-<now>` with `partitions` partitions.
pub fn fresh_topic(brokers: &str, prefix: &str, partitions: i32) -> String {
    let topic = format!("{prefix}-{}", now_ms());
    let created = ensure_topic(
        &producer_config(brokers, &[]),
        &topic,
        partitions,
        Duration::from_secs(30),
    )
    .expect("topic created");
    assert_eq!(created, partitions);
    topic
}

/// `LIVEPIPE_CRASH_EVENTS` (records for the separate-broker runs), or
/// `default`.
pub fn separate_broker_events(default: u64) -> u64 {
    std::env::var("LIVEPIPE_CRASH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Generated traffic, the same bytes `livepipe gen --output --rate 400`
/// writes: several billing periods of event time in a few ten thousand
/// records.
pub fn generated_traffic(events: u64, seed: u64) -> Vec<Vec<u8>> {
    Generator::new(&GenConfig {
        seed,
        events,
        rate: 400,
        ..GenConfig::default()
    })
    .collect()
}

/// librdkafka's mock cluster with topic `events` of `partitions`
/// partitions, loaded with `records`.
pub fn loaded_mock_topic(records: &[Vec<u8>], partitions: i32) -> Mock {
    let cluster = mock_cluster("events", partitions);
    publish_all(&cluster.bootstrap_servers(), "events", records);
    cluster
}

/// Generated traffic into `topic` at `rate` records/s, `ts` = now, until
/// dropped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    pub fn start(brokers: &str, topic: &str, rate: u64) -> Traffic {
        Traffic::with_spikes(brokers, topic, rate, Vec::new())
    }

    /// The same traffic with the kinds of `spikes` at their multiplier
    /// inside each spike's window of event time (the spike bench).
    pub fn with_spikes(brokers: &str, topic: &str, rate: u64, spikes: Vec<Spike>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (brokers, topic, stop) = (brokers.to_string(), topic.to_string(), stop.clone());
            std::thread::spawn(move || {
                let records = Generator::new(&GenConfig {
                    events: u64::MAX,
                    start_ts: now_ms(),
                    rate,
                    ..GenConfig::default()
                });
                publish(
                    &producer_config(&brokers, &[]),
                    &topic,
                    Spiked::new(records, spikes),
                    Pace {
                        max_rate: None,
                        follow_clock: true,
                    },
                    &stop,
                    Arc::new(PublishStats::default()),
                    Duration::from_secs(5),
                )
                .expect("traffic");
            })
        };
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
