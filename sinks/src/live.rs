//! Live sink: the latest snapshot of every stream, for whoever reads it.
//!
//! The worker that gathers the per-tick snapshots publishes them into a
//! `tokio::sync::watch` channel. Publishing never waits on readers (a slow
//! HTTP client or a stuck dashboard cannot hold a worker back); readers get
//! the newest board whenever they look, or are woken when it changes.

use livepipe_dataflow::live::Snapshot;
use livepipe_dataflow::time::Time;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;
use tokio::sync::watch;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::fsutil::write_atomic;

/// Latest snapshot per stream, sorted by `stream_id`.
pub type Board = Arc<BTreeMap<String, Snapshot>>;

/// The hand-off between the dataflow and the live readers. Cheap to clone.
#[derive(Clone)]
pub struct LiveBoard {
    sender: Arc<watch::Sender<Board>>,
}

impl Default for LiveBoard {
    fn default() -> Self {
        LiveBoard {
            sender: Arc::new(watch::Sender::new(Board::default())),
        }
    }
}

impl LiveBoard {
    /// Replaces the snapshots of the streams in `snapshots`; others keep
    /// their latest one.
    pub fn publish(&self, snapshots: impl IntoIterator<Item = Snapshot>) {
        self.sender.send_modify(|board| {
            let board = Arc::make_mut(board);
            for snapshot in snapshots {
                board.insert(snapshot.stream_id.clone(), snapshot);
            }
        });
    }

    /// The current board.
    pub fn latest(&self) -> Board {
        self.sender.borrow().clone()
    }

    /// A receiver that is woken on every publish.
    pub fn subscribe(&self) -> watch::Receiver<Board> {
        self.sender.subscribe()
    }

    /// Writes `live.json`: a JSON array of the latest snapshots, sorted by
    /// `stream_id`, atomically.
    pub fn write_json(&self, path: &Path) -> io::Result<()> {
        let board = self.latest();
        let snapshots: Vec<&Snapshot> = board.values().collect();
        let mut bytes = serde_json::to_vec_pretty(&snapshots)?;
        bytes.push(b'\n');
        write_atomic(path, &bytes)
    }
}

/// Gathers every worker's snapshots on worker 0 and publishes them on
/// arrival (never at frontier progress: the live path does not wait).
pub fn attach<'s>(snapshots: StreamVec<'s, Time, Snapshot>, board: Option<LiveBoard>) {
    snapshots.sink(
        Exchange::new(|_| 0),
        "LiveSink",
        move |(input, _frontier)| {
            input.for_each_stamp(|_, batches| {
                for batch in batches {
                    if let Some(board) = board.as_ref() {
                        board.publish(batch.drain(..));
                    } else {
                        batch.clear();
                    }
                }
            });
        },
    );
}
