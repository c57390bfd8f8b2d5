//! Numbers the sub-graphs report while they run, for `/metrics` and
//! `/healthz`. Plain atomics, shared by all workers: updating them costs a
//! relaxed add per batch or tick, never a lock on the per-record path.
//!
//! The two histograms are `prometheus-client`'s own (a short lock per
//! observation): they are observed once per tick and worker, not per
//! record, so the lock costs nothing that matters, and `/metrics` encodes
//! them as they are.

use prometheus_client::metrics::histogram::Histogram;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};

use crate::turns::Turns;

/// Bucket bounds (seconds) of [`Probes::tick_duration`]: a tick of a
/// small board takes well under a millisecond, a tick near the stream
/// bound tens of milliseconds, and one near a second is a problem.
pub const TICK_DURATION_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Bucket bounds (seconds) of [`Probes::event_to_tick_latency`]: the
/// contract's budget is about a second (a tick per second plus the hand-off).
pub const LATENCY_BUCKETS: [f64; 11] =
    [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Debug)]
pub struct Probes {
    /// Impression records admitted to billing and not yet part of a final
    /// outcome (as its canonical record or a duplicate) nor late: the
    /// impressions waiting for their window to close, retries included.
    pub pending_impressions: AtomicI64,
    /// Live ticks computed (each worker counts its own).
    pub ticks: AtomicU64,
    /// The longest tick so far, in microseconds.
    pub tick_micros_max: AtomicU64,
    /// How long each tick took to compute (seconds), every worker's.
    pub tick_duration: Histogram,
    /// Per tick that counted new live events: the tick's wall clock minus
    /// the wall clock at which the newest of those events was stamped by
    /// its source (seconds). What a creator waits, less the page's part.
    pub event_to_tick_latency: Histogram,
    /// Wall-clock ms of the latest tick, for `/healthz`.
    pub last_tick_ms: AtomicU64,
    /// Every input of the job has ended (a finite input read to its end):
    /// the dataflow is completing, not waiting for anything.
    pub inputs_ended: AtomicBool,
    /// How long operator invocations take, per path (see [`crate::turns`]).
    pub turns: Turns,
}

impl Default for Probes {
    fn default() -> Self {
        Probes {
            pending_impressions: AtomicI64::default(),
            ticks: AtomicU64::default(),
            tick_micros_max: AtomicU64::default(),
            tick_duration: Histogram::new(TICK_DURATION_BUCKETS),
            event_to_tick_latency: Histogram::new(LATENCY_BUCKETS),
            last_tick_ms: AtomicU64::default(),
            inputs_ended: AtomicBool::default(),
            turns: Turns::default(),
        }
    }
}
