//! What the benches share.

use serde::Deserialize;

/// The parse floor's target: what a bare program would parse each record
/// into (borrowed strings, no validation, no dedup of keys).
#[derive(Deserialize)]
#[allow(dead_code)]
pub struct Bare<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    event_id: &'a str,
    ts: u64,
    stream_id: &'a str,
    viewer_id: &'a str,
    impression_id: Option<&'a str>,
    watched_ms: Option<u64>,
}
