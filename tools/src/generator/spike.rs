//! Spikes: for a window of event time, some kinds of event at a multiple
//! of their usual rate, on top of any [`super::Generator`] traffic.
//!
//! The simulation's mix comes out of its viewers' behaviour, and changing
//! it from inside would change every byte after the first draw (see the
//! module docs of the generator). A spike is instead a transform of the
//! records it yields: each record of a spiked kind in the window is
//! followed by `multiplier - 1` copies with fresh ids, so the rest of the
//! traffic is byte for byte what the same seed always gives.
//!
//! A copy must be a new event, not a retry: its `event_id` gets a suffix,
//! and so do the ids that make it count as something new. An impression
//! copy and its `ad_progress` copies share a suffixed `impression_id`, so
//! the ad spike brings 10x the impressions to bill *and* their watches; a
//! join or chat copy comes from a suffixed viewer, so the storm is 10x the
//! viewers joining and chatting.

use std::collections::{HashMap, VecDeque};

/// What a spike multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpikeKind {
    /// `impression` and `ad_progress`.
    Ads,
    /// `chat` and `join`.
    ChatJoin,
}

impl SpikeKind {
    fn covers(self, event_type: &str) -> bool {
        match self {
            SpikeKind::Ads => matches!(event_type, "impression" | "ad_progress"),
            SpikeKind::ChatJoin => matches!(event_type, "chat" | "join"),
        }
    }

    /// The ids a copy suffixes besides its `event_id`.
    fn id_fields(self) -> &'static [&'static str] {
        match self {
            SpikeKind::Ads => &["impression_id"],
            SpikeKind::ChatJoin => &["viewer_id"],
        }
    }
}

/// One spike: records of `kind` with `from_ts <= ts < until_ts` come
/// `multiplier` times (the original and `multiplier - 1` copies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spike {
    pub kind: SpikeKind,
    pub multiplier: u32,
    pub from_ts: u64,
    pub until_ts: u64,
}

/// `records` with `spikes` applied (see the module docs). Lines that are
/// not a JSON object with a string `type` and `event_id` and an integer
/// `ts` (most planted malformed ones) pass through untouched and are never copied.
pub struct Spiked<I> {
    records: I,
    spikes: Vec<Spike>,
    copies: VecDeque<Vec<u8>>,
    /// Impressions copied so far, with their spike's multiplier: their
    /// watches are copied too, wherever their `ts` falls (a watch in the
    /// window of an impression from before it would bill nothing).
    copied_impressions: HashMap<String, u32>,
}

impl<I: Iterator<Item = Vec<u8>>> Spiked<I> {
    pub fn new(records: I, spikes: Vec<Spike>) -> Self {
        Spiked {
            records,
            spikes,
            copies: VecDeque::new(),
            copied_impressions: HashMap::new(),
        }
    }

    /// The records under the spikes (a generator, for its summary).
    pub fn inner(&self) -> &I {
        &self.records
    }

    /// Queues the copies `record` gets, if any.
    fn copy(&mut self, record: &[u8]) {
        let Ok(serde_json::Value::Object(event)) = serde_json::from_slice(record) else {
            return;
        };
        let (Some(kind), Some(ts), Some(_)) = (
            event.get("type").and_then(|t| t.as_str()),
            event.get("ts").and_then(|t| t.as_u64()),
            event.get("event_id").and_then(|t| t.as_str()),
        ) else {
            return;
        };
        let impression_id = event.get("impression_id").and_then(|t| t.as_str());
        let multiplier = if kind == "ad_progress" {
            let copied = impression_id.and_then(|id| self.copied_impressions.get(id));
            copied.copied().unwrap_or(1)
        } else {
            let Some(spike) = self
                .spikes
                .iter()
                .find(|s| s.kind.covers(kind) && (s.from_ts..s.until_ts).contains(&ts))
            else {
                return;
            };
            if let (Some(id), "impression") = (impression_id, kind) {
                self.copied_impressions
                    .insert(id.to_string(), spike.multiplier);
            }
            spike.multiplier
        };
        let kind = if kind == "impression" || kind == "ad_progress" {
            SpikeKind::Ads
        } else {
            SpikeKind::ChatJoin
        };
        for n in 1..multiplier {
            let mut copy = event.clone();
            let fields = std::iter::once("event_id").chain(kind.id_fields().iter().copied());
            for field in fields {
                if let Some(serde_json::Value::String(id)) = copy.get_mut(field) {
                    id.push_str(&format!("~s{n}"));
                }
            }
            let bytes = serde_json::to_vec(&copy).expect("a JSON object serializes");
            self.copies.push_back(bytes);
        }
    }
}

impl<I: Iterator<Item = Vec<u8>>> Iterator for Spiked<I> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if let Some(copy) = self.copies.pop_front() {
            return Some(copy);
        }
        let record = self.records.next()?;
        if !self.spikes.is_empty() {
            self.copy(&record);
        }
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{GenConfig, Generator};

    use std::collections::{BTreeMap, HashSet};

    const START: u64 = 1_700_000_000_000;

    fn events(records: &[Vec<u8>]) -> Vec<serde_json::Value> {
        records
            .iter()
            .filter_map(|r| serde_json::from_slice(r).ok())
            // What a spike may copy (see `Spiked`).
            .filter(|v: &serde_json::Value| v["type"].is_string() && v["event_id"].is_string())
            .collect()
    }

    fn count_by_type(events: &[serde_json::Value], window: (u64, u64)) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for event in events {
            let ts = event["ts"].as_u64().unwrap_or(0);
            if (window.0..window.1).contains(&ts) {
                *counts
                    .entry(event["type"].as_str().unwrap_or("").to_string())
                    .or_default() += 1;
            }
        }
        counts
    }

    #[test]
    fn a_spike_multiplies_its_kinds_in_its_window_only() {
        let config = GenConfig {
            events: 40_000,
            start_ts: START,
            ..GenConfig::default()
        };
        let base: Vec<Vec<u8>> = Generator::new(&config).collect();
        let window = (START + 5_000, START + 10_000);
        let spike = Spike {
            kind: SpikeKind::Ads,
            multiplier: 10,
            from_ts: window.0,
            until_ts: window.1,
        };
        let spiked: Vec<Vec<u8>> = Spiked::new(base.clone().into_iter(), vec![spike]).collect();
        let (before, after) = (events(&base), events(&spiked));
        let (inside, outside) = (window, (window.1, u64::MAX));
        let (b, a) = (
            count_by_type(&before, inside),
            count_by_type(&after, inside),
        );
        assert!(b["impression"] > 0 && b["ad_progress"] > 0, "{b:?}");
        for (kind, n) in &b {
            match kind.as_str() {
                "impression" => assert_eq!(a[kind], n * 10),
                // The watches of the window's impressions, wherever they fall.
                "ad_progress" => assert!(a[kind] > n * 2, "{} of {n}", a[kind]),
                _ => assert_eq!(a[kind], *n, "{kind}"),
            }
        }
        let (b, a) = (
            count_by_type(&before, outside),
            count_by_type(&after, outside),
        );
        for (kind, n) in &b {
            if kind != "ad_progress" {
                assert_eq!(a[kind], *n, "{kind}");
            }
        }
        // Every copy is a new event, and each copied watch has its copied
        // impression.
        let ids: HashSet<&str> = after
            .iter()
            .filter_map(|e| e["event_id"].as_str())
            .collect();
        let copies = after
            .iter()
            .filter(|e| e["event_id"].as_str().is_some_and(|id| id.contains("~s")));
        assert_eq!(copies.count(), after.len() - before.len());
        assert!(
            ids.len() as f64 > after.len() as f64 * 0.95,
            "ids stay distinct"
        );
        let impressions: HashSet<&str> = after
            .iter()
            .filter(|e| e["type"] == "impression")
            .filter_map(|e| e["impression_id"].as_str())
            .collect();
        let orphans = after
            .iter()
            .filter(|e| e["type"] == "ad_progress")
            .filter_map(|e| e["impression_id"].as_str())
            .filter(|id| id.contains("~s") && !impressions.contains(id))
            .count();
        assert_eq!(orphans, 0);
    }

    #[test]
    fn a_storm_brings_new_viewers_and_no_spike_changes_nothing() {
        let config = GenConfig {
            events: 5_000,
            start_ts: START,
            ..GenConfig::default()
        };
        let base: Vec<Vec<u8>> = Generator::new(&config).collect();
        let same: Vec<Vec<u8>> = Spiked::new(base.clone().into_iter(), Vec::new()).collect();
        assert_eq!(same, base);
        let storm = Spike {
            kind: SpikeKind::ChatJoin,
            multiplier: 3,
            from_ts: 0,
            until_ts: u64::MAX,
        };
        let spiked = events(&Spiked::new(base.into_iter(), vec![storm]).collect::<Vec<_>>());
        let copied_viewers = spiked
            .iter()
            .filter(|e| e["event_id"].as_str().is_some_and(|id| id.contains("~s")))
            .all(|e| {
                SpikeKind::ChatJoin.covers(e["type"].as_str().unwrap())
                    && e["viewer_id"].as_str().unwrap().contains("~s")
            });
        assert!(copied_viewers);
    }
}
