//! The parse floor: what a bare program does to read a JSONL event file
//! and nothing else. No pipeline can read records faster, so livepipe's
//! throughput is stated as a ratio of it, measured on the same file in the
//! same window (`cargo bench --bench e2e`, `examples/parse_floor.rs`).

use serde::Deserialize;
use std::borrow::Cow;

/// What the floor parses each record into: the fields of every event, as
/// borrowed strings where unescaped; no validation, no dedup of keys.
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

/// The floor over a whole file's bytes: cut into `threads` ranges at line
/// ends, each range split into lines and parsed into [`Bare`] on a thread
/// of its own. Returns how many lines it saw.
pub fn bare_parse_file(bytes: &[u8], threads: usize) -> usize {
    let mut cuts = vec![0];
    for i in 1..threads.max(1) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_is_seen_once_however_the_file_is_cut() {
        let line = br#"{"type":"chat","event_id":"e","ts":1,"stream_id":"s","viewer_id":"v"}"#;
        let mut file = Vec::new();
        for _ in 0..101 {
            file.extend_from_slice(line);
            file.push(b'\n');
        }
        for threads in 1..=4 {
            assert_eq!(bare_parse_file(&file, threads), 101, "{threads} threads");
        }
    }
}
