//! Kafka helpers shared by the tests: loading a topic, and the separate
//! broker process (`LIVEPIPE_TEST_KAFKA`, started by `.ci/run`).

use livepipe_tools::generator::{GenConfig, Generator};
use livepipe_tools::publish::{ensure_topic, producer_config, publish, Pace, PublishStats};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Creates a topic named `<prefix>-<now>` with `partitions` partitions.
pub fn fresh_topic(brokers: &str, prefix: &str, partitions: i32) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let topic = format!("{prefix}-{now}");
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
pub fn loaded_mock_topic(
    records: &[Vec<u8>],
    partitions: i32,
) -> rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic("events", partitions, 1)
        .expect("topic");
    publish_all(&cluster.bootstrap_servers(), "events", records);
    cluster
}
