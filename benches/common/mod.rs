//! What the benches share.

#![allow(dead_code)]

pub mod kafka_replay;
pub mod live;
pub mod spikes;

use serde::Deserialize;

/// The parse floor's target: what a bare program would parse each record
/// into (borrowed strings, no validation, no dedup of keys).
#[derive(Deserialize)]
#[allow(dead_code)]
pub struct Bare<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    event_id: &'a str,
    ts: u64,
    stream_id: &'a str,
    viewer_id: &'a str,
    impression_id: Option<&'a str>,
    watched_ms: Option<u64>,
}

/// The parse floor: `lines` parsed into [`Bare`] on 2 threads, nothing
/// else. Returns how many parsed.
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
