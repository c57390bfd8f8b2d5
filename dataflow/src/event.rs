//! Validated events: the types that flow through the dataflow.
//!
//! These are deliberately separate from the JSON wire format (see
//! [`crate::parse`]): bincode, which timely uses to move data between
//! processes, cannot deserialize internally tagged enums, and keeping the
//! dataflow types plain lets them be `Ord + Hash` for differential.

use serde::{Deserialize, Serialize};

/// Text fields of events. Ids are short (`v-1206`, `imp-7`): up to 23
/// bytes live inline, so parsing a record allocates nothing and cloning it
/// (into arrangements, across workers) copies no heap text; longer text is
/// shared, not copied. Orders, hashes and compares as `str`.
pub use smol_str::SmolStr as Text;

/// Where a record came from: its source partition and the offset within it.
///
/// For a file, `partition` is the file's index on the command line and
/// `offset` the 1-based line number; for Kafka, the topic partition and the
/// message offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// One validated livestream event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Event {
    /// Event time, ms since the Unix epoch (0 < ts < 2^53).
    pub ts: u64,
    pub event_id: Text,
    pub stream_id: Text,
    pub viewer_id: Text,
    pub kind: EventKind,
}

/// What happened, with the fields only some types carry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventKind {
    Join,
    Leave,
    Heartbeat,
    Chat,
    /// Boxed: an impression's ad details would double the size of every
    /// event, and events are moved many times on their way (a few percent of
    /// them are impressions).
    Impression(Box<Impression>),
    AdProgress(AdProgress),
}

/// An ad shown once to one viewer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Impression {
    pub impression_id: Text,
    pub ad_id: Text,
    pub campaign_id: Text,
    pub advertiser_id: Text,
    /// 0..=10^12 millionths of the currency unit.
    pub price_micros: u64,
}

/// How much of an ad has been watched so far (cumulative).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AdProgress {
    pub impression_id: Text,
    /// 0..=86,400,000 ms.
    pub watched_ms: u64,
}

impl EventKind {
    /// The wire name of the type (`join`, `ad_progress`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Join => "join",
            EventKind::Leave => "leave",
            EventKind::Heartbeat => "heartbeat",
            EventKind::Chat => "chat",
            EventKind::Impression(_) => "impression",
            EventKind::AdProgress(_) => "ad_progress",
        }
    }
}

/// An event as it leaves a source: where it came from, and the watermark of
/// its partition just before it (max `ts` of the partition's earlier valid
/// records minus the allowed lateness; 0 before the first one).
///
/// The watermark travels with the record because billing's on-time/late
/// decision is made on it, exactly, while timely itself only sees a coarse
/// version of it as the record's timestamp (see [`crate::time`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ingested {
    pub event: Event,
    pub position: Position,
    pub watermark: u64,
    /// Wall-clock ms when its source stamped it (read it from the broker or
    /// the file): where the live path's event-to-tick latency starts.
    pub ingested_at_ms: u64,
}

/// A record the parser refused, on its way to the dead-letter output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedRecord {
    /// The file path or Kafka topic it came from.
    pub source: std::sync::Arc<str>,
    pub position: Position,
    /// Stable reason code (`not_json`, `missing_field:ts`, ...).
    pub reason: String,
    /// The record as read (at most the first [`RAW_KEEP_BYTES`] of it).
    pub raw: Vec<u8>,
}

/// How much of a rejected record is kept for the dead-letter output.
pub const RAW_KEEP_BYTES: usize = 4096;
