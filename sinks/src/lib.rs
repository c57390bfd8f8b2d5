//! livepipe's outputs.
//!
//! * [`billing`]: finalized period files (atomic, with completion markers)
//!   and the SQLite [`ledger`] that makes billing exactly once.
//! * [`binding`]: what a ledger is bound to (rules, input); [`out_lock`]:
//!   one job per output directory; [`gaps`]: input records lost unread.
//! * [`report`]: reconciliation read from the ledger (read-only) and
//!   checked against the completion markers (`livepipe report`).
//! * [`side`]: the append-only JSON-lines side outputs (rejected, late,
//!   expired).
//! * [`live`]: the latest per-stream snapshots, handed from the dataflow to
//!   readers (the HTTP server, `live.json`) without ever blocking a worker.
//! * [`http`]: the dashboard, JSON API, SSE, `/metrics` and `/healthz`,
//!   with each stream's last minutes kept by [`history`] for the page,
//!   served from a thread of its own; [`metrics`] renders the job's numbers
//!   ([`process`]: the process's own CPU, memory and files).

pub mod billing;
pub mod binding;
pub mod fsutil;
pub mod gaps;
pub mod history;
pub mod http;
pub mod ledger;
pub mod live;
pub mod metrics;
pub mod out_lock;
pub mod period_files;
pub mod process;
pub mod report;
pub mod side;
