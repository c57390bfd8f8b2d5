//! File source: `.jsonl` files read to the end, each file one partition.
//!
//! Files are history, so what is late must not depend on how fast they are
//! read: each file keeps its own watermark (highest valid `ts` so far minus
//! the allowed lateness), every record is stamped with the watermark *before*
//! it, and the record travels at the coarse version of that watermark (see
//! `livepipe_dataflow::time`). The source's capability follows the least
//! watermark of the files it still reads; a file at its end stops holding it
//! back, and when every file is done the capability is dropped, so the
//! frontier empties and everything finalizes.
//!
//! File `i` is read by worker `i % workers`, in budgeted slices so the worker
//! keeps serving the rest of the graph (and the live tick) in between.

use livepipe_dataflow::event::{Ingested, Position, RejectedRecord, RAW_KEEP_BYTES};
use livepipe_dataflow::parse::{parse_event, Rejection, MAX_RECORD_BYTES};
use livepipe_dataflow::time::{coarse, Time};
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::{Scope, StreamVec};

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one activation may read before yielding to other operators.
const SLICE: Duration = Duration::from_millis(5);
/// Records read between checks of the clock.
const RECORDS_PER_CHECK: usize = 256;

/// What the file source reports to the rest of the job.
#[derive(Clone)]
pub struct FileSourceContext {
    pub allowed_lateness_ms: u64,
    pub time_granularity_ms: u64,
    /// Highest `ts` of any valid record seen, for the live path's `now`.
    pub max_event_ts: Arc<AtomicU64>,
    /// Records read (valid or not), for progress reporting.
    pub records_read: Arc<AtomicU64>,
    /// Where rejected records go. Called from the reading worker.
    pub on_reject: Arc<dyn Fn(RejectedRecord) + Send + Sync>,
    /// Called once with the cause if a file cannot be read any further.
    pub on_fatal: Arc<dyn Fn(String) + Send + Sync>,
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

/// One file being read.
struct Cursor {
    path: PathBuf,
    name: Arc<str>,
    partition: u32,
    reader: Option<BufReader<File>>,
    line: u64,
    max_ts: Option<u64>,
    done: bool,
}

/// A partition's watermark: its highest valid `ts` so far minus the allowed
/// lateness; 0 (nothing is late) before its first valid record.
fn watermark(max_ts: Option<u64>, lateness: u64) -> u64 {
    max_ts.map_or(0, |ts| ts.saturating_sub(lateness))
}

/// Builds the source on this worker for the files it owns.
pub fn file_source<'s>(
    scope: Scope<'s, Time>,
    paths: &[PathBuf],
    context: FileSourceContext,
) -> StreamVec<'s, Time, Ingested> {
    let index = scope.index();
    let peers = scope.peers();
    let mut cursors: Vec<Cursor> = paths
        .iter()
        .enumerate()
        .filter(|(partition, _)| partition % peers == index)
        .map(|(partition, path)| Cursor {
            path: path.clone(),
            name: Arc::from(path.display().to_string()),
            partition: partition as u32,
            reader: None,
            line: 0,
            max_ts: None,
            done: false,
        })
        .collect();

    source(scope, "FileSource", move |capability, info| {
        let activator = scope.activator_for(info.address);
        let mut capability = Some(capability);
        let mut line = Vec::with_capacity(1024);
        move |output| {
            let Some(cap) = capability.as_mut() else {
                return;
            };
            let lateness = context.allowed_lateness_ms;
            let granularity = context.time_granularity_ms;
            let started = Instant::now();
            for cursor in cursors.iter_mut().filter(|c| !c.done) {
                if let Err(err) = read_slice(cursor, &mut line, started, &context, |time, batch| {
                    output
                        .session(&cap.delayed(&time))
                        .give_iterator(batch.drain(..));
                }) {
                    (context.on_fatal)(format!("reading {}: {err}", cursor.path.display()));
                    // Keep the capability: an emptied frontier would finalize
                    // impressions that are not final. The job is going down.
                    return;
                }
            }
            let least = cursors
                .iter()
                .filter(|c| !c.done)
                .map(|c| coarse(watermark(c.max_ts, lateness), granularity))
                .min();
            match least {
                Some(time) => {
                    cap.downgrade(&time);
                    activator.activate();
                }
                None => capability = None,
            }
        }
    })
}

/// Reads records from one file until the slice is used up or the file ends,
/// handing batches of events to `emit` grouped by their timely time.
fn read_slice(
    cursor: &mut Cursor,
    line: &mut Vec<u8>,
    started: Instant,
    context: &FileSourceContext,
    mut emit: impl FnMut(Time, &mut Vec<Ingested>),
) -> io::Result<()> {
    let lateness = context.allowed_lateness_ms;
    let granularity = context.time_granularity_ms;
    if cursor.reader.is_none() {
        cursor.reader = Some(BufReader::with_capacity(1 << 20, File::open(&cursor.path)?));
    }
    let reader = cursor.reader.as_mut().expect("opened above");
    let mut batch = Vec::with_capacity(RECORDS_PER_CHECK);
    let mut batch_time = coarse(watermark(cursor.max_ts, lateness), granularity);
    let mut read = 0u64;
    'slice: loop {
        for _ in 0..RECORDS_PER_CHECK {
            let Some(oversized) = read_record(reader, line, MAX_RECORD_BYTES)? else {
                cursor.done = true;
                break 'slice;
            };
            cursor.line += 1;
            read += 1;
            let position = Position {
                partition: cursor.partition,
                offset: cursor.line,
            };
            let parsed = if oversized {
                Err(Rejection::TooLarge)
            } else {
                parse_event(line)
            };
            match parsed {
                Ok(event) => {
                    let watermark = watermark(cursor.max_ts, lateness);
                    let time = coarse(watermark, granularity);
                    if time != batch_time {
                        emit(batch_time, &mut batch);
                        batch_time = time;
                    }
                    cursor.max_ts = Some(cursor.max_ts.map_or(event.ts, |m| m.max(event.ts)));
                    batch.push(Ingested {
                        event,
                        position,
                        watermark,
                    });
                }
                Err(rejection) => (context.on_reject)(RejectedRecord {
                    source: cursor.name.clone(),
                    position,
                    reason: rejection.code(),
                    raw: line[..line.len().min(RAW_KEEP_BYTES)].to_vec(),
                }),
            }
        }
        if started.elapsed() >= SLICE {
            break;
        }
    }
    if !batch.is_empty() {
        emit(batch_time, &mut batch);
    }
    if let Some(max) = cursor.max_ts {
        context.max_event_ts.fetch_max(max, Ordering::Relaxed);
    }
    context.records_read.fetch_add(read, Ordering::Relaxed);
    if cursor.done {
        cursor.reader = None;
    }
    Ok(())
}

/// Reads one `\n`-terminated record into `buf` (without the `\n`), keeping at
/// most `max` bytes of it: a hostile multi-gigabyte line costs no memory.
/// Returns `None` at the end of the input, else whether the record was longer
/// than `max`. A last line without `\n` is a record; nothing after a final
/// `\n` is.
pub fn read_record(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Option<bool>> {
    buf.clear();
    let mut oversized = false;
    let mut started = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if available.is_empty() {
            return Ok(started.then_some(oversized));
        }
        started = true;
        let (chunk, consumed, complete) = match memchr::memchr(b'\n', available) {
            Some(end) => (&available[..end], end + 1, true),
            None => (available, available.len(), false),
        };
        let room = max.saturating_sub(buf.len());
        if chunk.len() > room {
            oversized = true;
        }
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(consumed);
        if complete {
            return Ok(Some(oversized));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(input: &[u8], max: usize) -> Vec<(Vec<u8>, bool)> {
        let mut reader = BufReader::with_capacity(3, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some(oversized) = read_record(&mut reader, &mut buf, max).unwrap() {
            out.push((buf.clone(), oversized));
        }
        out
    }

    #[test]
    fn lines_blank_lines_and_missing_final_newline() {
        let got = records(b"a\n\nbc\nd", 10);
        let want: Vec<(Vec<u8>, bool)> = vec![
            (b"a".to_vec(), false),
            (b"".to_vec(), false),
            (b"bc".to_vec(), false),
            (b"d".to_vec(), false),
        ];
        assert_eq!(got, want);
        assert_eq!(records(b"a\n", 10).len(), 1);
        assert!(records(b"", 10).is_empty());
    }

    #[test]
    fn oversized_records_are_cut_and_flagged() {
        let got = records(b"0123456789abc\nok\n", 4);
        assert_eq!(got[0], (b"0123".to_vec(), true));
        assert_eq!(got[1], (b"ok".to_vec(), false));
    }
}
