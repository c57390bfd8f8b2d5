//! What the benches share.

#![allow(dead_code)]

pub mod kafka_replay;
pub mod live;
pub mod spikes;

use serde::Deserialize;
use std::borrow::Cow;

/// The parse floor's target: what a bare program would parse each record
/// into (borrowed strings where unescaped, no validation, no dedup of
/// keys).
#[derive(Deserialize)]
#[allow(dead_code)]
pub struct Bare<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    ts: u64,
    #[serde(borrow)]
    stream_id: Cow<'a, str>,
    #[serde(borrow)]
    viewer_id: Cow<'a, str>,
    #[serde(borrow, default)]
    impression_id: Option<Cow<'a, str>>,
    #[serde(default)]
    watched_ms: Option<u64>,
    #[serde(default)]
    price_micros: Option<u64>,
}

/// The parse floor over a whole file, as a bare program would do it: the
/// bytes cut into `threads` ranges at line ends, each range split into
/// lines and parsed into [`Bare`] on a thread of its own. Returns how many
/// lines it saw.
pub fn bare_parse_file(bytes: &[u8], threads: usize) -> usize {
    let mut cuts = vec![0];
    for i in 1..threads {
        let mut cut = bytes.len() * i / threads;
        while cut < bytes.len() && bytes[cut - 1] != b'\n' {
            cut += 1;
        }
        cuts.push(cut);
    }
    cuts.push(bytes.len());
    std::thread::scope(|s| {
        let parts: Vec<_> = cuts
            .windows(2)
            .map(|range| {
                let part = &bytes[range[0]..range[1]];
                s.spawn(move || {
                    part.split(|&b| b == b'\n')
                        .filter(|line| !line.is_empty())
                        .inspect(|line| {
                            std::hint::black_box(serde_json::from_slice::<Bare>(line).is_ok());
                        })
                        .count()
                })
            })
            .collect();
        parts.into_iter().map(|part| part.join().unwrap()).sum()
    })
}

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
