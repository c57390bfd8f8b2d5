//! The billing sink alone (criterion): final outcomes committed to the
//! ledger and rendered into period files, as worker 0's sink thread does
//! it, on a real disk (`target/tmp`), fsyncs included. `cargo bench
//! --bench sink`.
//!
//! `LIVEPIPE_BENCH_SINK_DIR=/dev/shm` measures the CPU alone.
//!
//! The shape is a 4-hour replay of a million events: 40,000 outcomes (two
//! thirds billed) over 240 one-minute periods, committed in 48 frontier
//! moves of five periods each, then the end of the input.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use livepipe_dataflow::billing::{AdDetails, BillingEvent, ImpressionFact, Outcome};
use livepipe_dataflow::config::PipelineConfig;
use livepipe_dataflow::event::Position;
use livepipe_sinks::billing::BillingSink;
use livepipe_sinks::side::SideOutputs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

const OUTCOMES: u64 = 40_000;
const PERIODS: u64 = 240;
const PERIODS_PER_COMMIT: u64 = 5;
const START_MS: u64 = 1_700_000_000_000;

/// Outcomes in impression-time order; ids in no order (as hashes spread
/// them), the ad fields as short as a generator's.
fn outcomes() -> Vec<BillingEvent> {
    let config = PipelineConfig::default();
    let span = PERIODS * config.billing_period_ms;
    (0..OUTCOMES)
        .map(|n| {
            let ts = START_MS + n * span / OUTCOMES;
            // A bijection of 0..2^32: distinct ids, scattered.
            let id = (n as u32).wrapping_mul(2_654_435_761);
            BillingEvent::Final(Outcome {
                impression_id: format!("imp-{id:08x}").into(),
                impression: ImpressionFact {
                    ts,
                    event_id: format!("e-{}", n * 25).into(),
                    watermark: ts - 5_000,
                    position: Position {
                        partition: 0,
                        offset: n * 25,
                    },
                    ad: AdDetails {
                        ad_id: format!("ad-{}", n % 50).into(),
                        campaign_id: format!("camp-{}", n % 20).into(),
                        advertiser_id: format!("adv-{}", n % 10).into(),
                        stream_id: format!("stream-{}", n % 20).into(),
                        viewer_id: format!("v-{}", n % 3_000).into(),
                        price_micros: 25_000,
                    }
                    .into(),
                },
                qualified_ts: (n % 3 != 0).then_some(ts + 4_000),
                duplicates: 0,
            })
        })
        .collect()
}

/// Feeds `outcomes` to a fresh sink under `out`, moving the frontier past
/// each group of periods once its outcomes are in, then ends the input.
fn run_sink(out: &Path, outcomes: Vec<BillingEvent>) {
    let config = PipelineConfig::default();
    std::fs::create_dir_all(out).expect("output directory");
    let side = Arc::new(SideOutputs::open(out).expect("side outputs"));
    let mut sink = BillingSink::open(
        out,
        config.clone(),
        vec![Arc::from("bench")],
        side,
        Arc::default(),
    )
    .expect("sink");
    let per_commit = OUTCOMES / (PERIODS / PERIODS_PER_COMMIT);
    let mut outcomes = outcomes.into_iter().peekable();
    while outcomes.peek().is_some() {
        let mut last_ts = 0;
        for event in outcomes.by_ref().take(per_commit as usize) {
            if let BillingEvent::Final(outcome) = &event {
                last_ts = outcome.impression.ts;
            }
            sink.accept(event).expect("accept");
        }
        // The frontier a replay reaches once these impressions are final.
        sink.advance(Some(last_ts + config.qualify_window_ms))
            .expect("commit");
    }
    sink.advance(None).expect("final commit");
}

fn sink(c: &mut Criterion) {
    let outcomes = outcomes();
    // `LIVEPIPE_BENCH_SINK_DIR` measures on another disk (`/dev/shm`: the
    // CPU alone, no fsync). A new directory per run, all removed at the
    // end, none before: ext4 without a journal skips inodes freed in the
    // last minute or more when it allocates one, so files created right
    // after many were deleted cost several times more (see BENCHMARKS.md).
    let base = std::env::var_os("LIVEPIPE_BENCH_SINK_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from);
    let root = base.join(format!("bench-sink-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("bench directory");
    let mut runs = 0u32;
    let mut group = c.benchmark_group("sink");
    group.sample_size(10);
    group.throughput(Throughput::Elements(OUTCOMES));
    group.bench_function("commit_40k_outcomes_240_periods", |b| {
        b.iter_batched(
            || {
                runs += 1;
                (root.join(format!("run-{runs}")), outcomes.clone())
            },
            |(out, outcomes)| run_sink(&out, outcomes),
            BatchSize::PerIteration,
        )
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&root);
}

criterion_group!(benches, sink);
criterion_main!(benches);
