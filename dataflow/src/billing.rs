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
//! order, worker count or partitioning. Differential computes it with one
//! `reduce` keyed by impression id (which is also the dedup arrangement),
//! and [`finalize`] releases an outcome only once the frontier has passed
//! its deadline: records still able to change it travel at times at or
//! before `coarse(D)` (see [`crate::time`]).
//!
//! State stays bounded: each record leaves the arrangement again
//! `state_retention_ms` after the latest deadline it can influence. Outcome
//! changes caused by those retractions happen after the deadline and are
//! dropped by [`finalize`]; a duplicate that arrives after everything about
//! its id has been retracted can produce a second outcome, which the billing
//! sink's ledger (every finalized id, forever) rejects.

use differential_dataflow::AsCollection;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, Concat};
use timely::dataflow::StreamVec;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::PipelineConfig;
use crate::event::{EventKind, Ingested, Position};
use crate::probe::Probes;
use crate::route::RouteKey;
use crate::time::{after, coarse, Time};

/// Shared, immutable text. Facts are cloned at every merge of an
/// arrangement and every reduce output; cloning an `Arc` is a count, not an
/// allocation and a copy.
pub type Text = Arc<str>;

/// The arrangement key: an impression id, led by a hash of it. Keys are
/// compared at every step of every merge and seek; comparing the hash first
/// settles almost all of them without touching the text, and the text
/// itself keeps distinct ids distinct when hashes collide.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ImpressionKey {
    hash: u64,
    pub id: Text,
}

impl ImpressionKey {
    /// `route` is the job's key, the same in every process: the hash
    /// decides the worker that holds the id.
    pub fn new(id: String, route: &RouteKey) -> Self {
        ImpressionKey {
            hash: route.hash(&id),
            id: id.into(),
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
    pub ad_id: String,
    pub campaign_id: String,
    pub advertiser_id: String,
    pub stream_id: String,
    pub viewer_id: String,
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
    pub event_id: String,
    pub impression_id: String,
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
            event_id: event_id.to_string(),
            impression_id: impression_id.to_string(),
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
            event_id: outcome.impression.event_id.to_string(),
            impression_id: outcome.impression_id.to_string(),
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

/// What the reduce says about an impression id at some time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
enum Verdict {
    Outcome(Outcome),
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
    let (facts, window_closed) = admit(ingested, config, route, probes.clone());
    let verdicts = decide(facts, config);
    finalize(verdicts, config, probes).concat(window_closed.map(BillingEvent::Late))
}

/// Turns ingested records into billing facts, early: below-threshold
/// progress and other event types are dropped here, so differential sees
/// about two records per impression; impressions already past their own
/// window are late on arrival.
fn admit<'s>(
    ingested: StreamVec<'s, Time, Ingested>,
    config: &PipelineConfig,
    route: RouteKey,
    probes: Arc<Probes>,
) -> (
    StreamVec<'s, Time, (ImpressionKey, Fact)>,
    StreamVec<'s, Time, LateRecord>,
) {
    let qualify_ms = config.qualify_ms;
    let window = config.qualify_window_ms;
    type Admitted<'s> = StreamVec<'s, Time, Option<(ImpressionKey, Fact)>>;
    let (facts, late): (Admitted<'s>, StreamVec<'s, Time, LateRecord>) =
        ingested.ok_err(move |record: Ingested| {
            let Ingested {
                event,
                position,
                watermark,
            } = record;
            match event.kind {
                EventKind::Impression(imp) => {
                    let fact = Fact::Impression(ImpressionFact {
                        ts: event.ts,
                        event_id: event.event_id.into(),
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
                        Err(LateRecord::of(
                            &fact,
                            &imp.impression_id,
                            LateReason::WindowClosed,
                        ))
                    } else {
                        // Pending until it is part of a final outcome (or
                        // late because its id already was): see finalize.
                        probes.pending_impressions.fetch_add(1, Ordering::Relaxed);
                        Ok(Some((ImpressionKey::new(imp.impression_id, &route), fact)))
                    }
                }
                EventKind::AdProgress(progress) if progress.watched_ms >= qualify_ms => {
                    let fact = Fact::Progress(ProgressFact {
                        ts: event.ts,
                        event_id: event.event_id.into(),
                        watermark,
                        position,
                    });
                    Ok(Some((
                        ImpressionKey::new(progress.impression_id, &route),
                        fact,
                    )))
                }
                _ => Ok(None),
            }
        });
    (facts.flat_map(|fact| fact), late)
}

/// The differential part: every fact enters at its arrival time and leaves
/// again once it can no longer matter; one reduce per impression id decides.
fn decide<'s>(
    facts: StreamVec<'s, Time, (ImpressionKey, Fact)>,
    config: &PipelineConfig,
) -> StreamVec<'s, Time, ((ImpressionKey, Verdict), Time, isize)> {
    let window = config.qualify_window_ms;
    let granularity = config.time_granularity_ms;
    let retention = config.state_retention_ms;
    // Retirements are rounded up to a grid of a tenth of the retention: the
    // records of one impression (its retries, its progress) then mostly leave
    // at one time, and the reduce revisits the id once, not once per record.
    // State lives at most a tenth longer.
    let retire_grid = (retention / 10)
        .next_multiple_of(granularity)
        .max(granularity);
    let updates = facts.unary_frontier(Pipeline, "EnterAndRetire", move |_, _| {
        // Retractions wait here, by retire time, until the frontier reaches
        // them. Handing them to differential up front would park them in the
        // arrangement's batcher, which re-sorts every pending future update
        // each time the frontier moves: quadratic in the retention.
        let mut retiring: BTreeMap<Time, Vec<(ImpressionKey, Fact)>> = BTreeMap::new();
        let mut retire_cap: Option<Capability<Time>> = None;
        move |(input, frontier), output| {
            input.for_each_stamp(|cap, batches| {
                let Some(&time) = cap.least() else { return };
                let mut session = output.session(&cap);
                for batch in batches {
                    for (id, fact) in batch.drain(..) {
                        // The latest deadline this fact can influence is its own
                        // `ts + window` (for an impression: its own deadline; for
                        // progress: the deadline of an impression at `ts - window`
                        // or later). It must still be present when the frontier
                        // passes that deadline, and may leave `retention` later.
                        let last_useful = fact.watermark().max(fact.ts() + window);
                        let retire = after(last_useful, granularity)
                            .saturating_add(retention)
                            .checked_next_multiple_of(retire_grid)
                            .unwrap_or(u64::MAX);
                        debug_assert!(retire > time);
                        if retire_cap.as_ref().is_none_or(|c| retire < *c.time()) {
                            retire_cap = Some(cap.delayed(&retire, 0));
                        }
                        session.give(((id.clone(), fact.clone()), time, 1isize));
                        retiring.entry(retire).or_default().push((id, fact));
                    }
                }
            });
            // Release every retirement the frontier has reached.
            while let Some(entry) = retiring.first_entry() {
                let retire = *entry.key();
                if frontier.less_than(&retire) {
                    break;
                }
                let cap = retire_cap
                    .as_ref()
                    .expect("a capability for pending retirements")
                    .delayed(&retire);
                let mut session = output.session(&cap);
                for (id, fact) in entry.remove() {
                    session.give(((id, fact), retire, -1isize));
                }
            }
            match (retiring.keys().next(), retire_cap.as_mut()) {
                (Some(next), Some(cap)) => cap.downgrade(next),
                _ => retire_cap = None,
            }
        }
    });
    updates
        .as_collection()
        .reduce_named(
            "DecideImpression",
            move |key: &ImpressionKey, input, output| {
                decide_impression(&key.id, input, output, window)
            },
        )
        .inner
}

/// The pure rule of the module docs, for one impression id. `input` is
/// sorted, so impressions come first and the canonical one leads.
fn decide_impression(
    id: &Text,
    input: &[(&Fact, isize)],
    output: &mut Vec<(Verdict, isize)>,
    window: u64,
) {
    let Some((Fact::Impression(canonical), _)) = input.first() else {
        // Only progress so far: the impression may still come.
        return;
    };
    let deadline = canonical.ts + window;
    let mut qualified_ts: Option<u64> = None;
    let mut duplicates = 0u32;
    for (fact, count) in &input[1..] {
        if *count <= 0 {
            continue;
        }
        if fact.watermark() > deadline {
            output.push((
                Verdict::Late(LateRecord::of(fact, id, LateReason::ImpressionFinal)),
                1,
            ));
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
    output.push((
        Verdict::Outcome(Outcome {
            impression_id: id.clone(),
            impression: canonical.clone(),
            qualified_ts,
            duplicates,
        }),
        1,
    ));
}

/// Releases each outcome once the frontier has passed its deadline, and late
/// records once they are known. Outcome changes at times after the deadline
/// (state retiring, or nothing at all in a correct run) are not changes of
/// a final answer and are dropped.
fn finalize<'s>(
    verdicts: StreamVec<'s, Time, ((ImpressionKey, Verdict), Time, isize)>,
    config: &PipelineConfig,
    probes: Arc<Probes>,
) -> StreamVec<'s, Time, BillingEvent> {
    let window = config.qualify_window_ms;
    let granularity = config.time_granularity_ms;
    verdicts.unary_frontier(Pipeline, "Finalize", move |_, _| {
        // Outcome updates per deadline bucket, with a capability to emit them.
        type Bucket = (Capability<Time>, Vec<(Outcome, isize)>);
        let mut pending: BTreeMap<Time, Bucket> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each_stamp(|cap, batches| {
                for batch in batches {
                    for ((_id, verdict), time, diff) in batch.drain(..) {
                        match verdict {
                            Verdict::Outcome(outcome) => {
                                let bucket = coarse(outcome.impression.ts + window, granularity);
                                if time > bucket {
                                    continue;
                                }
                                pending
                                    .entry(bucket)
                                    .or_insert_with(|| (cap.delayed(&bucket, 0), Vec::new()))
                                    .1
                                    .push((outcome, diff));
                            }
                            Verdict::Late(late) if diff > 0 => {
                                if late.kind == LateKind::Impression {
                                    probes.pending_impressions.fetch_sub(1, Ordering::Relaxed);
                                }
                                output
                                    .session(&cap.delayed(&time, 0))
                                    .give(BillingEvent::Late(late));
                            }
                            Verdict::Late(_) => {}
                        }
                    }
                }
            });
            while let Some(entry) = pending.first_entry() {
                if frontier.less_equal(entry.key()) {
                    break;
                }
                let (cap, mut updates) = entry.remove();
                differential_dataflow::consolidation::consolidate(&mut updates);
                let mut session = output.session(&cap);
                for (outcome, diff) in updates {
                    // A consistent reduce leaves exactly one outcome per id.
                    debug_assert_eq!(diff, 1, "outcome for {}", outcome.impression_id);
                    if diff > 0 {
                        // Every admitted impression record is the canonical
                        // one or a duplicate of exactly one final outcome.
                        let records = 1 + i64::from(outcome.duplicates);
                        probes
                            .pending_impressions
                            .fetch_sub(records, Ordering::Relaxed);
                        session.give(BillingEvent::Final(outcome));
                    }
                }
            }
        }
    })
}
