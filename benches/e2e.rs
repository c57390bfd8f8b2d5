//! End-to-end throughput harness: `cargo bench --bench e2e`.
//!
//! Generates a realistic file (`LIVEPIPE_BENCH_EVENTS`, default 1M records),
//! measures the parse floor (a bare program parsing every line into a typed
//! struct on 2 threads), then runs the release binary on the file with 1 and
//! 2 workers and prints a Markdown table: events/s, ratio to the floor and
//! peak RSS (through `/usr/bin/time` when the machine has it).

mod common;

use common::Bare;

use livepipe_sources::generator::{write_jsonl, GenConfig};

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn input(events: u64) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("e2e-{events}.jsonl"));
    if !path.exists() {
        let config = GenConfig {
            events,
            ..GenConfig::default()
        };
        let file = std::fs::File::create(&path).unwrap();
        write_jsonl(&config, BufWriter::with_capacity(1 << 20, file)).unwrap();
    }
    path
}

/// Lines per second of the bare typed parse on 2 threads, file read included.
fn parse_floor(path: &Path) -> f64 {
    let started = Instant::now();
    let bytes = std::fs::read(path).unwrap();
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let half = lines.len() / 2;
    let (a, b) = lines.split_at(half);
    let parsed: usize = std::thread::scope(|s| {
        let parse = |part: &[&[u8]]| {
            part.iter()
                .filter(|l| serde_json::from_slice::<Bare>(l).is_ok())
                .count()
        };
        let left = s.spawn(move || parse(a));
        let right = parse(b);
        left.join().unwrap() + right
    });
    assert!(parsed > 0);
    lines.len() as f64 / started.elapsed().as_secs_f64()
}

struct Run {
    events_per_sec: f64,
    peak_rss_mib: Option<f64>,
}

fn run(path: &Path, workers: u32, events: u64) -> Run {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-out-{workers}"));
    let _ = std::fs::remove_dir_all(&out);
    let binary = env!("CARGO_BIN_EXE_livepipe");
    let time = Path::new("/usr/bin/time");
    let mut command = if time.exists() {
        let mut c = Command::new(time);
        c.args(["-f", "peak_rss_kib=%M", binary]);
        c
    } else {
        Command::new(binary)
    };
    command
        .args(["run", "--input"])
        .arg(path)
        .arg("--out")
        .arg(&out)
        .args(["--workers", &workers.to_string()])
        .env("RUST_LOG", "warn");
    let started = Instant::now();
    let output = command.output().expect("livepipe runs");
    let secs = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let peak_rss_mib = stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_kib="))
        .and_then(|kib| kib.trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0);
    Run {
        events_per_sec: events as f64 / secs,
        peak_rss_mib,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter here.
    let events: u64 = std::env::var("LIVEPIPE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let path = input(events);
    let floor = parse_floor(&path);
    println!("\n{events} records, parse floor (2 threads, typed serde_json): {floor:.0} lines/s\n");
    println!("| workers | events/s | ratio to floor | peak RSS |");
    println!("|---|---|---|---|");
    for workers in [1, 2] {
        let r = run(&path, workers, events);
        let rss = r
            .peak_rss_mib
            .map_or("n/a".to_string(), |m| format!("{m:.0} MiB"));
        println!(
            "| {workers} | {:.0} | {:.2} | {rss} |",
            r.events_per_sec,
            r.events_per_sec / floor
        );
    }
}
