//! File source: `.jsonl` files read to the end, each file one partition.
//!
//! Files are history, so what is late must not depend on how fast they are
//! read: each file keeps its own watermark (highest valid `ts` so far minus
//! the allowed lateness), every record is stamped with the watermark *before*
//! it, and the record travels at the coarse version of that watermark (see
//! `livepipe_dataflow::time`).
//!
//! Parsing is the expensive part of reading, and the watermark depends on
//! every earlier valid record, so the work is split in three:
//!
//! 1. **Read** (the worker that owns file `i`, worker `i % workers`): cut
//!    the file into chunks of lines, in budgeted slices so the worker keeps
//!    serving the rest of the graph, and deal the chunks out to all workers.
//! 2. **Parse** (every worker): parse a chunk; rejected records go to the
//!    dead-letter callback right there.
//! 3. **Stamp** (the owner again): put parsed chunks back in file order and
//!    stamp each event with its file's watermark, exactly as if one thread
//!    had read the file.
//!
//! The reader's capability follows the watermark the stamper has reached
//! (they share it, being on the same worker), so the stamper may always
//! emit at the coarse watermark. A file stops holding time back once it is
//! read and stamped to its end; when every file is, the frontier empties and
//! everything finalizes.

mod read;

use crate::stamp::{Batch, Output, PartitionClock, StampRules};
use crate::SourceContext;
use livepipe_dataflow::event::{Ingested, Position, RejectedRecord, RAW_KEEP_BYTES};
use livepipe_dataflow::parse::{check_clock, parse_event, Rejection};
use livepipe_dataflow::resume::Checkpoint;
use livepipe_dataflow::time::{coarse, wall_clock_ms, Time};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::{Scope, StreamVec};

use read::{Chunk, Fed, Feed, Reader};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use timely::scheduling::Activator;

/// Records per chunk handed to a parsing worker, by default.
pub const RECORDS_PER_CHUNK: usize = 1024;
/// Chunks of one file read but not yet stamped: bounds memory when the
/// readers are faster than the rest of the graph.
const CHUNKS_IN_FLIGHT: u64 = 16;

/// The file source's settings and reporting.
#[derive(Clone)]
pub struct FileSourceContext {
    pub source: SourceContext,
    /// Records per chunk dealt out for parsing ([`RECORDS_PER_CHUNK`]).
    pub records_per_chunk: usize,
}

/// Checks up front that every input can be opened, so a typo is a usage
/// error before anything starts, not a fault halfway through.
pub fn check_inputs(paths: &[PathBuf]) -> Result<(), String> {
    for path in paths {
        match File::open(path) {
            Ok(file) => match file.metadata() {
                Ok(meta) if meta.is_dir() => {
                    return Err(format!(
                        "--input {}: is a directory, not a file",
                        path.display()
                    ))
                }
                _ => {}
            },
            Err(err) => return Err(format!("--input {}: cannot open: {err}", path.display())),
        }
    }
    Ok(())
}

/// The valid events of one chunk, with their line numbers.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ParsedChunk {
    partition: u32,
    seq: u64,
    events: Vec<(u64, livepipe_dataflow::event::Event)>,
    next_line: u64,
    end_byte: u64,
    prefix_sha256: [u8; 32],
}

/// How far the stamper has got with each file; shared with the reader.
struct Progress {
    files: Vec<Stamped>,
    /// Activates `ReadFiles` (set once it is built).
    wake_reader: Option<Activator>,
}

/// How far the stamper has got with one file.
#[derive(Clone, Copy, Debug, Default)]
struct Stamped {
    /// Chunks stamped so far (the next one to stamp has this `seq`).
    chunks: u64,
    /// The file's clock. Its watermark never goes back: the reader holds
    /// its capability there, and the stamper emits at or after it.
    clock: PartitionClock,
}

/// Builds the source on this worker: readers for the files it owns, a
/// parser for anyone's chunks, a stamper for its own files.
pub fn file_source<'s>(
    scope: Scope<'s, Time>,
    paths: &[PathBuf],
    context: FileSourceContext,
) -> StreamVec<'s, Time, Ingested> {
    let names: Vec<Arc<str>> = paths
        .iter()
        .map(|path| Arc::from(path.display().to_string()))
        .collect();
    let files = (0..paths.len() as u32)
        .map(|partition| {
            let max_ts = context.source.resume.get(&partition).and_then(|c| c.max_ts);
            let mut clock = PartitionClock::resumed(max_ts);
            clock.advance(context.source.allowed_lateness_ms, wall_clock_ms());
            Stamped { chunks: 0, clock }
        })
        .collect();
    let progress = Rc::new(RefCell::new(Progress {
        files,
        wake_reader: None,
    }));
    let chunks = read_chunks(scope, paths, &context, progress.clone());
    let parsed = parse_chunks(chunks, names, &context);
    stamp(parsed, &context, progress)
}

/// One of this worker's files as `ReadFiles` sees it.
struct Feeding {
    partition: u32,
    /// Chunks let into the dataflow.
    sent: u64,
    /// Its reading thread reported its end.
    ended: bool,
}

/// Whether `fed` may enter the dataflow now: a file's chunk waits while
/// [`CHUNKS_IN_FLIGHT`] of it are not stamped yet.
fn has_room(fed: &Fed, files: &[Feeding], stamped: &[Stamped]) -> bool {
    match fed {
        Fed::Chunk(chunk) => files
            .iter()
            .find(|f| f.partition == chunk.partition)
            .is_some_and(|f| f.sent - stamped[f.partition as usize].chunks < CHUNKS_IN_FLIGHT),
        Fed::End { .. } | Fed::Failed { .. } => true,
    }
}

/// Stage 1: the owner's reading thread cuts its files into chunks, and
/// the `ReadFiles` operator lets them into the dataflow, at most
/// [`CHUNKS_IN_FLIGHT`] of a file ahead of its stamper.
fn read_chunks<'s>(
    scope: Scope<'s, Time>,
    paths: &[PathBuf],
    context: &FileSourceContext,
    progress: Rc<RefCell<Progress>>,
) -> StreamVec<'s, Time, Chunk> {
    let index = scope.index();
    let peers = scope.peers();
    let readers: Vec<Reader> = paths
        .iter()
        .enumerate()
        .filter(|(partition, _)| partition % peers == index)
        .map(|(partition, path)| Reader::resumed(path, partition as u32, &context.source))
        .collect();
    let mut files: Vec<Feeding> = readers
        .iter()
        .map(|reader| Feeding {
            partition: reader.partition(),
            sent: 0,
            ended: false,
        })
        .collect();
    let context = context.clone();
    source(scope, "ReadFiles", move |capability, info| {
        // The stamper wakes this operator when it has stamped a chunk: the
        // capability follows it, and a file held back may go on.
        progress.borrow_mut().wake_reader = Some(scope.activator_for(info.address.clone()));
        let wake = scope.worker().sync_activator_for(info.address.to_vec());
        let mut feed = Some(readers)
            .filter(|readers| !readers.is_empty())
            .map(|readers| Feed::spawn(readers, context.records_per_chunk, wake));
        let mut capability = Some(capability);
        move |output| {
            let Some(cap) = capability.as_mut() else {
                return;
            };
            if let Some(Err(err)) = &feed {
                (context.source.on_fatal)(format!("starting the file reader: {err}"));
                // Keep the capability: an emptied frontier would finalize
                // impressions that are not final.
                return;
            }
            let progress = progress.borrow();
            if let Some(Ok(feed)) = feed.as_mut() {
                while let Some(fed) = feed.next_if(|fed| has_room(fed, &files, &progress.files)) {
                    match fed {
                        Fed::Chunk(chunk) => {
                            let file = files.iter_mut().find(|f| f.partition == chunk.partition);
                            file.expect("a file of this worker").sent += 1;
                            output.session(&*cap).give(chunk);
                        }
                        Fed::End { partition } => {
                            let file = files.iter_mut().find(|f| f.partition == partition);
                            file.expect("a file of this worker").ended = true;
                        }
                        Fed::Failed { error, .. } => {
                            (context.source.on_fatal)(error);
                            return;
                        }
                    }
                }
            }
            // Hold time at the least watermark of the files not yet stamped
            // to their end: the stamper emits at or after it.
            let granularity = context.source.time_granularity_ms;
            let least = files
                .iter()
                .filter(|f| !f.ended || progress.files[f.partition as usize].chunks < f.sent)
                .map(|f| {
                    coarse(
                        progress.files[f.partition as usize].clock.watermark(),
                        granularity,
                    )
                })
                .min();
            match least {
                Some(time) => cap.downgrade(&time),
                None => {
                    // Every file of this worker is stamped to its end, and
                    // with it every checkpoint recorded.
                    context.source.checkpoints.close();
                    capability = None;
                    feed = None;
                }
            }
        }
    })
}

/// Stage 2: any worker parses a chunk; rejections go out from here.
fn parse_chunks<'s>(
    chunks: StreamVec<'s, Time, Chunk>,
    names: Vec<Arc<str>>,
    context: &FileSourceContext,
) -> StreamVec<'s, Time, ParsedChunk> {
    let context = context.clone();
    chunks.unary(
        // Deal chunks round-robin over the workers.
        Exchange::new(|chunk: &Chunk| chunk.seq.wrapping_add(chunk.partition as u64)),
        "ParseChunks",
        move |_, _| {
            move |input, output| {
                input.for_each_stamp(|cap, batches| {
                    let mut session = output.session(&cap);
                    for batch in batches {
                        for chunk in batch.drain(..) {
                            session.give(parse_chunk(chunk, &names, &context));
                        }
                    }
                });
            }
        },
    )
}

fn parse_chunk(chunk: Chunk, names: &[Arc<str>], context: &FileSourceContext) -> ParsedChunk {
    // Event time is never in the future, whatever the source: a `ts` more
    // than 10 minutes ahead of the wall clock (read once per chunk) is
    // rejected, so it cannot drag the file's watermark forward.
    let wall_ms = wall_clock_ms();
    let mut events = Vec::with_capacity(chunk.ends.len());
    let mut start = 0usize;
    let mut oversized = chunk.oversized.iter().peekable();
    for (i, &end) in chunk.ends.iter().enumerate() {
        let record = &chunk.bytes[start..end as usize];
        start = end as usize;
        let offset = chunk.first_line + i as u64;
        let parsed = if oversized.next_if_eq(&&(i as u32)).is_some() {
            Err(Rejection::TooLarge)
        } else {
            parse_event(record).and_then(|event| check_clock(event.ts, wall_ms).map(|_| event))
        };
        match parsed {
            Ok(event) => events.push((offset, event)),
            Err(rejection) => (context.source.on_reject)(RejectedRecord {
                source: names[chunk.partition as usize].clone(),
                position: Position {
                    partition: chunk.partition,
                    offset,
                },
                reason: rejection.code(),
                raw: record[..record.len().min(RAW_KEEP_BYTES)].to_vec(),
            }),
        }
    }
    context
        .source
        .records_read
        .fetch_add(chunk.ends.len() as u64, Ordering::Relaxed);
    ParsedChunk {
        partition: chunk.partition,
        seq: chunk.seq,
        events,
        next_line: chunk.next_line,
        end_byte: chunk.end_byte,
        prefix_sha256: chunk.prefix_sha256,
    }
}

/// Stage 3: the owner puts chunks back in file order and stamps each event
/// with the watermark of its file just before it.
fn stamp<'s>(
    parsed: StreamVec<'s, Time, ParsedChunk>,
    context: &FileSourceContext,
    progress: Rc<RefCell<Progress>>,
) -> StreamVec<'s, Time, Ingested> {
    let rules = StampRules {
        allowed_lateness_ms: context.source.allowed_lateness_ms,
        time_granularity_ms: context.source.time_granularity_ms,
    };
    let checkpoints = context.source.checkpoints.clone();
    parsed.unary(
        Exchange::new(|chunk: &ParsedChunk| chunk.partition as u64),
        "StampInFileOrder",
        move |_, _| {
            // Chunks that arrived ahead of their turn, with the capability
            // they came with (the reader's time when it sent them).
            let mut waiting: BTreeMap<(u32, u64), (Capability<Time>, ParsedChunk)> =
                BTreeMap::new();
            move |input, output| {
                input.for_each_stamp(|cap, batches| {
                    for batch in batches {
                        for chunk in batch.drain(..) {
                            let held = cap.retain_least(0).expect("totally ordered time");
                            waiting.insert((chunk.partition, chunk.seq), (held, chunk));
                        }
                    }
                });
                let mut progress = progress.borrow_mut();
                let progress = &mut *progress;
                let stamped = &mut progress.files;
                let mut any = false;
                loop {
                    let next = waiting
                        .keys()
                        .find(|(partition, seq)| stamped[*partition as usize].chunks == *seq);
                    let Some(&key) = next else { break };
                    let (cap, chunk) = waiting.remove(&key).expect("found above");
                    let state = &mut stamped[chunk.partition as usize];
                    let checkpoint = stamp_chunk(&mut state.clock, rules, chunk, &cap, output);
                    state.chunks += 1;
                    checkpoints.record(key.0, checkpoint);
                    any = true;
                }
                if any {
                    if let Some(reader) = &progress.wake_reader {
                        reader.activate();
                    }
                }
            }
        },
    )
}

/// Stamps and sends one chunk's events in order; returns the position
/// after it.
fn stamp_chunk(
    clock: &mut PartitionClock,
    rules: StampRules,
    chunk: ParsedChunk,
    cap: &Capability<Time>,
    output: &mut Output<'_>,
) -> Checkpoint {
    let wall_ms = wall_clock_ms();
    let mut batch = Batch::new(cap);
    for (offset, event) in chunk.events {
        let position = Position {
            partition: chunk.partition,
            offset,
        };
        let (time, ingested) = clock.stamp(rules, event, position, wall_ms, 0);
        batch.push(output, time, ingested);
    }
    batch.flush(output);
    Checkpoint {
        offset: chunk.next_line,
        byte: chunk.end_byte,
        max_ts: clock.max_ts(),
        prefix_sha256: Some(chunk.prefix_sha256),
    }
}
