//! `/metrics`: the job's numbers in OpenMetrics text, Prometheus naming.
//!
//! The numbers themselves live where they are produced, as plain atomics
//! (per-worker event counters, the billing sink's stats, the dataflow's
//! probes, the Kafka source's partition status): the hot path never takes
//! a lock or touches a registry. A `prometheus-client` collector reads them
//! on each scrape and the crate does the encoding.
//!
//! Naming follows Prometheus: base units with the unit as suffix (and an
//! OpenMetrics `# UNIT` line), `_total` on counters, `_timestamp_seconds`
//! on instants. Every metric, with its type, unit, labels and meaning, is
//! listed in docs/operations.md, Metrics; `testdata/known_metrics.txt` is
//! the whole exposition for known values.

use livepipe_dataflow::event::EventKind;
use livepipe_dataflow::probe::Probes;
use livepipe_dataflow::time::wall_clock_ms;
use livepipe_dataflow::turns::Path;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::billing::BillingStats;
use crate::process::ProcessStats;

/// The wire names of event types, in [`EventsIn`] slot order.
pub const EVENT_TYPES: [&str; 6] = [
    "join",
    "leave",
    "heartbeat",
    "chat",
    "impression",
    "ad_progress",
];

/// One worker's counts of valid events by type, on a cache line of its own
/// so that workers never contend.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct WorkerCounts([AtomicU64; 6]);

impl WorkerCounts {
    pub fn count(&self, kind: &EventKind) {
        let slot = match kind {
            EventKind::Join => 0,
            EventKind::Leave => 1,
            EventKind::Heartbeat => 2,
            EventKind::Chat => 3,
            EventKind::Impression(_) => 4,
            EventKind::AdProgress(_) => 5,
        };
        self.0[slot].fetch_add(1, Ordering::Relaxed);
    }
}

/// Valid events in, by type, one [`WorkerCounts`] per worker.
#[derive(Debug)]
pub struct EventsIn(Vec<WorkerCounts>);

impl EventsIn {
    pub fn new(workers: usize) -> Self {
        EventsIn((0..workers).map(|_| WorkerCounts::default()).collect())
    }

    pub fn worker(&self, index: usize) -> &WorkerCounts {
        &self.0[index]
    }

    fn totals(&self) -> [u64; 6] {
        let mut totals = [0; 6];
        for worker in &self.0 {
            for (total, count) in totals.iter_mut().zip(&worker.0) {
                *total += count.load(Ordering::Relaxed);
            }
        }
        totals
    }
}

/// Rejected records by reason code (rare: a lock is fine).
pub type RejectedByReason = Arc<Mutex<BTreeMap<String, u64>>>;

/// What is known about one source partition.
#[derive(Clone, Debug, Default)]
pub struct PartitionRow {
    /// The Kafka topic it belongs to.
    pub topic: Arc<str>,
    pub partition: i32,
    /// The position: the next offset to consume (`None` until known: a
    /// record read, or the ledger's resume offset).
    pub offset: Option<i64>,
    /// The broker's high watermark as last fetched (`None` before the
    /// first answer).
    pub high_watermark: Option<i64>,
    pub idle: bool,
}

impl PartitionRow {
    /// Records on the broker not consumed yet: high watermark minus
    /// position, once both are known. The two are read at different
    /// moments, so a position just past an older high watermark reads 0,
    /// never a negative lag.
    pub fn lag(&self) -> Option<i64> {
        Some((self.high_watermark? - self.offset?).max(0))
    }
}

/// Everything `/metrics` reports, by reference.
#[derive(Clone)]
pub struct JobMetrics {
    pub events_in: Arc<EventsIn>,
    pub rejected: RejectedByReason,
    pub billing: Arc<BillingStats>,
    pub probes: Arc<Probes>,
    /// Per-partition positions (Kafka); empty for files.
    pub partitions: Arc<dyn Fn() -> Vec<PartitionRow> + Send + Sync>,
    /// Open SSE connections.
    pub sse_clients: Arc<AtomicUsize>,
    /// Streams on the live board.
    pub live_streams: Arc<dyn Fn() -> usize + Send + Sync>,
    /// Streams refused at the live path's bound (`LiveBoard::streams_dropped`).
    pub live_streams_dropped: Arc<AtomicU64>,
    /// Why the input cannot be read right now (brokers unreachable), if so.
    pub input_problem: Arc<dyn Fn() -> Option<String> + Send + Sync>,
    /// Input records deleted before they were read, over the ledger's life
    /// (accepted with `--accept-data-loss`; see `gaps`).
    pub lost_records: u64,
    /// The process's CPU, memory and files ([`ProcessStats::current`]).
    pub process: Arc<dyn Fn() -> ProcessStats + Send + Sync>,
}

impl fmt::Debug for JobMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobMetrics").finish_non_exhaustive()
    }
}

/// The version `livepipe_build_info` reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

impl JobMetrics {
    /// The registry of the job's own metrics (prefixed `livepipe_`).
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("livepipe");
        registry.register_collector(Box::new(self.clone()));
        registry
    }

    /// The text exposition of every metric: the job's, then the standard
    /// `process_*` ones (which carry no prefix), then `# EOF`.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode_registry(&mut text, &self.registry())?;
        let mut process = Registry::default();
        process.register_collector(Box::new(ProcessCollector(self.process.clone())));
        prometheus_client::encoding::text::encode_registry(&mut text, &process)?;
        prometheus_client::encoding::text::encode_eof(&mut text)?;
        Ok(text)
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A gauge in seconds: `name` gets the `_seconds` suffix and a `# UNIT`.
fn seconds_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Gauge)?)
}

/// One gauge family with a sample per partition that has a value.
fn partition_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[PartitionRow],
    value: impl Fn(&PartitionRow) -> Option<i64>,
) -> fmt::Result {
    if rows.iter().all(|row| value(row).is_none()) {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for row in rows {
        let Some(value) = value(row) else { continue };
        let labels = [
            ("topic", row.topic.to_string()),
            ("partition", row.partition.to_string()),
        ];
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for JobMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        // The order is the exposition's order: keep it.
        self.encode_build(&mut encoder)?;
        self.encode_events(&mut encoder)?;
        self.encode_billing_counts(&mut encoder)?;
        self.encode_health(&mut encoder)?;
        self.encode_watermark(&mut encoder)?;
        self.encode_partitions(&mut encoder)?;
        self.encode_turns(&mut encoder)?;
        self.encode_live(&mut encoder)
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl JobMetrics {
    /// `livepipe_build_info{version} 1`: which build is running.
    fn encode_build(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let info = Info::new([("version", VERSION)]);
        info.encode(encoder.encode_descriptor(
            "build",
            "The running build: its version.",
            None,
            MetricType::Info,
        )?)
    }

    /// Records in: valid events by type, rejections by reason, and input
    /// lost before it was read.
    fn encode_events(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let totals = self.events_in.totals();
        let mut family = encoder.encode_descriptor(
            "events_in",
            "Valid events read, by type.",
            None,
            MetricType::Counter,
        )?;
        for (name, total) in EVENT_TYPES.iter().zip(totals) {
            ConstCounter::new(total).encode(family.encode_family(&[("type", *name)])?)?;
        }

        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut family = encoder.encode_descriptor(
            "rejected",
            "Records sent to rejected.jsonl, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in &rejected {
            ConstCounter::new(*count).encode(family.encode_family(&[("reason", reason)])?)?;
        }

        counter(
            encoder,
            "input_lost_records",
            "Input records deleted (retention) before they were read, recorded in gaps.jsonl.",
            self.lost_records,
        )
    }

    /// Billing's outcome counters and the impressions not final yet.
    fn encode_billing_counts(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let billing = &self.billing;
        counter(
            encoder,
            "duplicates",
            "Impression records dropped as duplicates of a canonical one.",
            load(&billing.duplicates),
        )?;
        counter(
            encoder,
            "late",
            "Records written to late.jsonl.",
            load(&billing.late),
        )?;
        counter(
            encoder,
            "billed",
            "Impressions billed (final, qualified).",
            load(&billing.billed),
        )?;
        counter(
            encoder,
            "billed_price_micros",
            "Money billed: price_micros of the billed impressions, summed (millionths of \
             the currency unit).",
            load(&billing.billed_micros),
        )?;
        counter(
            encoder,
            "expired",
            "Impressions final without a qualifying watch.",
            load(&billing.expired),
        )?;
        counter(
            encoder,
            "billing_files",
            "Billing period files written.",
            load(&billing.files),
        )?;
        gauge(
            encoder,
            "pending_impressions",
            "Impressions seen but not final yet.",
            self.probes
                .pending_impressions
                .load(Ordering::Relaxed)
                .max(0),
        )
    }

    /// Health: the input unreachable, billing's output stalled and for how long.
    fn encode_health(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        gauge(
            encoder,
            "input_unreachable",
            "1 while the input cannot be read (no Kafka broker up); the job waits and reconnects.",
            i64::from((self.input_problem)().is_some()),
        )?;
        let stall = self.billing.stall();
        gauge(
            encoder,
            "billing_stalled",
            "1 while the billing output refuses writes (billing retries; /healthz says why).",
            i64::from(stall.is_some()),
        )?;
        seconds_gauge(
            encoder,
            "billing_stalled",
            "How long billing has been stalled (0 when it is not).",
            stall.map_or(0.0, |s| {
                wall_clock_ms().saturating_sub(s.since_ms) as f64 / 1000.0
            }),
        )
    }

    /// Billing's event-time watermark and its lag, once there is one.
    fn encode_watermark(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let Some(watermark) = self.billing.watermark() else {
            return Ok(());
        };
        seconds_gauge(
            encoder,
            "watermark_timestamp",
            "Billing's event-time watermark (seconds since the epoch): every impression with \
             ts + window below it is final.",
            watermark as f64 / 1000.0,
        )?;
        seconds_gauge(
            encoder,
            "watermark_lag",
            "Wall clock minus the watermark.",
            (wall_clock_ms() as f64 - watermark as f64) / 1000.0,
        )
    }

    /// Per-partition positions of the source (none for files); a series
    /// is left out until its value is known.
    fn encode_partitions(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let partitions = (self.partitions)();
        if partitions.is_empty() {
            return Ok(());
        }
        partition_gauge(
            encoder,
            "partition_offset",
            "Position per source partition: the next offset to consume.",
            &partitions,
            |row| row.offset,
        )?;
        partition_gauge(
            encoder,
            "partition_high_watermark",
            "The broker's high watermark per partition (the offset after its last record), \
             fetched every second.",
            &partitions,
            |row| row.high_watermark,
        )?;
        partition_gauge(
            encoder,
            "partition_lag",
            "Records not consumed yet per partition: high watermark minus position.",
            &partitions,
            PartitionRow::lag,
        )?;
        partition_gauge(
            encoder,
            "partition_idle",
            "1 when the partition is idle and not holding the watermark back.",
            &partitions,
            |row| Some(row.idle as i64),
        )
    }

    /// How long the operators of each path hold a worker per invocation:
    /// the longest since the start, and all of them as a histogram.
    fn encode_turns(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let turns = &self.probes.turns;
        let mut family = encoder.encode_descriptor(
            "operator_invocation_max",
            "The longest single invocation of an operator of the path since the start (every \
             worker's).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for path in Path::ALL {
            let labels = [("path", path.label())];
            ConstGauge::new(turns.max_seconds(path)).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "operator_invocation",
            "Time one invocation of an operator of the path held its worker (every worker's).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for path in Path::ALL {
            let labels = [("path", path.label())];
            turns
                .histogram(path)
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// The live path: tick counts and times, latency, streams, SSE
    /// connections.
    fn encode_live(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let probes = &self.probes;
        counter(
            encoder,
            "live_ticks",
            "Live ticks computed (per worker, summed).",
            load(&probes.ticks),
        )?;
        probes.tick_duration.encode(encoder.encode_descriptor(
            "tick_duration",
            "Time to compute one live tick (per worker).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        seconds_gauge(
            encoder,
            "live_tick_max",
            "The longest live tick so far.",
            load(&probes.tick_micros_max) as f64 / 1e6,
        )?;
        probes
            .event_to_tick_latency
            .encode(encoder.encode_descriptor(
                "event_to_tick_latency",
                "Per tick that counted new events: the tick's wall clock minus the wall clock at \
             which the newest of them was read from its source.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?)?;
        gauge(
            encoder,
            "live_streams",
            "Streams on the live board.",
            (self.live_streams)() as i64,
        )?;
        counter(
            encoder,
            "live_streams_dropped",
            "Streams refused at the live path's bound (MAX_LIVE_STREAMS held at once).",
            load(&self.live_streams_dropped),
        )?;
        gauge(
            encoder,
            "sse_clients",
            "Open Server-Sent Events connections.",
            self.sse_clients.load(Ordering::Relaxed) as i64,
        )
    }
}

/// The standard `process_*` metrics (no prefix), those that could be read.
#[derive(Clone)]
struct ProcessCollector(Arc<dyn Fn() -> ProcessStats + Send + Sync>);

impl fmt::Debug for ProcessCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessCollector").finish_non_exhaustive()
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = (self.0)();
        if let Some(cpu) = stats.cpu_seconds {
            ConstCounter::new(cpu).encode(encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent.",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?)?;
        }
        let bytes = [
            (
                "process_resident_memory",
                "Resident memory size.",
                stats.resident_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size.",
                stats.virtual_bytes,
            ),
        ];
        for (name, help, value) in bytes {
            if let Some(value) = value {
                ConstGauge::new(value as i64).encode(encoder.encode_descriptor(
                    name,
                    help,
                    Some(&Unit::Bytes),
                    MetricType::Gauge,
                )?)?;
            }
        }
        if let Some(start) = stats.start_time_seconds {
            seconds_gauge(
                &mut encoder,
                "process_start_time",
                "Start time of the process since the epoch.",
                start,
            )?;
        }
        let fds = [
            ("process_open_fds", "Open file descriptors.", stats.open_fds),
            (
                "process_max_fds",
                "The limit on open file descriptors.",
                stats.max_fds,
            ),
        ];
        for (name, help, value) in fds {
            if let Some(value) = value {
                gauge(&mut encoder, name, help, value.min(i64::MAX as u64) as i64)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::Stall;
    use std::sync::atomic::AtomicI64;
    use std::time::Duration;

    /// A `JobMetrics` with small known values in every field. The stall's
    /// `since_ms` is in the future so that its age is 0 whatever the clock.
    fn known() -> JobMetrics {
        let events_in = EventsIn::new(2);
        events_in.worker(0).count(&EventKind::Join);
        events_in.worker(1).count(&EventKind::Join);
        events_in.worker(1).count(&EventKind::Chat);
        events_in.worker(0).count(&EventKind::Heartbeat);
        events_in.worker(0).count(&EventKind::Heartbeat);
        events_in.worker(1).count(&EventKind::Heartbeat);
        let rejected =
            BTreeMap::from([("bad_json".to_string(), 3), ("unknown_type".to_string(), 1)]);
        let billing = BillingStats {
            billed: AtomicU64::new(7),
            billed_micros: AtomicU64::new(3_500_000),
            expired: AtomicU64::new(2),
            late: AtomicU64::new(1),
            duplicates: AtomicU64::new(4),
            files: AtomicU64::new(5),
            frontier_ms: AtomicU64::new(1_000),
            stall: Mutex::new(Some(Stall {
                cause: "disk full".to_string(),
                since_ms: u64::MAX,
            })),
        };
        let probes = Probes {
            pending_impressions: AtomicI64::new(6),
            ticks: AtomicU64::new(8),
            tick_micros_max: AtomicU64::new(250_000),
            ..Probes::default()
        };
        for seconds in [0.0002, 0.003, 0.25] {
            probes.tick_duration.observe(seconds);
        }
        for seconds in [0.2, 1.5] {
            probes.event_to_tick_latency.observe(seconds);
        }
        let turns = &probes.turns;
        turns.record(Path::Source, Duration::from_micros(40));
        turns.record(Path::Live, Duration::from_micros(300));
        turns.record(Path::Live, Duration::from_micros(1_500));
        turns.record(Path::Billing, Duration::from_millis(2));
        JobMetrics {
            events_in: Arc::new(events_in),
            rejected: Arc::new(Mutex::new(rejected)),
            billing: Arc::new(billing),
            probes: Arc::new(probes),
            partitions: Arc::new(|| {
                vec![
                    PartitionRow {
                        topic: "events".into(),
                        partition: 0,
                        offset: Some(42),
                        high_watermark: Some(45),
                        idle: false,
                    },
                    PartitionRow {
                        topic: "events".into(),
                        partition: 1,
                        offset: None,
                        high_watermark: None,
                        idle: true,
                    },
                    PartitionRow {
                        topic: "events".into(),
                        partition: 2,
                        offset: Some(9),
                        high_watermark: Some(7),
                        idle: false,
                    },
                ]
            }),
            sse_clients: Arc::new(AtomicUsize::new(2)),
            live_streams: Arc::new(|| 9),
            live_streams_dropped: Arc::new(AtomicU64::new(1)),
            input_problem: Arc::new(|| Some("no broker".to_string())),
            lost_records: 11,
            process: Arc::new(|| ProcessStats {
                cpu_seconds: Some(1.25),
                resident_bytes: Some(50 << 20),
                virtual_bytes: Some(1 << 30),
                start_time_seconds: Some(1_700_000_000.5),
                open_fds: Some(12),
                max_fds: Some(1024),
            }),
        }
    }

    /// The rendering with the one clock-dependent value (the watermark's
    /// lag behind the wall clock) checked and replaced by `LAG`, and the
    /// version by `VERSION`.
    fn render_masked(metrics: &JobMetrics) -> String {
        let text = metrics.render().unwrap();
        let mut out = String::new();
        for line in text.lines() {
            match line.strip_prefix("livepipe_watermark_lag_seconds ") {
                Some(value) => {
                    let lag: f64 = value.parse().unwrap();
                    assert!(lag > 0.0, "{line}");
                    out.push_str("livepipe_watermark_lag_seconds LAG");
                }
                None => out.push_str(&line.replace(VERSION, "VERSION")),
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn renders_known_values() {
        // The whole exposition, byte for byte: names, help, types, order.
        let expected = include_str!("testdata/known_metrics.txt");
        let got = render_masked(&known());
        // After a deliberate change, `LIVEPIPE_BLESS=1 cargo test -p
        // livepipe-sinks --lib metrics` rewrites the fixture; review its diff.
        if std::env::var_os("LIVEPIPE_BLESS").is_some() {
            std::fs::write(
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/src/testdata/known_metrics.txt"
                ),
                &got,
            )
            .unwrap();
        }
        assert_eq!(got, expected);
        // And it is OpenMetrics to the letter.
        let text = known().render().unwrap();
        if let Err(why) = testkit::exposition::parse(&text) {
            panic!("{why}\n{text}");
        }
    }

    /// Before a watermark, with no partitions (files) and nothing stalled:
    /// those families are left out and the health gauges read 0.
    #[test]
    fn leaves_out_what_is_not_there() {
        let metrics = JobMetrics {
            billing: Arc::new(BillingStats::default()),
            partitions: Arc::new(Vec::new),
            input_problem: Arc::new(|| None),
            process: Arc::new(ProcessStats::default),
            ..known()
        };
        let text = metrics.render().unwrap();
        assert!(!text.contains("livepipe_watermark"), "{text}");
        assert!(!text.contains("livepipe_partition"), "{text}");
        assert!(text.contains("\nlivepipe_input_unreachable 0\n"), "{text}");
        assert!(text.contains("\nlivepipe_billing_stalled 0\n"), "{text}");
        assert!(
            text.contains("\nlivepipe_billing_stalled_seconds 0.0\n"),
            "{text}"
        );
        assert!(text.contains("\nlivepipe_billed_total 0\n"), "{text}");
        assert!(text.ends_with("livepipe_sse_clients 2\n# EOF\n"), "{text}");
        assert!(!text.contains("process_"), "{text}");
    }
}
