//! File source: `.jsonl` files read to the end, each file one partition.
//!
//! Files are history, so what is late must not depend on how fast they are
//! read: each file keeps its own watermark (highest valid `ts` so far minus
//! the allowed lateness), every record is stamped with the watermark *before*
//! it, and the record travels at the coarse version of that watermark (see
//! `livepipe_dataflow::time`).
//!
//! Parsing is the expensive part of reading, and the watermark depends on
//! every earlier valid record. The owner of file `i` (worker `i % workers`)
//! is the one place that sees the file in order, so it does as little as
//! that needs, and every record crosses between workers at most once:
//!
//! 1. **Read** (the owner's reading thread, [`read`]): cut the file into
//!    chunks of lines and digest it; `ReadFiles` deals the chunks out to all
//!    workers.
//! 2. **Parse** (every worker): parse a chunk; rejected records go to the
//!    dead-letter callback right there. The events stay; only their `ts`s
//!    go to the owner.
//! 3. **Clock** (the owner): run the file's clock over each chunk's `ts`s in
//!    file order, record the checkpoint after it, and send the parser the
//!    clock as it stood before the chunk.
//! 4. **Stamp** (the parser again): stamp each event from that clock, with
//!    the very arithmetic the owner ran, so every record gets exactly the
//!    watermark it would have had if one thread had read the file.
//!
//! In a job of one process the reading threads parse too (step 2 moves
//! into step 1), as long as each serves at most
//! [`WORKERS_PER_PARSING_READER`] workers: one thread parses about 3 M
//! lines/s, several times what a worker does with them, and the workers
//! then spend nothing on raw chunks (with 2 workers and one file, ~8% less
//! time; with one worker, the reading thread would otherwise leave most of
//! a second core idle). Across a cluster, or with more workers per file,
//! parsing is dealt out to every worker, so every process parses part of
//! every file. The rest is the same.
//!
//! The reader's capability follows the file clocks (they share them, being
//! on the same worker), so a stamper may always emit at the coarse
//! watermark. A file stops holding time back once it is read and clocked to
//! its end; when every file is, the frontier empties and everything
//! finalizes.

mod read;

use crate::stamp::{Batch, Output, PartitionClock, StampRules};
use crate::SourceContext;
use livepipe_dataflow::event::{Ingested, Position, RejectedRecord, RAW_KEEP_BYTES};
use livepipe_dataflow::parse::{check_clock, parse_event, parse_event_str, Rejection};
use livepipe_dataflow::resume::Checkpoint;
use livepipe_dataflow::time::{coarse, wall_clock_ms, Time};
use livepipe_dataflow::turns::Path;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::{Scope, StreamVec};

use read::{Chunk, Fed, Feed, Reader};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use timely::scheduling::Activator;

/// Records per chunk handed to a parsing worker, by default.
///
/// Every chunk costs a round of messages whatever its size (dealt out,
/// its times to the owner, its clock back, its stamped records on), and
/// with several workers each of them can wake another thread. On a sparse
/// file (70 records/s of event time) 2,048 took 5-11% less CPU with 2
/// workers than 1,024, and no more elsewhere; 4,096 was no faster and held
/// 30 MiB more in flight; 256 was a third slower.
pub const RECORDS_PER_CHUNK: usize = 2048;
/// In a job of one process, reading threads parse their chunks while each
/// serves at most this many workers (see the module docs).
pub const WORKERS_PER_PARSING_READER: usize = 4;
/// Chunks of one file read but not yet stamped: bounds memory when the
/// readers are faster than the rest of the graph.
const CHUNKS_IN_FLIGHT: u64 = 16;

/// The file source's settings and reporting.
#[derive(Clone)]
pub struct FileSourceContext {
    pub source: SourceContext,
    /// Records per chunk dealt out for parsing ([`RECORDS_PER_CHUNK`]).
    pub records_per_chunk: usize,
    /// Workers in this process: all the job's workers unless it is a
    /// cluster.
    pub workers_per_process: usize,
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
    prefix_blake3: [u8; 32],
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
    let chunks = read_chunks(scope, paths, &names, &context, progress.clone());
    let (times, events) = parse_chunks(chunks, ChunkParser::new(&names, &context.source));
    let clocks = clock_in_file_order(times, &context, progress);
    stamp_where_parsed(events, clocks, &context)
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
    names: &[Arc<str>],
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
        let one_process = peers == context.workers_per_process;
        let parse_while_reading = one_process && peers <= WORKERS_PER_PARSING_READER * names.len();
        let parser = parse_while_reading.then(|| ChunkParser::new(names, &context.source));
        let mut feed = Some(readers)
            .filter(|readers| !readers.is_empty())
            .map(|readers| Feed::spawn(readers, context.records_per_chunk, parser, wake));
        let mut capability = Some(capability);
        let probes = context.source.probes.clone();
        move |output| {
            let _turn = probes.turns.time(Path::Source);
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
                    if let Err(error) =
                        let_in(fed, &mut files, |chunk| output.session(&*cap).give(chunk))
                    {
                        (context.source.on_fatal)(error);
                        return;
                    }
                }
            }
            let granularity = context.source.time_granularity_ms;
            match least_watermark(&files, &progress.files, granularity) {
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

/// Lets one message of the reading thread into the dataflow (`send`) or
/// notes a file's end; a failed read is returned.
fn let_in(fed: Fed, files: &mut [Feeding], send: impl FnOnce(Chunk)) -> Result<(), String> {
    fn file(files: &mut [Feeding], partition: u32) -> &mut Feeding {
        files
            .iter_mut()
            .find(|f| f.partition == partition)
            .expect("a file of this worker")
    }
    match fed {
        Fed::Chunk(chunk) => {
            file(files, chunk.partition).sent += 1;
            send(chunk);
        }
        Fed::End { partition } => file(files, partition).ended = true,
        Fed::Failed { error } => return Err(error),
    }
    Ok(())
}

/// Where `ReadFiles` holds time: the least coarse watermark of the files
/// not yet clocked to their end (the stampers emit at or after it); `None`
/// once every file is.
fn least_watermark(files: &[Feeding], stamped: &[Stamped], granularity: u64) -> Option<Time> {
    files
        .iter()
        .filter(|f| !f.ended || stamped[f.partition as usize].chunks < f.sent)
        .map(|f| coarse(stamped[f.partition as usize].clock.watermark(), granularity))
        .min()
}

/// What parsing a chunk yields: the `ts`s of its valid records, for its
/// file's clock on the owner, and its events, which stay on the worker
/// that parsed them until the owner says where the clock stood.
#[derive(Clone, Debug)]
enum Parsed {
    Times(ChunkTimes),
    Events(ParsedChunk),
}

/// The `ts` of every valid record of a chunk, in file order, and where
/// the file resumes after it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChunkTimes {
    partition: u32,
    seq: u64,
    /// The worker that parsed the chunk and holds its events.
    parser: usize,
    ts: Vec<u64>,
    next_line: u64,
    end_byte: u64,
    prefix_blake3: [u8; 32],
}

/// The file's clock just before a chunk, sent back to the worker holding
/// its events: stamping them from here gives every record exactly the
/// watermark it would have had if one thread had read the whole file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChunkClock {
    partition: u32,
    seq: u64,
    parser: usize,
    clock: PartitionClock,
    /// The wall clock the owner bounded the watermarks by.
    wall_ms: u64,
}

/// Stage 2: any worker parses a chunk (unless its reading thread did);
/// rejections go out from here.
fn parse_chunks<'s>(
    chunks: StreamVec<'s, Time, Chunk>,
    parser: ChunkParser,
) -> (
    StreamVec<'s, Time, ChunkTimes>,
    StreamVec<'s, Time, ParsedChunk>,
) {
    let worker = chunks.scope().index();
    let probes = parser.probes.clone();
    let parsed: StreamVec<'s, Time, Parsed> = chunks.unary(
        // Deal chunks round-robin over the workers.
        Exchange::new(|chunk: &Chunk| chunk.seq.wrapping_add(chunk.partition as u64)),
        "ParseChunks",
        move |_, _| {
            move |input, output| {
                let _turn = probes.turns.time(Path::Source);
                input.for_each_stamp(|cap, batches| {
                    let mut session = output.session(&cap);
                    for batch in batches {
                        for mut chunk in batch.drain(..) {
                            let events = match chunk.parsed.take() {
                                Some(parsed) => *parsed,
                                None => parser.parse(chunk),
                            };
                            session.give(Parsed::Times(events.times(worker)));
                            session.give(Parsed::Events(events));
                        }
                    }
                });
            }
        },
    );
    parsed.ok_err(|parsed| match parsed {
        Parsed::Times(times) => Ok(times),
        Parsed::Events(events) => Err(events),
    })
}

/// Parses chunks into events, and sends their rejected records to the
/// dead-letter output: on a worker, or on a reading thread.
struct ChunkParser {
    /// Each file's name, by partition, for the dead-letter records.
    names: Vec<Arc<str>>,
    on_reject: Arc<dyn Fn(RejectedRecord) + Send + Sync>,
    records_read: Arc<std::sync::atomic::AtomicU64>,
    probes: Arc<livepipe_dataflow::probe::Probes>,
}

impl ChunkParser {
    fn new(names: &[Arc<str>], source: &SourceContext) -> Self {
        ChunkParser {
            names: names.to_vec(),
            on_reject: source.on_reject.clone(),
            records_read: source.records_read.clone(),
            probes: source.probes.clone(),
        }
    }

    fn parse(&self, chunk: Chunk) -> ParsedChunk {
        // Event time is never in the future, whatever the source: a `ts`
        // more than 10 minutes ahead of the wall clock (read once per chunk)
        // is rejected, so it cannot drag the file's watermark forward.
        let wall_ms = wall_clock_ms();
        let mut events = Vec::with_capacity(chunk.ends.len());
        // One UTF-8 check of the whole chunk instead of one per record: long
        // runs validate several times faster, and per record it was a third
        // of the parser's time. A record is a piece of the valid chunk only
        // if it starts and ends on character boundaries (`str::get` checks
        // that); if not, or if the chunk is not UTF-8, it is checked alone.
        let whole = std::str::from_utf8(&chunk.bytes).ok();
        let mut start = 0usize;
        let mut oversized = chunk.oversized.iter().peekable();
        for (i, &end) in chunk.ends.iter().enumerate() {
            let range = start..end as usize;
            let record = &chunk.bytes[range.clone()];
            start = end as usize;
            let offset = chunk.first_line + i as u64;
            let parsed = if oversized.next_if_eq(&&(i as u32)).is_some() {
                Err(Rejection::TooLarge)
            } else {
                match whole.and_then(|text| text.get(range)) {
                    Some(text) => parse_event_str(text),
                    None => parse_event(record),
                }
                .and_then(|event| check_clock(event.ts, wall_ms).map(|_| event))
            };
            match parsed {
                Ok(event) => events.push((offset, event)),
                Err(rejection) => (self.on_reject)(RejectedRecord {
                    source: self.names[chunk.partition as usize].clone(),
                    position: Position {
                        partition: chunk.partition,
                        offset,
                    },
                    reason: rejection.code(),
                    raw: record[..record.len().min(RAW_KEEP_BYTES)].to_vec(),
                }),
            }
        }
        self.records_read
            .fetch_add(chunk.ends.len() as u64, Ordering::Relaxed);
        ParsedChunk {
            partition: chunk.partition,
            seq: chunk.seq,
            events,
            next_line: chunk.next_line,
            end_byte: chunk.end_byte,
            prefix_blake3: chunk.prefix_blake3,
        }
    }
}

impl ParsedChunk {
    fn times(&self, parser: usize) -> ChunkTimes {
        ChunkTimes {
            partition: self.partition,
            seq: self.seq,
            parser,
            ts: self.events.iter().map(|(_, event)| event.ts).collect(),
            next_line: self.next_line,
            end_byte: self.end_byte,
            prefix_blake3: self.prefix_blake3,
        }
    }
}

/// Stage 3: the owner runs each file's clock over its chunks' `ts`s in file
/// order, records the checkpoint after each chunk, and tells the chunk's
/// parser where the clock stood before it.
fn clock_in_file_order<'s>(
    times: StreamVec<'s, Time, ChunkTimes>,
    context: &FileSourceContext,
    progress: Rc<RefCell<Progress>>,
) -> StreamVec<'s, Time, ChunkClock> {
    let rules = stamp_rules(context);
    let probes = context.source.probes.clone();
    let checkpoints = context.source.checkpoints.clone();
    times.unary(
        Exchange::new(|times: &ChunkTimes| times.partition as u64),
        "ClockInFileOrder",
        move |_, _| {
            // Chunks that arrived ahead of their turn, with the capability
            // they came with (the reader's time when it sent them).
            let mut waiting: BTreeMap<(u32, u64), (Capability<Time>, ChunkTimes)> = BTreeMap::new();
            move |input, output| {
                let _turn = probes.turns.time(Path::Source);
                input.for_each_stamp(|cap, batches| {
                    for batch in batches {
                        for times in batch.drain(..) {
                            let held = cap.retain_least(0).expect("totally ordered time");
                            waiting.insert((times.partition, times.seq), (held, times));
                        }
                    }
                });
                let mut progress = progress.borrow_mut();
                let mut any = false;
                loop {
                    let files = &progress.files;
                    let next = waiting
                        .keys()
                        .find(|(partition, seq)| files[*partition as usize].chunks == *seq);
                    let Some(&key) = next else { break };
                    let (cap, times) = waiting.remove(&key).expect("found above");
                    let file = &mut progress.files[times.partition as usize];
                    let (clock, checkpoint) = run_clock(&mut file.clock, rules, &times);
                    file.chunks += 1;
                    checkpoints.record(times.partition, checkpoint);
                    output.session(&cap).give(clock);
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

/// Runs `clock` over one chunk's `ts`s: returns where it stood before the
/// chunk, and the position after it.
fn run_clock(
    clock: &mut PartitionClock,
    rules: StampRules,
    times: &ChunkTimes,
) -> (ChunkClock, Checkpoint) {
    let wall_ms = wall_clock_ms();
    let before = ChunkClock {
        partition: times.partition,
        seq: times.seq,
        parser: times.parser,
        clock: *clock,
        wall_ms,
    };
    for &ts in &times.ts {
        clock.tick(rules, ts, wall_ms, 0);
    }
    let checkpoint = Checkpoint {
        offset: times.next_line,
        byte: times.end_byte,
        max_ts: clock.max_ts(),
        prefix_blake3: Some(times.prefix_blake3),
    };
    (before, checkpoint)
}

/// Stage 4: the worker that parsed a chunk stamps its events once the
/// owner has sent the clock before it.
fn stamp_where_parsed<'s>(
    events: StreamVec<'s, Time, ParsedChunk>,
    clocks: StreamVec<'s, Time, ChunkClock>,
    context: &FileSourceContext,
) -> StreamVec<'s, Time, Ingested> {
    let rules = stamp_rules(context);
    let probes = context.source.probes.clone();
    events.binary(
        clocks,
        Pipeline,
        Exchange::new(|clock: &ChunkClock| clock.parser as u64),
        "StampWhereParsed",
        move |_, _| {
            // Whichever of a chunk's events and clock came first, waiting
            // for the other; the events with the capability they came with.
            let mut events: HashMap<(u32, u64), (Capability<Time>, ParsedChunk)> = HashMap::new();
            let mut clocks: HashMap<(u32, u64), ChunkClock> = HashMap::new();
            move |input_events, input_clocks, output| {
                let _turn = probes.turns.time(Path::Source);
                input_events.for_each_stamp(|cap, batches| {
                    for chunk in batches.flat_map(|batch| batch.drain(..)) {
                        let held = cap.retain_least(0).expect("totally ordered time");
                        events.insert((chunk.partition, chunk.seq), (held, chunk));
                    }
                });
                input_clocks.for_each_stamp(|_, batches| {
                    for clock in batches.flat_map(|batch| batch.drain(..)) {
                        clocks.insert((clock.partition, clock.seq), clock);
                    }
                });
                let ready: Vec<(u32, u64)> = clocks
                    .keys()
                    .filter(|key| events.contains_key(key))
                    .copied()
                    .collect();
                for key in ready {
                    let (cap, chunk) = events.remove(&key).expect("ready");
                    let clock = clocks.remove(&key).expect("ready");
                    stamp_chunk(clock, rules, chunk, &cap, output);
                }
            }
        },
    )
}

fn stamp_rules(context: &FileSourceContext) -> StampRules {
    StampRules {
        allowed_lateness_ms: context.source.allowed_lateness_ms,
        time_granularity_ms: context.source.time_granularity_ms,
    }
}

/// Stamps and sends one chunk's events in order, from the clock before it.
fn stamp_chunk(
    before: ChunkClock,
    rules: StampRules,
    chunk: ParsedChunk,
    cap: &Capability<Time>,
    output: &mut Output<'_>,
) {
    let mut clock = before.clock;
    let mut batch = Batch::with_capacity(cap, chunk.events.len());
    for (offset, event) in chunk.events {
        let position = Position {
            partition: chunk.partition,
            offset,
        };
        let (time, ingested) = clock.stamp(rules, event, position, before.wall_ms, 0);
        batch.push(output, time, ingested);
    }
    batch.flush(output);
}
