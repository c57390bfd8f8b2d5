//! Numbers the sub-graphs report while they run, for `/metrics` and
//! `/healthz`. Plain atomics, shared by all workers: the dataflow knows
//! nothing of how they are exported, and updating them costs a relaxed
//! add per batch or tick, never a lock.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};

#[derive(Debug, Default)]
pub struct Probes {
    /// Impression records admitted to billing and not yet part of a final
    /// outcome (as its canonical record or a duplicate) nor late: the
    /// impressions waiting for their window to close, retries included.
    pub pending_impressions: AtomicI64,
    /// Live ticks computed (each worker counts its own).
    pub ticks: AtomicU64,
    /// Time spent computing ticks, in microseconds.
    pub tick_micros: AtomicU64,
    /// The longest tick so far, in microseconds.
    pub tick_micros_max: AtomicU64,
    /// Wall-clock ms of the latest tick, for `/healthz`.
    pub last_tick_ms: AtomicU64,
    /// Every input of the job has ended (a finite input read to its end):
    /// the dataflow is completing, not waiting for anything.
    pub inputs_ended: AtomicBool,
}
