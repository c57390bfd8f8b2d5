//! What livepipe's tests and benches share, so that each is written once:
//!
//! - [`job`]: the `livepipe` binary run to its end or started as a [`Job`],
//!   with a deadline on every wait; its HTTP address comes from
//!   `--addr-file`, never from its log.
//! - [`http`]: one HTTP GET and the Prometheus metric parser.
//! - [`exposition`]: a strict parser of the OpenMetrics text `/metrics` serves.
//! - [`kafka`]: librdkafka's mock cluster, loading topics, generated
//!   traffic, the separate broker.
//! - [`reference`] and [`outputs`]: the independent billing reference and
//!   the checks of a job's output against it.
//! - [`browser`]: a headless chromium over DevTools.
//! - [`floor`]: the parse floor that throughput is a ratio of.
//! - [`now_ms`]: the wall clock, the job's own.
//!
//! The traffic they drive comes from `livepipe-tools` (generator,
//! publisher, demo).

pub mod browser;
pub mod exposition;
pub mod floor;
pub mod http;
pub mod job;
pub mod kafka;
pub mod outputs;
pub mod reference;

pub use http::{get, http_get, metric, parse_metric};
pub use job::{
    demo_args, dir_bytes, gen_file, input_args, livepipe, refused, run_input, run_ok, topic_args,
    topic_job, wait_for, write_jsonl, Job, Livepipe,
};
/// Wall-clock ms since the Unix epoch: the clock the job itself reads.
pub use livepipe_dataflow::time::wall_clock_ms as now_ms;
