//! livepipe's inputs. Every source turns raw records into
//! [`Ingested`](livepipe_dataflow::event::Ingested) events through the one
//! parser in `livepipe_dataflow::parse`, stamps each with its partition's
//! watermark, and sends rejected records to a dead-letter callback.
//!
//! * [`file`]: `.jsonl` files read to the end, each file one partition.
//! * [`kafka`]: a Kafka topic, partitions assigned statically to workers.
//! * [`prefix`]: a file's identity up to a position (SHA-256 of its bytes).
//! * [`stamp`]: how both sources stamp events with their partition's
//!   watermark.
//!
//! What makes and sends traffic (the generator, the Kafka publisher, the
//! embedded demo) is not an input: it lives in the `livepipe-tools` crate.

pub mod file;
pub mod kafka;
pub mod prefix;
pub mod stamp;

use livepipe_dataflow::event::RejectedRecord;
use livepipe_dataflow::probe::Probes;
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
    /// Where the sources' operators time their invocations (the `source`
    /// path of `livepipe_operator_invocation_*`).
    pub probes: Arc<Probes>,
}
