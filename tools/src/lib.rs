//! The tools around livepipe, kept apart from the job's inputs: none of
//! this reads records into the pipeline, it makes and sends them.
//!
//! * [`generator`]: the synthetic traffic of `livepipe gen`, a seeded
//!   simulation that also plants the faults the job must survive.
//! * [`publish`]: writes records into a Kafka topic (`livepipe gen
//!   --brokers`, and the demo's producer).
//! * [`demo`]: the embedded demo: librdkafka's in-process mock cluster fed
//!   with live generated traffic.
//!
//! The dependency runs one way: the tools use `livepipe-sources` (the Kafka
//! client settings) and `livepipe-dataflow` (the parser and its limits);
//! the sources know nothing of the tools.

pub mod demo;
pub mod generator;
pub mod publish;
