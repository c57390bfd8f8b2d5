//! Resume positions: where each input partition can be re-read from after a
//! crash, so that every piece of state that is not final is rebuilt.
//!
//! Sources record a [`Checkpoint`] per partition as they read (a record
//! boundary, with the highest valid `ts` of everything before it). The
//! billing sink, when it commits outcomes up to frontier `F`, also commits
//! for each partition the latest checkpoint whose records before it are all
//! older than anything that can still matter:
//!
//! * an impression that is not final at `F` has `ts + window >= F`, so
//!   every record it depends on has `ts >= F - window`;
//! * a checkpoint whose `max_ts < F - window - lateness - granularity`
//!   therefore has nothing needed behind it (the margins cover the coarse
//!   frontier and arrival within the lateness bound).
//!
//! Replaying from there rebuilds all pending state; what is already final
//! is guarded by the ledger (an id is final once) and files are never
//! rewritten. The checkpoint also carries the partition's `max_ts`, which
//! seeds its watermark on restart: the replayed records are stamped with
//! exactly the watermarks they had the first time, so every late/on-time
//! decision repeats.

use crate::time::Time;
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::{Scope, StreamVec};

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use timely::scheduling::SyncActivator;

/// A record boundary in one partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The next record to read: a file's 1-based line number, or a Kafka
    /// offset.
    pub offset: u64,
    /// Files: the byte position of that line. Kafka: unused (0).
    pub byte: u64,
    /// Highest valid `ts` of the partition's records before `offset`.
    pub max_ts: Option<u64>,
    /// Files: BLAKE3 of the file's bytes before `byte`, its identity up to
    /// here. A resumed run checks it, so that another file under the same
    /// name is refused rather than read from the middle (docs/operations.md,
    /// "Changing rules, inputs and topics safely").
    /// Kafka: `None` (a topic's identity is checked through its offsets).
    pub prefix_blake3: Option<[u8; 32]>,
}

/// Recent checkpoints of every partition, kept by the billing sink (which
/// commits the safe ones) and read by sources that report the committed
/// offsets elsewhere.
#[derive(Debug, Default)]
pub struct Checkpoints {
    partitions: Mutex<BTreeMap<u32, VecDeque<Checkpoint>>>,
    /// The offsets last committed to the ledger, for sources that also
    /// report them elsewhere (Kafka consumer-group offsets).
    committed: Mutex<BTreeMap<u32, u64>>,
}

impl Checkpoints {
    /// Records that `partition` can be re-read from `checkpoint`. Cheap:
    /// call it per chunk or per poll, not per record.
    pub fn record(&self, partition: u32, checkpoint: Checkpoint) {
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let recent = partitions.entry(partition).or_default();
        match recent.back_mut() {
            // Checkpoints travel through the dataflow; one that arrives
            // behind a later one of its partition adds nothing.
            Some(last) if checkpoint.offset < last.offset => {}
            // Same event time as the last one: the later boundary is as
            // safe and replays less.
            Some(last) if last.max_ts == checkpoint.max_ts => *last = checkpoint,
            _ => recent.push_back(checkpoint),
        }
    }

    /// For each partition, the latest checkpoint with every record before
    /// it older than `bound` (`None`: everything is final, the latest).
    /// Older checkpoints are dropped: they will never be needed again.
    pub fn safe(&self, bound: Option<u64>) -> BTreeMap<u32, Checkpoint> {
        let mut partitions = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let mut safe = BTreeMap::new();
        for (&partition, recent) in partitions.iter_mut() {
            let is_safe = |c: &Checkpoint| match bound {
                None => true,
                Some(bound) => c.max_ts.is_none_or(|ts| ts < bound),
            };
            while recent.len() > 1 && is_safe(&recent[1]) {
                recent.pop_front();
            }
            if let Some(first) = recent.front().filter(|c| is_safe(c)) {
                safe.insert(partition, *first);
            }
        }
        safe
    }
}

impl Checkpoints {
    /// Notes what the ledger now holds.
    pub fn mark_committed(&self, positions: &BTreeMap<u32, Checkpoint>) {
        let mut committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        for (&partition, checkpoint) in positions {
            committed.insert(partition, checkpoint.offset);
        }
    }

    /// Whether the ledger already holds every position of `safe`.
    pub fn holds(&self, safe: &BTreeMap<u32, Checkpoint>) -> bool {
        let committed = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        safe.iter()
            .all(|(partition, checkpoint)| committed.get(partition) == Some(&checkpoint.offset))
    }

    /// The resume offset last committed to the ledger, per partition.
    pub fn committed(&self) -> BTreeMap<u32, u64> {
        self.committed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One worker's checkpoints on their way to the billing sink, which may be
/// in another process: sources record here, [`ship_checkpoints`] sends them.
#[derive(Debug, Default)]
pub struct CheckpointOutbox {
    queue: Mutex<Vec<(u32, Checkpoint)>>,
    /// Set by the worker's sources once they will record nothing more.
    closed: AtomicBool,
    /// Wakes [`ship_checkpoints`] on close, so the end of an input is seen
    /// at once rather than at its next poll (a finite run would otherwise
    /// idle up to `SHIP_EVERY` before it can end).
    wake: OnceLock<SyncActivator>,
}

impl CheckpointOutbox {
    /// Records that `partition` can be re-read from `checkpoint`. Cheap:
    /// call it per chunk or per poll, not per record.
    pub fn record(&self, partition: u32, checkpoint: Checkpoint) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((partition, checkpoint));
    }

    /// No more checkpoints will come from this worker (its inputs ended).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(wake) = self.wake.get() {
            // An error means the worker is gone; nothing is left to wake.
            let _ = wake.activate();
        }
    }

    fn take(&self) -> Vec<(u32, Checkpoint)> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// How often [`ship_checkpoints`] looks into its outbox.
const SHIP_EVERY: Duration = Duration::from_millis(100);

/// Sends this worker's checkpoints into the dataflow, towards the billing
/// sink, until the outbox is closed.
///
/// The stream's timestamps mean nothing: the sink takes checkpoints as they
/// come, and a checkpoint that arrives late is only less advanced, never
/// unsafe (see the module docs). So the operator simply holds its first
/// capability, and only its consumer, the sink, ever waits on it.
pub fn ship_checkpoints<'s>(
    scope: Scope<'s, Time>,
    outbox: std::sync::Arc<CheckpointOutbox>,
) -> StreamVec<'s, Time, (u32, Checkpoint)> {
    source(scope, "ShipCheckpoints", move |capability, info| {
        let _ = outbox
            .wake
            .set(scope.worker().sync_activator_for(info.address.to_vec()));
        let activator = scope.activator_for(info.address);
        let mut capability = Some(capability);
        activator.activate();
        move |output| {
            let Some(cap) = capability.as_ref() else {
                return;
            };
            // Read the flag before draining: whatever was recorded before
            // the close is then in this drain.
            let closed = outbox.closed.load(Ordering::Acquire);
            let mut checkpoints = outbox.take();
            if !checkpoints.is_empty() {
                output.session(cap).give_container(&mut checkpoints);
            }
            if closed {
                capability = None;
            } else {
                activator.activate_after(SHIP_EVERY);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64, max_ts: u64) -> Checkpoint {
        Checkpoint {
            offset,
            byte: offset * 10,
            max_ts: Some(max_ts),
            prefix_blake3: None,
        }
    }

    #[test]
    fn the_latest_checkpoint_below_the_bound_is_safe() {
        let checkpoints = Checkpoints::default();
        checkpoints.record(0, at(10, 1_000));
        checkpoints.record(0, at(20, 2_000));
        checkpoints.record(0, at(30, 3_000));
        assert_eq!(checkpoints.safe(Some(500)).get(&0), None);
        assert_eq!(checkpoints.safe(Some(2_500))[&0], at(20, 2_000));
        // Dropped what is behind it, kept what may become safe later.
        assert_eq!(checkpoints.safe(Some(2_500))[&0], at(20, 2_000));
        assert_eq!(checkpoints.safe(None)[&0], at(30, 3_000));
    }

    #[test]
    fn a_later_boundary_at_the_same_event_time_replaces_the_earlier() {
        let checkpoints = Checkpoints::default();
        checkpoints.record(1, at(10, 1_000));
        checkpoints.record(1, at(15, 1_000));
        assert_eq!(checkpoints.safe(Some(1_001))[&1], at(15, 1_000));
    }

    #[test]
    fn a_checkpoint_behind_the_latest_is_ignored() {
        let checkpoints = Checkpoints::default();
        checkpoints.record(3, at(20, 2_000));
        checkpoints.record(3, at(10, 1_000));
        assert_eq!(checkpoints.safe(None)[&3], at(20, 2_000));
        assert_eq!(checkpoints.safe(Some(1_500)).get(&3), None);
    }

    #[test]
    fn nothing_read_yet_is_always_safe() {
        let checkpoints = Checkpoints::default();
        let start = Checkpoint {
            offset: 1,
            ..Checkpoint::default()
        };
        checkpoints.record(2, start);
        assert_eq!(checkpoints.safe(Some(0))[&2], start);
    }
}
