//! Kafka consumer throughput: `cargo bench --bench kafka`.
//!
//! Loads generated traffic into a topic, then runs the release binary on it
//! with 1 and 2 workers and reports events/s consumed *and processed*: the
//! time from start until the last billing period is final (the last
//! `.done` marker is written), less the idle timeout that ends a backfill.
//!
//! Brokers: librdkafka's in-process mock cluster (16 partitions, because it
//! keeps only ~5 MiB per partition), and, when `LIVEPIPE_TEST_KAFKA` names
//! one, a separate broker process (4 partitions). `LIVEPIPE_BENCH_EVENTS`
//! sets the size (default 300k).

use livepipe_tools::generator::{GenConfig, Generator};
use livepipe_tools::publish::{ensure_topic, producer_config, publish, Pace, PublishStats};
use testkit::kafka::mock_cluster;
use testkit::Livepipe;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const IDLE_TIMEOUT_MS: u64 = 1_000;

fn load(brokers: &str, topic: &str, events: u64) {
    let records = Generator::new(&GenConfig {
        events,
        ..GenConfig::default()
    });
    let started = Instant::now();
    publish(
        &producer_config(brokers, &[]),
        topic,
        records,
        Pace {
            max_rate: None,
            follow_clock: false,
        },
        &AtomicBool::new(false),
        Arc::new(PublishStats::default()),
        Duration::from_secs(120),
    )
    .expect("loaded");
    eprintln!(
        "loaded {events} records into `{topic}` in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Events/s from start to the last marker.
fn consume(brokers: &str, topic: &str, workers: u32, events: u64) -> f64 {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-kafka-{topic}-{workers}"));
    let _ = std::fs::remove_dir_all(&out);
    let started = SystemTime::now();
    let mut job = Livepipe::new()
        .args(["run", "--brokers", brokers, "--topic", topic])
        .args(["--workers", &workers.to_string()])
        .args(["--idle-timeout-ms", &IDLE_TIMEOUT_MS.to_string()])
        .args(["--http", "127.0.0.1:0"])
        .arg("--out")
        .arg(&out)
        .log("warn")
        .start(&out.with_extension("log"));
    // Done once markers stop appearing for a few seconds.
    let mut last: Option<SystemTime> = None;
    let mut quiet_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let newest = std::fs::read_dir(out.join("billing"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".done"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max();
        if newest != last {
            last = newest;
            quiet_since = Instant::now();
        } else if last.is_some() && quiet_since.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    job.signal("TERM");
    let secs = last.unwrap().duration_since(started).unwrap().as_secs_f64()
        - IDLE_TIMEOUT_MS as f64 / 1000.0;
    events as f64 / secs
}

fn report(broker: &str, brokers: &str, topic: &str, events: u64) {
    for workers in [1, 2] {
        let rate = consume(brokers, topic, workers, events);
        println!("| {broker} | {workers} | {rate:.0} |");
    }
}

fn main() {
    let events: u64 = std::env::var("LIVEPIPE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let mut rows = Vec::new();
    let cluster = mock_cluster("bench", 16);
    let mock = cluster.bootstrap_servers();
    load(&mock, "bench", events);
    rows.push(("mock cluster (in-process)", mock, "bench".to_string()));
    if let Ok(brokers) = std::env::var("LIVEPIPE_TEST_KAFKA") {
        let topic = format!("bench-{}", testkit::now_ms());
        ensure_topic(
            &producer_config(&brokers, &[]),
            &topic,
            4,
            Duration::from_secs(30),
        )
        .expect("topic");
        load(&brokers, &topic, events);
        rows.push(("tansu (separate process)", brokers, topic));
    }
    println!("\n{events} records, `livepipe run --brokers` until the last period is final\n");
    println!("| broker | workers | events/s |");
    println!("|---|---|---|");
    for (name, brokers, topic) in rows {
        report(name, &brokers, &topic, events);
    }
}
