//! Synthetic livestream traffic for `livepipe gen`.
//!
//! The generator is a small discrete-event simulation, not a stream of random
//! rows. Everything is driven by one [`ChaCha8Rng`] seeded from
//! [`GenConfig::seed`], so a given configuration always yields the same bytes.
//! The parts below split the code, not the draws: moving a draw from one
//! place to another, or adding one, changes every byte after it.
//!
//! Generation ([`Generator`], an iterator of records) is separate from
//! writing ([`write_jsonl`]), so the same records can go to Kafka.
//!
//! Where to look:
//!
//! * `simulation.rs`: streams, viewers and what they do (join, heartbeat,
//!   chat, leave; ad breaks and hype moments).
//! * `ads.rs`: impressions, the `ad_progress` that follows each one, the ad
//!   pool and its prices.
//! * `pacing.rs`: keeping to the configured rate, and the order in which
//!   records arrive (event time, then a bounded shuffle).
//! * `faults.rs`: what is planted on purpose: retries, late events and the
//!   impression cases billing has to get right, in every block of 10 000.
//! * `malformed.rs`: the kinds of malformed line, each a small function.
//! * `encoding.rs`: valid events as JSON bytes.
//! * `spike.rs`: some kinds of event at a multiple of their rate for a
//!   window, as a transform of the records (the benches' spikes).
//!
//! The parser's limits (`livepipe_dataflow::parse`) are imported, not
//! copied: the malformed lines step exactly one past them.

mod ads;
mod encoding;
mod faults;
mod malformed;
mod pacing;
mod simulation;
pub mod spike;

use std::collections::VecDeque;
use std::io::{self, Write};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use faults::{ImpPlant, Plant, BLOCK};
use malformed::MALS;
use pacing::{Out, TimeQueue, RECORDS_PER_VIEWER_S};
use simulation::{mean_session_ms, zipf_cdf, Action, Stream, Viewer};

/// Configuration of [`Generator`] and [`write_jsonl`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenConfig {
    /// Seed of the deterministic random number generator.
    pub seed: u64,
    /// Number of records (lines) to produce, malformed ones included.
    pub events: u64,
    /// Event time (ms since the epoch) of the first record.
    pub start_ts: u64,
    /// Average records per second of event time.
    pub rate: u64,
    /// Number of streams; popularity is Zipf-like.
    pub streams: u32,
    /// Fraction of records that are re-sent retries (same bytes).
    pub duplicate_rate: f64,
    /// Fraction of records whose `ts` is 1..3 hours older than the current time.
    pub late_rate: f64,
    /// Fraction of garbage lines.
    pub malformed_rate: f64,
    /// Fraction of impressions whose watch never reaches 2000 ms.
    pub never_qualify_rate: f64,
    /// Bound of the arrival shuffle (ms).
    pub allowed_lateness_ms: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            seed: 0,
            events: 100_000,
            start_ts: 1_700_000_000_000,
            rate: 2000,
            streams: 20,
            duplicate_rate: 0.01,
            late_rate: 0.001,
            malformed_rate: 0.001,
            never_qualify_rate: 0.3,
            allowed_lateness_ms: 5000,
        }
    }
}

/// What a generator produced (counts of lines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenSummary {
    /// All lines, malformed ones included.
    pub records: u64,
    /// Lines that are not valid events.
    pub malformed: u64,
    /// Retries: lines repeating an earlier line byte for byte.
    pub duplicates: u64,
    /// Valid events planted 1..3 hours behind the current event time.
    pub late: u64,
    /// Valid `impression` lines (retries, planted duplicates and late ones
    /// included).
    pub impressions: u64,
}

/// Writes `config.events` records as JSON lines to `out`.
pub fn write_jsonl(config: &GenConfig, out: impl Write) -> io::Result<GenSummary> {
    let mut out = io::BufWriter::with_capacity(1 << 16, out);
    let mut generator = Generator::new(config);
    for record in generator.by_ref() {
        out.write_all(&record)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(generator.summary())
}

/// What a queued record counts as in [`GenSummary`].
const F_MALFORMED: u8 = 1;
const F_DUPLICATE: u8 = 2;
const F_LATE: u8 = 4;
const F_IMPRESSION: u8 = 8;

/// The simulation as an iterator of records; see the [module docs](self).
///
/// Yields exactly `config.events` items, each one line's bytes without the
/// newline (possibly empty: a planted blank line; possibly not UTF-8).
/// [`Generator::summary`] counts what was yielded so far.
pub struct Generator {
    events: u64,
    never_rate: f64,
    p_dup: f64,
    p_late: f64,
    p_mal: f64,
    /// Half the allowed lateness: the arrival jitter bound.
    half: u64,
    plant_dups: bool,
    plant_late: bool,
    plant_malformed: bool,

    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    sched: TimeQueue<Action>,
    out: TimeQueue<Out>,

    streams: Vec<Stream>,
    zipf_cdf: Vec<f64>,
    viewers: Vec<Viewer>,
    free: Vec<u32>,
    alive: u64,
    mean_session_ms: f64,
    /// Records per concurrent viewer per second, smoothed.
    per_viewer: f64,
    target_rate: f64,

    next_event: u64,
    next_viewer: u64,
    next_imp: u64,
    created: u64,
    created_in_tick: u64,

    next_block: u64,
    /// Block plants not yet due, latest due first.
    pending: Vec<(u64, Plant)>,
    /// Impression plants waiting for the next impression.
    imp_queue: VecDeque<ImpPlant>,

    emitted: u64,
    summary: GenSummary,
}

impl Generator {
    /// A generator for `config` (which is copied).
    pub fn new(config: &GenConfig) -> Self {
        let clamp = |r: f64| {
            if r.is_finite() {
                r.clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        let n_streams = config.streams.max(1) as usize;
        let duplicate_rate = clamp(config.duplicate_rate);
        let late_rate = clamp(config.late_rate);
        let malformed_rate = clamp(config.malformed_rate);
        let per_block = BLOCK as f64;
        let mut g = Generator {
            events: config.events,
            never_rate: clamp(config.never_qualify_rate),
            p_dup: duplicate_rate,
            p_late: (late_rate - 1.0 / per_block).max(0.0),
            p_mal: (malformed_rate - MALS.len() as f64 / per_block).max(0.0),
            // (Bounded only to rule out overflow.)
            half: (config.allowed_lateness_ms / 2).min(1 << 50),
            plant_dups: duplicate_rate > 0.0,
            plant_late: late_rate > 0.0,
            plant_malformed: malformed_rate > 0.0,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            now: config.start_ts.max(1),
            seq: 0,
            sched: TimeQueue::new(1 << 15, config.start_ts.max(1)),
            out: TimeQueue::new(config.allowed_lateness_ms / 2 + 1, config.start_ts.max(1)),
            streams: (0..n_streams).map(|_| Stream::new()).collect(),
            zipf_cdf: zipf_cdf(n_streams),
            viewers: Vec::new(),
            free: Vec::new(),
            alive: 0,
            mean_session_ms: mean_session_ms(),
            per_viewer: RECORDS_PER_VIEWER_S,
            target_rate: config.rate.max(1) as f64,
            next_event: 1,
            next_viewer: 1,
            next_imp: 1,
            created: 0,
            created_in_tick: 0,
            next_block: 0,
            pending: Vec::new(),
            imp_queue: VecDeque::new(),
            emitted: 0,
            summary: GenSummary::default(),
        };
        g.schedule_block();
        g.populate();
        g
    }

    /// Counts of the records yielded so far.
    pub fn summary(&self) -> GenSummary {
        self.summary
    }
}

impl Iterator for Generator {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.emitted >= self.events {
            return None;
        }
        loop {
            // Everything still to be created has a key >= the next action's ts.
            let horizon = self.sched.peek_key().unwrap_or(u64::MAX);
            if self.out.peek_key().is_some_and(|key| key <= horizon) {
                let (_, Out { flags, bytes }) = self.out.pop().expect("peeked");
                self.emitted += 1;
                let s = &mut self.summary;
                s.records += 1;
                s.malformed += u64::from(flags & F_MALFORMED != 0);
                s.duplicates += u64::from(flags & F_DUPLICATE != 0);
                s.late += u64::from(flags & F_LATE != 0);
                s.impressions += u64::from(flags & F_IMPRESSION != 0);
                return Some(bytes);
            }
            self.step();
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.events - self.emitted).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

impl std::iter::FusedIterator for Generator {}
