//! The livepipe dataflow: one ingest, two paths that share nothing else.
//!
//! * [`route`]: where ingest splits into the two paths.
//! * [`live`]: a timely sub-graph that emits per-stream presence and chat
//!   counts on a one-second wall-clock tick, whatever the frontier says.
//! * [`billing`]: a differential sub-graph that deduplicates impressions,
//!   joins qualifying watches and releases only final outcomes.
//! * [`turns`]: bounded operator invocations, and their timing per path.
//! * [`policy`]: what the billing sink does with them: which periods are
//!   final, which files cover them, where sources may resume.
//!
//! This crate does no I/O: sources and sinks live in their own crates and
//! meet the graph through the types in [`event`] and the streams returned
//! here, and report progress through the atomics of [`probe`].

pub mod billing;
pub mod config;
pub mod event;
pub mod lines;
pub mod live;
pub mod parse;
pub mod policy;
pub mod probe;
pub mod resume;
pub mod route;
pub mod time;
pub mod turns;
