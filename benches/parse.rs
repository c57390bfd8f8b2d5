//! Parser throughput (criterion): the strict parser against a bare typed
//! serde_json parse of the same records, the floor it cannot beat.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livepipe_dataflow::parse::parse_event;
use livepipe_tools::generator::{GenConfig, Generator};
use testkit::floor::Bare;

fn records() -> Vec<Vec<u8>> {
    let config = GenConfig {
        events: 20_000,
        malformed_rate: 0.0,
        ..GenConfig::default()
    };
    Generator::new(&config).collect()
}

fn parse(c: &mut Criterion) {
    let records = records();
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("strict_parse_event", |b| {
        b.iter(|| records.iter().filter(|r| parse_event(r).is_ok()).count())
    });
    group.bench_function("bare_serde_typed_floor", |b| {
        b.iter(|| {
            records
                .iter()
                .filter(|r| serde_json::from_slice::<Bare>(r).is_ok())
                .count()
        })
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
