//! Planted faults and edge cases: what the generator gets wrong on purpose.
//!
//! Apart from the simulation so that the traffic's story and its sabotage
//! can be read (and changed) separately; the kinds of malformed line have a
//! module of their own (`malformed.rs`).
//!
//! At the configured rates: producer retries (the exact same bytes again,
//! shortly after, counted in [`GenSummary::duplicates`]), events 1–3 hours
//! older than the current event time ([`GenSummary::late`]) and malformed
//! lines ([`GenSummary::malformed`]). Impressions additionally carry, at
//! small rates, the cases billing has to get right: a duplicate impression
//! (same `impression_id`, new `event_id`) with a slightly larger or a slightly
//! smaller `ts`, the same `impression_id` on two different streams, an
//! `ad_progress` arriving before its impression, `watched_ms` of exactly 2000
//! and exactly 1999, progress at exactly the impression's `ts` and at exactly
//! `ts + 300_000` and `ts + 300_001`.
//!
//! So that every file has them, each block of 10 000 records plants every
//! impression case above, one late event and one malformed line of each kind
//! (the kinds of `malformed.rs`), early in the block; random draws make up
//! the rest of the configured rates. Hence the malformed rate is at least
//! 19 per 10 000 records, and a rate of 0 turns the matching plants off (`duplicate_rate`
//! also covers the duplicate impressions; the other impression cases are
//! valid data and always planted). A file of 10 000 records at the
//! default rate contains all of the cases except the two window-boundary
//! ones, which by construction need five minutes of event time (600 000
//! records at the default rate). Retries are random draws only.
//!
//! [`GenSummary::duplicates`]: super::GenSummary::duplicates
//! [`GenSummary::late`]: super::GenSummary::late
//! [`GenSummary::malformed`]: super::GenSummary::malformed

use rand::Rng;

use super::encoding::Body;
use super::malformed::{Mal, MALS};
use super::simulation::Action;
use super::{Generator, F_DUPLICATE, F_IMPRESSION, F_LATE};

/// Records per block within which every planted case occurs at least once.
pub(super) const BLOCK: u64 = 10_000;
/// Impression plants are due within this many records of a block's start,
/// so that their progress (up to +2 s) lands in the block too.
pub(super) const IMP_PLANT_SPREAD: u64 = 2_000;
/// Malformed and late plants are due within this many records.
pub(super) const OTHER_PLANT_SPREAD: u64 = 8_000;
pub(super) const HOUR_MS: u64 = 3_600_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ImpPlant {
    /// A second impression record, new event id, ts slightly larger.
    DupLater,
    /// A second impression record, new event id, ts slightly smaller.
    DupEarlier,
    /// The same impression id on another stream.
    OtherStream,
    /// The first progress arrives before the impression.
    ProgressFirst,
    /// `watched_ms` reaches exactly 2000.
    Exact2000,
    /// `watched_ms` stops at exactly 1999.
    Exact1999,
    /// Qualifying progress at exactly the impression's ts.
    AtImpressionTs,
    /// First qualifying progress at exactly ts + 300 000.
    AtWindowEnd,
    /// First qualifying progress at exactly ts + 300 001.
    PastWindowEnd,
}

pub(super) const DUP_PLANTS: [ImpPlant; 3] = [
    ImpPlant::DupLater,
    ImpPlant::DupEarlier,
    ImpPlant::OtherStream,
];
pub(super) const EDGE_PLANTS: [ImpPlant; 6] = [
    ImpPlant::ProgressFirst,
    ImpPlant::Exact2000,
    ImpPlant::Exact1999,
    ImpPlant::AtImpressionTs,
    ImpPlant::AtWindowEnd,
    ImpPlant::PastWindowEnd,
];
/// Probability that an impression carries one of [`EDGE_PLANTS`] besides
/// the guaranteed ones.
pub(super) const EDGE_PLANT_RATE: f64 = 0.003;

#[derive(Clone, Copy, Debug)]
pub(super) enum Plant {
    Imp(ImpPlant),
    Mal(Mal),
    Late,
}

impl Generator {
    /// The random draw of an impression case, beyond the block's plants.
    pub(super) fn random_imp_plant(&mut self) -> Option<ImpPlant> {
        let u: f64 = self.rng.random();
        if u < self.p_dup {
            Some(DUP_PLANTS[self.rng.random_range(0..DUP_PLANTS.len())])
        } else if u < self.p_dup + EDGE_PLANT_RATE {
            Some(EDGE_PLANTS[self.rng.random_range(0..EDGE_PLANTS.len())])
        } else {
            None
        }
    }

    /// Queues every planted case for the next block of records.
    pub(super) fn schedule_block(&mut self) {
        let start = self.next_block * BLOCK;
        self.next_block += 1;
        let mut plants = Vec::new();
        if self.plant_dups {
            plants.extend(
                DUP_PLANTS
                    .iter()
                    .map(|&p| (IMP_PLANT_SPREAD, Plant::Imp(p))),
            );
        }
        plants.extend(
            EDGE_PLANTS
                .iter()
                .map(|&p| (IMP_PLANT_SPREAD, Plant::Imp(p))),
        );
        if self.plant_late {
            plants.push((OTHER_PLANT_SPREAD, Plant::Late));
        }
        if self.plant_malformed {
            plants.extend(MALS.iter().map(|&m| (OTHER_PLANT_SPREAD, Plant::Mal(m))));
        }
        for (spread, plant) in plants {
            let due = start + self.rng.random_range(0..spread);
            self.pending.push((due, plant));
        }
        self.pending.sort_by_key(|p| std::cmp::Reverse(p.0));
    }

    pub(super) fn fire_due_plants(&mut self) {
        while let Some(&(due, plant)) = self.pending.last() {
            if due > self.created {
                break;
            }
            self.pending.pop();
            match plant {
                Plant::Imp(p) => self.imp_queue.push_back(p),
                Plant::Mal(m) => self.malformed(m),
                Plant::Late => self.late(),
            }
        }
    }

    /// A valid event 1..3 hours older than the current event time.
    pub(super) fn late(&mut self) {
        let ts = self
            .now
            .saturating_sub(self.rng.random_range(HOUR_MS..=3 * HOUR_MS))
            .max(1);
        let (stream, viewer) = self.random_present();
        let (body, flags) = match self.rng.random_range(0..100) {
            0..50 => (Body::Heartbeat, F_LATE),
            50..75 => (Body::Chat, F_LATE),
            75..90 => {
                let imp = self.next_imp;
                self.next_imp += 1;
                let ad = self.pick_ad();
                let price = self.price(ad);
                (Body::Impression { imp, ad, price }, F_LATE | F_IMPRESSION)
            }
            _ => {
                // Progress for a recent impression, hours too early.
                let imp = self
                    .next_imp
                    .saturating_sub(self.rng.random_range(1..=50))
                    .max(1);
                let watched = self.rng.random_range(0..=30_000);
                (Body::Progress { imp, watched }, F_LATE)
            }
        };
        let key = self.now + self.jitter();
        let bytes = self.record(ts, stream, viewer, body);
        self.push_raw(key, bytes, flags);
    }

    /// The progress-first plant: the impression's first `ad_progress`
    /// (`step`: offset, watched ms) gets the impression's (late) arrival key
    /// and an earlier sequence number, so it arrives just before it. Returns
    /// that key, for the impression.
    pub(super) fn progress_first(
        &mut self,
        stream: u32,
        viewer: u64,
        imp: u64,
        (off, watched): (u64, u64),
    ) -> u64 {
        let now = self.now;
        let ts = now + off.min(self.half);
        let key = now + self.half;
        let bytes = self.record(ts, stream, viewer, Body::Progress { imp, watched });
        self.push_valid(ts, key, bytes, 0);
        key
    }

    /// The duplicate-impression plants: a second record of the impression
    /// `body` just shown, with a new event id, slightly earlier, slightly
    /// later or on another stream.
    pub(super) fn plant_copy(
        &mut self,
        plant: Option<ImpPlant>,
        stream: u32,
        viewer: u64,
        body: Body,
    ) {
        let Body::Impression { imp, ad, price } = body else {
            return;
        };
        let now = self.now;
        let dup = |stream| Action::DupImpression {
            stream,
            viewer,
            imp,
            ad,
            price,
        };
        match plant {
            Some(ImpPlant::DupEarlier) if self.half >= 2 && now > self.half => {
                // key - ts stays within 3/4 of the allowed lateness.
                let ts = now - self.rng.random_range(1..=self.half / 2);
                let key = self.key(now);
                let bytes = self.record(ts, stream, viewer, body);
                self.push_valid(ts, key, bytes, F_IMPRESSION);
            }
            Some(ImpPlant::DupLater | ImpPlant::DupEarlier) => {
                let t = now + self.rng.random_range(1..=2000);
                self.at(t, dup(stream));
            }
            Some(ImpPlant::OtherStream) => {
                let n = self.streams.len() as u32;
                let other = if n > 1 {
                    (stream + self.rng.random_range(1..n)) % n
                } else {
                    stream + 1
                };
                let t = now + self.rng.random_range(0..=1500);
                self.at(t, dup(other));
            }
            _ => {}
        }
    }

    /// Queues a valid on-time record, and maybe a retry of it, a late event
    /// or a malformed line.
    pub(super) fn push_valid(&mut self, ts: u64, key: u64, bytes: Vec<u8>, flags: u8) {
        let u: f64 = self.rng.random();
        if u < self.p_dup {
            let delay = self.rng.random_range(1..=1000);
            let retry_key = key.max((key + delay).min(ts + self.half));
            let copy = bytes.clone();
            self.push_raw(key, bytes, flags);
            self.push_raw(retry_key, copy, flags | F_DUPLICATE);
            return;
        }
        self.push_raw(key, bytes, flags);
        let u = u - self.p_dup;
        if u < self.p_late {
            self.late();
        } else if u - self.p_late < self.p_mal {
            let kind = MALS[self.rng.random_range(0..MALS.len())];
            self.malformed(kind);
        }
    }
}
