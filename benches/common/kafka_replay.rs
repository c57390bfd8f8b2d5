//! Kafka replay against its own floor: the same records in a 4-partition
//! topic, read by a bare consumer (the floor) and by `livepipe run
//! --brokers` to its last final billing file, in the same run.
//!
//! The broker is the separate one when `LIVEPIPE_TEST_KAFKA` is set (the
//! figure that matters: a real network hop), else librdkafka's mock
//! cluster in this process.

use livepipe_sources::kafka::{KafkaSettings, StartOffsets};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use testkit::kafka::{fresh_topic, mock_cluster, publish_all, Mock};
use testkit::Livepipe;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Bare;

pub const PARTITIONS: i32 = 4;
/// The idle timeout of the livepipe runs: the last partitions stop holding
/// the watermark back this long after the topic's end, which is then taken
/// off the measured time.
const IDLE_TIMEOUT_MS: u64 = 1_000;

/// A topic loaded with the records, and what keeps its broker alive.
pub struct LoadedTopic {
    pub brokers: String,
    pub topic: String,
    pub records: u64,
    /// The mock cluster, when there is no separate broker.
    _mock: Option<Mock>,
}

impl LoadedTopic {
    pub fn load(records: &[Vec<u8>]) -> LoadedTopic {
        let (brokers, topic, mock) = match std::env::var("LIVEPIPE_TEST_KAFKA") {
            Ok(brokers) => {
                let topic = fresh_topic(&brokers, "e2e", PARTITIONS);
                (brokers, topic, None)
            }
            Err(_) => {
                let mock = mock_cluster("events", PARTITIONS);
                (mock.bootstrap_servers(), "events".to_string(), Some(mock))
            }
        };
        publish_all(&brokers, &topic, records);
        LoadedTopic {
            brokers,
            topic,
            records: records.len() as u64,
            _mock: mock,
        }
    }

    pub fn where_(&self) -> &'static str {
        if self._mock.is_some() {
            "librdkafka's mock cluster (in process)"
        } else {
            "the separate broker (LIVEPIPE_TEST_KAFKA)"
        }
    }
}

/// Records/s of the bare consume floor: `threads` consumers, each assigned
/// its share of the partitions from the beginning, reading and parsing
/// every record into [`Bare`] until all of them are read, nothing else.
///
/// The end is counted, not asked for: some brokers misreport their high
/// watermarks, and the number of records is known.
pub fn consume_floor(topic: &LoadedTopic, threads: u32) -> f64 {
    let consumed = AtomicU64::new(0);
    // The mock cluster's handle is not `Sync`: threads take only the names.
    let (brokers, name, records) = (topic.brokers.as_str(), topic.topic.as_str(), topic.records);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..threads as i32 {
            let consumed = &consumed;
            scope.spawn(move || {
                // livepipe's own consumer settings: the floor differs from
                // it only in what it does with a record.
                let consumer: BaseConsumer = KafkaSettings {
                    brokers: brokers.to_string(),
                    topic: name.to_string(),
                    start: StartOffsets::Earliest,
                    overrides: Vec::new(),
                    accept_data_loss: false,
                    group_id: "livepipe-e2e-floor".to_string(),
                }
                .consumer_config()
                .set("group.id", "livepipe-e2e-floor")
                .create()
                .expect("consumer");
                let mut assignment = TopicPartitionList::new();
                for partition in (0..PARTITIONS).filter(|p| p % threads as i32 == thread) {
                    assignment
                        .add_partition_offset(name, partition, Offset::Beginning)
                        .expect("partition");
                }
                consumer.assign(&assignment).expect("assign");
                while consumed.load(Ordering::Relaxed) < records {
                    let Some(message) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    // Partition ends (`enable.partition.eof`) are not records.
                    let Ok(message) = message else { continue };
                    let payload = rdkafka::Message::payload(&message).unwrap_or_default();
                    // Malformed records are part of the traffic; they
                    // count as read either way.
                    let _ = serde_json::from_slice::<Bare>(payload);
                    consumed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    topic.records as f64 / started.elapsed().as_secs_f64()
}

/// Records/s of `livepipe run --brokers` on the topic with `workers`
/// workers, until `OUT/billing` holds every completion marker of `want`
/// (a file replay's), minus the idle timeout.
pub fn livepipe_replay(topic: &LoadedTopic, workers: u32, want: &BTreeSet<String>) -> f64 {
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = scratch.join(format!("bench-kafka-out-{workers}"));
    let _ = std::fs::remove_dir_all(&out);
    let idle = IDLE_TIMEOUT_MS.to_string();
    let started = Instant::now();
    let job = Livepipe::new()
        .args(["run", "--brokers", &topic.brokers, "--topic", &topic.topic])
        .args([
            "--workers",
            &workers.to_string(),
            "--idle-timeout-ms",
            &idle,
        ])
        .arg("--out")
        .arg(&out)
        .log("warn")
        .start(&scratch.join(format!("bench-kafka-{workers}.log")));
    let billing = out.join("billing");
    let limit = Duration::from_secs(3600);
    while !done_markers(&billing).is_superset(want) {
        assert!(started.elapsed() < limit, "gave up waiting for {want:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = started.elapsed().as_secs_f64() - IDLE_TIMEOUT_MS as f64 / 1000.0;
    job.stop();
    topic.records as f64 / secs
}

/// The completion markers in a billing directory.
pub fn done_markers(billing: &Path) -> BTreeSet<String> {
    std::fs::read_dir(billing)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".done"))
        .collect()
}
