//! Where ingest splits: every event goes to exactly one path, and the live
//! path also gets the event clock.
//!
//! The live path counts "now" as the highest event time the pipeline has
//! seen, over every partition and every kind of event. A worker only sees
//! its own partitions, and in a cluster no memory is shared between
//! processes, so each worker reports its highest `ts` into a small stream
//! that is broadcast to every live operator. It reports only when that
//! time moves, at most once per batch.

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::StreamVec;

use crate::event::{EventKind, Ingested};
use crate::live::Signal;
use crate::probe::Probes;
use crate::time::Time;
use crate::turns::Path;

use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The job's key for hashing producers' ids (stream ids, impression ids)
/// to workers and arrangement keys.
///
/// Producers choose those ids. With a fixed hash they could choose ids
/// that all land on one worker, or collide in an arrangement, and slow the
/// job for everyone. A random key per job takes that choice away: SipHash
/// 1-3, keyed, as std's `HashMap` does against the same attack. Every
/// process of a cluster must route alike, so process 0 draws the key and
/// the cluster handshake hands it to the others. It changes at every
/// start, so nothing that outlives a run may depend on a hash (files and
/// the ledger sort by the ids themselves).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RouteKey([u64; 2]);

impl RouteKey {
    pub fn new(words: [u64; 2]) -> Self {
        RouteKey(words)
    }

    /// The keyed hash of `id`.
    pub fn hash(&self, id: &str) -> u64 {
        let mut hasher = siphasher::sip::SipHasher13::new_with_keys(self.0[0], self.0[1]);
        id.hash(&mut hasher);
        hasher.finish()
    }
}

impl std::fmt::Debug for RouteKey {
    // Knowing the key is knowing how to collide: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteKey(<hidden>)")
    }
}

/// The streams the two paths start from.
pub struct Paths<'s> {
    /// Joins, heartbeats, leaves and chat, as the live path reads them
    /// (converted here: a live record is not moved whole once more).
    pub live: StreamVec<'s, Time, Signal>,
    /// Every worker's highest event time so far, on every worker.
    pub clock: StreamVec<'s, Time, u64>,
    /// Impressions and ad progress.
    pub billing: StreamVec<'s, Time, Ingested>,
}

/// Splits `ingested` into the two paths and the clock. `on_event` sees
/// every event once, on the worker that ingested it (for counters).
pub fn split_paths<'s>(
    ingested: StreamVec<'s, Time, Ingested>,
    probes: Arc<Probes>,
    mut on_event: impl FnMut(&EventKind) + 'static,
) -> Paths<'s> {
    let mut builder = OperatorBuilder::new("SplitPaths".to_owned(), ingested.scope());
    let mut input = builder.new_input(ingested, Pipeline);
    let (live, live_stream) = builder.new_output();
    let (clock, clock_stream) = builder.new_output();
    let (billing, billing_stream) = builder.new_output();
    let mut live = OutputBuilder::from(live);
    let mut clock = OutputBuilder::from(clock);
    let mut billing = OutputBuilder::from(billing);
    builder.build(move |_capabilities| {
        let mut reported: u64 = 0;
        move |_frontiers| {
            // Ingest is timed as the source's: it is shared by both paths.
            let _turn = probes.turns.time(Path::Source);
            let mut live = live.activate();
            let mut clock = clock.activate();
            let mut billing = billing.activate();
            input.for_each_stamp(|cap, batches| {
                let mut to_live = live.session(&cap);
                let mut to_billing = billing.session(&cap);
                let mut highest = reported;
                for batch in batches {
                    for record in batch.drain(..) {
                        on_event(&record.event.kind);
                        highest = highest.max(record.event.ts);
                        match Signal::of(record) {
                            Ok(signal) => to_live.give(signal),
                            Err(record) => to_billing.give(record),
                        }
                    }
                }
                if highest > reported {
                    reported = highest;
                    clock.session(&cap).give(highest);
                }
            });
        }
    });
    Paths {
        live: live_stream,
        clock: clock_stream.broadcast(),
        billing: billing_stream,
    }
}
