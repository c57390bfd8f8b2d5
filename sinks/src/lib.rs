//! livepipe's outputs.
//!
//! * [`billing`]: finalized period files (atomic, with completion markers)
//!   and the SQLite [`ledger`] that makes billing exactly once.
//! * [`side`]: the append-only JSON-lines side outputs (rejected, late,
//!   expired).
//! * [`live`]: the latest per-stream snapshots, handed from the dataflow to
//!   readers (the HTTP server, `live.json`) without ever blocking a worker.
//! * [`http`]: the dashboard, JSON API, SSE, `/metrics` and `/healthz`,
//!   served from a thread of its own; [`metrics`] renders the job's numbers.

pub mod billing;
pub mod fsutil;
pub mod http;
pub mod ledger;
pub mod live;
pub mod metrics;
pub mod side;
