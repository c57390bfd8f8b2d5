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

mod common;

use common::live::{percentile, Job, Prober};
use testkit::kafka::mock_cluster;
use testkit::kafka::Traffic;

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

const IDLE_CLIENTS: usize = 500;

fn main() {
    let seconds: u64 = std::env::var("LIVEPIPE_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let cluster = mock_cluster("events", 4);
    let brokers = cluster.bootstrap_servers();
    // Background traffic, as in the demo but without the catch-up.
    let traffic = Traffic::start(&brokers, "events", 1_000);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-latency");
    let job = Job::start(&brokers, "events", &dir, &[]);
    let mut prober = Prober::new(&brokers, "events", &job.base);
    // Let the job reach steady state first.
    let _ = prober.phase(Duration::from_secs(10), || {});
    let length = Duration::from_secs(seconds);
    let alone = prober.phase(length, || {});

    let base = job.base.clone();
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
    let crowded = prober.phase(length, || {});
    drop(idle);
    drop(job);
    drop(traffic);

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
