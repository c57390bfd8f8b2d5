//! livepipe's inputs. Every source turns raw records into
//! [`Ingested`](livepipe_dataflow::event::Ingested) events through the one
//! parser in `livepipe_dataflow::parse`, stamps each with its partition's
//! watermark, and sends rejected records to a dead-letter callback.

pub mod file;
pub mod generator;
