//! Pacing: how many records per second of event time, and in which order
//! they arrive.
//!
//! Apart from the simulation because it decides nothing about what happens,
//! only when a record is created and when it leaves: the rate steering and
//! the two time queues are the generator's clockwork.
//!
//! # Rate
//!
//! The audience size is steered (by the arrival rate) so that the output
//! averages [`GenConfig::rate`] records per second of
//! event time; at the default 2000/s that is roughly seven to nine thousand
//! concurrent viewers. Ad breaks on popular streams make the rate bursty.
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
//! [`GenConfig::rate`]: super::GenConfig::rate

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use rand::Rng;

use super::faults::BLOCK;
use super::simulation::Action;
use super::Generator;

/// Initial estimate of records per concurrent viewer per second (measured
/// for the default configuration), refined while running.
pub(super) const RECORDS_PER_VIEWER_S: f64 = 0.24;
/// Time constant of the audience-size correction.
pub(super) const AUDIENCE_TAU_MS: f64 = 60_000.0;

/// A record waiting for its arrival turn.
pub(super) struct Out {
    pub(super) flags: u8,
    pub(super) bytes: Vec<u8>,
}

/// A priority queue of items keyed by (ms, sequence number), popping the
/// smallest first: a calendar queue, since nearly all keys fall within a few
/// seconds of the current time. Keys in `[cursor, cursor + ring.len())` go
/// to FIFO buckets of one ms each (sequence numbers are pushed in
/// increasing order, so a bucket is sorted); other keys go to a binary heap,
/// and pops merge the two.
pub(super) struct TimeQueue<T> {
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
    pub(super) fn new(span: u64, cursor: u64) -> Self {
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
    pub(super) fn push(&mut self, key: u64, seq: u64, item: T) {
        if key >= self.cursor && key - self.cursor <= self.mask {
            self.ring[(key & self.mask) as usize].push_back((seq, item));
            self.in_ring += 1;
        } else {
            self.far.push(Far { key, seq, item });
        }
    }

    /// The smallest key, moving the cursor up to it.
    pub(super) fn peek_key(&mut self) -> Option<u64> {
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

    pub(super) fn pop(&mut self) -> Option<(u64, T)> {
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

impl Generator {
    // ----- creation: when, and how many -------------------------------------

    /// Schedules `action` at event time `ts`.
    pub(super) fn at(&mut self, ts: u64, action: Action) {
        self.seq += 1;
        self.sched.push(ts, self.seq, action);
    }

    /// Once a second: re-estimates the records each viewer produces.
    pub(super) fn tick(&mut self) {
        if self.alive > 0 {
            let observed = self.created_in_tick as f64 / self.alive as f64;
            self.per_viewer = (0.99 * self.per_viewer + 0.01 * observed).clamp(0.02, 5.0);
        }
        self.created_in_tick = 0;
        self.at(self.now + 1000, Action::Tick);
    }

    /// Inter-arrival time (ms) steering the audience towards the size that
    /// produces the configured rate.
    pub(super) fn arrival_gap(&mut self) -> u64 {
        let target = self.target_rate / self.per_viewer;
        let base = target / self.mean_session_ms;
        let correction = (target - self.alive as f64) / AUDIENCE_TAU_MS;
        let per_ms = (base + correction).clamp(0.2 * base, 5.0 * base);
        self.exp_ms(1.0 / per_ms)
    }

    // ----- arrival: in which order ------------------------------------------

    /// Arrival key of a record with event time `ts`.
    pub(super) fn key(&mut self, ts: u64) -> u64 {
        if self.created == 0 {
            ts // the first record arrives first
        } else {
            ts + self.jitter()
        }
    }

    /// The arrival shuffle: `U[0, allowed_lateness_ms / 2]`.
    pub(super) fn jitter(&mut self) -> u64 {
        if self.half == 0 {
            0
        } else {
            self.rng.random_range(0..=self.half)
        }
    }

    /// Queues a record for arrival at `key`; every [`BLOCK`] records
    /// created, the next block's plants are scheduled.
    pub(super) fn push_raw(&mut self, key: u64, bytes: Vec<u8>, flags: u8) {
        debug_assert!(key >= self.now);
        self.seq += 1;
        self.out.push(key, self.seq, Out { flags, bytes });
        self.created += 1;
        self.created_in_tick += 1;
        if self.created >= self.next_block * BLOCK {
            self.schedule_block();
        }
    }
}
