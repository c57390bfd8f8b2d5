//! Billing path: every impression billed exactly once, only after a
//! qualifying watch, and only once it is final.
//!
//! The whole outcome of an impression id is a pure function of the records
//! that reached billing for it, each annotated with the watermark of its
//! partition when it arrived (see [`Ingested`]):
//!
//! * impressions whose own window had closed when they arrived
//!   (`watermark > ts + window`) are late and never enter (see [`admit`]);
//! * the canonical impression is the least `(ts, event_id)` among the rest,
//!   and its deadline is `D = ts + qualify_window`;
//! * an `ad_progress` counts if `watermark <= D`, `watched_ms >= qualify_ms`
//!   and `ts` lies in `[canonical.ts, D]`; the earliest such `ts` is
//!   `qualified_ts`;
//! * any other record with `watermark > D` arrived after the impression was
//!   final: it is late and changes nothing.
//!
//! Because the rule reads only data, the answer does not depend on arrival
//! order, worker count or partitioning. It lives in one function,
//! [`decide_impression`]; the dataflow only decides when to call it, and
//! with which facts.
//!
//! Facts are exchanged by impression id, so that an id's records meet on
//! one worker. Impressions are arranged there by id (the dedup
//! arrangement); one operator, `DecideImpression`, reads the batches of
//! that arrangement as they come, holds a handle on its trace, and holds
//! the qualifying progress itself (each progress record is read by one
//! decision at most: arranging it, three quarters of billing's records,
//! cost more than the rest of billing's dataflow). It reads both inputs
//! up to one cut, the upper bound of the arranged batches it has read,
//! which it moves only once the progress input has passed it:
//!
//! * an impression registers its id under its deadline bucket
//!   `coarse(ts + window)` (see [`crate::time`]);
//! * once the cut has passed a bucket, every record with `watermark <= D`
//!   of an id due there has been read (it travels at a time at or before
//!   `coarse(D)`). The operator reads the id's facts once, from the trace
//!   through the cut and from the progress it holds, decides, emits the
//!   final outcome and the late records among them, and leaves a
//!   tombstone: the deadline, for the retention (see below);
//! * a fact of a decided id read later is late (its watermark is above
//!   `D`, or it would have been read) and is reported on arrival.
//!
//! So each fact is reported at most once, and each outcome is final once:
//! the facts read before the decision are exactly those the decision reads
//! (everything before the cut, of which it takes those present at the
//! bucket or arriving after it), and the facts read after it meet the
//! tombstone. Every admitted impression record leaves
//! `pending_impressions` once: as the canonical one, a duplicate, or late.
//!
//! State stays bounded: each record leaves (the arrangement, or the held
//! progress) once the latest deadline it can influence has passed, and a
//! tombstone stays `state_retention_ms` longer than the latest of its id's
//! records (see [`Retirement`]). The trace is compacted up to the cut
//! (every undecided bucket is at or after it, so what the decisions read
//! stays exact). A fact of an id whose tombstone has gone starts the id
//! afresh (none of its earlier records is left); a second outcome for the
//! id is rejected by the billing sink's ledger (every finalized id,
//! forever).

use differential_dataflow::operators::arrange::arrangement::arrange_core;
use differential_dataflow::trace::cursor::cursor_list;
use differential_dataflow::trace::implementations::{ValBatcher, ValSpine};
use differential_dataflow::trace::{Cursor, Navigable, SpanOf, TraceReader};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{Operator, OutputBuilder};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, Concat};
use timely::dataflow::StreamVec;
use timely::order::PartialOrder;
use timely::progress::frontier::AntichainRef;
use timely::progress::Antichain;

use foldhash::{HashMap, HashMapExt};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::PipelineConfig;
use crate::event::{EventKind, Ingested, Position};
use crate::probe::Probes;
use crate::route::RouteKey;
use crate::time::{after, coarse, Time};
use crate::turns::{Path, Slice};

/// Facts are cloned at every merge of an arrangement: their text is
/// inline or shared (see [`Text`]), never copied from the heap.
pub use crate::event::Text;

/// The arrangement key: an impression id, led by a hash of it. Keys are
/// compared at every step of every merge and seek; comparing the hash first
/// settles almost all of them without touching the text, and the text
/// itself keeps distinct ids distinct when hashes collide.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ImpressionKey {
    hash: u64,
    pub id: Text,
}

/// A key hashes as its keyed hash alone: equal keys have equal hashes, and
/// the decision's maps of ids then hash one word, not the id's text. The
/// word is already the job's keyed SipHash of the id, which producers
/// cannot predict, so a fast hasher over it keeps those maps safe.
impl std::hash::Hash for ImpressionKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl ImpressionKey {
    /// `route` is the job's key, the same in every process: the hash
    /// decides the worker that holds the id.
    pub fn new(id: Text, route: &RouteKey) -> Self {
        ImpressionKey {
            hash: route.hash(&id),
            id,
        }
    }
}

/// An impression as it entered billing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ImpressionFact {
    // Field order matters: the derived `Ord` makes the canonical record
    // (least `ts`, then `event_id` in byte order) sort first.
    pub ts: u64,
    pub event_id: Text,
    pub watermark: u64,
    pub position: Position,
    /// What the billed row says about the ad, behind one pointer: facts are
    /// moved and cloned at every merge of the arrangement, and only the
    /// canonical impression's details are ever read.
    pub ad: Arc<AdDetails>,
}

/// An impression's billable details.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AdDetails {
    pub ad_id: Text,
    pub campaign_id: Text,
    pub advertiser_id: Text,
    pub stream_id: Text,
    pub viewer_id: Text,
    pub price_micros: u64,
}

/// An `ad_progress` that reached the qualifying threshold.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProgressFact {
    pub ts: u64,
    pub event_id: Text,
    pub watermark: u64,
    pub position: Position,
}

/// What billing keeps per impression id. Impressions sort before progress.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Fact {
    Impression(ImpressionFact),
    Progress(ProgressFact),
}

impl Fact {
    fn ts(&self) -> u64 {
        match self {
            Fact::Impression(i) => i.ts,
            Fact::Progress(p) => p.ts,
        }
    }
    fn watermark(&self) -> u64 {
        match self {
            Fact::Impression(i) => i.watermark,
            Fact::Progress(p) => p.watermark,
        }
    }
}

/// The final word on one impression id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Outcome {
    pub impression_id: Text,
    /// The canonical impression record.
    pub impression: ImpressionFact,
    /// `ts` of the earliest qualifying `ad_progress`; `None` means expired.
    pub qualified_ts: Option<u64>,
    /// On-time impression records other than the canonical one.
    pub duplicates: u32,
}

impl Outcome {
    pub fn is_billed(&self) -> bool {
        self.qualified_ts.is_some()
    }
}

/// Why a record was not taken into account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LateReason {
    /// An impression whose own qualify window had closed when it arrived.
    WindowClosed,
    /// The impression it concerns was already final when it arrived.
    ImpressionFinal,
    /// The ledger already held a final outcome for its id: the dataflow no
    /// longer had the id's state (retired, or replayed after a restart).
    AlreadyFinal,
}

impl LateReason {
    pub fn code(&self) -> &'static str {
        match self {
            LateReason::WindowClosed => "window_closed",
            LateReason::ImpressionFinal => "impression_final",
            LateReason::AlreadyFinal => "already_final",
        }
    }
}

/// What kind of record was late.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LateKind {
    Impression,
    AdProgress,
}

impl LateKind {
    /// The record's `type`, as `late.jsonl` names it.
    pub fn code(&self) -> &'static str {
        match self {
            LateKind::Impression => "impression",
            LateKind::AdProgress => "ad_progress",
        }
    }
}

/// A record that arrived too late to count, for `late.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LateRecord {
    pub reason: LateReason,
    pub kind: LateKind,
    pub event_id: Text,
    pub impression_id: Text,
    pub ts: u64,
    pub position: Position,
}

impl LateRecord {
    fn of(fact: &Fact, impression_id: &str, reason: LateReason) -> Self {
        let (kind, event_id, position) = match fact {
            Fact::Impression(i) => (LateKind::Impression, &i.event_id, i.position),
            Fact::Progress(p) => (LateKind::AdProgress, &p.event_id, p.position),
        };
        LateRecord {
            reason,
            kind,
            event_id: event_id.clone(),
            impression_id: Text::from(impression_id),
            ts: fact.ts(),
            position,
        }
    }

    /// The canonical impression of an outcome whose id (or period) the
    /// ledger already held final: the first answer stands.
    pub fn already_final(outcome: &Outcome) -> Self {
        LateRecord {
            reason: LateReason::AlreadyFinal,
            kind: LateKind::Impression,
            event_id: outcome.impression.event_id.clone(),
            impression_id: outcome.impression_id.clone(),
            ts: outcome.impression.ts,
            position: outcome.impression.position,
        }
    }
}

/// What leaves the billing path: only final outcomes and late records.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BillingEvent {
    Final(Outcome),
    Late(LateRecord),
}

/// Builds the billing sub-graph on the stream of ingested impressions and
/// `ad_progress` records (other event types may be present; they are ignored).
pub fn billing<'s>(
    ingested: StreamVec<'s, Time, Ingested>,
    config: &PipelineConfig,
    route: RouteKey,
    probes: Arc<Probes>,
) -> StreamVec<'s, Time, BillingEvent> {
    let admitted = admit(ingested, config, route, probes.clone());
    decide(admitted.impressions, admitted.progress, config, probes)
        .concat(admitted.window_closed.map(BillingEvent::Late))
}

/// A billing fact with the id it concerns.
type KeyedFact = (ImpressionKey, Fact);

/// What admission hands on, keyed by impression id.
struct Admitted<'s> {
    /// Impressions within their own window, for the arrangement.
    impressions: StreamVec<'s, Time, KeyedFact>,
    /// `ad_progress` records at or above the qualifying threshold.
    progress: StreamVec<'s, Time, KeyedFact>,
    /// Impressions whose own window had closed when they arrived.
    window_closed: StreamVec<'s, Time, LateRecord>,
}

/// Turns ingested records into billing facts, early: below-threshold
/// progress and other event types are dropped here, so billing sees about
/// four records per impression; impressions already past their own window
/// are late on arrival.
fn admit<'s>(
    ingested: StreamVec<'s, Time, Ingested>,
    config: &PipelineConfig,
    route: RouteKey,
    probes: Arc<Probes>,
) -> Admitted<'s> {
    let qualify_ms = config.qualify_ms;
    let window = config.qualify_window_ms;
    let mut builder = OperatorBuilder::new("AdmitBilling".to_owned(), ingested.scope());
    let mut input = builder.new_input(ingested, Pipeline);
    let (impressions, impressions_stream) = builder.new_output();
    let (progress, progress_stream) = builder.new_output();
    let (window_closed, window_closed_stream) = builder.new_output();
    let mut impressions = OutputBuilder::from(impressions);
    let mut progress = OutputBuilder::from(progress);
    let mut window_closed = OutputBuilder::from(window_closed);
    builder.build(move |_capabilities| {
        move |_frontiers| {
            let mut impressions = impressions.activate();
            let mut progress = progress.activate();
            let mut window_closed = window_closed.activate();
            input.for_each_stamp(|cap, batches| {
                let mut to_impressions = impressions.session(&cap);
                let mut to_progress = progress.session(&cap);
                let mut to_window_closed = window_closed.session(&cap);
                for record in batches.flat_map(|batch| batch.drain(..)) {
                    let Ingested {
                        event,
                        position,
                        watermark,
                        ..
                    } = record;
                    match event.kind {
                        EventKind::Impression(imp) => {
                            let fact = Fact::Impression(ImpressionFact {
                                ts: event.ts,
                                event_id: event.event_id,
                                watermark,
                                position,
                                ad: Arc::new(AdDetails {
                                    ad_id: imp.ad_id,
                                    campaign_id: imp.campaign_id,
                                    advertiser_id: imp.advertiser_id,
                                    stream_id: event.stream_id,
                                    viewer_id: event.viewer_id,
                                    price_micros: imp.price_micros,
                                }),
                            });
                            if watermark > event.ts + window {
                                to_window_closed.give(LateRecord::of(
                                    &fact,
                                    &imp.impression_id,
                                    LateReason::WindowClosed,
                                ));
                            } else {
                                // Pending until it is part of a final
                                // outcome (or late because its id already
                                // was): see `Decider::settled`.
                                probes.pending_impressions.fetch_add(1, Ordering::Relaxed);
                                let key = ImpressionKey::new(imp.impression_id, &route);
                                to_impressions.give((key, fact));
                            }
                        }
                        EventKind::AdProgress(watch) if watch.watched_ms >= qualify_ms => {
                            let fact = Fact::Progress(ProgressFact {
                                ts: event.ts,
                                event_id: event.event_id,
                                watermark,
                                position,
                            });
                            let key = ImpressionKey::new(watch.impression_id, &route);
                            to_progress.give((key, fact));
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    Admitted {
        impressions: impressions_stream,
        progress: progress_stream,
        window_closed: window_closed_stream,
    }
}

/// Where a fact is held: the worker of its id's keyed hash. Impressions
/// and progress of one id meet there.
fn by_id(fact: &KeyedFact) -> u64 {
    fact.0.hash
}

/// When billing lets go of a fact, in two steps.
///
/// The arrangement holds a fact only until the latest deadline it can
/// influence has passed ([`Retirement::leaves`]): no decision reads it
/// after that. What a decided id leaves behind, its [`Tombstone`], stays
/// `state_retention_ms` longer ([`Retirement::forgotten`]), so that a retry
/// arriving within the retention is still late against the first decision.
/// Keeping the facts themselves for the retention (as livepipe did before)
/// tripled the arrangement, and every merge of it, for nothing read.
#[derive(Clone, Copy, Debug)]
struct Retirement {
    window: u64,
    granularity: u64,
    retention: u64,
    leave_grid: u64,
    forget_grid: u64,
}

impl Retirement {
    fn new(config: &PipelineConfig) -> Self {
        let granularity = config.time_granularity_ms();
        let window = config.qualify_window_ms;
        let retention = config.state_retention_ms;
        // Both times are rounded up to a grid of a tenth of what they add:
        // the records of one impression (its retries, its progress) then
        // mostly leave at one time. Each lives at most a tenth longer.
        let grid = |span: u64| (span / 10).next_multiple_of(granularity).max(granularity);
        Retirement {
            window,
            granularity,
            retention,
            leave_grid: grid(window),
            forget_grid: grid(retention),
        }
    }

    /// The latest deadline `fact` can influence is its own `ts + window`
    /// (for an impression: its own deadline; for progress: the deadline of
    /// an impression at `ts - window` or later); a fact arriving later
    /// than that is read (as late) by the decision it arrived after. The
    /// first timely time past both.
    fn last_read(&self, fact: &Fact) -> Time {
        let last_useful = fact.watermark().max(fact.ts() + self.window);
        after(last_useful, self.granularity)
    }

    /// The time `fact` leaves the arrangement: it is present at every
    /// bucket whose decision can read it.
    fn leaves(&self, fact: &Fact) -> Time {
        let last_read = self.last_read(fact);
        let leaves = last_read
            .checked_next_multiple_of(self.leave_grid)
            .unwrap_or(u64::MAX);
        // Never after the tombstone it may leave goes: an id that starts
        // afresh must find none of its earlier facts.
        leaves.min(self.forgotten_after(last_read))
    }

    /// The time from which `fact` no longer keeps its decided id's
    /// tombstone.
    fn forgotten(&self, fact: &Fact) -> Time {
        self.forgotten_after(self.last_read(fact))
    }

    /// `retention` after a fact's last read, on a grid.
    fn forgotten_after(&self, last_read: Time) -> Time {
        last_read
            .saturating_add(self.retention)
            .checked_next_multiple_of(self.forget_grid)
            .unwrap_or(u64::MAX)
    }
}

/// Every impression enters the arrangement at its arrival time, on the
/// worker of its id, and leaves again once it can no longer matter (see
/// [`Retirement`]). A frontier jump can make many retirements due at once:
/// at most [`RETIRE_SLICE_FACTS`] are released per invocation, the rest
/// wait under the held capability for the next.
fn enter_and_retire<'s>(
    facts: StreamVec<'s, Time, KeyedFact>,
    retirement: Retirement,
    probes: Arc<Probes>,
) -> StreamVec<'s, Time, (KeyedFact, Time, isize)> {
    let scope = facts.scope();
    facts.unary_frontier(Exchange::new(by_id), "EnterAndRetire", move |_, info| {
        let activator = scope.activator_for(info.address);
        // Retractions wait here, by retire time, until the frontier reaches
        // them. Handing them to differential up front would park them in the
        // arrangement's batcher, which re-sorts every pending future update
        // each time the frontier moves: quadratic in the retention.
        let mut retiring: BTreeMap<Time, Vec<KeyedFact>> = BTreeMap::new();
        let mut retire_cap: Option<Capability<Time>> = None;
        move |(input, frontier), output| {
            let _turn = probes.turns.time(Path::Billing);
            input.for_each_stamp(|cap, batches| {
                let Some(&time) = cap.least() else { return };
                let mut session = output.session(&cap);
                for batch in batches {
                    for (id, fact) in batch.drain(..) {
                        let retire = retirement.leaves(&fact);
                        debug_assert!(retire > time);
                        if retire_cap.as_ref().is_none_or(|c| retire < *c.time()) {
                            retire_cap = Some(cap.delayed(&retire, 0));
                        }
                        session.give(((id.clone(), fact.clone()), time, 1isize));
                        retiring.entry(retire).or_default().push((id, fact));
                    }
                }
            });
            // Release the retirements the frontier has reached, a slice
            // at a time: their order within a time does not matter.
            let mut slice = Slice::new(RETIRE_SLICE_FACTS);
            while let Some(mut entry) = retiring.first_entry() {
                let retire = *entry.key();
                if frontier.less_than(&retire) {
                    break;
                }
                let cap = retire_cap
                    .as_ref()
                    .expect("a capability for pending retirements")
                    .delayed(&retire);
                let mut session = output.session(&cap);
                let facts = entry.get_mut();
                while !facts.is_empty() && slice.take() {
                    let (id, fact) = facts.pop().expect("not empty");
                    session.give(((id, fact), retire, -1isize));
                }
                if !facts.is_empty() {
                    activator.activate();
                    break;
                }
                entry.remove();
            }
            match (retiring.keys().next(), retire_cap.as_mut()) {
                (Some(next), Some(cap)) => cap.downgrade(next),
                _ => retire_cap = None,
            }
        }
    })
}

/// What is left of an impression id once it has been decided: enough to
/// call every later fact of it late, until all its facts have retired.
#[derive(Clone, Copy, Debug)]
struct Tombstone {
    /// The decided impression's deadline `D`.
    deadline: u64,
    /// The latest [`Retirement::forgotten`] of the id's facts: facts
    /// arriving at or after it meet an arrangement without the id, and
    /// start afresh.
    expiry: Time,
}

/// The differential part: impressions arranged by id, and one operator
/// that reads an id's facts once, when the cut passes its deadline.
///
/// Qualifying progress does not enter the arrangement: each record is read
/// by one decision at most, so the operator holds it by id itself, cut at
/// the same bounds as the arranged batches (see [`Decider::received`]).
/// Arranging it cost more than all the rest of billing's dataflow: it is
/// three quarters of billing's records, each sorted, merged and retracted.
///
/// A frontier jump can make a whole period's ids due at once. The operator
/// settles a [`Slice`] of them per invocation and keeps the rest, with the
/// bucket's capability, in [`Backlog`]; while a backlog is pending it reads
/// no input and leaves the trace's compaction where it was, so the rest is
/// decided from exactly the facts the first slice saw (see [`Backlog`]).
fn decide<'s>(
    impressions: StreamVec<'s, Time, KeyedFact>,
    progress: StreamVec<'s, Time, KeyedFact>,
    config: &PipelineConfig,
    probes: Arc<Probes>,
) -> StreamVec<'s, Time, BillingEvent> {
    let retirement = Retirement::new(config);
    let scope = impressions.scope();
    // Already on the worker of their id (`EnterAndRetire` exchanged them).
    let arranged = arrange_core::<_, _, ImpressionBatcher, ImpressionSpine>(
        enter_and_retire(impressions, retirement, probes.clone()),
        Pipeline,
        "ImpressionFacts",
        ImpressionBatcher::new,
    );
    let mut trace = Some(arranged.trace);
    let mut decider = Decider::new(config, retirement, probes);
    arranged.stream.binary_frontier(
        progress,
        Pipeline,
        Exchange::new(by_id),
        "DecideImpression",
        move |_, info| {
            let activator = scope.activator_for(info.address);
            move |(arranged, arranged_frontier), (progress, progress_frontier), output| {
                let probes = decider.probes.clone();
                let _turn = probes.turns.time(Path::Billing);
                let mut slice = Slice::new(SETTLE_SLICE_IDS);
                let mut read = false;
                loop {
                    if decider.backlog.is_none() && !read {
                        read = true;
                        arranged.for_each_stamp(|cap, spans| {
                            for span in spans.flat_map(|spans| spans.drain(..)) {
                                decider.received.push_back((cap.retain_least(0), span));
                            }
                        });
                        progress.for_each_stamp(|cap, batches| {
                            let Some(&time) = cap.least() else { return };
                            let (_, waiting) = decider
                                .waiting
                                .entry(time)
                                .or_insert_with(|| (cap.delayed(&time, 0), Vec::new()));
                            for batch in batches {
                                waiting.append(batch);
                            }
                        });
                        let inputs_ended =
                            arranged_frontier.is_empty() && progress_frontier.is_empty();
                        decider.read_through(
                            progress_frontier.frontier(),
                            inputs_ended,
                            |cap, time, late| output.session(&cap.delayed(&time)).give(late),
                        );
                    }
                    if decider.backlog.is_none() {
                        let cut = decider.cut.clone();
                        decider.backlog = decider.next_due(|bucket| !cut.less_equal(bucket));
                    }
                    let Some(mut backlog) = decider.backlog.take() else {
                        break;
                    };
                    let batches = trace
                        .as_mut()
                        .expect("the trace is held while ids are due")
                        .batches_through(decider.seen_upper.borrow())
                        .expect("the received batches end at a batch boundary");
                    let (mut cursor, storage) = cursor_list(batches);
                    let mut session = output.session(&backlog.cap);
                    let ids = &mut backlog.ids;
                    decider.settle_slice(ids, &mut cursor, &storage, &mut slice, |event| {
                        session.give(event)
                    });
                    drop(session);
                    if backlog.ids.pending() {
                        // The rest in a later turn: a live tick may be due.
                        decider.backlog = Some(backlog);
                        activator.activate();
                        return;
                    }
                }
                // Every bucket before the cut is decided: what the cut has
                // reached can no longer be read.
                let cut = decider.cut.clone();
                decider.forget_expired(|expiry| !cut.less_than(expiry));
                decider.retire_progress(|leaves| !cut.less_than(leaves));
                if cut.is_empty() {
                    trace = None;
                } else if let Some(trace) = trace.as_mut() {
                    // Undecided buckets are all at or after the cut, so
                    // accumulations there stay exact.
                    trace.set_logical_compaction(cut.borrow());
                    trace.set_physical_compaction(decider.seen_upper.borrow());
                }
            }
        },
    )
}

/// The arrangement of impressions: differential's default layout for
/// `(key, value)` updates.
type ImpressionBatcher = ValBatcher<ImpressionKey, Fact, Time, isize>;
type ImpressionSpine = ValSpine<ImpressionKey, Fact, Time, isize>;

/// At most this many ids are settled per invocation of `DecideImpression`
/// (and at most [`crate::turns::SLICE_TIME`]): a few microseconds each.
const SETTLE_SLICE_IDS: usize = 1024;

/// At most this many retractions are released per invocation of
/// `EnterAndRetire`.
const RETIRE_SLICE_FACTS: usize = 16 * 1024;

/// The ids of one passed bucket not settled yet, for later invocations.
///
/// Exactness is kept by making the slices indistinguishable from one long
/// invocation: `cap` holds the bucket, so nothing downstream sees it pass
/// before its last outcome; no input is read until the backlog is done, so
/// `seen_upper` and the held progress (the facts the decisions read) do
/// not move; and the trace's logical compaction stays at or before
/// `bucket`, so the accumulations read at the bucket stay what they were.
struct Backlog {
    cap: Capability<Time>,
    ids: DueIds,
}

/// The ids of a passed bucket, and how far settling them has come.
struct DueIds {
    bucket: Time,
    /// Sorted, distinct and undecided when taken.
    keys: Vec<ImpressionKey>,
    /// How many of `keys` have been settled.
    next: usize,
}

impl DueIds {
    fn pending(&self) -> bool {
        self.next < self.keys.len()
    }
}

/// A cursor over the arranged facts: the trace's, or one batch's.
trait FactCursor:
    for<'a> Cursor<
    Key<'a> = &'a ImpressionKey,
    Val<'a> = &'a Fact,
    TimeGat<'a> = &'a Time,
    DiffGat<'a> = &'a isize,
>
{
}

impl<C> FactCursor for C where
    C: for<'a> Cursor<
        Key<'a> = &'a ImpressionKey,
        Val<'a> = &'a Fact,
        TimeGat<'a> = &'a Time,
        DiffGat<'a> = &'a isize,
    >
{
}

/// A batch's arrivals, in time order: a fact arriving after everything
/// about a decided id retired starts it afresh, one arriving before is
/// late. Retractions only shrink the arrangement and are not arrivals.
/// Times before `least` (the batch's capability) are read as `least`.
fn arrivals<'b, C>(cursor: &mut C, storage: &'b C::Storage, least: Time) -> Vec<Arrival<'b>>
where
    C: FactCursor,
{
    let mut arrivals = Vec::new();
    while let Some(key) = cursor.get_key(storage) {
        while let Some(fact) = cursor.get_val(storage) {
            cursor.map_times(storage, |&time, &diff| {
                for _ in 0..diff.max(0) {
                    arrivals.push((time.max(least), key, fact));
                }
            });
            cursor.step_val(storage);
        }
        cursor.step_key(storage);
    }
    // Stable, and a batch mostly spans one time: nearly free.
    arrivals.sort_by_key(|&(time, _, _)| time);
    arrivals
}

/// An arranged fact as it arrived: its time, id and fact.
type Arrival<'b> = (Time, &'b ImpressionKey, &'b Fact);

/// The facts of the id under the cursor that the decision at `bucket`
/// reads: `present` at the bucket, and `later`, every arrival after it
/// (late, if it comes while the decision's tombstone lives, even if
/// retracted since), in time order. A fact retracted by the bucket belonged
/// to an earlier decision of the id, or can no longer matter (progress
/// before it). Both cleared first.
fn facts_at<'b, C>(
    cursor: &mut C,
    storage: &'b C::Storage,
    bucket: Time,
    present: &mut Vec<&'b Fact>,
    later: &mut Vec<(Time, &'b Fact)>,
) where
    C: for<'a> Cursor<Val<'a> = &'a Fact, TimeGat<'a> = &'a Time, DiffGat<'a> = &'a isize>,
{
    present.clear();
    later.clear();
    while let Some(fact) = cursor.get_val(storage) {
        let mut at_bucket = 0isize;
        cursor.map_times(storage, |&time, &diff| {
            if time <= bucket {
                at_bucket += diff;
            } else {
                for _ in 0..diff.max(0) {
                    later.push((time, fact));
                }
            }
        });
        if at_bucket > 0 {
            present.push(fact);
        }
        cursor.step_val(storage);
    }
    later.sort_by_key(|&(time, _)| time);
}

/// Adds an id's held progress to what [`facts_at`] read of its
/// impressions, by the same rule: `present` if it came by `bucket` and
/// leaves after it, `later` if it came after it. `later` stays in time
/// order, impressions first at equal times.
fn watches_at<'b>(
    watches: &'b [HeldWatch],
    bucket: Time,
    present: &mut Vec<&'b Fact>,
    later: &mut Vec<(Time, &'b Fact)>,
) {
    let impressions_later = later.len();
    for watch in watches {
        if watch.arrived > bucket {
            later.push((watch.arrived, &watch.fact));
        } else if watch.leaves > bucket {
            present.push(&watch.fact);
        }
    }
    if later.len() > impressions_later {
        // Stable: impressions were first.
        later.sort_by_key(|&(time, _)| time);
    }
}

/// The decision operator's state: ids waiting for their deadline, decided
/// ids' tombstones, held progress, and how far the inputs have been read.
struct Decider {
    window: u64,
    granularity: u64,
    retirement: Retirement,
    probes: Arc<Probes>,
    /// Impression ids to decide, by deadline bucket, with a capability to
    /// emit their outcomes.
    due: BTreeMap<Time, (Capability<Time>, Vec<ImpressionKey>)>,
    decided: HashMap<ImpressionKey, Tombstone>,
    expiring: BTreeMap<Time, Vec<ImpressionKey>>,
    /// Arranged spans received and not read yet, with their capability: a
    /// span is read once the progress input has passed its upper bound, so
    /// that the facts read so far, of both kinds, are exactly those before
    /// one bound (the cut).
    received: VecDeque<(Option<Capability<Time>>, SpanOf<ImpressionSpine>)>,
    /// Progress received and not read yet, by time.
    waiting: Waiting,
    /// Progress read and not retired, by id: what the arrangement would
    /// hold of it.
    watches: HashMap<ImpressionKey, Vec<HeldWatch>>,
    /// When held progress leaves, by time (an id once per record).
    watches_leaving: BTreeMap<Time, Vec<ImpressionKey>>,
    /// The upper bound of the spans read so far: the trace through it
    /// holds exactly the impressions this operator has read.
    seen_upper: Antichain<Time>,
    /// Every fact before it has been read: `seen_upper`, or nothing once
    /// both inputs have ended.
    cut: Antichain<Time>,
    /// The bucket being settled over several invocations, if any.
    backlog: Option<Backlog>,
}

/// A qualifying `ad_progress` held by [`Decider`], with the times the
/// arrangement would have given it: when it came, and when it leaves (see
/// [`Retirement::leaves`]).
struct HeldWatch {
    arrived: Time,
    leaves: Time,
    fact: Fact,
}

/// Progress taken off [`Decider::waiting`] to be read: by time, with a
/// capability at each time (for late records).
type Waiting = BTreeMap<Time, (Capability<Time>, Vec<KeyedFact>)>;

impl Decider {
    fn new(config: &PipelineConfig, retirement: Retirement, probes: Arc<Probes>) -> Self {
        Decider {
            window: config.qualify_window_ms,
            granularity: config.time_granularity_ms(),
            retirement,
            probes,
            due: BTreeMap::new(),
            decided: HashMap::new(),
            expiring: BTreeMap::new(),
            received: VecDeque::new(),
            waiting: BTreeMap::new(),
            watches: HashMap::new(),
            watches_leaving: BTreeMap::new(),
            seen_upper: Antichain::from_elem(0),
            cut: Antichain::from_elem(0),
            backlog: None,
        }
    }

    /// Reads the received spans whose upper bound the progress input has
    /// passed (`progress_frontier`: every progress record before it is in),
    /// each with the waiting progress before it, and moves the cut there.
    /// Once both inputs have ended and every span is read, the rest of the
    /// progress is read too and the cut passes every bucket. `emit` gets
    /// the late records.
    fn read_through(
        &mut self,
        progress_frontier: AntichainRef<'_, Time>,
        inputs_ended: bool,
        mut emit: impl FnMut(&Capability<Time>, Time, BillingEvent),
    ) {
        while let Some((_, span)) = self.received.front() {
            if !PartialOrder::less_equal(&span.upper().borrow(), &progress_frontier) {
                break;
            }
            let (cap, span) = self.received.pop_front().expect("a front");
            self.seen_upper.clone_from(span.upper());
            let waiting = self.waiting_before(span.upper());
            if let (Some(batch), Some(cap)) = (span.inner, cap) {
                let impressions = arrivals(&mut batch.cursor(), &batch, *cap.time());
                self.arrive_span(Some((impressions, &cap)), waiting, &mut emit);
            } else {
                self.arrive_span(None, waiting, &mut emit);
            }
        }
        if inputs_ended && self.received.is_empty() {
            // Nothing else comes: every bucket is passed.
            let waiting = self.waiting_before(&Antichain::new());
            self.arrive_span(None, waiting, &mut emit);
            self.cut = Antichain::new();
        } else {
            self.cut.clone_from(&self.seen_upper);
        }
    }

    /// The waiting progress before `upper` (all of it if `upper` is empty).
    fn waiting_before(&mut self, upper: &Antichain<Time>) -> Waiting {
        let after = match upper.elements().first() {
            Some(upper) => self.waiting.split_off(upper),
            None => BTreeMap::new(),
        };
        std::mem::replace(&mut self.waiting, after)
    }

    /// A fact of `key` arriving at `time`: late if its id was decided before
    /// it came (and then it keeps the tombstone at least as long as itself).
    fn late_if_decided(
        &mut self,
        key: &ImpressionKey,
        time: Time,
        fact: &Fact,
    ) -> Option<LateRecord> {
        let tomb = self
            .decided
            .get_mut(key)
            .filter(|tomb| time < tomb.expiry)?;
        // It was not read at the decision, and every fact with
        // `watermark <= D` was (its time is at most `coarse(D)`).
        debug_assert!(fact.watermark() > tomb.deadline);
        let retire = self.retirement.forgotten(fact);
        if retire > tomb.expiry {
            tomb.expiry = retire;
            self.expiring.entry(retire).or_default().push(key.clone());
        }
        if matches!(fact, Fact::Impression(_)) {
            self.probes
                .pending_impressions
                .fetch_sub(1, Ordering::Relaxed);
        }
        Some(LateRecord::of(fact, &key.id, LateReason::ImpressionFinal))
    }

    /// An impression of `key` arriving at `time` (under `cap`): late if its
    /// id was decided before it came, else it registers its id under its
    /// deadline bucket.
    fn arrive(
        &mut self,
        key: &ImpressionKey,
        time: Time,
        fact: &Fact,
        cap: &Capability<Time>,
    ) -> Option<LateRecord> {
        if let Some(late) = self.late_if_decided(key, time, fact) {
            return Some(late);
        }
        // The tombstone's retention is over (and every fact it stood for
        // has left): the id starts afresh. The tombstone itself stays until
        // the cut passes its expiry (`forget_expired`): a bucket before this
        // arrival may still be due, and its decision must find the id
        // decided as it was then, however early the operator received this
        // fact (`next_due` tells an expired one).
        if let Fact::Impression(imp) = fact {
            let bucket = coarse(imp.ts + self.window, self.granularity).max(time);
            self.due
                .entry(bucket)
                .or_insert_with(|| (cap.delayed(&bucket), Vec::new()))
                .1
                .push(key.clone());
        }
        None
    }

    /// A qualifying progress record of `key` arriving at `time` (under
    /// `cap`): late if its id was decided before it came, else held for
    /// the decision.
    fn arrive_watch(
        &mut self,
        (key, fact): KeyedFact,
        time: Time,
        cap: &Capability<Time>,
        emit: &mut impl FnMut(&Capability<Time>, Time, BillingEvent),
    ) {
        if let Some(late) = self.late_if_decided(&key, time, &fact) {
            emit(cap, time, BillingEvent::Late(late));
            return;
        }
        let leaves = self.retirement.leaves(&fact);
        debug_assert!(leaves > time);
        self.watches_leaving
            .entry(leaves)
            .or_default()
            .push(key.clone());
        self.watches.entry(key).or_default().push(HeldWatch {
            arrived: time,
            leaves,
            fact,
        });
    }

    /// Every arrival through a read span: the impressions of its batch
    /// (with the batch's capability), if any, and the `waiting` progress
    /// before its upper bound. In time order (impressions first at equal
    /// times, whose order does not matter), as one arrangement of both
    /// would hand them over: a late arrival extends its id's tombstone,
    /// which decides whether a later one is late. `emit` gets the late ones.
    fn arrive_span(
        &mut self,
        batch: Option<(Vec<Arrival<'_>>, &Capability<Time>)>,
        waiting: Waiting,
        mut emit: impl FnMut(&Capability<Time>, Time, BillingEvent),
    ) {
        let (impressions, cap) =
            batch.map_or((Vec::new(), None), |(arrived, cap)| (arrived, Some(cap)));
        let mut impressions = impressions.into_iter().peekable();
        for (time, (watch_cap, watches)) in waiting {
            while let Some(impression) = impressions.next_if(|&(at, _, _)| at <= time) {
                self.arrive_impression(impression, cap, &mut emit);
            }
            for watch in watches {
                self.arrive_watch(watch, time, &watch_cap, &mut emit);
            }
        }
        for impression in impressions {
            self.arrive_impression(impression, cap, &mut emit);
        }
    }

    /// [`Decider::arrive`] for an arrival read from a batch under `cap`.
    fn arrive_impression(
        &mut self,
        (time, key, fact): Arrival<'_>,
        cap: Option<&Capability<Time>>,
        emit: &mut impl FnMut(&Capability<Time>, Time, BillingEvent),
    ) {
        let cap = cap.expect("impressions come with their batch's capability");
        if let Some(late) = self.arrive(key, time, fact, cap) {
            emit(cap, time, BillingEvent::Late(late));
        }
    }

    /// Lets go of held progress once the cut has `reached` the time it
    /// leaves.
    fn retire_progress(&mut self, reached: impl Fn(&Time) -> bool) {
        while let Some((leaves, keys)) = pop_reached(&mut self.watches_leaving, &reached) {
            for key in keys {
                if let Some(held) = self.watches.get_mut(&key) {
                    held.retain(|watch| watch.leaves > leaves);
                    if held.is_empty() {
                        self.watches.remove(&key);
                    }
                }
            }
        }
    }

    /// The next bucket the cut has `passed`, with its capability and
    /// its ids not decided yet (each once).
    fn next_due(&mut self, passed: impl Fn(&Time) -> bool) -> Option<Backlog> {
        while let Some((bucket, (cap, mut keys))) = pop_reached(&mut self.due, &passed) {
            keys.sort_unstable();
            keys.dedup();
            // A tombstone that expired by the bucket no longer stands,
            // even if `forget_expired` has not run since.
            keys.retain(|key| {
                self.decided
                    .get(key)
                    .is_none_or(|tomb| tomb.expiry <= bucket)
            });
            if !keys.is_empty() {
                let ids = DueIds {
                    bucket,
                    keys,
                    next: 0,
                };
                return Some(Backlog { cap, ids });
            }
        }
        None
    }

    /// Settles the ids of `ids` in turn while `slice` allows, reading
    /// their facts with `cursor` (over the trace through `seen_upper`);
    /// `emit` gets the events.
    fn settle_slice<C>(
        &mut self,
        ids: &mut DueIds,
        cursor: &mut C,
        storage: &C::Storage,
        slice: &mut Slice,
        mut emit: impl FnMut(BillingEvent),
    ) where
        C: FactCursor,
    {
        while ids.pending() && slice.take() {
            let key = ids.keys[ids.next].clone();
            ids.next += 1;
            cursor.seek_key(storage, &key);
            if cursor.get_key(storage) != Some(&key) {
                continue;
            }
            let (mut present, mut later) = (Vec::new(), Vec::new());
            facts_at(cursor, storage, ids.bucket, &mut present, &mut later);
            // Taken out while the decision borrows them, then put back:
            // they leave in their own time.
            let watches = self.watches.remove(&key).unwrap_or_default();
            watches_at(&watches, ids.bucket, &mut present, &mut later);
            self.settled(key.clone(), &present, &later, ids.bucket)
                .for_each(&mut emit);
            if !watches.is_empty() {
                self.watches.insert(key, watches);
            }
        }
    }

    /// Decides `key` from the facts read at `bucket` (`present` there, and
    /// `later` ones), if its deadline's bucket is this one (or passed): its
    /// outcome, then the facts that came after it was final; a tombstone
    /// stays.
    ///
    /// The tombstone lives until the latest [`Retirement::forgotten`] of
    /// the facts present at the bucket. A fact that came after the bucket
    /// is late only while it lives, and extends it, in time order: the
    /// judgement [`Decider::arrive`] makes of a fact that comes after the
    /// decision, so the answer does not depend on whether the operator
    /// received a fact before deciding (a replay moves the frontier far at
    /// once) or after. The rest start the id afresh (`arrive` registered
    /// any impression among them).
    fn settled(
        &mut self,
        key: ImpressionKey,
        present: &[&Fact],
        later: &[(Time, &Fact)],
        bucket: Time,
    ) -> impl Iterator<Item = BillingEvent> {
        let mut expiry = present
            .iter()
            .map(|fact| self.retirement.forgotten(fact))
            .max()
            .unwrap_or(0);
        let mut within = 0;
        for &(time, fact) in later {
            if time >= expiry {
                break;
            }
            expiry = expiry.max(self.retirement.forgotten(fact));
            within += 1;
        }
        let joined: Vec<&Fact>;
        let facts = if within == 0 {
            present
        } else {
            joined = present
                .iter()
                .copied()
                .chain(later[..within].iter().map(|&(_, fact)| fact))
                .collect();
            &joined
        };
        let (Some(outcome), late) = decide_impression(&key.id, facts, self.window) else {
            return None.into_iter().chain(Vec::new());
        };
        let deadline = outcome.impression.ts + self.window;
        if coarse(deadline, self.granularity) > bucket {
            // Not final yet: the bucket of its deadline decides it.
            return None.into_iter().chain(Vec::new());
        }
        // Every admitted impression record is the canonical one or a
        // duplicate of exactly one final outcome, or late.
        let late_impressions = late
            .iter()
            .filter(|late| late.kind == LateKind::Impression)
            .count() as i64;
        let records = 1 + i64::from(outcome.duplicates) + late_impressions;
        self.probes
            .pending_impressions
            .fetch_sub(records, Ordering::Relaxed);
        self.decided
            .insert(key.clone(), Tombstone { deadline, expiry });
        self.expiring.entry(expiry).or_default().push(key);
        let late: Vec<BillingEvent> = late.into_iter().map(BillingEvent::Late).collect();
        Some(BillingEvent::Final(outcome)).into_iter().chain(late)
    }

    /// Forgets tombstones once the cut has `passed` their expiry (every
    /// fact they stood for was let go before).
    fn forget_expired(&mut self, passed: impl Fn(&Time) -> bool) {
        while let Some((expiry, keys)) = pop_reached(&mut self.expiring, &passed) {
            for key in keys {
                if self
                    .decided
                    .get(&key)
                    .is_some_and(|tomb| tomb.expiry == expiry)
                {
                    self.decided.remove(&key);
                }
            }
        }
    }
}

/// Removes the first entry of `by_time` if the cut has `reached` its time.
fn pop_reached<V>(
    by_time: &mut BTreeMap<Time, V>,
    reached: impl Fn(&Time) -> bool,
) -> Option<(Time, V)> {
    let entry = by_time.first_entry()?;
    reached(entry.key()).then(|| entry.remove_entry())
}

/// The pure rule of the module docs, for the facts of one impression id
/// (each once, in any order): the outcome, if an impression is among them,
/// and the facts that came after it was final.
pub fn decide_impression(
    id: &Text,
    facts: &[&Fact],
    window: u64,
) -> (Option<Outcome>, Vec<LateRecord>) {
    let canonical = facts
        .iter()
        .enumerate()
        .filter_map(|(n, fact)| match fact {
            Fact::Impression(imp) => Some((imp, n)),
            Fact::Progress(_) => None,
        })
        .min();
    let Some((canonical, canonical_at)) = canonical else {
        // Only progress so far: the impression may still come.
        return (None, Vec::new());
    };
    let deadline = canonical.ts + window;
    let mut qualified_ts: Option<u64> = None;
    let mut duplicates = 0u32;
    let mut late = Vec::new();
    for (n, fact) in facts.iter().enumerate() {
        if n == canonical_at {
            continue;
        }
        if fact.watermark() > deadline {
            late.push(LateRecord::of(fact, id, LateReason::ImpressionFinal));
            continue;
        }
        match fact {
            Fact::Impression(_) => duplicates += 1,
            Fact::Progress(p) => {
                if p.ts >= canonical.ts && p.ts <= deadline {
                    qualified_ts = Some(qualified_ts.map_or(p.ts, |q| q.min(p.ts)));
                }
            }
        }
    }
    let outcome = Outcome {
        impression_id: id.clone(),
        impression: canonical.clone(),
        qualified_ts,
        duplicates,
    };
    (Some(outcome), late)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: u64 = 10_000;

    fn imp(event_id: &str, ts: u64, watermark: u64) -> Fact {
        Fact::Impression(ImpressionFact {
            ts,
            event_id: event_id.into(),
            watermark,
            position: Position {
                partition: 0,
                offset: ts,
            },
            ad: Arc::new(AdDetails {
                ad_id: "ad".into(),
                campaign_id: "c".into(),
                advertiser_id: "adv".into(),
                stream_id: "s".into(),
                viewer_id: "v".into(),
                price_micros: 1,
            }),
        })
    }

    fn prog(event_id: &str, ts: u64, watermark: u64) -> Fact {
        Fact::Progress(ProgressFact {
            ts,
            event_id: event_id.into(),
            watermark,
            position: Position {
                partition: 1,
                offset: ts,
            },
        })
    }

    #[test]
    fn a_fact_stays_for_every_decision_that_reads_it_and_leaves_before_its_tombstone() {
        for (window, retention) in [(300_000, 600_000), (10_000, 0), (60_000, 20_000)] {
            let config = PipelineConfig {
                qualify_window_ms: window,
                state_retention_ms: retention,
                ..PipelineConfig::default()
            };
            let granularity = config.time_granularity_ms();
            let retirement = Retirement::new(&config);
            let ts = 1_700_000_123_456;
            for watermark in [ts - 5_000, ts + window - 1, ts + window + 7_777] {
                for fact in [imp("i", ts, watermark), prog("p", ts, watermark)] {
                    let leaves = retirement.leaves(&fact);
                    // Present at the bucket of the latest deadline it can
                    // influence (`ts + window`) and at its own arrival.
                    assert!(leaves > coarse(ts + window, granularity), "{fact:?}");
                    assert!(leaves > coarse(watermark, granularity), "{fact:?}");
                    // Gone before its id can start afresh, and the
                    // tombstone holds the retention past its last read.
                    let forgotten = retirement.forgotten(&fact);
                    assert!(leaves <= forgotten, "{fact:?}");
                    assert!(
                        forgotten >= after(watermark.max(ts + window), granularity) + retention
                    );
                }
            }
        }
    }

    /// One case: an id's facts; the canonical event id, `qualified_ts`,
    /// duplicates (`None`: no decision) and the late event ids.
    struct Case {
        name: &'static str,
        facts: Vec<Fact>,
        decision: Option<(&'static str, Option<u64>, u32)>,
        late: &'static [&'static str],
    }

    /// One case per clause of the rule: a table, so longer than a screen
    /// by nature; each case reads on its own.
    #[test]
    fn the_rule_of_the_module_docs() {
        let cases = [
            Case {
                name: "only progress: no decision",
                facts: vec![prog("p", 1_000, 1_000)],
                decision: None,
                late: &[],
            },
            Case {
                name: "an impression alone expires",
                facts: vec![imp("i", 1_000, 1_000)],
                decision: Some(("i", None, 0)),
                late: &[],
            },
            Case {
                name: "canonical is the least ts",
                facts: vec![imp("a", 2_000, 2_000), imp("b", 1_000, 2_500)],
                decision: Some(("b", None, 1)),
                late: &[],
            },
            Case {
                name: "equal ts: the least event id",
                facts: vec![imp("b", 1_000, 1_000), imp("a", 1_000, 1_500)],
                decision: Some(("a", None, 1)),
                late: &[],
            },
            Case {
                name: "a duplicate counts only with watermark <= D",
                facts: vec![
                    imp("i", 1_000, 1_000),
                    imp("d1", 1_500, 11_000),
                    imp("d2", 1_600, 11_001),
                ],
                decision: Some(("i", None, 1)),
                late: &["d2"],
            },
            Case {
                name: "progress exactly at the impression's ts qualifies",
                facts: vec![imp("i", 1_000, 1_000), prog("p", 1_000, 1_000)],
                decision: Some(("i", Some(1_000), 0)),
                late: &[],
            },
            Case {
                name: "progress exactly at D qualifies",
                facts: vec![imp("i", 1_000, 1_000), prog("p", 11_000, 11_000)],
                decision: Some(("i", Some(11_000), 0)),
                late: &[],
            },
            Case {
                name: "progress before the impression does not qualify",
                facts: vec![prog("p", 999, 999), imp("i", 1_000, 1_000)],
                decision: Some(("i", None, 0)),
                late: &[],
            },
            Case {
                name: "progress after D does not qualify (and is late)",
                facts: vec![imp("i", 1_000, 1_000), prog("p", 11_001, 11_001)],
                decision: Some(("i", None, 0)),
                late: &["p"],
            },
            Case {
                name: "progress in the window arriving after D is late",
                facts: vec![imp("i", 1_000, 1_000), prog("p", 5_000, 11_001)],
                decision: Some(("i", None, 0)),
                late: &["p"],
            },
            Case {
                name: "the earliest qualifying progress wins",
                facts: vec![
                    prog("p2", 4_000, 4_000),
                    imp("i", 1_000, 1_000),
                    prog("p1", 3_000, 9_000),
                ],
                decision: Some(("i", Some(3_000), 0)),
                late: &[],
            },
            Case {
                name: "the window is the canonical impression's",
                facts: vec![
                    imp("late-ts", 5_000, 5_000),
                    imp("i", 1_000, 1_000),
                    prog("p", 12_000, 12_000),
                ],
                decision: Some(("i", None, 1)),
                late: &["p"],
            },
        ];
        for case in cases {
            let facts: Vec<&Fact> = case.facts.iter().collect();
            let id: Text = "imp-1".into();
            let (outcome, late) = decide_impression(&id, &facts, WINDOW);
            let decision = outcome.as_ref().map(|o| {
                assert_eq!(o.impression_id, id, "{}", case.name);
                (&*o.impression.event_id, o.qualified_ts, o.duplicates)
            });
            assert_eq!(decision, case.decision, "{}", case.name);
            let late_ids: Vec<&str> = late.iter().map(|l| l.event_id.as_str()).collect();
            assert_eq!(late_ids, case.late, "{}", case.name);
            for l in &late {
                assert_eq!(l.reason, LateReason::ImpressionFinal, "{}", case.name);
                assert_eq!(l.impression_id, "imp-1", "{}", case.name);
            }
        }
    }

    fn ingested(id: &str, ts: u64, kind: EventKind) -> Ingested {
        use crate::event::Event;
        Ingested {
            event: Event {
                ts,
                event_id: format!("{id}-{}", kind.name()).into(),
                stream_id: "s".into(),
                viewer_id: "v".into(),
                kind,
            },
            position: Position {
                partition: 0,
                offset: 0,
            },
            watermark: ts,
            ingested_at_ms: 0,
        }
    }

    /// Several slices' worth of ids due in one bucket when the input ends
    /// at once: every outcome comes out once, over several invocations,
    /// and the bucket's time is held until the last of them is out.
    #[test]
    fn a_frontier_jump_is_settled_in_slices_holding_the_bucket() {
        use crate::event::{AdProgress, Impression};
        use std::cell::RefCell;
        use std::rc::Rc;
        use timely::dataflow::operators::{Input, Inspect, Probe};

        let n = 3 * SETTLE_SLICE_IDS + 7;
        let config = PipelineConfig::default();
        let ts = 1_700_000_000_000;
        let bucket = coarse(ts + config.qualify_window_ms, config.time_granularity_ms());
        timely::execute_directly(move |worker| {
            let seen = Rc::new(RefCell::new(Vec::new()));
            let sink = seen.clone();
            let (mut input, probe) = worker.dataflow::<Time, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<Ingested>>();
                let route = RouteKey::new([1, 2]);
                let out = billing(stream, &config, route, Arc::new(Probes::default()));
                let probe = out
                    .inspect(move |event: &BillingEvent| sink.borrow_mut().push(event.clone()))
                    .probe()
                    .0;
                (input, probe)
            });
            input.advance_to(coarse(ts, config.time_granularity_ms()));
            for i in 0..n {
                let id = format!("imp-{i}");
                let ad: Text = "a".into();
                let impression = Impression {
                    impression_id: id.as_str().into(),
                    ad_id: ad.clone(),
                    campaign_id: ad.clone(),
                    advertiser_id: ad,
                    price_micros: 1,
                };
                input.send(ingested(
                    &id,
                    ts,
                    EventKind::Impression(Box::new(impression)),
                ));
                if i % 2 == 0 {
                    let watch = AdProgress {
                        impression_id: id.as_str().into(),
                        watched_ms: 5_000,
                    };
                    input.send(ingested(&id, ts + 1_000, EventKind::AdProgress(watch)));
                }
            }
            input.close();
            let mut steps_with_outcomes = 0;
            while !probe.done() {
                let before = seen.borrow().len();
                worker.step();
                let after = seen.borrow().len();
                steps_with_outcomes += usize::from(after > before);
                if !probe.less_equal(&bucket) {
                    assert_eq!(after, n, "the bucket passed before all its outcomes");
                }
            }
            let seen = seen.borrow();
            let ids: std::collections::BTreeSet<&str> = seen
                .iter()
                .map(|event| match event {
                    BillingEvent::Final(outcome) => outcome.impression_id.as_str(),
                    BillingEvent::Late(late) => panic!("nothing is late: {late:?}"),
                })
                .collect();
            assert_eq!((seen.len(), ids.len()), (n, n));
            let billed = seen
                .iter()
                .filter(|e| matches!(e, BillingEvent::Final(o) if o.is_billed()))
                .count();
            assert_eq!(billed, n.div_ceil(2));
            assert!(steps_with_outcomes >= 3, "{steps_with_outcomes} turns");
        });
    }

    /// One step of feeding the billing sub-graph in a test.
    enum Feed {
        /// Advance the input to the record's coarse watermark, and send it.
        Send(Ingested),
        /// Advance the input to a time and step until the frontier is there.
        StepTo(Time),
    }

    /// Every event the billing sub-graph emits for `feed`, in order.
    fn billing_events(config: PipelineConfig, feed: Vec<Feed>) -> Vec<BillingEvent> {
        use std::cell::RefCell;
        use std::rc::Rc;
        use timely::dataflow::operators::{Input, Inspect, Probe};

        timely::execute_directly(move |worker| {
            let events = Rc::new(RefCell::new(Vec::new()));
            let seen = events.clone();
            let (mut input, probe) = worker.dataflow::<Time, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<Ingested>>();
                let out = billing(stream, &config, RouteKey::new([1, 2]), Arc::default());
                let probe = out
                    .inspect(move |event: &BillingEvent| seen.borrow_mut().push(event.clone()))
                    .probe()
                    .0;
                (input, probe)
            });
            for step in feed {
                match step {
                    Feed::Send(record) => {
                        input.advance_to(coarse(record.watermark, config.time_granularity_ms()));
                        input.send(record);
                    }
                    Feed::StepTo(time) => {
                        input.advance_to(time);
                        worker.step_while(|| probe.less_than(&time));
                    }
                }
            }
            input.close();
            worker.step_while(|| !probe.done());
            events.take()
        })
    }

    /// An impression of `imp-1`, event id `{event}-impression`.
    fn impression_of(event: &str, ts: u64, watermark: u64) -> Ingested {
        use crate::event::Impression;
        let ad: Text = "a".into();
        let impression = EventKind::Impression(Box::new(Impression {
            impression_id: "imp-1".into(),
            ad_id: ad.clone(),
            campaign_id: ad.clone(),
            advertiser_id: ad,
            price_micros: 1,
        }));
        Ingested {
            watermark,
            ..ingested(event, ts, impression)
        }
    }

    /// A qualifying `ad_progress` of `imp-1`, event id `{event}-ad_progress`.
    fn progress_of(event: &str, ts: u64, watermark: u64) -> Ingested {
        let progress = EventKind::AdProgress(crate::event::AdProgress {
            impression_id: "imp-1".into(),
            watched_ms: 5_000,
        });
        Ingested {
            watermark,
            ..ingested(event, ts, progress)
        }
    }

    /// The late records of one impression and two of its `ad_progress`
    /// that come after its deadline, fed with the worker stepped between
    /// them (each arrives after the decision, or after its tombstone has
    /// gone) or all at once (the decision receives them first).
    fn late_progress_ts(step_between: bool) -> Vec<u64> {
        let config = PipelineConfig {
            qualify_window_ms: 60_000,
            state_retention_ms: 10_000,
            ..PipelineConfig::default()
        };
        let t = 1_700_000_000_000;
        // The impression's deadline is t + 60 s: decided at that bucket,
        // its tombstone lives until t + 72 s. The first progress comes
        // before that (late, and it keeps the tombstone until t + 138
        // s), the second after (the id starts afresh: nothing to say).
        let records = [
            impression_of("i", t, t),
            progress_of("p1", t + 66_000, t + 65_000),
            progress_of("p2", t + 141_000, t + 140_000),
        ];
        let granularity = config.time_granularity_ms();
        let mut feed = Vec::new();
        for record in records {
            if step_between {
                feed.push(Feed::StepTo(coarse(record.watermark, granularity)));
            }
            feed.push(Feed::Send(record));
        }
        let mut late: Vec<u64> = billing_events(config, feed)
            .into_iter()
            .filter_map(|event| match event {
                BillingEvent::Late(late) => Some(late.ts),
                BillingEvent::Final(_) => None,
            })
            .collect();
        late.sort_unstable();
        late
    }

    #[test]
    fn a_record_after_the_deadline_is_judged_alike_however_the_decision_met_it() {
        let t = 1_700_000_000_000;
        assert_eq!(late_progress_ts(true), [t + 66_000]);
        assert_eq!(late_progress_ts(false), [t + 66_000]);
    }

    /// An impression decided at its deadline's bucket with a duplicate
    /// whose own deadline falls in the next bucket, then (with no
    /// retention) a record of the id long after its tombstone: the
    /// duplicate is counted once, and the late record starts the id afresh
    /// without reopening the next bucket, whether the decision receives it
    /// first, between the two buckets, or after both.
    #[test]
    fn a_record_that_starts_an_id_afresh_does_not_reopen_a_passed_bucket() {
        let config = PipelineConfig {
            qualify_window_ms: 60_000,
            state_retention_ms: 0,
            ..PipelineConfig::default()
        };
        let t = 1_700_000_000_000;
        let granularity = config.time_granularity_ms();
        // Buckets of 2 s: "i" is due at t + 60 s, "dup" at t + 62 s; both
        // are read at t + 60 s, and "dup" is still arranged at t + 62 s.
        let between = coarse(t + 62_500, granularity);
        for pause in [None, Some(between), Some(t + 120_000)] {
            let mut feed = vec![
                Feed::Send(impression_of("i", t, t)),
                Feed::Send(impression_of("dup", t + 2_500, t + 2_500)),
            ];
            feed.extend(pause.map(Feed::StepTo));
            feed.push(Feed::Send(progress_of("p", t + 120_000, t + 120_000)));
            let events = billing_events(config.clone(), feed);
            let [BillingEvent::Final(outcome)] = &events[..] else {
                panic!("one outcome, nothing late (paused at {pause:?}): {events:?}");
            };
            assert_eq!(outcome.impression.event_id, "i-impression");
            assert_eq!(outcome.duplicates, 1);
        }
    }

    #[test]
    fn the_order_of_the_facts_does_not_matter() {
        let facts = [
            imp("b", 1_000, 1_000),
            imp("a", 1_000, 1_200),
            prog("p", 4_000, 9_000),
            prog("q", 3_000, 12_000),
            imp("c", 900, 1_300),
        ];
        let id: Text = "x".into();
        let forward: Vec<&Fact> = facts.iter().collect();
        let backward: Vec<&Fact> = facts.iter().rev().collect();
        let (o1, mut l1) = decide_impression(&id, &forward, WINDOW);
        let (o2, mut l2) = decide_impression(&id, &backward, WINDOW);
        l1.sort();
        l2.sort();
        assert_eq!(o1, o2);
        assert_eq!(l1, l2);
        // "c" has the least ts: D = 10 900, so "q" is late, "p" qualifies.
        let o1 = o1.unwrap();
        assert_eq!(o1.impression.event_id.as_str(), "c");
        assert_eq!((o1.qualified_ts, o1.duplicates), (Some(4_000), 2));
        assert_eq!(l1.len(), 1);
        assert_eq!(l1[0].event_id, "q");
    }
}
