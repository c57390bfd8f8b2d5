//! `/metrics`: the job's numbers in Prometheus text format.
//!
//! The numbers themselves live where they are produced, as plain atomics
//! (per-worker event counters, the billing sink's stats, the dataflow's
//! probes, the Kafka source's partition status): the hot path never takes
//! a lock or touches a registry. A `prometheus-client` collector reads them
//! on each scrape and the crate does the encoding.

use livepipe_dataflow::event::EventKind;
use livepipe_dataflow::probe::Probes;
use livepipe_dataflow::time::wall_clock_ms;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::billing::BillingStats;

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
    pub partition: i32,
    /// Next offset to read (-1 before the first record).
    pub offset: i64,
    /// Records behind the broker's high watermark (-1 unknown).
    pub lag: i64,
    pub idle: bool,
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
}

impl fmt::Debug for JobMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobMetrics").finish_non_exhaustive()
    }
}

impl JobMetrics {
    /// The registry to encode on each scrape.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("livepipe");
        registry.register_collector(Box::new(self.clone()));
        registry
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry())?;
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

/// One gauge family with a sample per partition.
fn partition_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[PartitionRow],
    value: impl Fn(&PartitionRow) -> i64,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for row in rows {
        let labels = [("partition", row.partition.to_string())];
        ConstGauge::new(value(row)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for JobMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        // The order is the exposition's order: keep it.
        self.encode_events(&mut encoder)?;
        self.encode_billing_counts(&mut encoder)?;
        self.encode_health(&mut encoder)?;
        self.encode_watermark(&mut encoder)?;
        self.encode_partitions(&mut encoder)?;
        self.encode_live(&mut encoder)
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl JobMetrics {
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
        gauge(
            encoder,
            "billing_stalled_seconds",
            "How long billing has been stalled (0 when it is not).",
            stall.map_or(0, |s| {
                (wall_clock_ms().saturating_sub(s.since_ms) / 1000) as i64
            }),
        )
    }

    /// Billing's event-time watermark and its lag, once there is one.
    fn encode_watermark(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let Some(watermark) = self.billing.watermark() else {
            return Ok(());
        };
        gauge(
            encoder,
            "watermark_ms",
            "Billing's event-time watermark (ms since the epoch): every impression with \
             ts + window below it is final.",
            watermark as i64,
        )?;
        gauge(
            encoder,
            "watermark_lag_ms",
            "Wall clock minus the watermark.",
            wall_clock_ms() as i64 - watermark as i64,
        )
    }

    /// Per-partition positions of the source (none for files).
    fn encode_partitions(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let partitions = (self.partitions)();
        if partitions.is_empty() {
            return Ok(());
        }
        partition_gauge(
            encoder,
            "partition_offset",
            "Next offset to read, per source partition.",
            &partitions,
            |row| row.offset,
        )?;
        partition_gauge(
            encoder,
            "partition_lag",
            "Records behind the broker's high watermark, per partition (-1 unknown).",
            &partitions,
            |row| row.lag,
        )?;
        partition_gauge(
            encoder,
            "partition_idle",
            "1 when the partition is idle and not holding the watermark back.",
            &partitions,
            |row| row.idle as i64,
        )
    }

    /// The live path: tick counts and times, streams, SSE connections.
    fn encode_live(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let probes = &self.probes;
        counter(
            encoder,
            "live_ticks",
            "Live ticks computed (per worker, summed).",
            load(&probes.ticks),
        )?;
        let seconds = |micros: u64| micros as f64 / 1e6;
        ConstCounter::new(seconds(load(&probes.tick_micros))).encode(
            encoder.encode_descriptor(
                "live_tick_seconds",
                "Time spent computing live ticks; divide by live_ticks_total for the mean.",
                None,
                MetricType::Counter,
            )?,
        )?;
        ConstGauge::new(seconds(load(&probes.tick_micros_max))).encode(
            encoder.encode_descriptor(
                "live_tick_max_seconds",
                "The longest live tick so far.",
                None,
                MetricType::Gauge,
            )?,
        )?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::Stall;
    use std::sync::atomic::AtomicI64;

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
            tick_micros: AtomicU64::new(1_500_000),
            tick_micros_max: AtomicU64::new(250_000),
            ..Probes::default()
        };
        JobMetrics {
            events_in: Arc::new(events_in),
            rejected: Arc::new(Mutex::new(rejected)),
            billing: Arc::new(billing),
            probes: Arc::new(probes),
            partitions: Arc::new(|| {
                vec![
                    PartitionRow {
                        partition: 0,
                        offset: 42,
                        lag: 3,
                        idle: false,
                    },
                    PartitionRow {
                        partition: 1,
                        offset: -1,
                        lag: -1,
                        idle: true,
                    },
                ]
            }),
            sse_clients: Arc::new(AtomicUsize::new(2)),
            live_streams: Arc::new(|| 9),
            live_streams_dropped: Arc::new(AtomicU64::new(1)),
            input_problem: Arc::new(|| Some("no broker".to_string())),
            lost_records: 11,
        }
    }

    /// The rendering with the one clock-dependent value (the watermark's
    /// lag behind the wall clock) checked and replaced by `LAG`.
    fn render_masked(metrics: &JobMetrics) -> String {
        let text = metrics.render().unwrap();
        let mut out = String::new();
        for line in text.lines() {
            match line.strip_prefix("livepipe_watermark_lag_ms ") {
                Some(value) => {
                    let lag: i64 = value.parse().unwrap();
                    assert!(lag > 0, "{line}");
                    out.push_str("livepipe_watermark_lag_ms LAG");
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn renders_known_values() {
        let expected = r##"# HELP livepipe_events_in Valid events read, by type.
# TYPE livepipe_events_in counter
livepipe_events_in_total{type="join"} 2
livepipe_events_in_total{type="leave"} 0
livepipe_events_in_total{type="heartbeat"} 3
livepipe_events_in_total{type="chat"} 1
livepipe_events_in_total{type="impression"} 0
livepipe_events_in_total{type="ad_progress"} 0
# HELP livepipe_rejected Records sent to rejected.jsonl, by reason.
# TYPE livepipe_rejected counter
livepipe_rejected_total{reason="bad_json"} 3
livepipe_rejected_total{reason="unknown_type"} 1
# HELP livepipe_input_lost_records Input records deleted (retention) before they were read, recorded in gaps.jsonl.
# TYPE livepipe_input_lost_records counter
livepipe_input_lost_records_total 11
# HELP livepipe_duplicates Impression records dropped as duplicates of a canonical one.
# TYPE livepipe_duplicates counter
livepipe_duplicates_total 4
# HELP livepipe_late Records written to late.jsonl.
# TYPE livepipe_late counter
livepipe_late_total 1
# HELP livepipe_billed Impressions billed (final, qualified).
# TYPE livepipe_billed counter
livepipe_billed_total 7
# HELP livepipe_expired Impressions final without a qualifying watch.
# TYPE livepipe_expired counter
livepipe_expired_total 2
# HELP livepipe_billing_files Billing period files written.
# TYPE livepipe_billing_files counter
livepipe_billing_files_total 5
# HELP livepipe_pending_impressions Impressions seen but not final yet.
# TYPE livepipe_pending_impressions gauge
livepipe_pending_impressions 6
# HELP livepipe_input_unreachable 1 while the input cannot be read (no Kafka broker up); the job waits and reconnects.
# TYPE livepipe_input_unreachable gauge
livepipe_input_unreachable 1
# HELP livepipe_billing_stalled 1 while the billing output refuses writes (billing retries; /healthz says why).
# TYPE livepipe_billing_stalled gauge
livepipe_billing_stalled 1
# HELP livepipe_billing_stalled_seconds How long billing has been stalled (0 when it is not).
# TYPE livepipe_billing_stalled_seconds gauge
livepipe_billing_stalled_seconds 0
# HELP livepipe_watermark_ms Billing's event-time watermark (ms since the epoch): every impression with ts + window below it is final.
# TYPE livepipe_watermark_ms gauge
livepipe_watermark_ms 1000
# HELP livepipe_watermark_lag_ms Wall clock minus the watermark.
# TYPE livepipe_watermark_lag_ms gauge
livepipe_watermark_lag_ms LAG
# HELP livepipe_partition_offset Next offset to read, per source partition.
# TYPE livepipe_partition_offset gauge
livepipe_partition_offset{partition="0"} 42
livepipe_partition_offset{partition="1"} -1
# HELP livepipe_partition_lag Records behind the broker's high watermark, per partition (-1 unknown).
# TYPE livepipe_partition_lag gauge
livepipe_partition_lag{partition="0"} 3
livepipe_partition_lag{partition="1"} -1
# HELP livepipe_partition_idle 1 when the partition is idle and not holding the watermark back.
# TYPE livepipe_partition_idle gauge
livepipe_partition_idle{partition="0"} 0
livepipe_partition_idle{partition="1"} 1
# HELP livepipe_live_ticks Live ticks computed (per worker, summed).
# TYPE livepipe_live_ticks counter
livepipe_live_ticks_total 8
# HELP livepipe_live_tick_seconds Time spent computing live ticks; divide by live_ticks_total for the mean.
# TYPE livepipe_live_tick_seconds counter
livepipe_live_tick_seconds_total 1.5
# HELP livepipe_live_tick_max_seconds The longest live tick so far.
# TYPE livepipe_live_tick_max_seconds gauge
livepipe_live_tick_max_seconds 0.25
# HELP livepipe_live_streams Streams on the live board.
# TYPE livepipe_live_streams gauge
livepipe_live_streams 9
# HELP livepipe_live_streams_dropped Streams refused at the live path's bound (MAX_LIVE_STREAMS held at once).
# TYPE livepipe_live_streams_dropped counter
livepipe_live_streams_dropped_total 1
# HELP livepipe_sse_clients Open Server-Sent Events connections.
# TYPE livepipe_sse_clients gauge
livepipe_sse_clients 2
# EOF
"##;
        assert_eq!(render_masked(&known()), expected);
    }

    /// Before a watermark, with no partitions (files) and nothing stalled:
    /// those families are left out and the health gauges read 0.
    #[test]
    fn leaves_out_what_is_not_there() {
        let metrics = JobMetrics {
            billing: Arc::new(BillingStats::default()),
            partitions: Arc::new(Vec::new),
            input_problem: Arc::new(|| None),
            ..known()
        };
        let text = metrics.render().unwrap();
        assert!(!text.contains("livepipe_watermark"), "{text}");
        assert!(!text.contains("livepipe_partition"), "{text}");
        assert!(text.contains("\nlivepipe_input_unreachable 0\n"), "{text}");
        assert!(text.contains("\nlivepipe_billing_stalled 0\n"), "{text}");
        assert!(
            text.contains("\nlivepipe_billing_stalled_seconds 0\n"),
            "{text}"
        );
        assert!(text.contains("\nlivepipe_billed_total 0\n"), "{text}");
        assert!(text.ends_with("livepipe_sse_clients 2\n# EOF\n"), "{text}");
    }
}
