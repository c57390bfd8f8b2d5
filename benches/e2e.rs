//! End-to-end harness: `cargo bench --bench e2e`. One run prints every
//! table `BENCHMARKS.md` keeps for issue-level targets:
//!
//! 1. **File replay.** Realistic generated files (`LIVEPIPE_BENCH_EVENTS`,
//!    default 1M records) at two rates of event time: dense (2,000
//!    records/s, ~8 minutes) and sparse (70 records/s, ~4 hours: 30 times
//!    the timestamps and billing periods per record); the parse floor (a
//!    bare program parsing every line into a typed struct on 2 threads);
//!    the release binary on each file with 1 and 2 workers, each run into
//!    a new output directory: events/s, ratio to the floor, peak RSS
//!    (`/usr/bin/time`). Medians of `LIVEPIPE_BENCH_RUNS` (default 3) runs.
//! 2. **Kafka replay.** The same records in a 4-partition topic (the
//!    separate broker if `LIVEPIPE_TEST_KAFKA` is set, else the mock
//!    cluster): the bare consume floor (an rdkafka consumer per worker,
//!    reading and parsing every record, nothing else) and `livepipe run
//!    --brokers` with 1 and 2 workers to its last final billing file (the
//!    file replay's), as a ratio of that floor.
//! 3. **Cost growth.** File replay (2 workers) of 1M, 5M and 10M generated
//!    records at the generator's dense default rate (2,000 records/s of
//!    event time; `LIVEPIPE_BENCH_GROWTH` lists other sizes): events/s and
//!    peak RSS each, one run each.
//! 4. **Live and finality.** The mock cluster with ~1,000 records/s of
//!    traffic (`ts` = now) for `LIVEPIPE_BENCH_SECONDS` (default 60): live
//!    latency (a probe join produced -> first SSE board event showing it)
//!    and billing finality (watermark passes a period's end + qualify
//!    window -> the period's `.done` marker), with 10 s periods and a 10 s
//!    window so that several periods finalize in the phase.
//! 5. **Soak.** `livepipe gen --brokers` at 2,000 records/s into the mock
//!    cluster and `livepipe run` with the default rules (plus
//!    `LIVEPIPE_SOAK_ARGS`, e.g. `--state-retention-ms 60000`) for
//!    `LIVEPIPE_SOAK_MINUTES` (default 30; 0 skips): RSS, pending
//!    impressions and present viewers every minute.
//!
//! 6. **Spikes.** The mock cluster with generated traffic at
//!    `LIVEPIPE_SPIKE_RATE` records/s (default 1,000; `ts` = now), then for
//!    `LIVEPIPE_SPIKE_SECONDS` (default 60) each: an ad spike (impressions
//!    and `ad_progress` at `LIVEPIPE_SPIKE_MULTIPLIER`, default 10, times
//!    their usual rate) and a chat and join storm (the same for chat and
//!    joins), with a phase as long before, between and after. Per phase:
//!    live latency and billing finality as in part 4, the longest operator
//!    invocation per path in the phase (from the histogram), pending
//!    impressions. Only with
//!    `LIVEPIPE_E2E_ONLY=spikes` (it takes 5 phases and a warm-up).
//!
//! `LIVEPIPE_E2E_ONLY=file|kafka|growth|live|soak|spikes` runs one part
//! alone.

mod common;

use livepipe_tools::generator::{write_jsonl, GenConfig};

use common::kafka_replay::{consume_floor, done_markers, livepipe_replay, LoadedTopic};
use common::live::{percentile, FinalityWatch, Job, Prober};
use common::spikes::{phases, print_table, windows, Invocations, Row};
use livepipe_tools::generator::spike::SpikeKind;
use testkit::kafka::mock_cluster;
use testkit::kafka::Traffic;
use testkit::Livepipe;

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The generator's dense default rate of event time: 1M records span ~8
/// minutes.
const DENSE_RATE: u64 = 2_000;
/// A sparse rate: 1M records span about four hours, so timestamps, billing
/// periods and their files are 30 times as many per record.
const SPARSE_RATE: u64 = 70;

fn input(events: u64) -> PathBuf {
    input_at(events, DENSE_RATE)
}

fn input_at(events: u64, rate: u64) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let path = match rate {
        DENSE_RATE => dir.join(format!("e2e-{events}.jsonl")),
        _ => dir.join(format!("e2e-{events}-at-{rate}.jsonl")),
    };
    if !path.exists() {
        let config = GenConfig {
            events,
            rate,
            ..GenConfig::default()
        };
        let file = std::fs::File::create(&path).unwrap();
        write_jsonl(&config, BufWriter::with_capacity(1 << 20, file)).unwrap();
    }
    path
}

/// Lines per second of the bare typed parse on 2 threads, file read
/// included (`testkit::floor`; `examples/parse_floor.rs` runs it alone).
fn parse_floor(path: &Path) -> f64 {
    let started = Instant::now();
    let bytes = std::fs::read(path).unwrap();
    let lines = testkit::floor::bare_parse_file(&bytes, 2);
    assert!(lines > 0);
    lines as f64 / started.elapsed().as_secs_f64()
}

struct Run {
    events_per_sec: f64,
    peak_rss_mib: Option<f64>,
    /// Where it wrote its outputs.
    out: PathBuf,
}

/// A new output directory for every run, all removed when the harness
/// ends ([`remove_run_outputs`]). Deleting a run's outputs right before the
/// next run slowed that run: ext4 without a journal skips inodes deleted in
/// the last minute or more when it allocates new ones, and a run over the
/// sparse file creates 480 files (~12% of its time, see BENCHMARKS.md).
fn new_run_output(workers: u32) -> PathBuf {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{RUN_OUTPUT_PREFIX}{}-{n}-w{workers}",
        std::process::id()
    ))
}

const RUN_OUTPUT_PREFIX: &str = "bench-out-";

/// Removes the run outputs of this harness, and any an interrupted earlier
/// one left behind.
fn remove_run_outputs() {
    let Ok(entries) = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(RUN_OUTPUT_PREFIX)
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn run(path: &Path, workers: u32, events: u64) -> Run {
    let out = new_run_output(workers);
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
        out,
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
    println!("\n## File replay\n");
    for rate in [DENSE_RATE, SPARSE_RATE] {
        replay_file(events, rate, runs);
    }
}

fn replay_file(events: u64, rate: u64, runs: u64) {
    let path = input_at(events, rate);
    let floor = median((0..runs).map(|_| parse_floor(&path)));
    println!("{events} records at {rate} records/s of event time, parse floor (2 threads, typed serde_json): {floor:.0} lines/s; medians of {runs} runs\n");
    println!("| workers | events/s | ratio to floor | peak RSS |");
    println!("|---|---|---|---|");
    for workers in [1, 2] {
        let mut results: Vec<Run> = (0..runs).map(|_| run(&path, workers, events)).collect();
        results.sort_by(|a, b| a.events_per_sec.total_cmp(&b.events_per_sec));
        let median_run = results.swap_remove(results.len() / 2);
        let rss = median_run
            .peak_rss_mib
            .map_or("n/a".to_string(), |m| format!("{m:.0} MiB"));
        println!(
            "| {workers} | {:.0} | {:.2} | {rss} |",
            median_run.events_per_sec,
            median_run.events_per_sec / floor
        );
    }
    println!();
}

fn kafka_replay() {
    let events = env_or("LIVEPIPE_BENCH_EVENTS", 1_000_000);
    let runs = env_or("LIVEPIPE_BENCH_RUNS", 3).max(1);
    let path = input(events);
    // The billing files a Kafka run must reach: a file replay's.
    let reference = run(&path, 2, events);
    let want = done_markers(&reference.out.join("billing"));
    let records: Vec<Vec<u8>> = std::fs::read(&path)
        .unwrap()
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let topic = LoadedTopic::load(&records);
    drop(records);
    println!("\n## Kafka replay\n");
    println!(
        "{} records in {} partitions of {}; medians of {runs} runs\n",
        topic.records,
        common::kafka_replay::PARTITIONS,
        topic.where_()
    );
    println!("| workers | consume floor records/s | livepipe records/s | ratio |");
    println!("|---|---|---|---|");
    for workers in [1, 2] {
        let floor = median((0..runs).map(|_| consume_floor(&topic, workers)));
        let livepipe = median((0..runs).map(|_| livepipe_replay(&topic, workers, &want)));
        println!(
            "| {workers} | {floor:.0} | {livepipe:.0} | {:.2} |",
            livepipe / floor
        );
    }
}

fn growth() {
    let sizes = std::env::var("LIVEPIPE_BENCH_GROWTH")
        .unwrap_or_else(|_| "1000000,5000000,10000000".to_string());
    let runs = env_or("LIVEPIPE_BENCH_RUNS", 3).max(1);
    println!("\n## Cost growth (file replay, 2 workers, 2,000 records/s of event time)\n");
    println!("Medians of {runs} runs; the floor is measured on the same file in the same run.\n");
    println!("| records | parse floor lines/s | events/s | ratio to floor | peak RSS |");
    println!("|---|---|---|---|---|");
    for events in sizes
        .split(',')
        .filter_map(|n| n.trim().parse::<u64>().ok())
    {
        let path = input(events);
        let floor = median((0..runs).map(|_| parse_floor(&path)));
        let mut results: Vec<Run> = (0..runs).map(|_| run(&path, 2, events)).collect();
        results.sort_by(|a, b| a.events_per_sec.total_cmp(&b.events_per_sec));
        let result = results.swap_remove(results.len() / 2);
        let rss = result
            .peak_rss_mib
            .map_or("n/a".to_string(), |m| format!("{m:.0} MiB"));
        println!(
            "| {events} | {floor:.0} | {:.0} | {:.2} | {rss} |",
            result.events_per_sec,
            result.events_per_sec / floor
        );
    }
}

/// The job the live and spike parts measure: short billing periods and
/// window, so that several periods finalize within a phase.
fn finality_job(brokers: &str, dir: &Path) -> Job {
    let period = FINALITY_PERIOD_MS.to_string();
    let window = FINALITY_WINDOW_MS.to_string();
    let flags = [
        "--billing-period-ms",
        &period,
        "--qualify-window-ms",
        &window,
    ];
    Job::start(brokers, "events", dir, &flags)
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
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
    let job = finality_job(&brokers, &dir);
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

/// Part 6; see the module docs. The phases follow the spike windows laid
/// out in event time (the wall clock) when the traffic starts.
fn spikes() {
    let rate = env_or("LIVEPIPE_SPIKE_RATE", 1_000);
    let length = Duration::from_secs(env_or("LIVEPIPE_SPIKE_SECONDS", 60));
    let multiplier = env_or("LIVEPIPE_SPIKE_MULTIPLIER", 10) as u32;
    let warm_up = Duration::from_secs(15);
    let phases = phases(&[SpikeKind::Ads, SpikeKind::ChatJoin]);
    let first_phase_ms = testkit::now_ms() + warm_up.as_millis() as u64;
    let spikes = windows(&phases, first_phase_ms, length, multiplier);
    let cluster = mock_cluster("events", 4);
    let brokers = cluster.bootstrap_servers();
    let _traffic = testkit::kafka::Traffic::with_spikes(&brokers, "events", rate, spikes);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-spikes");
    let job = finality_job(&brokers, &dir);
    let mut prober = Prober::new(&brokers, "events", &job.base);
    let until_first = first_phase_ms.saturating_sub(testkit::now_ms());
    let _ = prober.phase(Duration::from_millis(until_first), || {});
    let mut finality = FinalityWatch::new(&job.out, FINALITY_WINDOW_MS, LATENESS_MS);
    let rows: Vec<Row> = phases
        .iter()
        .map(|(name, _)| {
            let start = Invocations::read(&job);
            let live = prober.phase(length, || finality.look());
            Row::measure(name, live, &mut finality, &job, &start)
        })
        .collect();
    drop(job);
    println!("\n## Spikes\n");
    println!(
        "{rate} records/s of steady traffic (ts = now) into the mock cluster, 2 workers; \
         phases of {} s; spikes at {multiplier}x the usual rate of their kinds; a probe join \
         every 250 ms; {FINALITY_PERIOD_MS} ms periods, {FINALITY_WINDOW_MS} ms window, \
         {LATENESS_MS} ms lateness (a period's marker is counted in the phase it appears in, \
         about window + lateness after the period ends)\n",
        length.as_secs()
    );
    print_table(&rows);
}

fn main() {
    // `cargo bench` passes `--bench`; parts are chosen by the environment.
    let only = std::env::var("LIVEPIPE_E2E_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only == part;
    if run("file") {
        file_replay();
    }
    if run("kafka") {
        kafka_replay();
    }
    if run("growth") {
        growth();
    }
    if run("live") {
        live_and_finality();
    }
    if run("soak") {
        soak();
    }
    // Long, and only meaningful on a quiet machine: never part of a full run.
    if only == "spikes" {
        spikes();
    }
    remove_run_outputs();
}
