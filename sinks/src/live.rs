//! Live sink: the latest snapshot of every stream on the board, for
//! whoever reads it.
//!
//! The worker that gathers the live path's updates applies them to the
//! board in a `tokio::sync::watch` channel. Publishing never waits on
//! readers (a slow HTTP client or a stuck dashboard cannot hold a worker
//! back); readers get the newest board whenever they look, or are woken
//! when it changes.
//!
//! The board holds the streams the live path holds, no more: a stream the
//! dataflow retires (quiet for longer than the presence TTL, see
//! [`livepipe_dataflow::live`]) leaves the board after its last `0, 0`
//! snapshot, and the board refuses streams past [`MAX_BOARD_STREAMS`]
//! (counted with the dataflow's refusals in
//! `livepipe_live_streams_dropped_total`). It keeps the streams ranked, so
//! that the top N ([`BoardState::top`], [`LiveBoard::top`]) cost
//! O(N + log streams), not a sort of the board.

use livepipe_dataflow::live::{LiveUpdate, Snapshot, MAX_LIVE_STREAMS};
use livepipe_dataflow::time::Time;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;
use tokio::sync::watch;

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::fsutil::write_atomic;

/// Streams on the board at most: the live path's own bound, so that the
/// board refuses nothing the dataflow holds; this only guards against a
/// producer of updates that does not bound itself. About 190 bytes a
/// stream (the snapshot and its id, shared by the index and the ranking),
/// so at most about 20 MB, and as much again while a reader holds an older
/// board across an update (see [`LiveBoard::latest`]).
pub const MAX_BOARD_STREAMS: usize = MAX_LIVE_STREAMS;

/// A board as readers see it: immutable, cheap to clone.
pub type Board = Arc<BoardState>;

/// The latest snapshot of every stream on the board, by id and ranked by
/// viewers.
#[derive(Clone, Debug, Default)]
pub struct BoardState {
    streams: HashMap<Arc<str>, Arc<Snapshot>>,
    /// The same snapshots, most viewers first, ties by `stream_id`.
    ranking: BTreeMap<(Reverse<u64>, Arc<str>), Arc<Snapshot>>,
}

impl BoardState {
    /// One stream's latest snapshot.
    pub fn get(&self, stream_id: &str) -> Option<&Snapshot> {
        self.streams.get(stream_id).map(|s| &**s)
    }

    pub fn contains_key(&self, stream_id: &str) -> bool {
        self.streams.contains_key(stream_id)
    }

    /// Streams on the board.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Every snapshot, most viewers first, ties by `stream_id` (so sorting
    /// them that way again is linear).
    pub fn values(&self) -> impl Iterator<Item = &Snapshot> + '_ {
        self.ranking.values().map(|s| &**s)
    }

    /// The `n` streams with the most viewers, most first, ties by
    /// `stream_id` (what `/api/live` and the dashboard show). O(n + log
    /// streams): the board is kept ranked.
    pub fn top(&self, n: usize) -> impl Iterator<Item = &Snapshot> + '_ {
        self.values().take(n)
    }

    /// Every snapshot sorted by `stream_id` (what `live.json` holds).
    /// O(streams log streams).
    pub fn by_stream_id(&self) -> Vec<&Snapshot> {
        let mut snapshots: Vec<&Snapshot> = self.streams.values().map(|s| &**s).collect();
        snapshots.sort_unstable_by(|a, b| a.stream_id.cmp(&b.stream_id));
        snapshots
    }

    /// Replaces a stream's snapshot; false if the stream is new and the
    /// board is full. O(log streams).
    fn insert(&mut self, snapshot: Snapshot) -> bool {
        let viewers = snapshot.viewers;
        let id = match self.streams.get_key_value(snapshot.stream_id.as_str()) {
            Some((id, old)) => {
                let id = id.clone();
                self.ranking.remove(&(Reverse(old.viewers), id.clone()));
                id
            }
            None if self.streams.len() >= MAX_BOARD_STREAMS => return false,
            None => Arc::from(snapshot.stream_id.as_str()),
        };
        let snapshot = Arc::new(snapshot);
        self.ranking
            .insert((Reverse(viewers), id.clone()), snapshot.clone());
        self.streams.insert(id, snapshot);
        true
    }

    fn remove(&mut self, stream_id: &str) {
        if let Some((id, old)) = self.streams.remove_entry(stream_id) {
            self.ranking.remove(&(Reverse(old.viewers), id));
        }
    }
}

/// The hand-off between the dataflow and the live readers. Cheap to clone.
#[derive(Clone)]
pub struct LiveBoard {
    sender: Arc<watch::Sender<Board>>,
    /// Streams refused at the bound, by the dataflow and by the board.
    dropped: Arc<AtomicU64>,
}

impl Default for LiveBoard {
    fn default() -> Self {
        LiveBoard {
            sender: Arc::new(watch::Sender::new(Board::default())),
            dropped: Arc::default(),
        }
    }
}

impl LiveBoard {
    /// Applies the live path's updates: snapshots replace a stream's
    /// latest one (others keep theirs), retirements remove the stream,
    /// refusal counts add to [`LiveBoard::streams_dropped`]. Readers are
    /// woken once per call.
    ///
    /// In place, O(updates × log streams), unless a reader holds the
    /// current board (a [`LiveBoard::latest`] still in use): then the
    /// board is copied first (O(streams), bounded by
    /// [`MAX_BOARD_STREAMS`]) and the reader keeps its copy.
    pub fn apply(&self, updates: impl IntoIterator<Item = LiveUpdate>) {
        let mut refused = 0;
        self.sender.send_modify(|board| {
            let board = Arc::make_mut(board);
            for update in updates {
                match update {
                    LiveUpdate::Snapshot(snapshot) => {
                        if !board.insert(snapshot) {
                            refused += 1;
                        }
                    }
                    LiveUpdate::Retired(stream_id) => board.remove(&stream_id),
                    LiveUpdate::Dropped(n) => refused += n,
                }
            }
        });
        if refused > 0 {
            self.dropped.fetch_add(refused, Ordering::Relaxed);
        }
    }

    /// Replaces the snapshots of the streams in `snapshots`; others keep
    /// their latest one.
    pub fn publish(&self, snapshots: impl IntoIterator<Item = Snapshot>) {
        self.apply(snapshots.into_iter().map(LiveUpdate::Snapshot));
    }

    /// The current board. Holding it is free for the reader, but an update
    /// that comes while it is held copies the board once (see
    /// [`LiveBoard::apply`]): for the top N or one stream, prefer
    /// [`LiveBoard::top`] and [`LiveBoard::get`], which hold nothing.
    pub fn latest(&self) -> Board {
        self.sender.borrow().clone()
    }

    /// A receiver that is woken on every update. Read it with
    /// `borrow()` (as [`LiveBoard::top`] does) rather than cloning the
    /// board out of it, for the reason given at [`LiveBoard::latest`].
    pub fn subscribe(&self) -> watch::Receiver<Board> {
        self.sender.subscribe()
    }

    /// The `n` streams with the most viewers, most first, ties by
    /// `stream_id`: copies of their snapshots, taken in O(n + log
    /// streams) without holding the board.
    pub fn top(&self, n: usize) -> Vec<Snapshot> {
        self.sender.borrow().top(n).cloned().collect()
    }

    /// One stream's latest snapshot, if it is on the board.
    pub fn get(&self, stream_id: &str) -> Option<Snapshot> {
        self.sender.borrow().get(stream_id).cloned()
    }

    /// Streams on the board.
    pub fn len(&self) -> usize {
        self.sender.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.sender.borrow().is_empty()
    }

    /// Streams refused at the bound so far (`livepipe_live_streams_dropped_total`):
    /// by the dataflow (each refused stream once while the bound holds; in
    /// a cluster every process's, gathered here) and by the board.
    pub fn streams_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The counter behind [`LiveBoard::streams_dropped`], for `/metrics`.
    pub fn streams_dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }

    /// Writes `live.json`: a JSON array of the latest snapshot of every
    /// stream on the board (held, not retired), sorted by `stream_id`,
    /// atomically.
    pub fn write_json(&self, path: &Path) -> io::Result<()> {
        let board = self.latest();
        let mut bytes = serde_json::to_vec_pretty(&board.by_stream_id())?;
        bytes.push(b'\n');
        write_atomic(path, &bytes)
    }
}

/// Gathers every worker's live updates on worker 0 and applies them on
/// arrival (never at frontier progress: the live path does not wait), one
/// board update per activation.
pub fn attach<'s>(updates: StreamVec<'s, Time, LiveUpdate>, board: Option<LiveBoard>) {
    let mut pending: Vec<LiveUpdate> = Vec::new();
    updates.sink(
        Exchange::new(|_| 0),
        "LiveSink",
        move |(input, _frontier)| {
            input.for_each_stamp(|_, batches| {
                for batch in batches {
                    if board.is_some() {
                        pending.append(batch);
                    } else {
                        batch.clear();
                    }
                }
            });
            if let Some(board) = board.as_ref() {
                if !pending.is_empty() {
                    board.apply(pending.drain(..));
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(stream_id: &str, viewers: u64) -> Snapshot {
        Snapshot {
            stream_id: stream_id.into(),
            viewers,
            chat_per_min: 0,
            as_of: 1,
            emitted_at: 2,
        }
    }

    fn ids<'a>(snapshots: impl IntoIterator<Item = &'a Snapshot>) -> Vec<&'a str> {
        snapshots
            .into_iter()
            .map(|s| s.stream_id.as_str())
            .collect()
    }

    #[test]
    fn the_board_ranks_replaces_and_retires() {
        let board = LiveBoard::default();
        board.publish([snapshot("b", 5), snapshot("a", 5), snapshot("c", 9)]);
        assert_eq!(ids(&board.top(10)), ["c", "a", "b"]);
        assert_eq!(ids(&board.top(2)), ["c", "a"]);
        // A reader holding the board keeps its copy.
        let held = board.latest();
        board.apply([
            LiveUpdate::Snapshot(snapshot("b", 20)),
            LiveUpdate::Retired("c".into()),
            LiveUpdate::Retired("never-seen".into()),
            LiveUpdate::Dropped(3),
        ]);
        assert_eq!(ids(held.top(10)), ["c", "a", "b"]);
        assert_eq!(ids(&board.top(10)), ["b", "a"]);
        assert_eq!(board.get("b").map(|s| s.viewers), Some(20));
        assert!(board.get("c").is_none() && !board.latest().contains_key("c"));
        assert_eq!(ids(board.latest().by_stream_id()), ["a", "b"]);
        assert_eq!(ids(board.latest().values()), ["b", "a"], "ranked");
        assert_eq!((board.len(), board.streams_dropped()), (2, 3));
    }

    #[test]
    fn the_board_refuses_new_streams_past_its_bound() {
        let board = LiveBoard::default();
        board.publish((0..MAX_BOARD_STREAMS + 5).map(|i| snapshot(&format!("s-{i}"), 1)));
        assert_eq!(board.len(), MAX_BOARD_STREAMS);
        assert_eq!(board.streams_dropped(), 5);
        // Streams on the board still update; a retirement makes room.
        board.publish([snapshot("s-0", 7)]);
        board.apply([LiveUpdate::Retired("s-1".into())]);
        board.publish([snapshot("late", 1)]);
        assert_eq!(board.len(), MAX_BOARD_STREAMS);
        assert_eq!(board.streams_dropped(), 5);
        assert_eq!(ids(&board.top(1)), ["s-0"]);
        assert!(board.get("late").is_some());
    }
}
