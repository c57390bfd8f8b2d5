//! Live path: concurrent viewers and chat rate per stream, every second.
//!
//! Creators want numbers that are fresh, not numbers that are final, so this
//! path never waits for the event-time frontier. Events are exchanged by
//! `stream_id` to an operator that keeps per-stream state ([`LiveStreams`])
//! and, on a wall-clock tick, emits a [`Snapshot`] of every *active* stream
//! it owns from whatever has arrived so far. It keeps a capability at its
//! input frontier only so that it may emit at all; the updates it sends are
//! consumed on arrival, not at frontier progress, so a stalled frontier
//! (billing waiting for a slow partition) never delays a tick.
//!
//! `now` is the highest event time the pipeline has seen (every worker's
//! highest, broadcast as the clock stream of [`crate::route`]), so
//! replaying an old file behaves like live, in one process or many.
//!
//! # Retirement and the bound
//!
//! Stream ids come from producers, and a platform that runs for weeks sees
//! every broadcast ever started, so per-stream state must not live forever:
//!
//! * A stream is *quiet* from `quiet_at` on: the presence TTL after its
//!   latest join, heartbeat, leave or chat, or a minute after its latest
//!   chat if that is later. From then on its counts are 0 and stay 0 until
//!   it sends again (a leave counts too: a late presence older than it must
//!   still meet it). An active stream (new, or `now < quiet_at` at the last
//!   tick) gets a snapshot every tick; the tick that finds it quiet emits
//!   its `0, 0` snapshot, frees its viewer and chat maps and stops
//!   snapshotting it. A quiet stream costs no tick any work.
//! * Once quiet for longer than the TTL (`now > quiet_at + ttl`) it is
//!   *retired*: its state is dropped and a [`LiveUpdate::Retired`] tells the
//!   board to drop it too (after a last `0, 0` snapshot if no tick saw it
//!   quiet; nothing at all for a stream no tick ever showed). Every held
//!   stream has one entry on an expiry queue, buckets of
//!   [`EXPIRY_BUCKET_MS`] keyed by `quiet_at + ttl` as it was when queued;
//!   an entry that comes up for a stream that sent since is queued again
//!   at its new deadline. So retirement is O(1) amortised per stream and
//!   per TTL it stays active, never a scan, and it runs whenever the clock
//!   moves, not only at ticks (a replayed file moves the clock minutes a
//!   second). A signal for a retired stream starts it afresh, which counts
//!   exactly what the old state would have: everything the old state held
//!   is older than `now - 2 ttl` (chat `now - 60 s - ttl`) and can no
//!   longer count nor cancel a newer signal.
//! * At most [`MAX_LIVE_STREAMS`] streams are held over all workers (each
//!   worker its share). At the bound a new stream first evicts a quiet
//!   stream (the one that went quiet first, give or take a bucket): its
//!   counts are 0 and its grace period is all it loses. With no quiet
//!   stream to evict, the new stream's signals are dropped and it is
//!   counted, once while the bound holds, in [`LiveUpdate::Dropped`]
//!   (`livepipe_live_streams_dropped_total`). Streams with viewers or chat
//!   are never evicted: a flood of made-up ids cannot push real streams off
//!   the dashboard nor make their numbers wrong, only keep new streams out
//!   until the flood goes quiet. (Evicting the least active stream instead
//!   would let the flood churn real small streams out, each coming back
//!   with counts missing, and needs an ordered index on every update.)
//!
//! So a tick costs O(active streams + streams retired), never O(streams
//! ever seen), and the end of a finite input emits one last snapshot of
//! every stream still held (not retired), at the final `now`, deciding
//! retirement exactly.
//!
//! # Bounded turns
//!
//! The live operator shares its worker with billing, and billing shares it
//! with the live operator: neither may hold it long (see
//! [`crate::turns`]). A burst of signals is taken off the input at once (a
//! move each) and applied [`LIVE_SLICE_SIGNALS`] at a time, in arrival
//! order, one slice per invocation; a due tick follows the slice, so it is
//! at most a slice late and counts what the slice brought. The end of the
//! input is decided only once no signal is left to apply.

use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::PipelineConfig;
use crate::event::{EventKind, Ingested, Text};
use crate::probe::Probes;
use crate::route::RouteKey;
use crate::time::{wall_clock_ms, Time};
use crate::turns::{Path, Slice};

/// Chat rate is counted over this much event time.
pub const CHAT_WINDOW_MS: u64 = 60_000;

/// Streams held by the live path at once, over all workers (each worker
/// holds at most `MAX_LIVE_STREAMS / workers`), and so on the board.
///
/// Measured with a counting allocator: a held stream with one viewer costs
/// about 550 bytes in the dataflow (330 once quiet) and 190 on the board,
/// so the bound caps the live state near 75 MB plus the viewers beyond the
/// first of each stream. 100,000 streams live at once is far above what
/// one dashboard process serves; past it new streams wait (see the module
/// doc) and are counted, the streams already shown keep their numbers.
pub const MAX_LIVE_STREAMS: usize = 100_000;

/// At most this many signals are applied per invocation of the live
/// operator (and at most [`crate::turns::SLICE_TIME`]); a burst beyond it
/// waits, in arrival order, for the next invocation.
const LIVE_SLICE_SIGNALS: usize = 8 * 1024;

/// Width of an expiry-queue bucket, in event-time ms. A bucket is retired
/// once all of it is past, so a stream retires at most this much event
/// time late mid-run (never at the end of an input, which is exact).
pub const EXPIRY_BUCKET_MS: u64 = 1_000;

/// One stream's numbers at one tick.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Snapshot {
    pub stream_id: Text,
    /// Distinct viewers present (see docs/contract.md, Live path).
    pub viewers: u64,
    /// `chat` events with `ts` in `(as_of - 60 s, as_of]`.
    pub chat_per_min: u64,
    /// The event time the counts are computed at (the highest seen).
    pub as_of: u64,
    /// Wall-clock ms of the tick.
    pub emitted_at: u64,
}

/// What the live path tells the board. One stream's updates all come from
/// the worker that owns it, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LiveUpdate {
    /// A stream's latest numbers.
    Snapshot(Snapshot),
    /// The stream retired (quiet for longer than the TTL, or evicted while
    /// quiet at the bound) after a last `0, 0` snapshot: forget it.
    Retired(Text),
    /// This many streams were refused at [`MAX_LIVE_STREAMS`] since the
    /// worker's last report.
    Dropped(u64),
}

/// The part of an event the live path needs: what enters [`live`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    stream_id: Text,
    viewer_id: Text,
    ts: u64,
    kind: SignalKind,
    /// When its source stamped it (wall-clock ms), for the latency probe.
    ingested_at_ms: u64,
}

/// What a live event says about its viewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignalKind {
    /// `join` or `heartbeat`.
    Presence,
    Leave,
    /// A chat message: presence, and one more for the chat rate.
    Chat,
}

/// Latest signals of one viewer on one stream.
#[derive(Default)]
struct Viewer {
    presence: u64,
    leave: u64,
}

impl Viewer {
    /// Present if the latest presence is fresh and no leave is at or after it.
    fn present(&self, horizon: u64) -> bool {
        self.presence > horizon && self.leave < self.presence
    }
}

#[derive(Default)]
struct StreamState {
    viewers: HashMap<Text, Viewer>,
    /// Chat count per event-time ms, sorted by ms, pruned to the last
    /// minute. A deque rather than a map: chat arrives nearly in order (an
    /// insert lands near the back), and a stream with one chat costs 16
    /// bytes here, not a map node.
    chats: VecDeque<(u64, u64)>,
}

impl StreamState {
    fn apply(&mut self, viewer_id: Text, ts: u64, kind: SignalKind, now: u64) {
        let viewer = self.viewers.entry(viewer_id).or_default();
        match kind {
            SignalKind::Leave => viewer.leave = viewer.leave.max(ts),
            SignalKind::Presence | SignalKind::Chat => {
                viewer.presence = viewer.presence.max(ts);
                if kind == SignalKind::Chat {
                    self.chat(ts, now);
                }
            }
        }
    }

    /// Counts a chat at `ts`, `now` being the event clock.
    fn chat(&mut self, ts: u64, now: u64) {
        // What the next snapshot would drop (its `now` is at least this
        // one) goes now: a replay moves the clock minutes between two
        // ticks, and the window must not grow with it.
        let chat_floor = now.saturating_sub(CHAT_WINDOW_MS);
        while self.chats.front().is_some_and(|&(t, _)| t <= chat_floor) {
            self.chats.pop_front();
        }
        match self.chats.back_mut() {
            Some((last, n)) if *last == ts => *n += 1,
            Some((last, _)) if *last > ts => {
                let at = self.chats.partition_point(|&(t, _)| t < ts);
                match self.chats.get_mut(at) {
                    Some((t, n)) if *t == ts => *n += 1,
                    _ => self.chats.insert(at, (ts, 1)),
                }
            }
            _ => self.chats.push_back((ts, 1)),
        }
    }

    /// Counts at `now`, forgetting what can no longer count: a viewer whose
    /// latest presence *and* leave are both older than the TTL horizon can
    /// never be present again without a newer signal.
    fn snapshot(&mut self, now: u64, ttl: u64) -> (u64, u64) {
        let horizon = now.saturating_sub(ttl);
        self.viewers
            .retain(|_, v| v.presence > horizon || v.leave > horizon);
        let viewers = self.viewers.values().filter(|v| v.present(horizon)).count() as u64;
        let chat_floor = now.saturating_sub(CHAT_WINDOW_MS);
        // Keep (chat_floor, now]; anything at or below the floor is gone for good.
        let gone = self.chats.partition_point(|&(t, _)| t <= chat_floor);
        self.chats.drain(..gone);
        let counted = self.chats.partition_point(|&(t, _)| t <= now);
        let chat_per_min = self.chats.range(..counted).map(|(_, n)| n).sum();
        (viewers, chat_per_min)
    }
}

/// One held stream.
struct Held {
    /// The map's key, shared (one allocation per stream). The active list
    /// and the expiry queue hold clones; an entry whose pointer is not the
    /// held stream's is left over from a retired stream of the same id.
    id: Rc<str>,
    state: StreamState,
    /// From this event time on the counts are 0 until a new signal (see
    /// the module doc); retired once `now > quiet_at + ttl`.
    quiet_at: u64,
    /// In the active list: snapshotted at every tick.
    active: bool,
    /// A snapshot of it has been emitted: the board shows it.
    shown: bool,
}

/// A stream that left at the bound, to be reported at the next flush.
struct Evicted {
    id: Rc<str>,
    /// Its last snapshot was not `0, 0`: send one first, at this `now`.
    zero_at: Option<u64>,
}

/// The live state of the streams one worker owns: counts, retirement and
/// the bound (see the module doc). The operator feeds it signals and
/// clock readings, calls [`LiveStreams::advance`] whenever the clock moves,
/// [`LiveStreams::tick`] every tick and [`LiveStreams::finish`] at the end.
pub struct LiveStreams {
    ttl: u64,
    max_streams: usize,
    streams: HashMap<Rc<str>, Held>,
    /// Streams snapshotted every tick (new, or not quiet at the last tick).
    active: Vec<Rc<str>>,
    /// Every held stream once, by `(quiet_at + ttl) / EXPIRY_BUCKET_MS`
    /// as it was when queued; a stream whose `quiet_at` moved on since is
    /// queued again when its entry comes up.
    expiry: BTreeMap<u64, Vec<Rc<str>>>,
    /// Hashes of streams refused at the bound while it holds, so that one
    /// refused stream is counted once, not once per record (bounded too).
    refused: HashSet<u64>,
    /// Refused since the last report.
    dropped: u64,
    /// Evicted at the bound, to be reported before anything else.
    evicted: Vec<Evicted>,
    /// Entries of `active` left by streams retired since (compacted once
    /// they are half of it).
    stale_active: usize,
}

impl LiveStreams {
    /// State for streams with presence TTL `ttl`, holding at most
    /// `max_streams` (at least 1).
    pub fn new(ttl: u64, max_streams: usize) -> Self {
        LiveStreams {
            ttl,
            max_streams: max_streams.max(1),
            streams: HashMap::new(),
            active: Vec::new(),
            expiry: BTreeMap::new(),
            refused: HashSet::new(),
            dropped: 0,
            evicted: Vec::new(),
            stale_active: 0,
        }
    }

    /// Streams held (active or quiet, not retired).
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Entries on the active list (streams snapshotted at the next tick,
    /// and leftovers of streams retired since the last one).
    pub fn active_len(&self) -> usize {
        self.active.len()
    }

    /// Entries on the expiry queue: one per held stream.
    pub fn queued_len(&self) -> usize {
        self.expiry.values().map(Vec::len).sum()
    }

    /// Applies one live signal, `now` being the event clock. A stream it
    /// makes new past the bound evicts a quiet stream or is refused (and
    /// counted).
    pub fn apply(&mut self, stream_id: Text, viewer_id: Text, ts: u64, kind: SignalKind, now: u64) {
        let until = match kind {
            SignalKind::Chat => ts.saturating_add(self.ttl.max(CHAT_WINDOW_MS)),
            SignalKind::Presence | SignalKind::Leave => ts.saturating_add(self.ttl),
        };
        let held = match self.streams.get_mut(stream_id.as_str()) {
            Some(held) => held,
            None => {
                if !self.admit(&stream_id, now) {
                    return;
                }
                let id: Rc<str> = Rc::from(stream_id.as_str());
                let held = self.streams.entry(id.clone()).or_insert(Held {
                    id,
                    state: StreamState::default(),
                    quiet_at: until,
                    active: false,
                    shown: false,
                });
                Self::enqueue(&mut self.expiry, held, self.ttl);
                held
            }
        };
        held.state.apply(viewer_id, ts, kind, now);
        held.quiet_at = held.quiet_at.max(until);
        if !held.active {
            held.active = true;
            self.active.push(held.id.clone());
        }
    }

    /// Whether a new stream may be held: below the bound, or once a quiet
    /// stream is evicted to make room. Counts the refused.
    fn admit(&mut self, stream_id: &str, now: u64) -> bool {
        if self.streams.len() < self.max_streams || self.evict_one(now) {
            if !self.refused.is_empty() {
                self.refused.remove(&stream_hash(stream_id));
            }
            return true;
        }
        let hash = stream_hash(stream_id);
        if !self.refused.contains(&hash) {
            if self.refused.len() >= MAX_LIVE_STREAMS {
                // Bounded too (about 16 bytes a hash): a stream refused
                // again after this many others is counted again.
                self.refused.clear();
            }
            self.refused.insert(hash);
            self.dropped += 1;
        }
        false
    }

    /// Evicts the quiet stream (`quiet_at <= now`) that went quiet first,
    /// if there is one. Only entries queued within a TTL of `now` can be
    /// quiet; those found not quiet are queued again at their later
    /// deadline, past that range, so each is looked at once per move.
    fn evict_one(&mut self, now: u64) -> bool {
        let ttl = self.ttl;
        let horizon = now.saturating_add(ttl) / EXPIRY_BUCKET_MS;
        let mut requeue = Vec::new();
        let mut found = None;
        while let Some(mut bucket) = self.expiry.first_entry() {
            if *bucket.key() > horizon {
                break;
            }
            let Some(id) = bucket.get_mut().pop() else {
                bucket.remove();
                continue;
            };
            let held = &self.streams[&id];
            if held.quiet_at <= now {
                found = Some(id);
                break;
            }
            requeue.push(id);
        }
        for id in requeue {
            let held = self.streams.get_mut(&id).expect("queued streams are held");
            Self::enqueue(&mut self.expiry, held, ttl);
        }
        let Some(id) = found else {
            return false;
        };
        let held = self.streams.remove(&id).expect("queued streams are held");
        self.stale_active += usize::from(held.active);
        if held.shown {
            // Its row says 0, 0 unless no tick saw it quiet yet.
            let zero_at = held.active.then_some(now);
            self.evicted.push(Evicted { id, zero_at });
        }
        true
    }

    fn enqueue(expiry: &mut BTreeMap<u64, Vec<Rc<str>>>, held: &Held, ttl: u64) {
        let deadline = held.quiet_at.saturating_add(ttl);
        expiry
            .entry(deadline / EXPIRY_BUCKET_MS)
            .or_default()
            .push(held.id.clone());
    }

    /// Retires the streams quiet for longer than the TTL at `now`, whose
    /// queue buckets are wholly past, and reports evictions: what the clock
    /// moving does between ticks too (a replayed file moves it minutes a
    /// second). O(retired + streams queued again), nothing when no bucket
    /// is due.
    pub fn advance(&mut self, now: u64, emitted_at: u64, mut out: impl FnMut(LiveUpdate)) {
        self.flush_evicted(emitted_at, &mut out);
        let ttl = self.ttl;
        while let Some(bucket) = self.expiry.first_entry() {
            if (bucket.key() + 1).saturating_mul(EXPIRY_BUCKET_MS) > now {
                break;
            }
            for id in bucket.remove() {
                let held = self.streams.get_mut(&id).expect("queued streams are held");
                if held.quiet_at.saturating_add(ttl) >= now {
                    // It sent since it was queued.
                    Self::enqueue(&mut self.expiry, held, ttl);
                    continue;
                }
                let held = self.streams.remove(&id).expect("held");
                self.stale_active += usize::from(held.active);
                Self::retired(held, now, emitted_at, &mut out);
            }
        }
        if self.stale_active > 1_024 && self.stale_active * 2 > self.active.len() {
            // Amortised O(1) a retirement; keeps retired ids from living on
            // in the list until the next tick.
            let streams = &self.streams;
            self.active
                .retain(|id| streams.get(id).is_some_and(|h| Rc::ptr_eq(&h.id, id)));
            self.stale_active = 0;
        }
        if self.streams.len() < self.max_streams && !self.refused.is_empty() {
            // Room again: a stream refused before is counted anew if
            // refused again.
            self.refused.clear();
        }
    }

    /// Whether [`LiveStreams::advance`] at `now` has anything to do.
    pub fn due(&self, now: u64) -> bool {
        !self.evicted.is_empty()
            || self
                .expiry
                .first_key_value()
                .is_some_and(|(key, _)| (key + 1).saturating_mul(EXPIRY_BUCKET_MS) <= now)
    }

    /// Tells the board a stream is gone: a last `0, 0` snapshot unless its
    /// row already says so, then the retirement; nothing for a stream it
    /// never showed.
    fn retired(held: Held, now: u64, emitted_at: u64, out: &mut impl FnMut(LiveUpdate)) {
        if !held.shown {
            return;
        }
        if held.active {
            out(LiveUpdate::Snapshot(Snapshot {
                stream_id: Text::from(&*held.id),
                viewers: 0,
                chat_per_min: 0,
                as_of: now,
                emitted_at,
            }));
        }
        out(LiveUpdate::Retired(Text::from(&*held.id)));
    }

    /// One tick at event time `now`: retirements due (see
    /// [`LiveStreams::advance`]), a snapshot of every active stream (the
    /// ones found quiet leave the active list and free their maps), and
    /// the count of streams refused since the last tick.
    /// O(active + retired), whatever else is held.
    pub fn tick(&mut self, now: u64, emitted_at: u64, mut out: impl FnMut(LiveUpdate)) {
        self.advance(now, emitted_at, &mut out);
        let LiveStreams {
            ttl,
            streams,
            active,
            ..
        } = self;
        let ttl = *ttl;
        active.retain(|id| {
            let Some(held) = streams.get_mut(id).filter(|h| Rc::ptr_eq(&h.id, id)) else {
                // Retired since the last tick (and maybe started afresh,
                // with an entry of its own).
                return false;
            };
            let (viewers, chat_per_min) = held.state.snapshot(now, ttl);
            held.shown = true;
            out(LiveUpdate::Snapshot(Snapshot {
                stream_id: Text::from(&**id),
                viewers,
                chat_per_min,
                as_of: now,
                emitted_at,
            }));
            if now < held.quiet_at {
                return true;
            }
            debug_assert_eq!((viewers, chat_per_min), (0, 0), "quiet means 0, 0");
            // Nothing left can count: free the maps, keep the stream.
            held.state = StreamState::default();
            held.active = false;
            false
        });
        self.stale_active = 0;
        if self.dropped > 0 {
            out(LiveUpdate::Dropped(self.dropped));
            self.dropped = 0;
        }
    }

    /// The end of the input: every held stream either retires (quiet for
    /// longer than the TTL at `now`, exactly) or gets a last snapshot at
    /// `now`. Leaves nothing held.
    pub fn finish(&mut self, now: u64, emitted_at: u64, mut out: impl FnMut(LiveUpdate)) {
        self.flush_evicted(emitted_at, &mut out);
        self.active.clear();
        self.stale_active = 0;
        self.expiry.clear();
        let ttl = self.ttl;
        for (id, mut held) in self.streams.drain() {
            if held.quiet_at.saturating_add(ttl) < now {
                Self::retired(held, now, emitted_at, &mut out);
            } else {
                let (viewers, chat_per_min) = held.state.snapshot(now, ttl);
                out(LiveUpdate::Snapshot(Snapshot {
                    stream_id: Text::from(&*id),
                    viewers,
                    chat_per_min,
                    as_of: now,
                    emitted_at,
                }));
            }
        }
        if self.dropped > 0 {
            out(LiveUpdate::Dropped(self.dropped));
            self.dropped = 0;
        }
    }

    /// Reports the streams evicted at the bound since the last call.
    fn flush_evicted(&mut self, emitted_at: u64, out: &mut impl FnMut(LiveUpdate)) {
        for Evicted { id, zero_at } in self.evicted.drain(..) {
            if let Some(as_of) = zero_at {
                out(LiveUpdate::Snapshot(Snapshot {
                    stream_id: Text::from(&*id),
                    viewers: 0,
                    chat_per_min: 0,
                    as_of,
                    emitted_at,
                }));
            }
            out(LiveUpdate::Retired(Text::from(&*id)));
        }
    }
}

/// A stream id's hash for the worker's own set of refused ids (routing
/// uses the job's keyed hash, [`RouteKey`]).
fn stream_hash(stream_id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    stream_id.hash(&mut hasher);
    hasher.finish()
}

impl Signal {
    /// What the live path needs of an ingested record, or the record back
    /// if only billing reads it.
    #[allow(
        clippy::result_large_err,
        reason = "the record goes on by value: boxing it would allocate per billing record"
    )]
    pub fn of(record: Ingested) -> Result<Signal, Ingested> {
        let kind = match record.event.kind {
            EventKind::Join | EventKind::Heartbeat => SignalKind::Presence,
            EventKind::Chat => SignalKind::Chat,
            EventKind::Leave => SignalKind::Leave,
            EventKind::Impression(_) | EventKind::AdProgress(_) => return Err(record),
        };
        Ok(Signal {
            stream_id: record.event.stream_id,
            viewer_id: record.event.viewer_id,
            ts: record.event.ts,
            kind,
            ingested_at_ms: record.ingested_at_ms,
        })
    }
}

/// The live path's wall-clock tick: when the next one is due, and what
/// each one cost (in the probes).
struct Ticker {
    tick: Duration,
    next_tick: Instant,
    probes: Arc<Probes>,
    /// The newest stamp (wall-clock ms) of the events counted since the
    /// last tick; 0 when none came.
    newest_ingested_ms: u64,
}

impl Ticker {
    fn new(tick: Duration, probes: Arc<Probes>) -> Self {
        Ticker {
            tick,
            next_tick: Instant::now() + tick,
            probes,
            newest_ingested_ms: 0,
        }
    }

    fn is_due(&self, now: Instant) -> bool {
        now >= self.next_tick
    }

    /// Notes an event counted now, stamped by its source at `ingested_at_ms`.
    fn counted(&mut self, ingested_at_ms: u64) {
        self.newest_ingested_ms = self.newest_ingested_ms.max(ingested_at_ms);
    }

    /// Records a tick that started at `started` and was stamped
    /// `emitted_at`; returns how long until the next one. Ticks are on a
    /// fixed grid: a slow worker skips to the next slot.
    fn ticked(&mut self, started: Instant, emitted_at: u64) -> Duration {
        let elapsed = started.elapsed();
        let probes = &self.probes;
        probes.ticks.fetch_add(1, Ordering::Relaxed);
        probes.tick_duration.observe(elapsed.as_secs_f64());
        probes
            .tick_micros_max
            .fetch_max(elapsed.as_micros() as u64, Ordering::Relaxed);
        probes.last_tick_ms.fetch_max(emitted_at, Ordering::Relaxed);
        // A tick that counted nothing new has no latency to tell: the
        // age of old events would only measure how quiet the input is.
        if self.newest_ingested_ms > 0 {
            let latency_ms = emitted_at.saturating_sub(self.newest_ingested_ms);
            probes
                .event_to_tick_latency
                .observe(latency_ms as f64 / 1000.0);
            self.newest_ingested_ms = 0;
        }
        while self.next_tick <= started {
            self.next_tick += self.tick;
        }
        self.next_tick - started
    }
}

/// Applies signals from the front of `pending`, in arrival order, while a
/// [`Slice`] of [`LIVE_SLICE_SIGNALS`] allows.
fn apply_slice(
    pending: &mut VecDeque<Signal>,
    streams: &mut LiveStreams,
    ticker: &mut Ticker,
    now: u64,
) {
    let mut slice = Slice::new(LIVE_SLICE_SIGNALS);
    while slice.take() {
        let Some(signal) = pending.pop_front() else {
            break;
        };
        // The id moves into the state: no copy per event.
        let Signal {
            stream_id,
            viewer_id,
            ts,
            kind,
            ingested_at_ms,
        } = signal;
        ticker.counted(ingested_at_ms);
        streams.apply(stream_id, viewer_id, ts, kind, now);
    }
}

/// Builds the live sub-graph over the live events and the event clock (the
/// highest `ts` seen anywhere, as [`crate::route::split_paths`] gives it).
/// The returned stream carries, per tick, a snapshot of every active stream
/// and the retirements (see the module doc); when the input ends, a last
/// snapshot of every stream still held.
/// `route` is the job's key, the same in every process: the keyed hash of
/// a stream id decides the worker that counts it.
///
/// (A little over a screen: the operator's closure owns its state across
/// activations, and what it does with it is in [`LiveStreams`] and
/// [`Ticker`]; what is left here is the order of the steps.)
pub fn live<'s>(
    signals: StreamVec<'s, Time, Signal>,
    clock: StreamVec<'s, Time, u64>,
    config: &PipelineConfig,
    route: RouteKey,
    probes: Arc<Probes>,
) -> StreamVec<'s, Time, LiveUpdate> {
    let ttl = config.presence_ttl_ms;
    let tick = Duration::from_millis(config.tick_ms);
    let scope = signals.scope();
    // Streams are spread by hash: each worker holds its share of the bound.
    let max_streams = (MAX_LIVE_STREAMS / scope.peers()).max(1);
    signals.binary_frontier(
        clock,
        Exchange::new(move |signal: &Signal| route.hash(&signal.stream_id)),
        Pipeline,
        "LiveCounts",
        move |capability, info| {
            let activator = scope.activator_for(info.address);
            let mut capability: Option<Capability<Time>> = Some(capability);
            let mut streams = LiveStreams::new(ttl, max_streams);
            let mut now: u64 = 0;
            let timed = probes.clone();
            let mut ticker = Ticker::new(tick, probes);
            activator.activate_after(tick);
            let mut pending: VecDeque<Signal> = VecDeque::new();
            move |(input, frontier), (clock, clock_frontier), output| {
                let _turn = timed.turns.time(Path::Live);
                clock.for_each_stamp(|_, batches| {
                    for batch in batches {
                        now = batch.drain(..).fold(now, u64::max);
                    }
                });
                // Taking the input is a move per signal; applying it is the
                // work, and a burst is applied a slice per turn.
                input.for_each_stamp(|_, batches| {
                    for batch in batches {
                        pending.extend(batch.drain(..));
                    }
                });
                apply_slice(&mut pending, &mut streams, &mut ticker, now);
                if !pending.is_empty() {
                    activator.activate();
                }
                let Some(cap) = capability.as_mut() else {
                    return;
                };
                let finished =
                    frontier.is_empty() && clock_frontier.is_empty() && pending.is_empty();
                let started = Instant::now();
                if finished || ticker.is_due(started) {
                    let emitted_at = wall_clock_ms();
                    let mut session = output.session(&*cap);
                    if finished {
                        streams.finish(now, emitted_at, |update| session.give(update));
                    } else {
                        streams.tick(now, emitted_at, |update| session.give(update));
                    }
                    let until_next = ticker.ticked(started, emitted_at);
                    // One timer per tick: data activations in between must
                    // not pile up timers that all fire at the same moment.
                    if !finished {
                        activator.activate_after(until_next);
                    }
                } else if streams.due(now) {
                    // Between ticks too: a replay moves the clock minutes
                    // a second, and what retires makes room for what comes.
                    let mut session = output.session(&*cap);
                    streams.advance(now, wall_clock_ms(), |update| session.give(update));
                }
                if finished {
                    ticker.probes.inputs_ended.store(true, Ordering::Relaxed);
                    capability = None;
                    return;
                }
                // Hold time at the least either input may still bring.
                let inputs = frontier.frontier();
                let clocks = clock_frontier.frontier();
                if let Some(&time) = inputs.iter().chain(clocks.iter()).min() {
                    if time > *cap.time() {
                        cap.downgrade(&time);
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of several slices' worth of signals, then the end of the
    /// input at once: the end waits for the slices, and the last snapshot
    /// counts every signal.
    #[test]
    fn a_burst_is_applied_in_slices_and_all_of_it_counts() {
        use crate::event::{Event, Position};
        use std::cell::RefCell;
        use std::rc::Rc;
        use timely::dataflow::operators::vec::Map;
        use timely::dataflow::operators::{Input, Inspect, Probe};

        let n = 3 * LIVE_SLICE_SIGNALS as u64 + 11;
        let ts = 1_700_000_000_000;
        timely::execute_directly(move |worker| {
            let seen = Rc::new(RefCell::new(Vec::new()));
            let sink = seen.clone();
            let config = PipelineConfig::default();
            let (mut input, mut clock, probe) = worker.dataflow::<Time, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<Ingested>>();
                let (clock, ticks) = scope.new_input::<Vec<u64>>();
                let probes = Arc::new(Probes::default());
                let signals = stream.flat_map(|record| Signal::of(record).ok());
                let probe = live(signals, ticks, &config, RouteKey::new([1, 2]), probes)
                    .inspect(move |update: &LiveUpdate| sink.borrow_mut().push(update.clone()))
                    .probe()
                    .0;
                (input, clock, probe)
            });
            clock.send(ts);
            for i in 0..n {
                input.send(Ingested {
                    event: Event {
                        ts,
                        event_id: format!("e{i}").into(),
                        stream_id: "s".into(),
                        viewer_id: format!("v{i}").into(),
                        kind: EventKind::Join,
                    },
                    position: Position {
                        partition: 0,
                        offset: i,
                    },
                    watermark: ts,
                    ingested_at_ms: 0,
                });
            }
            input.close();
            clock.close();
            while !probe.done() {
                worker.step();
            }
            let last = seen.borrow().iter().rev().find_map(|update| match update {
                LiveUpdate::Snapshot(s) => Some(s.viewers),
                _ => None,
            });
            assert_eq!(last, Some(n));
        });
    }

    #[test]
    fn leave_on_equal_ts_wins_and_ttl_expires() {
        let mut state = StreamState::default();
        state.apply("a".into(), 1_000, SignalKind::Presence, 0);
        state.apply("a".into(), 1_000, SignalKind::Leave, 0);
        state.apply("b".into(), 1_000, SignalKind::Presence, 0);
        state.apply("c".into(), 5_000, SignalKind::Chat, 0);
        assert_eq!(state.snapshot(5_000, 30_000), (2, 1));
        // b's presence at 1000 is no longer newer than 31_000 - 30_000.
        assert_eq!(state.snapshot(31_000, 30_000), (1, 1));
        // The chat at 5000 leaves the minute at 65_000.
        assert_eq!(state.snapshot(65_000, 30_000), (0, 0));
        assert!(state.viewers.is_empty());
    }

    #[test]
    fn chats_out_of_order_count_once_each_in_their_minute() {
        let mut state = StreamState::default();
        for ts in [
            70_000, 10_000, 70_000, 40_000, 10_000, 90_000, 5_000, 130_000,
        ] {
            state.apply("v".into(), ts, SignalKind::Chat, 0);
        }
        let ms: Vec<u64> = state.chats.iter().map(|&(t, _)| t).collect();
        assert_eq!(ms, [5_000, 10_000, 40_000, 70_000, 90_000, 130_000]);
        // (10_000, 70_000]: 40_000 and 70_000 twice; 130_000 is ahead of now.
        assert_eq!(state.snapshot(70_000, 30_000).1, 3);
        assert_eq!(state.chats.len(), 4);
        assert_eq!(state.snapshot(130_000, 30_000).1, 2);
        assert_eq!(state.snapshot(190_000, 30_000).1, 0);
        assert!(state.chats.is_empty());
    }

    #[test]
    fn chats_are_pruned_as_the_clock_moves_and_count_the_same() {
        let (mut pruned, mut kept) = (StreamState::default(), StreamState::default());
        let mut now = 0;
        for step in 0..600u64 {
            // Nearly in order, one in five a little late.
            let ts = 1_000 * step - if step % 5 == 4 { 3_500 } else { 0 };
            now = now.max(ts);
            pruned.apply("v".into(), ts, SignalKind::Chat, now);
            kept.apply("v".into(), ts, SignalKind::Chat, 0);
        }
        assert!(pruned.chats.len() <= 62, "{}", pruned.chats.len());
        assert_eq!(pruned.snapshot(now, 30_000), kept.snapshot(now, 30_000));
        assert_eq!(pruned.chats, kept.chats);
    }

    #[test]
    fn late_presence_after_leave_does_not_resurrect() {
        let mut state = StreamState::default();
        state.apply("a".into(), 2_000, SignalKind::Presence, 0);
        state.apply("a".into(), 3_000, SignalKind::Leave, 0);
        state.apply("a".into(), 2_500, SignalKind::Presence, 0);
        assert_eq!(state.snapshot(3_000, 30_000).0, 0);
        state.apply("a".into(), 4_000, SignalKind::Presence, 0);
        assert_eq!(state.snapshot(4_000, 30_000).0, 1);
    }

    /// A base event time, so that `now - ttl` never saturates at 0.
    const B: u64 = 1_000_000_000;
    const TTL: u64 = 30_000;

    /// Runs one tick at `B + now` and returns what it emitted.
    fn tick(streams: &mut LiveStreams, now: u64) -> Vec<LiveUpdate> {
        let mut out = Vec::new();
        streams.tick(B + now, 0, |u| out.push(u));
        out
    }

    /// Applies a signal at `B + ts`, the clock being there too.
    /// Room for 100 streams, the `(stream, viewer, ts, kind)` signals
    /// applied, then one tick at `now`.
    fn ticked_after(signals: &[(&str, &str, u64, SignalKind)], now: u64) -> LiveStreams {
        let mut streams = LiveStreams::new(TTL, 100);
        for &(stream, viewer, ts, kind) in signals {
            signal(&mut streams, stream, viewer, ts, kind);
        }
        tick(&mut streams, now);
        streams
    }

    fn signal(streams: &mut LiveStreams, stream: &str, viewer: &str, ts: u64, kind: SignalKind) {
        streams.apply(stream.into(), viewer.into(), B + ts, kind, B + ts);
    }

    /// Viewer `v` present at `ts` on streams `PREFIX-i` for each `i` of
    /// `ids`.
    fn present(streams: &mut LiveStreams, prefix: &str, ids: std::ops::Range<u32>, ts: u64) {
        for i in ids {
            signal(
                streams,
                &format!("{prefix}-{i}"),
                "v",
                ts,
                SignalKind::Presence,
            );
        }
    }

    fn snapshots(updates: &[LiveUpdate]) -> Vec<(Text, u64, u64)> {
        updates
            .iter()
            .filter_map(|u| match u {
                LiveUpdate::Snapshot(s) => Some((s.stream_id.clone(), s.viewers, s.chat_per_min)),
                _ => None,
            })
            .collect()
    }

    fn retired(updates: &[LiveUpdate]) -> Vec<Text> {
        updates
            .iter()
            .filter_map(|u| match u {
                LiveUpdate::Retired(id) => Some(id.clone()),
                _ => None,
            })
            .collect()
    }

    fn dropped(updates: &[LiveUpdate]) -> u64 {
        updates
            .iter()
            .map(|u| match u {
                LiveUpdate::Dropped(n) => *n,
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn a_quiet_stream_shows_zero_then_retires_after_the_ttl() {
        let mut streams = LiveStreams::new(TTL, 100);
        signal(&mut streams, "s", "v", 10_000, SignalKind::Presence);
        assert_eq!(snapshots(&tick(&mut streams, 10_000)), [("s".into(), 1, 0)]);
        // Quiet from 40_000 (ts + ttl): the tick that sees it says 0, 0 and
        // stops snapshotting it.
        assert_eq!(snapshots(&tick(&mut streams, 40_000)), [("s".into(), 0, 0)]);
        assert_eq!((streams.active_len(), streams.queued_len()), (0, 1));
        assert!(tick(&mut streams, 55_000).is_empty());
        // Quiet for exactly the TTL: still held; for longer: retired (by
        // the tick that finds its queue bucket past).
        assert!(tick(&mut streams, 70_000).is_empty());
        assert_eq!(retired(&tick(&mut streams, 71_000)), ["s"]);
        assert!(streams.is_empty());
        assert_eq!(streams.queued_len(), 0);
    }

    #[test]
    fn chat_keeps_a_stream_for_its_minute_and_a_leave_for_the_ttl() {
        let mut streams = ticked_after(
            &[
                ("chat", "v", 0, SignalKind::Chat),
                ("left", "w", 0, SignalKind::Presence),
                ("left", "w", 20_000, SignalKind::Leave),
            ],
            20_000,
        );
        // The chat counts until 60_000; the leave at 20_000 keeps "left"
        // active (at 0 viewers) until 50_000.
        let mut shown = snapshots(&tick(&mut streams, 50_000));
        shown.sort();
        assert_eq!(shown, [("chat".into(), 0, 1), ("left".into(), 0, 0)]);
        assert_eq!(streams.active_len(), 1);
        let updates = tick(&mut streams, 81_000);
        assert_eq!(retired(&updates), ["left"]);
        assert_eq!(snapshots(&updates), [("chat".into(), 0, 0)]);
        assert_eq!(retired(&tick(&mut streams, 91_000)), ["chat"]);
    }

    #[test]
    fn a_signal_before_retirement_keeps_the_stream() {
        let mut streams = LiveStreams::new(TTL, 100);
        signal(&mut streams, "s", "v", 0, SignalKind::Presence);
        tick(&mut streams, 30_000);
        signal(&mut streams, "s", "v", 50_000, SignalKind::Presence);
        let updates = tick(&mut streams, 61_000);
        assert_eq!(snapshots(&updates), [("s".into(), 1, 0)]);
        assert!(retired(&updates).is_empty());
        // Its queue entry moved on; it retires from its new quiet point.
        assert_eq!(streams.queued_len(), 1);
        tick(&mut streams, 80_000);
        assert!(retired(&tick(&mut streams, 110_000)).is_empty());
        assert_eq!(retired(&tick(&mut streams, 111_000)), ["s"]);
    }

    #[test]
    fn a_retired_stream_started_afresh_counts_like_the_old_state_would() {
        let mut streams = LiveStreams::new(TTL, 100);
        signal(&mut streams, "s", "a", 0, SignalKind::Presence);
        signal(&mut streams, "s", "a", 5_000, SignalKind::Leave);
        tick(&mut streams, 35_000);
        assert_eq!(retired(&tick(&mut streams, 70_000)), ["s"]);
        // A late presence older than the forgotten leave cannot count any
        // more; a new viewer does.
        signal(&mut streams, "s", "a", 1_000, SignalKind::Presence);
        signal(&mut streams, "s", "b", 69_000, SignalKind::Presence);
        assert_eq!(snapshots(&tick(&mut streams, 70_000)), [("s".into(), 1, 0)]);
    }

    #[test]
    fn the_clock_retires_streams_between_ticks() {
        let mut streams = LiveStreams::new(TTL, 1_000_000);
        signal(&mut streams, "shown", "v", 0, SignalKind::Presence);
        tick(&mut streams, 0);
        // A replay: thousands of streams come and go between two ticks.
        for i in 0..5_000u64 {
            signal(
                &mut streams,
                &format!("s-{i}"),
                "v",
                1_000 + i * 100,
                SignalKind::Presence,
            );
        }
        let now = B + 1_000 + 5_000 * 100;
        assert!(streams.due(now));
        let mut out = Vec::new();
        streams.advance(now, 0, |u| out.push(u));
        // Only what the board showed is retired on it, with a last 0, 0
        // since no tick saw it quiet; the rest goes silently.
        assert_eq!(snapshots(&out), [("shown".into(), 0, 0)]);
        assert_eq!(retired(&out), ["shown"]);
        // Held: the streams of the last 2 TTL (and a bucket).
        assert!((600..=611).contains(&streams.len()), "{}", streams.len());
        // The retired ids do not linger in the active list.
        assert_eq!(streams.active_len(), streams.len());
    }

    #[test]
    fn many_distinct_streams_stay_bounded_and_all_retire() {
        let mut streams = LiveStreams::new(TTL, 1_000_000);
        let (mut retired_seen, mut most_held, mut most_per_tick) = (0, 0, 0);
        let mut last: HashMap<Text, (u64, u64)> = HashMap::new();
        let mut take = |updates: Vec<LiveUpdate>| {
            let mut snapshots = 0;
            for update in updates {
                match update {
                    LiveUpdate::Snapshot(s) => {
                        snapshots += 1;
                        last.insert(s.stream_id, (s.viewers, s.chat_per_min));
                    }
                    LiveUpdate::Retired(id) => {
                        retired_seen += 1;
                        assert_eq!(last.remove(&id), Some((0, 0)), "{id} left at 0, 0");
                    }
                    LiveUpdate::Dropped(_) => panic!("below the bound"),
                }
            }
            most_per_tick = most_per_tick.max(snapshots);
        };
        // 100,000 streams, one join each, 100 a second of event time, a
        // tick every second: a stream is snapshotted for the TTL after its
        // join (31 ticks), held for another TTL, then retired.
        for second in 0..1_000u64 {
            for i in 0..100 {
                let id = second * 100 + i;
                let (stream, viewer) = (format!("s-{id}"), format!("v-{id}"));
                signal(
                    &mut streams,
                    &stream,
                    &viewer,
                    second * 1_000,
                    SignalKind::Presence,
                );
            }
            take(tick(&mut streams, second * 1_000));
            most_held = most_held.max(streams.len());
            assert!(streams.active_len() <= 3_000, "{}", streams.active_len());
        }
        for now in [1_100_000, 1_200_000] {
            take(tick(&mut streams, now));
        }
        assert!(most_held <= 6_200, "held {most_held}");
        // A tick snapshots the active streams, not every stream held, let
        // alone every stream seen.
        assert_eq!(most_per_tick, 3_100);
        assert_eq!(retired_seen, 100_000);
        assert!(streams.is_empty() && last.is_empty());
        assert_eq!(streams.queued_len(), 0);
    }

    #[test]
    fn past_the_bound_new_streams_are_refused_and_counted_once() {
        let mut streams = LiveStreams::new(TTL, 100);
        for round in 0..3 {
            for i in 0..1_000 {
                let (stream, viewer) = (format!("s-{i}"), format!("v-{round}"));
                signal(&mut streams, &stream, &viewer, round, SignalKind::Presence);
            }
        }
        assert_eq!(streams.len(), 100);
        let updates = tick(&mut streams, 10);
        assert_eq!(snapshots(&updates).len(), 100);
        assert_eq!(dropped(&updates), 900, "each refused stream once");
        // The streams held count all their viewers.
        assert!(snapshots(&updates).iter().all(|s| s.1 == 3));
        assert_eq!(dropped(&tick(&mut streams, 20)), 0);
    }

    #[test]
    fn at_the_bound_a_quiet_stream_makes_room_before_any_is_refused() {
        let mut streams = LiveStreams::new(TTL, 10);
        present(&mut streams, "old", 0..10, 0);
        tick(&mut streams, 0);
        // Five go quiet at 30_000; five stay active.
        present(&mut streams, "old", 5..10, 40_000);
        tick(&mut streams, 40_000);
        present(&mut streams, "new", 0..8, 40_000);
        assert_eq!(streams.len(), 10);
        let updates = tick(&mut streams, 40_000);
        let mut evicted = retired(&updates);
        evicted.sort();
        assert_eq!(evicted, ["old-0", "old-1", "old-2", "old-3", "old-4"]);
        // The evictions come before the snapshots of the streams admitted.
        assert!(matches!(updates[0], LiveUpdate::Retired(_)));
        assert_eq!(dropped(&updates), 3);
        let mut shown: Vec<Text> = snapshots(&updates).into_iter().map(|s| s.0).collect();
        shown.sort();
        let want: Vec<String> = (5..10)
            .map(|i| format!("old-{i}"))
            .chain((0..5).map(|i| format!("new-{i}")))
            .collect();
        let mut want = want;
        want.sort();
        assert_eq!(shown, want);
    }

    #[test]
    fn the_end_retires_exactly_and_snapshots_the_rest_at_now() {
        let mut streams = ticked_after(
            &[
                ("gone", "v", 0, SignalKind::Presence),
                ("edge", "v", 40_000, SignalKind::Leave),
                ("here", "v", 90_000, SignalKind::Presence),
            ],
            50_000,
        );
        let mut out = Vec::new();
        streams.finish(B + 100_000, 0, |u| out.push(u));
        // "gone": quiet at 30_000, retired past 60_000. "edge": quiet at
        // 70_000, and 100_000 is not more than the TTL past that.
        assert_eq!(retired(&out), ["gone"]);
        let mut shown = snapshots(&out);
        shown.sort();
        assert_eq!(shown, [("edge".into(), 0, 0), ("here".into(), 1, 0)]);
        assert!(out.iter().all(|u| match u {
            LiveUpdate::Snapshot(s) => s.as_of == B + 100_000,
            _ => true,
        }));
        assert!(streams.is_empty());
    }
}
