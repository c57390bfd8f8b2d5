//! What the benches share.

#![allow(dead_code)]

pub mod kafka_replay;
pub mod live;
pub mod spikes;

use testkit::floor::Bare;

/// The parse floor on records already in memory (criterion's `floor`
/// bench): `lines` parsed into [`Bare`] on 2 threads, nothing else.
/// Returns how many parsed.
pub fn bare_parse_on_two_threads(lines: &[&[u8]]) -> usize {
    let (a, b) = lines.split_at(lines.len() / 2);
    let parse = |part: &[&[u8]]| {
        part.iter()
            .filter(|l| serde_json::from_slice::<Bare>(l).is_ok())
            .count()
    };
    std::thread::scope(|s| {
        let left = s.spawn(|| parse(a));
        let right = parse(b);
        left.join().unwrap() + right
    })
}
