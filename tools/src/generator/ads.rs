//! Ads: each impression, the `ad_progress` updates that follow it, and the
//! pool of ads, campaigns and advertisers with their prices.
//!
//! Apart from the audience because billing is judged on these records alone:
//! how fast a watch qualifies (2000 ms), and whether it does so within the
//! five-minute window, is decided here.

use rand::Rng;

use super::encoding::Body;
use super::faults::ImpPlant;
use super::simulation::Action;
use super::{Generator, F_IMPRESSION};

/// The billing window: progress must come within this of the impression.
pub(super) const WINDOW_MS: u64 = 300_000;
/// The pools: ads, the campaigns they belong to, those campaigns' advertisers.
pub(super) const N_ADS: u64 = 48;
pub(super) const N_CAMPAIGNS: u64 = 16;
pub(super) const N_ADVERTISERS: u64 = 6;

impl Generator {
    /// Shows `viewer` an ad now: the impression, its planned progress, and
    /// whatever impression case is planted on it.
    pub(super) fn impression(&mut self, stream: u32, viewer: u64) {
        let now = self.now;
        let imp = self.next_imp;
        self.next_imp += 1;
        let ad = self.pick_ad();
        let price = self.price(ad);
        let plant = match self.imp_queue.pop_front() {
            Some(plant) => Some(plant),
            None => self.random_imp_plant(),
        };
        let mut steps = self.plan(plant);
        let mut key = self.key(now);
        if plant == Some(ImpPlant::ProgressFirst) && !steps.is_empty() {
            key = self.progress_first(stream, viewer, imp, steps.remove(0));
        }
        let body = Body::Impression { imp, ad, price };
        let bytes = self.record(now, stream, viewer, body);
        self.push_valid(now, key, bytes, F_IMPRESSION);
        for (off, watched) in steps {
            self.at(
                now + off,
                Action::Progress {
                    stream,
                    viewer,
                    imp,
                    watched,
                },
            );
        }
        self.plant_copy(plant, stream, viewer, body);
    }

    /// The `ad_progress` updates of one impression: (offset from the
    /// impression's ts, cumulative watched ms).
    pub(super) fn plan(&mut self, plant: Option<ImpPlant>) -> Vec<(u64, u64)> {
        match plant {
            Some(ImpPlant::Exact2000) => {
                return vec![
                    (1000, 1000),
                    (2000, 2000),
                    (5000, 5000),
                    (10_000, 10_000),
                    (15_000, 15_000),
                ]
            }
            Some(ImpPlant::Exact1999) => return vec![(1000, 1000), (2000, 1999)],
            Some(ImpPlant::AtImpressionTs) => {
                return vec![(0, 2100), (1000, 3100), (2000, 4100), (5000, 7100)]
            }
            Some(ImpPlant::AtWindowEnd) => {
                return vec![
                    (1000, 300),
                    (2000, 600),
                    (WINDOW_MS, 2500),
                    (WINDOW_MS + 5000, 7500),
                ]
            }
            Some(ImpPlant::PastWindowEnd) => {
                return vec![
                    (1000, 300),
                    (2000, 600),
                    (WINDOW_MS + 1, 2500),
                    (WINDOW_MS + 5001, 7500),
                ]
            }
            Some(ImpPlant::ProgressFirst) => return self.fast_plan(),
            _ => {}
        }
        let mut steps = if self.rng.random_bool(self.never_rate) {
            self.never_plan()
        } else {
            match self.rng.random_range(0..100) {
                0..80 => self.fast_plan(),
                80..94 => {
                    let resume = self.rng.random_range(60_000..=240_000);
                    self.slow_plan(resume)
                }
                _ => {
                    let resume = self.rng.random_range(WINDOW_MS + 1..=WINDOW_MS + 120_000);
                    self.slow_plan(resume)
                }
            }
        };
        if !steps.is_empty() && self.rng.random_bool(0.2) {
            // A "started" beacon at exactly the impression's ts.
            steps.insert(0, (0, 0));
        }
        steps
    }

    pub(super) fn ad_length(&mut self) -> u64 {
        match self.rng.random_range(0..100) {
            0..15 => 6_000,
            15..60 => 15_000,
            _ => 30_000,
        }
    }

    /// Watched roughly in real time, qualifying within seconds.
    pub(super) fn fast_plan(&mut self) -> Vec<(u64, u64)> {
        const OFFSETS: [u64; 8] = [1000, 2000, 5000, 10_000, 15_000, 20_000, 25_000, 30_000];
        let length = self.ad_length();
        let buffering = if self.rng.random_bool(0.3) {
            0
        } else {
            self.rng.random_range(1..=400)
        };
        let mut steps: Vec<(u64, u64)> = OFFSETS
            .iter()
            .take_while(|&&off| off < length)
            .map(|&off| (off, off - buffering))
            .collect();
        steps.push((length + buffering, length));
        if self.rng.random_bool(0.12) {
            // Abandoned after qualifying.
            let first_ok = steps.iter().position(|s| s.1 >= 2000).unwrap_or(0);
            let keep = self.rng.random_range(first_ok + 1..=steps.len());
            steps.truncate(keep);
        }
        steps
    }

    /// Starts, stalls below 2000 ms, and resumes at `resume` ms.
    pub(super) fn slow_plan(&mut self, resume: u64) -> Vec<(u64, u64)> {
        let length = self.ad_length().max(10_000);
        let w1 = self.rng.random_range(150..=600);
        let w2 = w1 + self.rng.random_range(100..=500);
        let w3 = (w2 + self.rng.random_range(100..=400)).min(1900);
        let w4 = self.rng.random_range(2000..=3500);
        let mut steps = vec![(1000, w1), (2000, w2), (5000, w3), (resume, w4)];
        let mut watched = w4;
        let mut t = resume;
        while watched < length {
            t += 5000;
            watched = (watched + 5000).min(length);
            steps.push((t, watched));
        }
        steps
    }

    /// Never reaches 2000 ms.
    pub(super) fn never_plan(&mut self) -> Vec<(u64, u64)> {
        if self.rng.random_bool(0.1) {
            return Vec::new(); // closed at once
        }
        let w1 = self.rng.random_range(50..=900);
        let mut steps = vec![(1000, w1)];
        if self.rng.random_bool(0.7) {
            let w2 = self.rng.random_range(w1..=1999);
            steps.push((2000, w2));
            if self.rng.random_bool(0.5) {
                steps.push((5000, self.rng.random_range(w2..=1999)));
            }
        }
        steps
    }

    /// Ads from a small pool, the first ones more often.
    pub(super) fn pick_ad(&mut self) -> u64 {
        let u: f64 = self.rng.random();
        ((u * u * N_ADS as f64) as u64).min(N_ADS - 1)
    }

    pub(super) fn price(&mut self, ad: u64) -> u64 {
        let base = 500 + splitmix(ad) % 49_501;
        (base * self.rng.random_range(80..=120) / 100).clamp(500, 50_000)
    }
}

pub(super) fn campaign_of(ad: u64) -> u64 {
    ad % N_CAMPAIGNS
}

pub(super) fn advertiser_of(ad: u64) -> u64 {
    campaign_of(ad) % N_ADVERTISERS
}

/// A fixed 64-bit mix (SplitMix64's finaliser), for per-ad base prices.
pub(super) fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
