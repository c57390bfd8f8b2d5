//! Synthetic livestream traffic for `livepipe gen`.
//!
//! The generator is a small discrete-event simulation, not a stream of random
//! rows. Everything is driven by one [`ChaCha8Rng`] seeded from
//! [`GenConfig::seed`], so a given configuration always yields the same bytes.
//!
//! # The simulation
//!
//! * **Streams.** [`GenConfig::streams`] channels (`stream-1`, `stream-2`, ...)
//!   with Zipf-like popularity: a new viewer picks stream `i` (1-based) with
//!   weight `1/i`, so the top stream holds roughly a quarter to a third of
//!   the audience.
//! * **Viewers.** Viewers arrive as a Poisson process, `join` a stream, send a
//!   `heartbeat` every ~10 s (±1 s jitter) and `leave` when their session ends
//!   (sessions are a mix of 20 s–3 min, 3–30 min and 30–120 min). About 15 %
//!   never send `leave` and simply stop heartbeating. The capture starts
//!   mid-broadcast: the audience present at `start_ts` is announced by
//!   heartbeats only (no `join`), with remaining session lengths drawn as in
//!   a steady state.
//! * **Chat.** Viewers are lurkers (never chat), occasional chatters or chatty
//!   ones whose messages come in bursts. Each stream has "hype moments" during
//!   which chat gaps shrink four-fold and a slice of the audience chats at once.
//! * **Ads.** Every stream runs an ad break every 2–6 minutes, in which each
//!   present viewer gets a pod of one or two `impression`s (clients fetch
//!   them within 20 s); every viewer also gets mid-rolls of their own every
//!   few minutes, and 40 % of joins a pre-roll. Ads, campaigns and
//!   advertisers come from small pools; prices are 500..=50 000 micros.
//!   Each impression is followed by cumulative `ad_progress` updates at
//!   +1 s, +2 s, +5 s, +10 s, ... up to the ad's length. Most qualify
//!   (reach 2000 ms watched) within seconds; some qualify slowly, after 1–4
//!   minutes of pause; a few only get there after the 5-minute window; and
//!   [`GenConfig::never_qualify_rate`] of them stop below 2000 ms.
//! * **Rate.** The audience size is steered (by the arrival rate) so that the
//!   output averages [`GenConfig::rate`] records per second of event time; at
//!   the default 2000/s that is roughly seven to nine thousand concurrent
//!   viewers. Ad breaks on popular streams make the rate bursty.
//!
//! # Ordering
//!
//! Future events sit in a priority queue keyed by event time, so records are
//! produced in `ts` order. Their *arrival* order is then shuffled: every record
//! gets an emission key `ts + U[0, allowed_lateness_ms / 2]` and records leave
//! a second priority queue in key order once no smaller key can still be
//! produced. (Both queues are calendar queues: one bucket per millisecond for
//! the next half minute, a binary heap beyond.)
//! Hence a record never arrives more than `allowed_lateness_ms` behind the
//! largest `ts` seen before it, except for the planted late ones. The first
//! record has `ts == start_ts` and arrives first.
//!
//! # Planted faults and edge cases
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
//! (kinds listed below), early in the block; random draws make up the rest of
//! the configured rates. Hence the malformed rate is at least 19 per 10 000
//! records, and a rate of 0 turns the matching plants off (`duplicate_rate`
//! also covers the duplicate impressions; the other impression cases are
//! valid data and always planted). A file of 10 000 records at the
//! default rate contains all of the cases except the two window-boundary
//! ones, which by construction need five minutes of event time (600 000
//! records at the default rate). Retries are random draws only.
//!
//! Malformed lines come in many kinds: not JSON, truncated JSON, `[1]` and
//! other non-objects, unknown `type`, missing fields, a float `ts` (`2e3`), a
//! string `ts`, a negative `ts`, a negative or too large `price_micros`, a too
//! large `watched_ms`, an id one byte over the parser's limit, an empty id, a non-string id, duplicate
//! keys, a blank line, invalid UTF-8 and a lone surrogate (`\ud800`).
//!
//! Generation ([`Generator`], an iterator of records) is separate from
//! writing ([`write_jsonl`]), so the same records can go to Kafka.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Write};

use livepipe_dataflow::parse::{MAX_STR_BYTES, PRICE_MICROS_MAX, WATCHED_MS_MAX};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::ser::{CompactFormatter, Formatter};

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

/// Records per block within which every planted case occurs at least once.
const BLOCK: u64 = 10_000;
/// Impression plants are due within this many records of a block's start,
/// so that their progress (up to +2 s) lands in the block too.
const IMP_PLANT_SPREAD: u64 = 2_000;
/// Malformed and late plants are due within this many records.
const OTHER_PLANT_SPREAD: u64 = 8_000;
/// The billing window: progress must come within this of the impression.
const WINDOW_MS: u64 = 300_000;
const HOUR_MS: u64 = 3_600_000;
const HEARTBEAT_MS: u64 = 10_000;
/// A viewer's own mid-rolls: every MIN + Exp(MEAN) ms.
const PERSONAL_AD_MIN_MS: u64 = 60_000;
const PERSONAL_AD_MEAN_MS: f64 = 240_000.0;
/// Streams' ad breaks: every MIN..=MAX ms.
const AD_BREAK_MIN_MS: u64 = 120_000;
const AD_BREAK_MAX_MS: u64 = 360_000;
const N_ADS: u64 = 48;
const N_CAMPAIGNS: u64 = 16;
const N_ADVERTISERS: u64 = 6;

/// Session length classes: (probability, min ms, max ms).
const SESSIONS: [(f64, u64, u64); 3] = [
    (0.35, 20_000, 180_000),
    (0.45, 180_000, 1_800_000),
    (0.20, 1_800_000, 7_200_000),
];
/// Initial estimate of records per concurrent viewer per second (measured
/// for the default configuration), refined while running.
const RECORDS_PER_VIEWER_S: f64 = 0.24;
/// Time constant of the audience-size correction.
const AUDIENCE_TAU_MS: f64 = 60_000.0;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    Lurker,
    Occasional,
    Chatty,
}

struct Viewer {
    id: u64,
    end: u64,
    stream: u32,
    epoch: u32,
    pos: u32,
    alive: bool,
    silent: bool,
    style: Style,
}

struct Stream {
    members: Vec<u32>,
    hype_until: u64,
}

#[derive(Clone, Copy, Debug)]
enum Action {
    /// Once per second of event time: adjust the audience target.
    Tick,
    /// A new viewer joins.
    Arrival,
    Heartbeat {
        slot: u32,
        epoch: u32,
    },
    /// The viewer's session ends (leave, or silence).
    End {
        slot: u32,
        epoch: u32,
    },
    Chat {
        slot: u32,
        epoch: u32,
        repeat: bool,
    },
    /// An ad is shown to the viewer; `repeat`: the viewer's own ad timer
    /// (rather than a pre-roll or a stream's ad break).
    Ad {
        slot: u32,
        epoch: u32,
        repeat: bool,
    },
    Progress {
        stream: u32,
        viewer: u64,
        imp: u64,
        watched: u64,
    },
    AdBreak {
        stream: u32,
    },
    Hype {
        stream: u32,
    },
    /// A planted second impression record for an existing impression id.
    DupImpression {
        stream: u32,
        viewer: u64,
        imp: u64,
        ad: u64,
        price: u64,
    },
}

/// A record waiting for its arrival turn.
struct Out {
    flags: u8,
    bytes: Vec<u8>,
}

/// A priority queue of items keyed by (ms, sequence number), popping the
/// smallest first: a calendar queue, since nearly all keys fall within a few
/// seconds of the current time. Keys in `[cursor, cursor + ring.len())` go
/// to FIFO buckets of one ms each (sequence numbers are pushed in
/// increasing order, so a bucket is sorted); other keys go to a binary heap,
/// and pops merge the two.
struct TimeQueue<T> {
    ring: Vec<VecDeque<(u64, T)>>,
    mask: u64,
    /// No ring item has a key below this.
    cursor: u64,
    in_ring: usize,
    far: BinaryHeap<Far<T>>,
}

struct Far<T> {
    key: u64,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Far<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.key, self.seq) == (other.key, other.seq)
    }
}
impl<T> Eq for Far<T> {}
impl<T> PartialOrd for Far<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Far<T> {
    /// Reversed, so that `BinaryHeap` pops the smallest key first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.key, other.seq).cmp(&(self.key, self.seq))
    }
}

impl<T> TimeQueue<T> {
    /// `span`: how far ahead of the smallest key the ring reaches (ms).
    fn new(span: u64, cursor: u64) -> Self {
        let size = span.clamp(1024, 1 << 15).next_power_of_two();
        TimeQueue {
            ring: (0..size).map(|_| VecDeque::new()).collect(),
            mask: size - 1,
            cursor,
            in_ring: 0,
            far: BinaryHeap::new(),
        }
    }

    /// `seq` must be larger than that of every item pushed before.
    fn push(&mut self, key: u64, seq: u64, item: T) {
        if key >= self.cursor && key - self.cursor <= self.mask {
            self.ring[(key & self.mask) as usize].push_back((seq, item));
            self.in_ring += 1;
        } else {
            self.far.push(Far { key, seq, item });
        }
    }

    /// The smallest key, moving the cursor up to it.
    fn peek_key(&mut self) -> Option<u64> {
        let far = self.far.peek().map(|f| f.key);
        if self.in_ring == 0 {
            if let Some(key) = far {
                self.cursor = self.cursor.max(key);
            }
            return far;
        }
        while self.ring[(self.cursor & self.mask) as usize].is_empty() {
            self.cursor += 1;
        }
        Some(far.map_or(self.cursor, |f| f.min(self.cursor)))
    }

    fn pop(&mut self) -> Option<(u64, T)> {
        let key = self.peek_key()?;
        let bucket = &mut self.ring[(self.cursor & self.mask) as usize];
        let ring_seq = if self.in_ring > 0 && key == self.cursor {
            bucket.front().map(|b| b.0)
        } else {
            None
        };
        let take_far = match (ring_seq, self.far.peek()) {
            (Some(seq), Some(f)) => (f.key, f.seq) < (key, seq),
            (Some(_), None) => false,
            (None, _) => true,
        };
        if take_far {
            let f = self.far.pop().expect("peeked");
            Some((f.key, f.item))
        } else {
            self.in_ring -= 1;
            let (_, item) = bucket.pop_front().expect("peeked");
            Some((key, item))
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Body {
    Join,
    Leave,
    Heartbeat,
    Chat,
    Impression { imp: u64, ad: u64, price: u64 },
    Progress { imp: u64, watched: u64 },
}

impl Body {
    fn name(self) -> &'static str {
        match self {
            Body::Join => "join",
            Body::Leave => "leave",
            Body::Heartbeat => "heartbeat",
            Body::Chat => "chat",
            Body::Impression { .. } => "impression",
            Body::Progress { .. } => "ad_progress",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ImpPlant {
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

const DUP_PLANTS: [ImpPlant; 3] = [
    ImpPlant::DupLater,
    ImpPlant::DupEarlier,
    ImpPlant::OtherStream,
];
const EDGE_PLANTS: [ImpPlant; 6] = [
    ImpPlant::ProgressFirst,
    ImpPlant::Exact2000,
    ImpPlant::Exact1999,
    ImpPlant::AtImpressionTs,
    ImpPlant::AtWindowEnd,
    ImpPlant::PastWindowEnd,
];
/// Probability that an impression carries one of [`EDGE_PLANTS`] besides
/// the guaranteed ones.
const EDGE_PLANT_RATE: f64 = 0.003;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mal {
    NotJson,
    Truncated,
    Array,
    NotObject,
    UnknownType,
    MissingField,
    TsFloat,
    TsString,
    TsNegative,
    NegativePrice,
    PriceTooLarge,
    WatchedTooLarge,
    LongId,
    EmptyId,
    IdNotString,
    DuplicateKeys,
    Blank,
    InvalidUtf8,
    LoneSurrogate,
}

const MALS: [Mal; 19] = [
    Mal::NotJson,
    Mal::Truncated,
    Mal::Array,
    Mal::NotObject,
    Mal::UnknownType,
    Mal::MissingField,
    Mal::TsFloat,
    Mal::TsString,
    Mal::TsNegative,
    Mal::NegativePrice,
    Mal::PriceTooLarge,
    Mal::WatchedTooLarge,
    Mal::LongId,
    Mal::EmptyId,
    Mal::IdNotString,
    Mal::DuplicateKeys,
    Mal::Blank,
    Mal::InvalidUtf8,
    Mal::LoneSurrogate,
];

#[derive(Clone, Copy, Debug)]
enum Plant {
    Imp(ImpPlant),
    Mal(Mal),
    Late,
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
        let mut zipf_cdf = Vec::with_capacity(n_streams);
        let mut acc = 0.0;
        for i in 0..n_streams {
            acc += 1.0 / (i + 1) as f64;
            zipf_cdf.push(acc);
        }
        for c in &mut zipf_cdf {
            *c /= acc;
        }
        let mean_session_ms = SESSIONS
            .iter()
            .map(|&(p, lo, hi)| p * (lo + hi) as f64 / 2.0)
            .sum();
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
            streams: (0..n_streams)
                .map(|_| Stream {
                    members: Vec::new(),
                    hype_until: 0,
                })
                .collect(),
            zipf_cdf,
            viewers: Vec::new(),
            free: Vec::new(),
            alive: 0,
            mean_session_ms,
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

    // ----- scheduling ---------------------------------------------------

    fn at(&mut self, ts: u64, action: Action) {
        self.seq += 1;
        self.sched.push(ts, self.seq, action);
    }

    /// Processes the earliest scheduled action.
    fn step(&mut self) {
        let (ts, action) = self.sched.pop().expect("a tick is always scheduled");
        debug_assert!(ts >= self.now);
        self.now = ts;
        match action {
            Action::Tick => self.tick(),
            Action::Arrival => self.arrival(),
            Action::Heartbeat { slot, epoch } => self.heartbeat(slot, epoch),
            Action::End { slot, epoch } => self.end(slot, epoch),
            Action::Chat {
                slot,
                epoch,
                repeat,
            } => self.chat(slot, epoch, repeat),
            Action::Ad {
                slot,
                epoch,
                repeat,
            } => {
                if self.live(slot, epoch) {
                    let v = &self.viewers[slot as usize];
                    let (stream, viewer) = (v.stream, v.id);
                    self.impression(stream, viewer);
                    if repeat {
                        let next = ts + PERSONAL_AD_MIN_MS + self.exp_ms(PERSONAL_AD_MEAN_MS);
                        self.at(next, action);
                    }
                }
            }
            Action::Progress {
                stream,
                viewer,
                imp,
                watched,
            } => self.emit(ts, stream, viewer, Body::Progress { imp, watched }),
            Action::AdBreak { stream } => self.ad_break(stream),
            Action::Hype { stream } => self.hype(stream),
            Action::DupImpression {
                stream,
                viewer,
                imp,
                ad,
                price,
            } => self.emit(ts, stream, viewer, Body::Impression { imp, ad, price }),
        }
        self.fire_due_plants();
    }

    /// The audience present at `start_ts`, plus the per-stream processes.
    fn populate(&mut self) {
        let start = self.now;
        let initial = (self.target_rate / self.per_viewer).round().max(1.0) as u64;
        for i in 0..initial {
            let stream = self.pick_stream();
            let remaining = self.residual_session();
            // The very first record is a heartbeat at exactly start_ts.
            let first_hb = if i == 0 {
                start
            } else {
                start + self.rng.random_range(0..HEARTBEAT_MS)
            };
            self.add_viewer(stream, start + remaining, first_hb, true);
        }
        for stream in 0..self.streams.len() as u32 {
            let first_break = start + self.rng.random_range(0..=AD_BREAK_MAX_MS);
            self.at(first_break, Action::AdBreak { stream });
            let first_hype = start + self.exp_ms(150_000.0);
            self.at(first_hype, Action::Hype { stream });
        }
        self.at(start + 1000, Action::Tick);
        let gap = self.arrival_gap();
        self.at(start + gap, Action::Arrival);
    }

    fn tick(&mut self) {
        if self.alive > 0 {
            let observed = self.created_in_tick as f64 / self.alive as f64;
            self.per_viewer = (0.99 * self.per_viewer + 0.01 * observed).clamp(0.02, 5.0);
        }
        self.created_in_tick = 0;
        self.at(self.now + 1000, Action::Tick);
    }

    /// Inter-arrival time (ms) steering the audience towards the size that
    /// produces the configured rate.
    fn arrival_gap(&mut self) -> u64 {
        let target = self.target_rate / self.per_viewer;
        let base = target / self.mean_session_ms;
        let correction = (target - self.alive as f64) / AUDIENCE_TAU_MS;
        let per_ms = (base + correction).clamp(0.2 * base, 5.0 * base);
        self.exp_ms(1.0 / per_ms)
    }

    fn arrival(&mut self) {
        let now = self.now;
        let stream = self.pick_stream();
        let session = self.session_length();
        let first_hb = now
            + self
                .rng
                .random_range(HEARTBEAT_MS - 2000..=HEARTBEAT_MS + 2000);
        let slot = self.add_viewer(stream, now + session, first_hb, false);
        let (viewer, epoch) = {
            let v = &self.viewers[slot as usize];
            (v.id, v.epoch)
        };
        self.emit(now, stream, viewer, Body::Join);
        if self.rng.random_bool(0.4) {
            let pre_roll = now + self.rng.random_range(500..=3000);
            self.at(
                pre_roll,
                Action::Ad {
                    slot,
                    epoch,
                    repeat: false,
                },
            );
        }
        let gap = self.arrival_gap();
        self.at(now + gap, Action::Arrival);
    }

    fn add_viewer(&mut self, stream: u32, end: u64, first_hb: u64, initial: bool) -> u32 {
        let id = self.next_viewer;
        self.next_viewer += 1;
        let style = match self.rng.random_range(0..100) {
            0..40 => Style::Lurker,
            40..75 => Style::Occasional,
            _ => Style::Chatty,
        };
        let silent = self.rng.random_bool(0.15);
        let pos = self.streams[stream as usize].members.len() as u32;
        let viewer = Viewer {
            id,
            end,
            stream,
            epoch: 0,
            pos,
            alive: true,
            silent,
            style,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                let v = &mut self.viewers[slot as usize];
                let epoch = v.epoch;
                *v = Viewer { epoch, ..viewer };
                slot
            }
            None => {
                self.viewers.push(viewer);
                (self.viewers.len() - 1) as u32
            }
        };
        self.streams[stream as usize].members.push(slot);
        self.alive += 1;
        let epoch = self.viewers[slot as usize].epoch;
        if first_hb < end {
            self.at(first_hb, Action::Heartbeat { slot, epoch });
        } else {
            self.at(end, Action::End { slot, epoch });
        }
        self.schedule_chat(slot, epoch, style, stream, end);
        // The viewer's own mid-rolls (phase uniform for the initial audience).
        let first_ad = if initial {
            self.rng
                .random_range(0..PERSONAL_AD_MIN_MS + PERSONAL_AD_MEAN_MS as u64)
        } else {
            PERSONAL_AD_MIN_MS + self.exp_ms(PERSONAL_AD_MEAN_MS)
        };
        if self.now + first_ad < end {
            self.at(
                self.now + first_ad,
                Action::Ad {
                    slot,
                    epoch,
                    repeat: true,
                },
            );
        }
        slot
    }

    fn live(&self, slot: u32, epoch: u32) -> bool {
        let v = &self.viewers[slot as usize];
        v.alive && v.epoch == epoch && self.now < v.end
    }

    fn heartbeat(&mut self, slot: u32, epoch: u32) {
        if !self.live(slot, epoch) {
            return;
        }
        let (stream, viewer, end) = {
            let v = &self.viewers[slot as usize];
            (v.stream, v.id, v.end)
        };
        self.emit(self.now, stream, viewer, Body::Heartbeat);
        let next = self.now
            + self
                .rng
                .random_range(HEARTBEAT_MS - 1000..=HEARTBEAT_MS + 1000);
        if next < end {
            self.at(next, Action::Heartbeat { slot, epoch });
        } else {
            self.at(end, Action::End { slot, epoch });
        }
    }

    fn end(&mut self, slot: u32, epoch: u32) {
        let v = &self.viewers[slot as usize];
        if !v.alive || v.epoch != epoch {
            return;
        }
        let (stream, viewer, silent, pos) = (v.stream, v.id, v.silent, v.pos as usize);
        if !silent {
            self.emit(self.now, stream, viewer, Body::Leave);
        }
        let v = &mut self.viewers[slot as usize];
        v.alive = false;
        v.epoch = v.epoch.wrapping_add(1);
        let members = &mut self.streams[stream as usize].members;
        members.swap_remove(pos);
        if let Some(&moved) = members.get(pos) {
            self.viewers[moved as usize].pos = pos as u32;
        }
        self.free.push(slot);
        self.alive -= 1;
    }

    fn chat(&mut self, slot: u32, epoch: u32, repeat: bool) {
        if !self.live(slot, epoch) {
            return;
        }
        let (stream, viewer, end, style) = {
            let v = &self.viewers[slot as usize];
            (v.stream, v.id, v.end, v.style)
        };
        self.emit(self.now, stream, viewer, Body::Chat);
        if repeat {
            self.schedule_chat(slot, epoch, style, stream, end);
        }
    }

    /// Schedules this viewer's next chat message, if its style chats and the
    /// session lasts that long.
    fn schedule_chat(&mut self, slot: u32, epoch: u32, style: Style, stream: u32, end: u64) {
        if let Some(gap) = self.chat_gap(style, stream) {
            if self.now + gap < end {
                let repeat = true;
                self.at(
                    self.now + gap,
                    Action::Chat {
                        slot,
                        epoch,
                        repeat,
                    },
                );
            }
        }
    }

    fn chat_gap(&mut self, style: Style, stream: u32) -> Option<u64> {
        let gap = match style {
            Style::Lurker => return None,
            Style::Occasional => self.exp_ms(30_000.0),
            Style::Chatty => {
                if self.rng.random_bool(0.3) {
                    self.rng.random_range(800..=4000)
                } else {
                    self.exp_ms(8_000.0)
                }
            }
        };
        let hype = self.now < self.streams[stream as usize].hype_until;
        Some(if hype { gap / 4 } else { gap }.max(200))
    }

    fn ad_break(&mut self, stream: u32) {
        let now = self.now;
        let members = self.streams[stream as usize].members.clone();
        for slot in members {
            let epoch = self.viewers[slot as usize].epoch;
            let pod = if self.rng.random_bool(0.35) { 2 } else { 1 };
            // Clients fetch their ads at slightly different times.
            let mut t = now + self.rng.random_range(0..=20_000);
            for _ in 0..pod {
                let ad = Action::Ad {
                    slot,
                    epoch,
                    repeat: false,
                };
                self.at(t, ad);
                t += self.rng.random_range(15_000..=31_000);
            }
        }
        let next = now + self.rng.random_range(AD_BREAK_MIN_MS..=AD_BREAK_MAX_MS);
        self.at(next, Action::AdBreak { stream });
    }

    fn hype(&mut self, stream: u32) {
        let now = self.now;
        let until = now + self.rng.random_range(10_000..=45_000);
        self.streams[stream as usize].hype_until = until;
        let n = self.streams[stream as usize].members.len();
        for _ in 0..(n / 8).min(400) {
            let slot = self.streams[stream as usize].members[self.rng.random_range(0..n)];
            let epoch = self.viewers[slot as usize].epoch;
            let t = now + self.rng.random_range(0..=10_000);
            self.at(
                t,
                Action::Chat {
                    slot,
                    epoch,
                    repeat: false,
                },
            );
        }
        let next = until + self.exp_ms(150_000.0);
        self.at(next, Action::Hype { stream });
    }

    // ----- ads ----------------------------------------------------------

    fn impression(&mut self, stream: u32, viewer: u64) {
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
        let body = Body::Impression { imp, ad, price };
        let mut key = self.key(now);
        if plant == Some(ImpPlant::ProgressFirst) && !steps.is_empty() {
            // The progress gets the impression's (late) arrival key and an
            // earlier sequence number, so it arrives just before it.
            let (off, watched) = steps.remove(0);
            let ts = now + off.min(self.half);
            key = now + self.half;
            let bytes = self.record(ts, stream, viewer, Body::Progress { imp, watched });
            self.push_valid(ts, key, bytes, 0);
        }
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
        let dup = Action::DupImpression {
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
                self.at(t, dup);
            }
            Some(ImpPlant::OtherStream) => {
                let n = self.streams.len() as u32;
                let other = if n > 1 {
                    (stream + self.rng.random_range(1..n)) % n
                } else {
                    stream + 1
                };
                let t = now + self.rng.random_range(0..=1500);
                self.at(
                    t,
                    Action::DupImpression {
                        stream: other,
                        viewer,
                        imp,
                        ad,
                        price,
                    },
                );
            }
            _ => {}
        }
    }

    fn random_imp_plant(&mut self) -> Option<ImpPlant> {
        let u: f64 = self.rng.random();
        if u < self.p_dup {
            Some(DUP_PLANTS[self.rng.random_range(0..DUP_PLANTS.len())])
        } else if u < self.p_dup + EDGE_PLANT_RATE {
            Some(EDGE_PLANTS[self.rng.random_range(0..EDGE_PLANTS.len())])
        } else {
            None
        }
    }

    /// The `ad_progress` updates of one impression: (offset from the
    /// impression's ts, cumulative watched ms).
    fn plan(&mut self, plant: Option<ImpPlant>) -> Vec<(u64, u64)> {
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

    fn ad_length(&mut self) -> u64 {
        match self.rng.random_range(0..100) {
            0..15 => 6_000,
            15..60 => 15_000,
            _ => 30_000,
        }
    }

    /// Watched roughly in real time, qualifying within seconds.
    fn fast_plan(&mut self) -> Vec<(u64, u64)> {
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
    fn slow_plan(&mut self, resume: u64) -> Vec<(u64, u64)> {
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
    fn never_plan(&mut self) -> Vec<(u64, u64)> {
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
    fn pick_ad(&mut self) -> u64 {
        let u: f64 = self.rng.random();
        ((u * u * N_ADS as f64) as u64).min(N_ADS - 1)
    }

    fn price(&mut self, ad: u64) -> u64 {
        let base = 500 + splitmix(ad) % 49_501;
        (base * self.rng.random_range(80..=120) / 100).clamp(500, 50_000)
    }

    // ----- planted faults -------------------------------------------------

    /// Queues every planted case for the next block of records.
    fn schedule_block(&mut self) {
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

    fn fire_due_plants(&mut self) {
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
    fn late(&mut self) {
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

    fn malformed(&mut self, kind: Mal) {
        let key = self.now + self.jitter();
        let bytes = self.malformed_bytes(kind);
        self.push_raw(key, bytes, F_MALFORMED);
    }

    fn malformed_bytes(&mut self, kind: Mal) -> Vec<u8> {
        let ts = self.now;
        let (stream, viewer) = self.random_present();
        let body = match kind {
            Mal::NegativePrice | Mal::PriceTooLarge => self.some_body(2),
            Mal::WatchedTooLarge => self.some_body(3),
            _ => {
                let pick = self.rng.random_range(0..6);
                self.some_body(pick)
            }
        };
        let eid = self.next_event;
        self.next_event += 1;
        let mut fields = fields(eid, ts, stream, viewer, body);
        let set = |fields: &mut Vec<(&'static str, Val)>, name: &str, val: Val| {
            if let Some(f) = fields.iter_mut().find(|f| f.0 == name) {
                f.1 = val;
            }
        };
        let id_field = ["event_id", "stream_id", "viewer_id"][self.rng.random_range(0..3)];
        match kind {
            Mal::NotJson => {
                const GARBAGE: [&[u8]; 5] = [
                    b"hello world",
                    b"<html><head><title>502 Bad Gateway</title></head></html>",
                    b"{type: heartbeat, ts: 1700000000000}",
                    b"event=join stream=stream-1 viewer=v-1",
                    b"{\"type\":\"chat\",\"event_id\":'e-1'}",
                ];
                return GARBAGE[self.rng.random_range(0..GARBAGE.len())].to_vec();
            }
            Mal::Truncated => {
                let mut bytes = render(&fields);
                let len = self.rng.random_range(1..bytes.len());
                bytes.truncate(len);
                return bytes;
            }
            Mal::Array => return b"[1]".to_vec(),
            Mal::NotObject => {
                const NOT_OBJECTS: [&[u8]; 4] = [b"null", b"42", b"\"heartbeat\"", b"true"];
                return NOT_OBJECTS[self.rng.random_range(0..NOT_OBJECTS.len())].to_vec();
            }
            Mal::Blank => return Vec::new(),
            Mal::UnknownType => {
                const TYPES: [&str; 7] = [
                    "like",
                    "follow",
                    "gift",
                    "subscribe",
                    "JOIN",
                    "Heartbeat",
                    "",
                ];
                let t = TYPES[self.rng.random_range(0..TYPES.len())];
                set(&mut fields, "type", Val::S(t.to_string()));
            }
            Mal::MissingField => {
                let i = self.rng.random_range(0..fields.len());
                fields.remove(i);
            }
            Mal::TsFloat => {
                let raw = match self.rng.random_range(0..3) {
                    0 => "2e3".to_string(),
                    1 => format!("{}.{:03}e3", ts / 1000, ts % 1000),
                    _ => format!("{ts}.0"),
                };
                set(&mut fields, "ts", Val::Raw(raw.into_bytes()));
            }
            Mal::TsString => set(&mut fields, "ts", Val::S(ts.to_string())),
            Mal::TsNegative => set(&mut fields, "ts", Val::Raw(format!("-{ts}").into_bytes())),
            Mal::NegativePrice => {
                let p = self.rng.random_range(500..=50_000);
                set(
                    &mut fields,
                    "price_micros",
                    Val::Raw(format!("-{p}").into_bytes()),
                );
            }
            Mal::PriceTooLarge => set(&mut fields, "price_micros", Val::N(PRICE_MICROS_MAX + 1)),
            Mal::WatchedTooLarge => set(&mut fields, "watched_ms", Val::N(WATCHED_MS_MAX + 1)),
            Mal::LongId => {
                let mut id = format!("{}-", id_field.trim_end_matches("_id"));
                while id.len() <= MAX_STR_BYTES {
                    id.push(char::from(b'a' + self.rng.random_range(0..26u8)));
                }
                set(&mut fields, id_field, Val::S(id));
            }
            Mal::EmptyId => set(&mut fields, id_field, Val::S(String::new())),
            Mal::IdNotString => {
                let val = if self.rng.random_bool(0.5) {
                    Val::N(u64::from(stream) + 1)
                } else {
                    Val::Raw(b"null".to_vec())
                };
                set(&mut fields, id_field, val);
            }
            Mal::DuplicateKeys => match self.rng.random_range(0..3) {
                0 => fields.push(("ts", Val::N(ts + 1))),
                1 => fields.insert(1, ("type", Val::S("leave".to_string()))),
                _ => fields.push(("viewer_id", Val::S(format!("v-{}", viewer + 1)))),
            },
            Mal::InvalidUtf8 => {
                let mut raw = format!("\"v-{viewer}").into_bytes();
                raw.extend_from_slice(b"\xff\xfe\"");
                set(&mut fields, "viewer_id", Val::Raw(raw));
            }
            Mal::LoneSurrogate => set(
                &mut fields,
                "viewer_id",
                Val::Raw(b"\"v-\\ud800\"".to_vec()),
            ),
        }
        render(&fields)
    }

    /// A body for a malformed line: 0 heartbeat, 1 chat, 2 impression,
    /// 3 ad_progress, 4 join, 5 leave.
    fn some_body(&mut self, pick: u32) -> Body {
        match pick {
            0 => Body::Heartbeat,
            1 => Body::Chat,
            2 => {
                let imp = self.next_imp;
                self.next_imp += 1;
                let ad = self.pick_ad();
                let price = self.price(ad);
                Body::Impression { imp, ad, price }
            }
            3 => Body::Progress {
                imp: self.next_imp.saturating_sub(1).max(1),
                watched: self.rng.random_range(0..=30_000),
            },
            4 => Body::Join,
            _ => Body::Leave,
        }
    }

    /// A (stream, viewer) currently watching, or a fresh viewer id.
    fn random_present(&mut self) -> (u32, u64) {
        let stream = self.pick_stream();
        let members = &self.streams[stream as usize].members;
        if members.is_empty() {
            let id = self.next_viewer;
            self.next_viewer += 1;
            (stream, id)
        } else {
            let slot = members[self.rng.random_range(0..members.len())];
            (stream, self.viewers[slot as usize].id)
        }
    }

    // ----- records ----------------------------------------------------

    /// Arrival key of a record with event time `ts`.
    fn key(&mut self, ts: u64) -> u64 {
        if self.created == 0 {
            ts // the first record arrives first
        } else {
            ts + self.jitter()
        }
    }

    fn jitter(&mut self) -> u64 {
        if self.half == 0 {
            0
        } else {
            self.rng.random_range(0..=self.half)
        }
    }

    /// Encodes a valid event with a fresh event id.
    fn record(&mut self, ts: u64, stream: u32, viewer: u64, body: Body) -> Vec<u8> {
        let eid = self.next_event;
        self.next_event += 1;
        encode(eid, ts, stream, viewer, body)
    }

    /// Creates a valid on-time event and queues it.
    fn emit(&mut self, ts: u64, stream: u32, viewer: u64, body: Body) {
        let flags = if matches!(body, Body::Impression { .. }) {
            F_IMPRESSION
        } else {
            0
        };
        let key = self.key(ts);
        let bytes = self.record(ts, stream, viewer, body);
        self.push_valid(ts, key, bytes, flags);
    }

    /// Queues a valid on-time record, and maybe a retry of it, a late event
    /// or a malformed line.
    fn push_valid(&mut self, ts: u64, key: u64, bytes: Vec<u8>, flags: u8) {
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

    fn push_raw(&mut self, key: u64, bytes: Vec<u8>, flags: u8) {
        debug_assert!(key >= self.now);
        self.seq += 1;
        self.out.push(key, self.seq, Out { flags, bytes });
        self.created += 1;
        self.created_in_tick += 1;
        if self.created >= self.next_block * BLOCK {
            self.schedule_block();
        }
    }

    // ----- sampling -----------------------------------------------------

    fn pick_stream(&mut self) -> u32 {
        let u: f64 = self.rng.random();
        let i = self.zipf_cdf.partition_point(|&c| c < u);
        i.min(self.zipf_cdf.len() - 1) as u32
    }

    fn session_length(&mut self) -> u64 {
        let mut u: f64 = self.rng.random();
        for &(p, lo, hi) in &SESSIONS {
            if u < p {
                return self.rng.random_range(lo..=hi);
            }
            u -= p;
        }
        let (_, lo, hi) = SESSIONS[SESSIONS.len() - 1];
        self.rng.random_range(lo..=hi)
    }

    /// Remaining session of a viewer already present (length-biased class,
    /// uniform position within the session).
    fn residual_session(&mut self) -> u64 {
        let weight = |&(p, lo, hi): &(f64, u64, u64)| p * (lo + hi) as f64;
        let total: f64 = SESSIONS.iter().map(weight).sum();
        let mut u = self.rng.random::<f64>() * total;
        let mut class = SESSIONS[SESSIONS.len() - 1];
        for s in &SESSIONS {
            if u < weight(s) {
                class = *s;
                break;
            }
            u -= weight(s);
        }
        let length = self.rng.random_range(class.1..=class.2);
        (length as f64 * self.rng.random::<f64>()).max(1000.0) as u64
    }

    /// Exponentially distributed duration (ms) with the given mean.
    fn exp_ms(&mut self, mean: f64) -> u64 {
        let u: f64 = self.rng.random();
        (-(1.0 - u).ln() * mean) as u64
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

// ----- encoding ---------------------------------------------------------

/// Builds one JSON object with serde_json's compact formatter. Keys and
/// values written with [`Obj::id`] must not need escaping (they are ASCII
/// letters, digits, `-` and `_`).
struct Obj {
    buf: Vec<u8>,
    first: bool,
}

/// Writing into a `Vec<u8>` cannot fail.
fn infallible(r: io::Result<()>) {
    debug_assert!(r.is_ok());
}

impl Obj {
    fn new() -> Self {
        let mut buf = Vec::with_capacity(224);
        infallible(CompactFormatter.begin_object(&mut buf));
        Obj { buf, first: true }
    }

    fn key(&mut self, key: &str) {
        let f = &mut CompactFormatter;
        infallible(f.begin_object_key(&mut self.buf, self.first));
        self.first = false;
        infallible(f.begin_string(&mut self.buf));
        infallible(f.write_string_fragment(&mut self.buf, key));
        infallible(f.end_string(&mut self.buf));
        infallible(f.end_object_key(&mut self.buf));
        infallible(f.begin_object_value(&mut self.buf));
    }

    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        let f = &mut CompactFormatter;
        infallible(f.begin_string(&mut self.buf));
        infallible(f.write_string_fragment(&mut self.buf, value));
        infallible(f.end_string(&mut self.buf));
        infallible(f.end_object_value(&mut self.buf));
    }

    /// A string value `"<prefix><n>"`.
    fn id(&mut self, key: &str, prefix: &str, n: u64) {
        self.key(key);
        let f = &mut CompactFormatter;
        infallible(f.begin_string(&mut self.buf));
        infallible(f.write_string_fragment(&mut self.buf, prefix));
        infallible(f.write_u64(&mut self.buf, n));
        infallible(f.end_string(&mut self.buf));
        infallible(f.end_object_value(&mut self.buf));
    }

    fn num(&mut self, key: &str, n: u64) {
        self.key(key);
        let f = &mut CompactFormatter;
        infallible(f.write_u64(&mut self.buf, n));
        infallible(f.end_object_value(&mut self.buf));
    }

    fn finish(mut self) -> Vec<u8> {
        infallible(CompactFormatter.end_object(&mut self.buf));
        self.buf
    }
}

fn campaign_of(ad: u64) -> u64 {
    ad % N_CAMPAIGNS
}

fn advertiser_of(ad: u64) -> u64 {
    campaign_of(ad) % N_ADVERTISERS
}

/// One valid event, keys in wire order.
fn encode(eid: u64, ts: u64, stream: u32, viewer: u64, body: Body) -> Vec<u8> {
    let mut o = Obj::new();
    o.text("type", body.name());
    o.id("event_id", "e-", eid);
    o.num("ts", ts);
    o.id("stream_id", "stream-", u64::from(stream) + 1);
    o.id("viewer_id", "v-", viewer);
    match body {
        Body::Impression { imp, ad, price } => {
            o.id("impression_id", "imp-", imp);
            o.id("ad_id", "ad-", ad + 1);
            o.id("campaign_id", "cmp-", campaign_of(ad) + 1);
            o.id("advertiser_id", "adv-", advertiser_of(ad) + 1);
            o.num("price_micros", price);
        }
        Body::Progress { imp, watched } => {
            o.id("impression_id", "imp-", imp);
            o.num("watched_ms", watched);
        }
        Body::Join | Body::Leave | Body::Heartbeat | Body::Chat => {}
    }
    o.finish()
}

/// A field value of a (possibly malformed) line.
enum Val {
    S(String),
    N(u64),
    /// Written verbatim.
    Raw(Vec<u8>),
}

/// The fields of a valid event, for mutation into a malformed one.
fn fields(eid: u64, ts: u64, stream: u32, viewer: u64, body: Body) -> Vec<(&'static str, Val)> {
    let mut f = vec![
        ("type", Val::S(body.name().to_string())),
        ("event_id", Val::S(format!("e-{eid}"))),
        ("ts", Val::N(ts)),
        (
            "stream_id",
            Val::S(format!("stream-{}", u64::from(stream) + 1)),
        ),
        ("viewer_id", Val::S(format!("v-{viewer}"))),
    ];
    match body {
        Body::Impression { imp, ad, price } => {
            f.push(("impression_id", Val::S(format!("imp-{imp}"))));
            f.push(("ad_id", Val::S(format!("ad-{}", ad + 1))));
            f.push((
                "campaign_id",
                Val::S(format!("cmp-{}", campaign_of(ad) + 1)),
            ));
            f.push((
                "advertiser_id",
                Val::S(format!("adv-{}", advertiser_of(ad) + 1)),
            ));
            f.push(("price_micros", Val::N(price)));
        }
        Body::Progress { imp, watched } => {
            f.push(("impression_id", Val::S(format!("imp-{imp}"))));
            f.push(("watched_ms", Val::N(watched)));
        }
        Body::Join | Body::Leave | Body::Heartbeat | Body::Chat => {}
    }
    f
}

fn render(fields: &[(&'static str, Val)]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    let f = &mut CompactFormatter;
    infallible(f.begin_object(&mut buf));
    for (i, (key, val)) in fields.iter().enumerate() {
        infallible(f.begin_object_key(&mut buf, i == 0));
        serde_json::to_writer(&mut buf, key).expect("writing to a Vec");
        infallible(f.begin_object_value(&mut buf));
        match val {
            Val::S(s) => serde_json::to_writer(&mut buf, s).expect("writing to a Vec"),
            Val::N(n) => infallible(f.write_u64(&mut buf, *n)),
            Val::Raw(raw) => buf.extend_from_slice(raw),
        }
    }
    infallible(f.end_object(&mut buf));
    buf
}

/// A fixed 64-bit mix (SplitMix64's finaliser), for per-ad base prices.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
