//! Live path: concurrent viewers and chat rate per stream, every second.
//!
//! Creators want numbers that are fresh, not numbers that are final, so this
//! path never waits for the event-time frontier. Events are exchanged by
//! `stream_id` to an operator that keeps per-stream state in hash maps and,
//! on a wall-clock tick, emits a [`Snapshot`] of every stream it owns from
//! whatever has arrived so far. It keeps a capability at its input frontier
//! only so that it may emit at all; the snapshots it sends are consumed on
//! arrival, not at frontier progress, so a stalled frontier (billing waiting
//! for a slow partition) never delays a tick.
//!
//! `now` is the highest event time the pipeline has seen (every worker's
//! highest, broadcast as the clock stream of [`crate::route`]), so
//! replaying an old file behaves like live, in one process or many.

use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::PipelineConfig;
use crate::event::{EventKind, Ingested};
use crate::probe::Probes;
use crate::time::Time;

/// Chat rate is counted over this much event time.
pub const CHAT_WINDOW_MS: u64 = 60_000;

/// One stream's numbers at one tick.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Snapshot {
    pub stream_id: String,
    /// Distinct viewers present (see SPEC §2).
    pub viewers: u64,
    /// `chat` events with `ts` in `(as_of - 60 s, as_of]`.
    pub chat_per_min: u64,
    /// The event time the counts are computed at (the highest seen).
    pub as_of: u64,
    /// Wall-clock ms of the tick.
    pub emitted_at: u64,
}

/// The part of an event the live path needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Signal {
    stream_id: String,
    viewer_id: String,
    ts: u64,
    kind: SignalKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum SignalKind {
    Presence,
    Leave,
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
    viewers: HashMap<String, Viewer>,
    /// Chat count per event-time ms, pruned to the last minute.
    chats: BTreeMap<u64, u64>,
}

impl StreamState {
    fn apply(&mut self, viewer_id: String, ts: u64, kind: SignalKind) {
        let viewer = self.viewers.entry(viewer_id).or_default();
        match kind {
            SignalKind::Leave => viewer.leave = viewer.leave.max(ts),
            SignalKind::Presence | SignalKind::Chat => {
                viewer.presence = viewer.presence.max(ts);
                if kind == SignalKind::Chat {
                    *self.chats.entry(ts).or_default() += 1;
                }
            }
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
        self.chats = self.chats.split_off(&(chat_floor + 1));
        let chat_per_min = self.chats.range(..=now).map(|(_, n)| n).sum();
        (viewers, chat_per_min)
    }
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn stream_hash(stream_id: &str) -> u64 {
    // DefaultHasher::new() has fixed keys: the same route in every process.
    let mut hasher = DefaultHasher::new();
    stream_id.hash(&mut hasher);
    hasher.finish()
}

/// Builds the live sub-graph over the live events and the event clock (the
/// highest `ts` seen anywhere, as [`crate::route::split_paths`] gives it).
/// The returned stream carries one snapshot per stream per tick, and a last
/// one when the input ends.
pub fn live<'s>(
    ingested: StreamVec<'s, Time, Ingested>,
    clock: StreamVec<'s, Time, u64>,
    config: &PipelineConfig,
    probes: Arc<Probes>,
) -> StreamVec<'s, Time, Snapshot> {
    let ttl = config.presence_ttl_ms;
    let tick = Duration::from_millis(config.tick_ms);
    let scope = ingested.scope();
    ingested
        .flat_map(|record: Ingested| {
            let kind = match record.event.kind {
                EventKind::Join | EventKind::Heartbeat => SignalKind::Presence,
                EventKind::Chat => SignalKind::Chat,
                EventKind::Leave => SignalKind::Leave,
                EventKind::Impression(_) | EventKind::AdProgress(_) => return None,
            };
            Some(Signal {
                stream_id: record.event.stream_id,
                viewer_id: record.event.viewer_id,
                ts: record.event.ts,
                kind,
            })
        })
        .binary_frontier(
            clock,
            Exchange::new(|signal: &Signal| stream_hash(&signal.stream_id)),
            Pipeline,
            "LiveCounts",
            move |capability, info| {
                let activator = scope.activator_for(info.address);
                let mut capability: Option<Capability<Time>> = Some(capability);
                let mut streams: HashMap<String, StreamState> = HashMap::new();
                let mut now: u64 = 0;
                let mut next_tick = Instant::now() + tick;
                activator.activate_after(tick);
                move |(input, frontier), (clock, clock_frontier), output| {
                    clock.for_each_stamp(|_, batches| {
                        for batch in batches {
                            now = batch.drain(..).fold(now, u64::max);
                        }
                    });
                    input.for_each_stamp(|_, batches| {
                        for batch in batches {
                            for signal in batch.drain(..) {
                                // The id moves into the map: no copy per event.
                                streams.entry(signal.stream_id).or_default().apply(
                                    signal.viewer_id,
                                    signal.ts,
                                    signal.kind,
                                );
                            }
                        }
                    });
                    let Some(cap) = capability.as_mut() else {
                        return;
                    };
                    let finished = frontier.is_empty() && clock_frontier.is_empty();
                    let now_instant = Instant::now();
                    if finished || now_instant >= next_tick {
                        let emitted_at = wall_clock_ms();
                        let mut session = output.session(&*cap);
                        for (stream_id, state) in streams.iter_mut() {
                            let (viewers, chat_per_min) = state.snapshot(now, ttl);
                            session.give(Snapshot {
                                stream_id: stream_id.clone(),
                                viewers,
                                chat_per_min,
                                as_of: now,
                                emitted_at,
                            });
                        }
                        // Ticks are on a fixed grid; a slow worker skips to the next slot.
                        let micros = now_instant.elapsed().as_micros() as u64;
                        probes.ticks.fetch_add(1, Ordering::Relaxed);
                        probes.tick_micros.fetch_add(micros, Ordering::Relaxed);
                        probes.tick_micros_max.fetch_max(micros, Ordering::Relaxed);
                        probes.last_tick_ms.fetch_max(emitted_at, Ordering::Relaxed);
                        while next_tick <= now_instant {
                            next_tick += tick;
                        }
                        // One timer per tick: data activations in between must
                        // not pile up timers that all fire at the same moment.
                        if !finished {
                            activator.activate_after(next_tick - now_instant);
                        }
                    }
                    if finished {
                        probes.inputs_ended.store(true, Ordering::Relaxed);
                        capability = None;
                        return;
                    }
                    let least = frontier
                        .frontier()
                        .iter()
                        .chain(clock_frontier.frontier().iter())
                        .min()
                        .copied();
                    if let Some(time) = least {
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

    #[test]
    fn leave_on_equal_ts_wins_and_ttl_expires() {
        let mut state = StreamState::default();
        state.apply("a".into(), 1_000, SignalKind::Presence);
        state.apply("a".into(), 1_000, SignalKind::Leave);
        state.apply("b".into(), 1_000, SignalKind::Presence);
        state.apply("c".into(), 5_000, SignalKind::Chat);
        assert_eq!(state.snapshot(5_000, 30_000), (2, 1));
        // b's presence at 1000 is no longer newer than 31_000 - 30_000.
        assert_eq!(state.snapshot(31_000, 30_000), (1, 1));
        // The chat at 5000 leaves the minute at 65_000.
        assert_eq!(state.snapshot(65_000, 30_000), (0, 0));
        assert!(state.viewers.is_empty());
    }

    #[test]
    fn late_presence_after_leave_does_not_resurrect() {
        let mut state = StreamState::default();
        state.apply("a".into(), 2_000, SignalKind::Presence);
        state.apply("a".into(), 3_000, SignalKind::Leave);
        state.apply("a".into(), 2_500, SignalKind::Presence);
        assert_eq!(state.snapshot(3_000, 30_000).0, 0);
        state.apply("a".into(), 4_000, SignalKind::Presence);
        assert_eq!(state.snapshot(4_000, 30_000).0, 1);
    }
}
