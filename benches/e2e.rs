//! End-to-end harness: `cargo bench --bench e2e`. One run prints every
//! table `BENCHMARKS.md` keeps for issue-level targets:
//!
//! 1. **File replay.** A realistic generated file (`LIVEPIPE_BENCH_EVENTS`,
//!    default 1M records); the parse floor (a bare program parsing every
//!    line into a typed struct on 2 threads); the release binary on the
//!    file with 1 and 2 workers: events/s, ratio to the floor, peak RSS
//!    (`/usr/bin/time`). Best of `LIVEPIPE_BENCH_RUNS` (default 3) runs.
//! 2. **Live and finality.** The mock cluster with ~1,000 records/s of
//!    traffic (`ts` = now) for `LIVEPIPE_BENCH_SECONDS` (default 60): live
//!    latency (a probe join produced -> first SSE board event showing it)
//!    and billing finality (watermark passes a period's end + qualify
//!    window -> the period's `.done` marker), with 10 s periods and a 10 s
//!    window so that several periods finalize in the phase.
//! 3. **Soak.** `livepipe gen --brokers` at 2,000 records/s into the mock
//!    cluster and `livepipe run` with the default rules (plus
//!    `LIVEPIPE_SOAK_ARGS`, e.g. `--state-retention-ms 60000`) for
//!    `LIVEPIPE_SOAK_MINUTES` (default 30; 0 skips): RSS, pending
//!    impressions and present viewers every minute.
//!
//! `LIVEPIPE_E2E_ONLY=file|live|soak` runs one part alone.

mod common;

use livepipe_tools::generator::{write_jsonl, GenConfig};

use common::live::{percentile, FinalityWatch, Job, Prober};
use testkit::kafka::mock_cluster;
use testkit::kafka::Traffic;
use testkit::Livepipe;

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    assert!(common::bare_parse_on_two_threads(&lines) > 0);
    lines.len() as f64 / started.elapsed().as_secs_f64()
}

struct Run {
    events_per_sec: f64,
    peak_rss_mib: Option<f64>,
}

fn run(path: &Path, workers: u32, events: u64) -> Run {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-out-{workers}"));
    let _ = std::fs::remove_dir_all(&out);
    let time = Path::new("/usr/bin/time");
    let mut livepipe = Livepipe::new();
    if time.exists() {
        livepipe = livepipe.under(time, &["-f", "peak_rss_kib=%M"]);
    }
    let livepipe = livepipe
        .args(["run", "--input"])
        .arg(path)
        .arg("--out")
        .arg(&out)
        .args(["--workers", &workers.to_string()])
        .log("warn")
        .within(Duration::from_secs(3600));
    let started = Instant::now();
    let output = livepipe.success();
    let secs = started.elapsed().as_secs_f64();
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

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn file_replay() {
    let events = env_or("LIVEPIPE_BENCH_EVENTS", 1_000_000);
    let runs = env_or("LIVEPIPE_BENCH_RUNS", 3).max(1);
    let path = input(events);
    let floor = (0..runs).map(|_| parse_floor(&path)).fold(0.0, f64::max);
    println!("\n## File replay\n");
    println!("{events} records, parse floor (2 threads, typed serde_json): {floor:.0} lines/s; best of {runs} runs\n");
    println!("| workers | events/s | ratio to floor | peak RSS |");
    println!("|---|---|---|---|");
    for workers in [1, 2] {
        let best = (0..runs)
            .map(|_| run(&path, workers, events))
            .max_by(|a, b| a.events_per_sec.total_cmp(&b.events_per_sec))
            .expect("at least one run");
        let rss = best
            .peak_rss_mib
            .map_or("n/a".to_string(), |m| format!("{m:.0} MiB"));
        println!(
            "| {workers} | {:.0} | {:.2} | {rss} |",
            best.events_per_sec,
            best.events_per_sec / floor
        );
    }
}

/// Period and window of the finality phase: short, so that several periods
/// finalize within it.
const FINALITY_PERIOD_MS: u64 = 10_000;
const FINALITY_WINDOW_MS: u64 = 10_000;
const LATENESS_MS: u64 = 5_000;

fn live_and_finality() {
    let seconds = env_or("LIVEPIPE_BENCH_SECONDS", 60);
    let cluster = mock_cluster("events", 4);
    let brokers = cluster.bootstrap_servers();
    let _traffic = Traffic::start(&brokers, "events", 1_000);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-live");
    let period = FINALITY_PERIOD_MS.to_string();
    let window = FINALITY_WINDOW_MS.to_string();
    let job = Job::start(
        &brokers,
        "events",
        &dir,
        &[
            "--billing-period-ms",
            &period,
            "--qualify-window-ms",
            &window,
        ],
    );
    let mut prober = Prober::new(&brokers, "events", &job.base);
    // Steady state first.
    let _ = prober.phase(Duration::from_secs(10), || {});
    let mut finality = FinalityWatch::new(&job.out, FINALITY_WINDOW_MS, LATENESS_MS);
    let live = prober.phase(Duration::from_secs(seconds), || finality.look());
    drop(job);
    let l = &live.latencies_ms;
    let f = finality.latencies_ms();
    println!("\n## Live latency and billing finality\n");
    println!(
        "{seconds} s, ~1,000 records/s of traffic (ts = now), 2 workers; a probe join every 250 ms; \
         {FINALITY_PERIOD_MS} ms periods, {FINALITY_WINDOW_MS} ms window, {LATENESS_MS} ms lateness\n"
    );
    println!("| measure | samples | p50 ms | p99 ms | max ms | target |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| live: produced -> SSE snapshot | {} | {:.0} | {:.0} | {:.0} | p99 <= 1500 |",
        l.len(),
        percentile(l, 0.5),
        percentile(l, 0.99),
        l.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "| billing: watermark past period end + window -> .done | {} | {:.0} | {:.0} | {:.0} | <= 2000 |",
        f.len(),
        percentile(&f, 0.5),
        percentile(&f, 0.99),
        f.last().copied().unwrap_or(f64::NAN)
    );
}

fn soak() {
    let minutes = env_or("LIVEPIPE_SOAK_MINUTES", 30);
    if minutes == 0 {
        return;
    }
    let cluster = mock_cluster("soak", 4);
    let brokers = cluster.bootstrap_servers();
    let duration = (minutes * 60 + 120).to_string();
    // Killed on drop, after the job.
    let _gen = Livepipe::new()
        .args(["gen", "--brokers", &brokers, "--topic", "soak"])
        .args(["--rate", "2000", "--duration", &duration])
        .log("warn")
        .start(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-soak-gen.log"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-soak");
    let extra = std::env::var("LIVEPIPE_SOAK_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let job = Job::start(&brokers, "soak", &dir, &extra);
    println!("\n## Soak\n");
    println!(
        "`livepipe gen --brokers` at 2,000 records/s into the mock cluster, `livepipe run` with \
         the default rules (5 min window, 10 min state retention) {}, 2 workers, {minutes} min; \
         sampled every minute\n",
        if extra.is_empty() {
            String::new()
        } else {
            format!("and `{}`", extra.join(" "))
        }
    );
    println!("| minute | RSS MiB | pending impressions | present viewers | billed |");
    println!("|---|---|---|---|---|");
    let started = Instant::now();
    let mut rss = Vec::new();
    for minute in 1..=minutes {
        let due = Duration::from_secs(minute * 60);
        std::thread::sleep(due.saturating_sub(started.elapsed()));
        let memory = job.rss_mib().unwrap_or(f64::NAN);
        let pending = job
            .metric("livepipe_pending_impressions")
            .unwrap_or(f64::NAN);
        let billed = job.metric("livepipe_billed_total").unwrap_or(f64::NAN);
        let viewers: u64 = serde_json::from_str::<Vec<serde_json::Value>>(&job.get("/api/live"))
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s["viewers"].as_u64())
            .sum();
        println!("| {minute} | {memory:.0} | {pending:.0} | {viewers} | {billed:.0} |");
        rss.push(memory);
    }
    drop(job);
    if rss.len() >= 5 {
        let at5 = rss[4];
        let last = rss[rss.len() - 1];
        let peak = rss[4..].iter().copied().fold(0.0, f64::max);
        println!(
            "\nRSS minute 5 -> {minutes}: {at5:.0} -> {last:.0} MiB ({:+.1}%), peak after minute 5 {peak:.0} MiB",
            (last / at5 - 1.0) * 100.0
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; parts are chosen by the environment.
    let only = std::env::var("LIVEPIPE_E2E_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only == part;
    if run("file") {
        file_replay();
    }
    if run("live") {
        live_and_finality();
    }
    if run("soak") {
        soak();
    }
}
