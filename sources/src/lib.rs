//! livepipe's inputs. Every source turns raw records into
//! [`Ingested`](livepipe_dataflow::event::Ingested) events through the one
//! parser in `livepipe_dataflow::parse`, stamps each with its partition's
//! watermark, and sends rejected records to a dead-letter callback.
//!
//! * [`file`]: `.jsonl` files read to the end, each file one partition.
//! * [`kafka`]: a Kafka topic, partitions assigned statically to workers.
//! * [`publish`]: writes generated traffic into a Kafka topic (`livepipe
//!   gen --brokers`, and the demo's producer).
//! * [`prefix`]: a file's identity up to a position (SHA-256 of its bytes).
//! * [`demo`]: the embedded demo: librdkafka's in-process mock cluster fed
//!   with live traffic.
//! * [`generator`]: the synthetic traffic itself.

pub mod demo;
pub mod file;
pub mod generator;
pub mod kafka;
pub mod prefix;
pub mod publish;

use livepipe_dataflow::event::RejectedRecord;
use livepipe_dataflow::resume::{Checkpoint, CheckpointOutbox, Checkpoints};

use std::collections::BTreeMap;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// What every source reports to the rest of the job.
#[derive(Clone)]
pub struct SourceContext {
    pub allowed_lateness_ms: u64,
    pub time_granularity_ms: u64,
    /// Records read (valid or not), for progress reporting.
    pub records_read: Arc<AtomicU64>,
    /// Where rejected records go. Called from the worker that parsed them.
    pub on_reject: Arc<dyn Fn(RejectedRecord) + Send + Sync>,
    /// Called once with the cause if an input cannot be read any further.
    pub on_fatal: Arc<dyn Fn(String) + Send + Sync>,
    /// Where sources record re-readable positions as they go: this
    /// worker's outbox, shipped to the billing sink.
    pub checkpoints: Arc<CheckpointOutbox>,
    /// The positions the billing sink committed (known in its process
    /// only), for sources that also report them elsewhere.
    pub committed: Arc<Checkpoints>,
    /// Where each partition starts: the positions an earlier run committed
    /// (partitions not in it start from the beginning, or as configured).
    pub resume: Arc<BTreeMap<u32, Checkpoint>>,
}

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

pub use livepipe_dataflow::time::wall_clock_ms;
