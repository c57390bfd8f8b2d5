//! `/metrics` of a running Kafka job, read with the strict OpenMetrics
//! parser (`testkit::exposition`): every family's name, type and unit
//! follow Prometheus conventions, and the partitions' lag is the broker's
//! high watermark minus the position, checked against known backlogs.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;
use testkit::exposition::{parse, Exposition, Kind};
use testkit::http::get;
use testkit::kafka::generated_traffic;
use testkit::{now_ms, topic_args, wait_for, Job};

use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn scrape(addr: &str) -> Exposition {
    let response = get(addr, "/metrics");
    assert_eq!(response.status, 200);
    parse(&response.body).unwrap_or_else(|why| panic!("{why}\n{}", response.body))
}

fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer")
}

/// Sends `records` to partition 0 of `events` and waits for delivery.
fn send_all(producer: &ThreadedProducer<DefaultProducerContext>, records: &[Vec<u8>]) {
    for record in records {
        producer
            .send(
                BaseRecord::<(), [u8]>::to("events")
                    .partition(0)
                    .payload(record),
            )
            .map_err(|(err, _)| err)
            .expect("sent");
    }
    producer.flush(Duration::from_secs(30)).expect("flushed");
}

fn joins(from: usize, n: usize) -> Vec<Vec<u8>> {
    let ts = now_ms();
    (from..from + n)
        .map(|i| {
            format!(
                r#"{{"type":"join","event_id":"j{i}","ts":{ts},"stream_id":"s","viewer_id":"v{i}"}}"#
            )
            .into_bytes()
        })
        .collect()
}

/// The families every Kafka run serves, with their type and unit.
const FAMILIES: &[(&str, Kind, Option<&str>)] = &[
    ("livepipe_build", Kind::Info, None),
    ("livepipe_events_in", Kind::Counter, None),
    ("livepipe_rejected", Kind::Counter, None),
    ("livepipe_input_lost_records", Kind::Counter, None),
    ("livepipe_duplicates", Kind::Counter, None),
    ("livepipe_late", Kind::Counter, None),
    ("livepipe_billed", Kind::Counter, None),
    ("livepipe_billed_price_micros", Kind::Counter, None),
    ("livepipe_expired", Kind::Counter, None),
    ("livepipe_billing_files", Kind::Counter, None),
    ("livepipe_pending_impressions", Kind::Gauge, None),
    ("livepipe_input_unreachable", Kind::Gauge, None),
    ("livepipe_billing_stalled", Kind::Gauge, None),
    (
        "livepipe_billing_stalled_seconds",
        Kind::Gauge,
        Some("seconds"),
    ),
    (
        "livepipe_watermark_timestamp_seconds",
        Kind::Gauge,
        Some("seconds"),
    ),
    (
        "livepipe_watermark_lag_seconds",
        Kind::Gauge,
        Some("seconds"),
    ),
    ("livepipe_partition_offset", Kind::Gauge, None),
    ("livepipe_partition_high_watermark", Kind::Gauge, None),
    ("livepipe_partition_lag", Kind::Gauge, None),
    ("livepipe_partition_idle", Kind::Gauge, None),
    ("livepipe_live_ticks", Kind::Counter, None),
    (
        "livepipe_tick_duration_seconds",
        Kind::Histogram,
        Some("seconds"),
    ),
    (
        "livepipe_live_tick_max_seconds",
        Kind::Gauge,
        Some("seconds"),
    ),
    (
        "livepipe_event_to_tick_latency_seconds",
        Kind::Histogram,
        Some("seconds"),
    ),
    ("livepipe_live_streams", Kind::Gauge, None),
    ("livepipe_live_streams_dropped", Kind::Counter, None),
    ("livepipe_sse_clients", Kind::Gauge, None),
    ("process_cpu_seconds", Kind::Counter, Some("seconds")),
    ("process_resident_memory_bytes", Kind::Gauge, Some("bytes")),
    ("process_start_time_seconds", Kind::Gauge, Some("seconds")),
    ("process_open_fds", Kind::Gauge, None),
];

/// Prometheus naming beyond the grammar: base units only, a unit suffix
/// declared as the unit, instants as `_timestamp_seconds`.
fn check_conventions(exposition: &Exposition) {
    for (name, family) in &exposition.families {
        for banned in ["_ms", "_millis", "_micros_", "_milliseconds", "_minutes"] {
            assert!(
                !name.ends_with(banned) && !name.contains(&format!("{banned}_")),
                "{name}: not a base unit"
            );
        }
        for unit in ["seconds", "bytes"] {
            if name.ends_with(&format!("_{unit}")) {
                assert_eq!(family.unit.as_deref(), Some(unit), "{name}: no # UNIT");
            }
        }
        assert!(family.help.is_some(), "{name}: no # HELP");
        assert!(!name.contains("timestamp") || name.ends_with("_timestamp_seconds"));
    }
}

#[test]
fn metrics_parse_strictly_with_prometheus_names_types_and_units() {
    let records = generated_traffic(3_000, 7);
    let cluster = testkit::kafka::loaded_mock_topic(&records, 2);
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = topic_args(&brokers, "events", &out);
    args.extend(["--workers", "2", "--idle-timeout-ms", "1000"]);
    let mut job = Job::start(&args, &dir.path().join("job.log"));
    let addr = job.addr();

    let mut exposition = Exposition::default();
    wait_for(&mut job, LIMIT, "every family, the topic read", || {
        exposition = scrape(&addr);
        let read: f64 = ["0", "1"]
            .iter()
            .filter_map(|p| exposition.value("livepipe_partition_offset", &[("partition", p)]))
            .sum();
        let latency = exposition.value("livepipe_event_to_tick_latency_seconds_count", &[]);
        FAMILIES
            .iter()
            .all(|(name, ..)| exposition.families.contains_key(*name))
            && read == records.len() as f64
            && latency.is_some_and(|n| n > 0.0)
    });
    for (name, kind, unit) in FAMILIES {
        let family = exposition.family(name);
        assert_eq!(family.kind, *kind, "{name}");
        assert_eq!(family.unit.as_deref(), *unit, "{name}");
    }
    check_conventions(&exposition);
    let build = &exposition.family("livepipe_build").samples[0];
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        exposition
            .value("process_resident_memory_bytes", &[])
            .unwrap()
            > 0.0
    );
    // Caught up: each partition's lag is its high watermark minus its
    // position, which is 0, and the high watermarks add up to the records.
    let mut high = 0.0;
    for partition in ["0", "1"] {
        let labels = [("topic", "events"), ("partition", partition)];
        let offset = exposition
            .value("livepipe_partition_offset", &labels)
            .unwrap();
        let hw = exposition
            .value("livepipe_partition_high_watermark", &labels)
            .unwrap();
        let lag = exposition.value("livepipe_partition_lag", &labels).unwrap();
        assert_eq!((lag, hw - offset), (0.0, 0.0), "partition {partition}");
        high += hw;
    }
    assert_eq!(high, records.len() as f64);
    job.stop();
}

/// `(offset, high watermark, lag)` of partition 0, once all three are there.
fn partition_0(addr: &str) -> Option<(f64, f64, f64)> {
    let exposition = scrape(addr);
    let labels = [("topic", "events"), ("partition", "0")];
    Some((
        exposition.value("livepipe_partition_offset", &labels)?,
        exposition.value("livepipe_partition_high_watermark", &labels)?,
        exposition.value("livepipe_partition_lag", &labels)?,
    ))
}

#[test]
fn partition_lag_is_the_backlog_on_the_broker() {
    const FIRST: usize = 200;
    const MORE: usize = 150;
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("events", 1, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();
    let producer = producer(&brokers);
    send_all(&producer, &joins(0, FIRST));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut job = Job::start(
        &topic_args(&brokers, "events", &out),
        &dir.path().join("job.log"),
    );
    let addr = job.addr();
    let first = FIRST as f64;
    wait_for(&mut job, LIMIT, "the first records read", || {
        partition_0(&addr) == Some((first, first, 0.0))
    });

    // The broker answers every fetch with an error from now on (about two
    // minutes of retries), but still answers the high-watermark queries:
    // what is published now stays on the broker, a known backlog.
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 250],
    );
    std::thread::sleep(Duration::from_secs(1));
    send_all(&producer, &joins(FIRST, MORE));
    let high = (FIRST + MORE) as f64;
    let mut seen = None;
    wait_for(&mut job, LIMIT, "the new high watermark", || {
        seen = partition_0(&addr);
        seen.is_some_and(|(_, hw, _)| hw == high)
    });
    let (offset, hw, lag) = seen.unwrap();
    assert_eq!(lag, hw - offset, "lag = high watermark - position");
    assert_eq!((offset, lag), (first, MORE as f64), "the backlog: {seen:?}");

    // Fetches work again: the backlog is read and the lag goes to 0.
    cluster.clear_request_errors(RDKafkaApiKey::Fetch);
    wait_for(&mut job, LIMIT, "the backlog read", || {
        partition_0(&addr) == Some((high, high, 0.0))
    });
    job.stop();
}
