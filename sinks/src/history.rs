//! The dashboard's history: each stream's snapshots of the last five
//! minutes, so that a page opened (or reloaded) draws its chart full at
//! once instead of starting empty and filling a point a second.
//!
//! A task on the HTTP server's runtime watches the [`LiveBoard`] and
//! appends every new tick (a new `emitted_at`) of the board's top
//! [`HISTORY_STREAMS`] streams to a ring of its own. The dataflow's workers
//! never see any of it: recording runs where the HTTP requests do, and a
//! slow recorder only skips a board version (it reads the newest).
//!
//! Bounded twice over:
//!
//! * per stream, at most [`HISTORY_POINTS`] points (a tick a second for
//!   [`HISTORY_WINDOW_MS`]), and none older than the window before the
//!   stream's newest point;
//! * at most [`HISTORY_STREAMS`] streams: the top of the board by viewers,
//!   which is what the page shows (its top 20, with room for the ranking
//!   to churn). Past the bound, the streams that went longest without a
//!   new point (fallen out of the top, or retired) are evicted first.
//!
//! About 32 bytes a point, so at most about 10 MB.

use livepipe_dataflow::live::Snapshot;
use tokio::sync::watch;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::live::{Board, LiveBoard};

/// Points kept per stream: five minutes at a tick a second.
pub const HISTORY_POINTS: usize = 300;
/// Points older than this before a stream's newest are dropped.
pub const HISTORY_WINDOW_MS: u64 = 5 * 60 * 1000;
/// Streams with a history at most (the top of the board by viewers).
pub const HISTORY_STREAMS: usize = 1_000;

/// One tick of one stream, without the stream's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Point {
    viewers: u64,
    chat_per_min: u64,
    as_of: u64,
    emitted_at: u64,
}

struct Ring {
    points: VecDeque<Point>,
    /// The recording round that last added a point, for eviction.
    touched: u64,
}

/// Every recorded stream's ring. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct History {
    inner: Arc<Mutex<Rings>>,
}

#[derive(Default)]
struct Rings {
    streams: HashMap<Arc<str>, Ring>,
    round: u64,
}

impl History {
    /// Appends the snapshots that are new ticks of their streams, then
    /// evicts past [`HISTORY_STREAMS`] (see the module doc).
    pub fn record<'a>(&self, snapshots: impl IntoIterator<Item = &'a Snapshot>) {
        let mut rings = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        rings.round += 1;
        let round = rings.round;
        for snapshot in snapshots {
            let ring = match rings.streams.get_mut(snapshot.stream_id.as_str()) {
                Some(ring) => ring,
                None => rings
                    .streams
                    .entry(Arc::from(snapshot.stream_id.as_str()))
                    .or_insert(Ring {
                        points: VecDeque::new(),
                        touched: round,
                    }),
            };
            ring.append(snapshot, round);
        }
        rings.evict();
    }

    /// A stream's points, oldest first, as snapshots; `None` if it has no
    /// history.
    pub fn get(&self, stream_id: &str) -> Option<Vec<Snapshot>> {
        let rings = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let ring = rings.streams.get(stream_id)?;
        Some(
            ring.points
                .iter()
                .map(|p| Snapshot {
                    stream_id: stream_id.into(),
                    viewers: p.viewers,
                    chat_per_min: p.chat_per_min,
                    as_of: p.as_of,
                    emitted_at: p.emitted_at,
                })
                .collect(),
        )
    }

    /// Streams with a history.
    pub fn streams(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .streams
            .len()
    }

    /// Records `board`'s top streams every time it changes, until the
    /// board is gone. Run on the HTTP server's runtime.
    pub async fn follow(self, board: LiveBoard) {
        let mut receiver: watch::Receiver<Board> = board.subscribe();
        drop(board);
        receiver.mark_changed();
        while receiver.changed().await.is_ok() {
            let board = receiver.borrow_and_update().clone();
            self.record(board.top(HISTORY_STREAMS));
        }
    }
}

impl Ring {
    /// Adds `snapshot` if it is a newer tick than the last point, and
    /// drops what falls out of the window or the ring.
    fn append(&mut self, snapshot: &Snapshot, round: u64) {
        if self
            .points
            .back()
            .is_some_and(|last| last.emitted_at >= snapshot.emitted_at)
        {
            return;
        }
        self.points.push_back(Point {
            viewers: snapshot.viewers,
            chat_per_min: snapshot.chat_per_min,
            as_of: snapshot.as_of,
            emitted_at: snapshot.emitted_at,
        });
        let oldest = snapshot.emitted_at.saturating_sub(HISTORY_WINDOW_MS);
        while self.points.len() > HISTORY_POINTS
            || self.points.front().is_some_and(|p| p.emitted_at < oldest)
        {
            self.points.pop_front();
        }
        self.touched = round;
    }
}

impl Rings {
    /// Past [`HISTORY_STREAMS`], drops the streams that went longest
    /// without a new point. O(streams log streams), only when over.
    fn evict(&mut self) {
        let over = self.streams.len().saturating_sub(HISTORY_STREAMS);
        if over == 0 {
            return;
        }
        let mut by_age: Vec<(u64, Arc<str>)> = self
            .streams
            .iter()
            .map(|(id, ring)| (ring.touched, id.clone()))
            .collect();
        by_age.sort_unstable();
        for (_, id) in by_age.into_iter().take(over) {
            self.streams.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: &str, viewers: u64, emitted_at: u64) -> Snapshot {
        Snapshot {
            stream_id: id.into(),
            viewers,
            chat_per_min: 1,
            as_of: emitted_at - 5,
            emitted_at,
        }
    }

    #[test]
    fn a_ring_keeps_each_tick_once_oldest_first_and_at_most_five_minutes() {
        let history = History::default();
        let start = 1_000_000;
        for tick in 0..400u64 {
            let s = snapshot("a", tick, start + tick * 1_000);
            // Each worker's board update repeats the tick: counted once.
            history.record([&s, &s]);
        }
        let points = history.get("a").unwrap();
        assert_eq!(points.len(), HISTORY_POINTS);
        assert_eq!(points[0].viewers, 100);
        assert_eq!(points.last().unwrap().viewers, 399);
        assert!(points.windows(2).all(|w| w[0].emitted_at < w[1].emitted_at));
        // A gap longer than the window leaves only the new point.
        history.record([&snapshot("a", 7, start + 2_000_000)]);
        assert_eq!(history.get("a").unwrap().len(), 1);
        assert!(history.get("b").is_none());
    }

    #[test]
    fn past_the_stream_bound_the_least_recent_streams_go() {
        let history = History::default();
        let names: Vec<String> = (0..HISTORY_STREAMS + 10).map(|i| format!("s{i}")).collect();
        for (i, name) in names.iter().enumerate() {
            history.record([&snapshot(name, 1, 1_000 + i as u64)]);
        }
        assert_eq!(history.streams(), HISTORY_STREAMS);
        assert!(history.get("s0").is_none() && history.get("s9").is_none());
        assert!(history.get("s10").is_some());
        assert!(history.get(&names[HISTORY_STREAMS + 9]).is_some());
    }
}
