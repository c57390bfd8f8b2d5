//! Stamping: how every source turns a parsed event into an [`Ingested`]
//! record, the same way for files and for Kafka.
//!
//! Each partition keeps a [`PartitionClock`]: its highest valid `ts` so far
//! and the watermark that follows it (that `ts` minus the allowed lateness,
//! bounded by the wall clock). A record is stamped with the watermark
//! *before* it, so whether it is late depends only on what came earlier in
//! its partition, and travels at the coarse version of that watermark (see
//! `livepipe_dataflow::time`). Both sources read a partition in order on
//! one worker, which is what makes this well defined; where a source keeps
//! a worker-wide watermark too (Kafka), it passes it as the floor.

use livepipe_dataflow::event::{Event, Ingested, Position};
use livepipe_dataflow::time::{coarse, Time};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::OutputBuilderSession;
use timely::dataflow::operators::Capability;

/// A partition's watermark: its highest valid `ts` so far minus the allowed
/// lateness; 0 (nothing is late) before its first valid record.
///
/// Never ahead of the wall clock (`wall_ms`) minus the lateness either: a
/// record stamped minutes ahead by a broken or hostile clock (up to the 10
/// minutes the parser lets through) counts as data, but cannot drag the
/// partition's watermark forward and make honest records late.
pub fn partition_watermark(max_ts: Option<u64>, lateness: u64, wall_ms: u64) -> u64 {
    max_ts.map_or(0, |ts| ts.min(wall_ms).saturating_sub(lateness))
}

/// The two rules stamping needs.
#[derive(Clone, Copy, Debug)]
pub struct StampRules {
    pub allowed_lateness_ms: u64,
    pub time_granularity_ms: u64,
}

/// One partition's event-time clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionClock {
    max_ts: Option<u64>,
    /// Never goes back, even if the wall clock that bounds it does: a
    /// source may hold its capability here.
    watermark: u64,
}

impl PartitionClock {
    /// A partition resumed where an earlier run left it.
    pub fn resumed(max_ts: Option<u64>) -> Self {
        PartitionClock {
            max_ts,
            watermark: 0,
        }
    }

    pub fn max_ts(&self) -> Option<u64> {
        self.max_ts
    }

    /// The watermark as last advanced or stamped.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// The watermark `max_ts` and the wall clock allow now.
    pub fn watermark_at(&self, lateness_ms: u64, wall_ms: u64) -> u64 {
        self.watermark
            .max(partition_watermark(self.max_ts, lateness_ms, wall_ms))
    }

    /// Moves the watermark to [`Self::watermark_at`] and returns it.
    pub fn advance(&mut self, lateness_ms: u64, wall_ms: u64) -> u64 {
        self.watermark = self.watermark_at(lateness_ms, wall_ms);
        self.watermark
    }

    /// The watermark before a record with `ts` (at least `floor`); then
    /// counts the `ts`. What [`Self::stamp`] does to the clock: replaying
    /// the `ts`s of a run of records with the same `wall_ms` leaves the
    /// clock exactly as stamping them would.
    pub fn tick(&mut self, rules: StampRules, ts: u64, wall_ms: u64, floor: u64) -> u64 {
        let watermark = self.advance(rules.allowed_lateness_ms, wall_ms).max(floor);
        self.max_ts = Some(self.max_ts.map_or(ts, |max| max.max(ts)));
        watermark
    }

    /// Stamps `event` with the watermark before it (at least `floor`) and
    /// the timely time it travels at, then counts its `ts`.
    pub fn stamp(
        &mut self,
        rules: StampRules,
        event: Event,
        position: Position,
        wall_ms: u64,
        floor: u64,
    ) -> (Time, Ingested) {
        let watermark = self.tick(rules, event.ts, wall_ms, floor);
        let time = coarse(watermark, rules.time_granularity_ms);
        let ingested = Ingested {
            event,
            position,
            watermark,
            ingested_at_ms: wall_ms,
        };
        (time, ingested)
    }
}

/// Where a source's stamped records go.
pub type Output<'a> = OutputBuilderSession<'a, Time, CapacityContainerBuilder<Vec<Ingested>>>;

/// Stamped records on their way out, sent one session per run of records
/// at the same time (most consecutive records share one).
pub struct Batch<'c> {
    cap: &'c Capability<Time>,
    time: Time,
    events: Vec<Ingested>,
    /// How many more records are expected: the size of the buffer to take
    /// when a flush has left it without one.
    expected: usize,
}

impl<'c> Batch<'c> {
    pub fn new(cap: &'c Capability<Time>) -> Self {
        Self::with_capacity(cap, 0)
    }

    /// A batch for about `records` records: most of a chunk's records
    /// travel at one time, so it is sent without growing (and copying) its
    /// buffer on the way.
    pub fn with_capacity(cap: &'c Capability<Time>, records: usize) -> Self {
        Batch {
            cap,
            time: *cap.time(),
            events: Vec::with_capacity(records),
            expected: records,
        }
    }

    /// Adds a record travelling at `time` (not before the capability's).
    pub fn push(&mut self, output: &mut Output<'_>, time: Time, event: Ingested) {
        if time != self.time {
            self.flush(output);
        }
        self.time = time;
        if self.events.capacity() == 0 {
            // Sending took the buffer: the rest of the records in one
            // allocation, not one doubling at a time.
            self.events.reserve(self.expected);
        }
        self.expected = self.expected.saturating_sub(1);
        self.events.push(event);
    }

    /// Sends what is batched, as one container (records are not moved
    /// one by one into the output's buffer).
    pub fn flush(&mut self, output: &mut Output<'_>) {
        if !self.events.is_empty() {
            output
                .session(&self.cap.delayed(&self.time))
                .give_container(&mut self.events);
            self.events.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WALL: u64 = 1_700_000_000_000;

    #[test]
    fn a_record_ahead_of_the_wall_clock_cannot_push_the_watermark() {
        let ahead = Some(WALL + 600_000);
        assert_eq!(partition_watermark(ahead, 5, WALL), WALL - 5);
        assert_eq!(partition_watermark(Some(WALL - 100), 5, WALL), WALL - 105);
        assert_eq!(partition_watermark(None, 5, WALL), 0);
    }

    #[test]
    fn the_watermark_never_goes_back_with_the_wall_clock() {
        let mut clock = PartitionClock::resumed(Some(WALL));
        assert_eq!(clock.advance(5, WALL), WALL - 5);
        assert_eq!(clock.advance(5, WALL - 1_000), WALL - 5);
    }
}
