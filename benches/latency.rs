//! Live latency: an event written to the broker -> visible in an SSE
//! snapshot. `cargo bench --bench latency`.
//!
//! librdkafka's mock cluster runs in this process with realistic traffic
//! (the generator at ~1,000 records/s, ts = now); the release binary reads
//! it with 2 workers. Every 250 ms a probe `join` on a stream of its own
//! (`probe-<n>`) is produced; a reader of `/api/board/events` notes when
//! each probe stream first shows up. The run has two phases of
//! `LIVEPIPE_BENCH_SECONDS` each (default 60): alone, then with 500 SSE
//! clients that connect and never read. Prints p50/p99/max latency and the
//! p99 gap between board events (the tick cadence) per phase.

use livepipe_sources::generator::{GenConfig, Generator};
use livepipe_sources::publish::{producer_config, publish, Pace, PublishStats};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PROBE_EVERY: Duration = Duration::from_millis(250);
const IDLE_CLIENTS: usize = 500;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// What the board reader saw: probe stream first seen, or a board event.
enum Seen {
    Probe(String, Instant),
    Board(Instant),
}

fn read_board(base: String, seen: mpsc::Sender<Seen>) {
    let mut stream = TcpStream::connect(&base).expect("connect");
    write!(
        stream,
        "GET /api/board/events HTTP/1.1\r\nHost: {base}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut known = std::collections::HashSet::new();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let at = Instant::now();
        let Ok(board) = serde_json::from_str::<Vec<serde_json::Value>>(data.trim()) else {
            continue;
        };
        if seen.send(Seen::Board(at)).is_err() {
            return;
        }
        for snapshot in board {
            let id = snapshot["stream_id"].as_str().unwrap_or_default();
            if id.starts_with("probe-") && known.insert(id.to_string()) {
                let _ = seen.send(Seen::Probe(id.to_string(), at));
            }
        }
    }
}

struct Phase {
    latencies_ms: Vec<f64>,
    gaps_ms: Vec<f64>,
}

fn phase(
    producer: &ThreadedProducer<DefaultProducerContext>,
    seen: &mpsc::Receiver<Seen>,
    next_probe: &mut u64,
    length: Duration,
) -> Phase {
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut latencies_ms = Vec::new();
    let mut gaps_ms = Vec::new();
    let mut last_board: Option<Instant> = None;
    let started = Instant::now();
    let mut next = Instant::now();
    while started.elapsed() < length {
        if Instant::now() >= next {
            *next_probe += 1;
            let id = format!("probe-{next_probe}");
            let record = format!(
                r#"{{"type":"join","event_id":"{id}","ts":{},"stream_id":"{id}","viewer_id":"probe"}}"#,
                now_ms()
            );
            producer
                .send(
                    BaseRecord::<str, str>::to("events")
                        .key(&id)
                        .payload(&record),
                )
                .map_err(|(err, _)| err)
                .expect("probe sent");
            producer.flush(Duration::from_secs(5)).expect("flushed");
            sent.insert(id, Instant::now());
            next += PROBE_EVERY;
        }
        while let Ok(event) = seen.recv_timeout(Duration::from_millis(10)) {
            match event {
                Seen::Probe(id, at) => {
                    if let Some(when) = sent.remove(&id) {
                        latencies_ms.push(at.duration_since(when).as_secs_f64() * 1e3);
                    }
                }
                Seen::Board(at) => {
                    if let Some(last) = last_board.replace(at) {
                        gaps_ms.push(at.duration_since(last).as_secs_f64() * 1e3);
                    }
                }
            }
        }
    }
    latencies_ms.sort_by(f64::total_cmp);
    gaps_ms.sort_by(f64::total_cmp);
    Phase {
        latencies_ms,
        gaps_ms,
    }
}

fn main() {
    let seconds: u64 = std::env::var("LIVEPIPE_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("events", 4, 1).expect("topic");
    let brokers = cluster.bootstrap_servers();

    // Background traffic, as in the demo but without the catch-up.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let brokers = brokers.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let records = Generator::new(&GenConfig {
                events: u64::MAX,
                start_ts: now_ms(),
                rate: 1_000,
                ..GenConfig::default()
            });
            publish(
                &producer_config(&brokers, &[]),
                "events",
                records,
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

    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-latency");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let log = out.join("job.log");
    let mut job = Command::new(env!("CARGO_BIN_EXE_livepipe"))
        .args(["run", "--brokers", &brokers, "--topic", "events"])
        .args(["--workers", "2", "--http", "127.0.0.1:0", "--out"])
        .arg(out.join("out"))
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .expect("livepipe runs");
    let base = loop {
        std::thread::sleep(Duration::from_millis(100));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(rest) = text.split("serving the dashboard at http://").nth(1) {
            break rest.split('/').next().unwrap().to_string();
        }
    };

    let (seen_tx, seen) = mpsc::channel();
    {
        let base = base.clone();
        std::thread::spawn(move || read_board(base, seen_tx));
    }
    let producer: ThreadedProducer<DefaultProducerContext> = producer_config(&brokers, &[])
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    let mut probe = 0;
    // Let the job reach steady state first.
    let _ = phase(&producer, &seen, &mut probe, Duration::from_secs(10));
    let length = Duration::from_secs(seconds);
    let alone = phase(&producer, &seen, &mut probe, length);

    let idle: Vec<TcpStream> = (0..IDLE_CLIENTS)
        .map(|_| {
            let mut stream = TcpStream::connect(&base).expect("idle client");
            write!(
                stream,
                "GET /api/board/events HTTP/1.1\r\nHost: {base}\r\n\r\n"
            )
            .unwrap();
            stream
        })
        .collect();
    let crowded = phase(&producer, &seen, &mut probe, length);
    drop(idle);

    let _ = Command::new("kill")
        .args(["-TERM", &job.id().to_string()])
        .status();
    let _ = job.wait();
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.join();

    println!("\nlive latency, event produced -> first SSE board event showing it ({seconds} s per phase, a probe every 250 ms, ~1,000 records/s of traffic)\n");
    println!("| phase | probes | p50 ms | p99 ms | max ms | board gap p99 ms |");
    println!("|---|---|---|---|---|---|");
    for (name, phase) in [("alone", &alone), ("500 idle SSE clients", &crowded)] {
        let l = &phase.latencies_ms;
        println!(
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            l.len(),
            percentile(l, 0.5),
            percentile(l, 0.99),
            l.last().copied().unwrap_or(f64::NAN),
            percentile(&phase.gaps_ms, 0.99),
        );
    }
}
