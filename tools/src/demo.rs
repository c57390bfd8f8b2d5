//! The embedded demo: `livepipe run` with no source flags.
//!
//! A thread starts librdkafka's mock cluster (a real Kafka-protocol broker,
//! in-process, listening on a loopback port), creates the topic and feeds
//! it with the generator's traffic through a real producer. The pipeline
//! then reads it through the same Kafka source as production: nothing here
//! is a shortcut around the wire protocol.
//!
//! The traffic starts a few minutes in the past and is sent faster than
//! real time until it reaches the wall clock, then as it happens. So the
//! first billing periods are final seconds after start (their qualify
//! windows are already behind), while the dashboard is live.
//!
//! The mock cluster is not `Send`, so it is created, used and dropped on
//! this one thread. It keeps only about 5 MiB per partition and purges
//! older messages: the backfill rate is bounded so that the consumer keeps
//! up, and the live rate is far below what it can take.

use crate::generator::{GenConfig, Generator};
use crate::publish::{producer_config, publish, Pace, PublishStats};
use livepipe_dataflow::time::wall_clock_ms;
use rdkafka::mocking::MockCluster;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What the demo produces.
#[derive(Clone, Debug)]
pub struct DemoSettings {
    pub topic: String,
    pub partitions: i32,
    /// Records per second of live traffic.
    pub rate: u64,
    /// How much history (ms of event time) to send at start.
    pub backfill_ms: u64,
    /// Records per second while sending the history.
    pub backfill_rate: u64,
    pub seed: u64,
    pub streams: u32,
    /// Bound of the generator's arrival shuffle.
    pub allowed_lateness_ms: u64,
}

impl Default for DemoSettings {
    fn default() -> Self {
        DemoSettings {
            topic: "livestream-events".into(),
            partitions: 4,
            // About four thousand concurrent viewers on 20 streams.
            rate: 1_000,
            // Enough history for the first periods to be final at once
            // with the default rules (60 s period + 5 min window + 5 s).
            backfill_ms: 7 * 60 * 1000,
            // ~4 MB/s over 4 partitions: the consumer keeps well ahead of
            // the mock's 5 MiB per-partition retention.
            backfill_rate: 20_000,
            seed: 1,
            streams: 20,
            allowed_lateness_ms: 5_000,
        }
    }
}

/// A running demo broker and its traffic.
pub struct Demo {
    brokers: String,
    stop: Arc<AtomicBool>,
    stats: Arc<PublishStats>,
    thread: Option<JoinHandle<()>>,
}

impl Demo {
    /// Starts the broker and the traffic; returns once the topic exists.
    pub fn start(settings: DemoSettings) -> Result<Demo, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(PublishStats::default());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let thread = {
            let stop = stop.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("demo-broker".into())
                .spawn(move || run_broker(settings, ready_tx, &stop, stats))
                .map_err(|err| format!("starting the demo broker thread: {err}"))?
        };
        let brokers = ready_rx
            .recv()
            .map_err(|_| "the demo broker thread stopped before it was ready".to_string())??;
        Ok(Demo {
            brokers,
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// `bootstrap.servers` of the embedded broker.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    pub fn stats(&self) -> Arc<PublishStats> {
        self.stats.clone()
    }

    /// Stops the traffic and the broker. Call it after the consumers are
    /// gone: the broker goes away with it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run_broker(
    settings: DemoSettings,
    ready: mpsc::Sender<Result<String, String>>,
    stop: &AtomicBool,
    stats: Arc<PublishStats>,
) {
    let cluster = match MockCluster::new(1) {
        Ok(cluster) => cluster,
        Err(err) => {
            let _ = ready.send(Err(format!("starting the embedded Kafka broker: {err}")));
            return;
        }
    };
    if let Err(err) = cluster.create_topic(&settings.topic, settings.partitions, 1) {
        let _ = ready.send(Err(format!(
            "creating topic `{}` on the embedded broker: {err}",
            settings.topic
        )));
        return;
    }
    let brokers = cluster.bootstrap_servers();
    let _ = ready.send(Ok(brokers.clone()));

    let generator = Generator::new(&GenConfig {
        seed: settings.seed,
        events: u64::MAX,
        start_ts: wall_clock_ms().saturating_sub(settings.backfill_ms),
        rate: settings.rate,
        streams: settings.streams,
        allowed_lateness_ms: settings.allowed_lateness_ms,
        ..GenConfig::default()
    });
    let pace = Pace {
        max_rate: Some(settings.backfill_rate),
        follow_clock: true,
    };
    let config = producer_config(&brokers, &[]);
    if let Err(err) = publish(
        &config,
        &settings.topic,
        generator,
        pace,
        stop,
        stats,
        Duration::from_secs(5),
    ) {
        tracing::error!("demo traffic: {err}");
    }
    // Keep the broker up for the consumers until the job stops.
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The cluster is dropped here, on the thread that made it.
    drop(cluster);
}
