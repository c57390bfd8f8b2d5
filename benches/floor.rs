//! The parse floor (criterion): a bare program parsing every record into a
//! typed struct on 2 threads, nothing else. No pipeline can read records
//! faster; `cargo bench --bench e2e` reports its throughput as a ratio of
//! this.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use testkit::tools::generator::{GenConfig, Generator};

fn floor(c: &mut Criterion) {
    let records: Vec<Vec<u8>> = Generator::new(&GenConfig {
        events: 200_000,
        ..GenConfig::default()
    })
    .collect();
    let lines: Vec<&[u8]> = records.iter().map(|r| &r[..]).collect();
    let mut group = c.benchmark_group("floor");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function("bare_typed_parse_2_threads", |b| {
        b.iter(|| common::bare_parse_on_two_threads(&lines))
    });
    group.finish();
}

criterion_group!(benches, floor);
criterion_main!(benches);
