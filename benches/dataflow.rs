//! The two sub-graphs alone (criterion), on records parsed and stamped up
//! front: events/s through the live path and through the billing path, in
//! one timely worker, nothing written anywhere. `cargo bench --bench dataflow`.
//!
//! Before the criterion groups it prints the state each path keeps, measured
//! with a counting allocator: heap bytes per pending impression (billing
//! state while no window has closed) and per present viewer (live state).

mod common;

use criterion::{criterion_group, Criterion, Throughput};
use livepipe_dataflow::billing::billing;
use livepipe_dataflow::config::PipelineConfig;
use livepipe_dataflow::event::{EventKind, Ingested, Position};
use livepipe_dataflow::live::{live, Signal};
use livepipe_dataflow::parse::parse_event;
use livepipe_dataflow::probe::Probes;
use livepipe_dataflow::route::RouteKey;
use livepipe_dataflow::time::{coarse, Time};
use livepipe_tools::generator::{GenConfig, Generator};
use timely::dataflow::operators::vec::input::Handle as InputHandle;
use timely::dataflow::operators::vec::Input as _;
use timely::dataflow::operators::vec::Map as _;
use timely::dataflow::operators::Probe;
use timely::dataflow::ProbeHandle;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

/// Counts live heap bytes, to measure the state the paths keep.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Generated records, parsed and stamped as one file partition would be.
fn ingested(events: u64) -> Vec<(Time, Ingested)> {
    let config = PipelineConfig::default();
    let mut max_ts: Option<u64> = None;
    Generator::new(&GenConfig {
        events,
        malformed_rate: 0.0,
        late_rate: 0.0,
        ..GenConfig::default()
    })
    .enumerate()
    .filter_map(|(line, raw)| {
        let event = parse_event(&raw).ok()?;
        let watermark = max_ts.map_or(0, |m| m.saturating_sub(config.allowed_lateness_ms));
        max_ts = Some(max_ts.map_or(event.ts, |m| m.max(event.ts)));
        let record = Ingested {
            event,
            position: Position {
                partition: 0,
                offset: line as u64 + 1,
            },
            watermark,
            ingested_at_ms: 0,
        };
        Some((coarse(watermark, config.time_granularity_ms()), record))
    })
    .collect()
}

fn is_billing(record: &Ingested) -> bool {
    matches!(
        record.event.kind,
        EventKind::Impression(_) | EventKind::AdProgress(_)
    )
}

/// The live or the billing sub-graph with the default rules, fed by hand: the
/// records, the event clock (live only), and a probe at the end.
fn build_path(
    worker: &mut timely::worker::Worker,
    billing_path: bool,
) -> (
    InputHandle<Time, Ingested>,
    InputHandle<Time, u64>,
    ProbeHandle<Time>,
) {
    let config = PipelineConfig::default();
    let probes = Arc::new(Probes::default());
    worker.dataflow::<Time, _, _>(|scope| {
        let (input, stream) = scope.new_input::<Ingested>();
        let (clock, ticks) = scope.new_input::<u64>();
        let probe = if billing_path {
            billing(stream, &config, RouteKey::new([1, 2]), probes.clone())
                .probe()
                .0
        } else {
            live(
                stream.flat_map(|record| Signal::of(record).ok()),
                ticks,
                &config,
                RouteKey::new([1, 2]),
                probes.clone(),
            )
            .probe()
            .0
        };
        (input, clock, probe)
    })
}

/// Runs `records` through the live or the billing sub-graph to the end.
fn run_path(records: &[(Time, Ingested)], billing_path: bool) {
    let records = records.to_vec();
    timely::execute_directly(move |worker| {
        let (mut input, mut clock, probe) = build_path(worker, billing_path);
        for (time, record) in records {
            if time > *input.time() {
                input.advance_to(time);
                clock.advance_to(time);
                worker.step();
            }
            if !billing_path {
                clock.send(record.event.ts);
            }
            input.send(record);
        }
        drop((input, clock));
        worker.step_while(|| !probe.done());
    });
}

/// Heap bytes per unit of state: `units` entries held by the path.
fn state_bytes(records: &[(Time, Ingested)], billing_path: bool) -> (usize, f64) {
    // Counted from before the copy the dataflow consumes: what the path
    // keeps of it stays counted, the rest is freed as it goes.
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let records = records.to_vec();
    timely::execute_directly(move |worker| {
        let (mut input, mut clock, probe) = build_path(worker, billing_path);
        let mut units = std::collections::BTreeSet::new();
        for (_, record) in records {
            // Everything at one time: no window closes, nothing is retired.
            let unit = match &record.event.kind {
                EventKind::Impression(imp) => imp.impression_id.to_string(),
                EventKind::AdProgress(_) => String::new(),
                _ => format!("{}/{}", record.event.stream_id, record.event.viewer_id),
            };
            if !unit.is_empty() {
                units.insert(unit);
            }
            if !billing_path {
                clock.send(record.event.ts);
            }
            input.send(record);
        }
        let held = units.len();
        drop(units);
        input.advance_to(1);
        clock.advance_to(1);
        worker.step_while(|| probe.less_than(&1));
        let bytes = LIVE_BYTES.load(Ordering::Relaxed) - before;
        (held, bytes as f64 / held.max(1) as f64)
    })
}

fn paths(c: &mut Criterion) {
    let records = ingested(200_000);
    let (billing_records, live_records): (Vec<_>, Vec<_>) =
        records.into_iter().partition(|(_, r)| is_billing(r));

    let mut group = c.benchmark_group("dataflow");
    group.sample_size(10);
    group.throughput(Throughput::Elements(live_records.len() as u64));
    group.bench_function("live_path", |b| b.iter(|| run_path(&live_records, false)));
    group.throughput(Throughput::Elements(billing_records.len() as u64));
    group.bench_function("billing_path", |b| {
        b.iter(|| run_path(&billing_records, true))
    });
    group.finish();
}

fn report_state() {
    let records = ingested(200_000);
    let (billing_records, live_records): (Vec<_>, Vec<_>) =
        records.into_iter().partition(|(_, r)| is_billing(r));
    let impressions: Vec<_> = billing_records
        .iter()
        .filter(|(_, r)| matches!(r.event.kind, EventKind::Impression(_)))
        .cloned()
        .collect();
    // Viewers within the presence TTL of the last record: all still present,
    // none pruned by a tick during the measurement.
    let last = live_records
        .iter()
        .map(|(_, r)| r.event.ts)
        .max()
        .unwrap_or(0);
    let recent: Vec<_> = live_records
        .iter()
        .filter(|(_, r)| r.event.ts + 25_000 >= last)
        .cloned()
        .collect();
    let (pending, per_impression) = state_bytes(&impressions, true);
    let (viewers, per_viewer) = state_bytes(&recent, false);
    println!(
        "\nstate: {per_impression:.0} heap bytes per pending impression ({pending} held by billing), \
         {per_viewer:.0} per present viewer ({viewers} stream/viewer pairs held by live)\n"
    );
}

criterion_group!(benches, paths);

fn main() {
    report_state();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
