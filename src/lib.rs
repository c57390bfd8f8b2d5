//! The `livepipe` binary's library half: the command line and the wiring of
//! sources, dataflow and sinks into a job. Kept as a library so tests and
//! benches drive the same code the binary runs.

pub mod cli;
pub mod cluster;
pub mod logs;
pub mod pipeline;
pub mod report;
pub mod settings;
pub mod stop;
