//! Stage 1 of the file source: cutting files into chunks of records.
//!
//! Reading is the one part of a file replay that cannot be spread over the
//! workers: a file's bytes are read, and digested, in order. It runs on a
//! thread of its own (a [`Feed`]) rather than on the owning worker, so that
//! on a machine with a core to spare it overlaps the dataflow's work instead
//! of adding to the busiest worker's. The thread runs ahead of the dataflow
//! by at most [`FEED_DEPTH`] chunks; the worker decides how many of them
//! enter the dataflow (see `CHUNKS_IN_FLIGHT` in the parent module).

use super::{ChunkParser, ParsedChunk};
use crate::prefix::DigestingReader;
use crate::SourceContext;
use livepipe_dataflow::lines::append_record;
use livepipe_dataflow::parse::MAX_RECORD_BYTES;
use livepipe_dataflow::resume::Checkpoint;
use serde::{Deserialize, Serialize};
use timely::scheduling::SyncActivator;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::thread;

/// Chunks a reading thread may have read that its worker has not taken.
const FEED_DEPTH: usize = 4;

/// Raw records of one file, in file order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Chunk {
    pub partition: u32,
    pub seq: u64,
    /// Line number of the first record.
    pub first_line: u64,
    /// The records, back to back; record `i` ends at `ends[i]`.
    pub bytes: Vec<u8>,
    pub ends: Vec<u32>,
    /// Indexes of records longer than the limit (kept cut).
    pub oversized: Vec<u32>,
    /// The line after the chunk, and its byte position: where the file
    /// resumes once this chunk is stamped.
    pub next_line: u64,
    pub end_byte: u64,
    /// BLAKE3 of the file's bytes before `end_byte`.
    pub prefix_blake3: [u8; 32],
    /// The chunk as its reading thread parsed it (then `bytes` and `ends`
    /// are empty): in a job of one process (see the module docs).
    pub parsed: Option<Box<ParsedChunk>>,
}

/// What a reading thread hands its worker.
pub(super) enum Fed {
    Chunk(Chunk),
    /// The file was read to its end; every chunk of it came before this.
    End {
        partition: u32,
    },
    /// Reading failed; nothing more comes from this file.
    Failed {
        error: String,
    },
}

/// One file being read.
pub(super) struct Reader {
    path: PathBuf,
    partition: u32,
    /// Open while there is more to read.
    reader: Option<DigestingReader<File>>,
    /// The digest the bytes before the start position must have (a resume).
    start_digest: Option<[u8; 32]>,
    /// Lines read so far (the last line number read).
    line: u64,
    /// Byte position of the next line.
    byte: u64,
    chunks_sent: u64,
    at_end: bool,
    /// Bytes of the last chunk: the next one is allocated that large, so
    /// it is not grown (and copied) record by record.
    last_chunk_bytes: usize,
}

impl Reader {
    /// A file as its owner starts reading it: where an earlier run left
    /// off, or at its first line.
    pub fn resumed(path: &Path, partition: u32, source: &SourceContext) -> Self {
        let start = source
            .resume
            .get(&partition)
            .copied()
            .unwrap_or(Checkpoint {
                offset: 1,
                ..Checkpoint::default()
            });
        // Re-readable from the start position until a chunk is stamped.
        source.checkpoints.record(partition, start);
        Reader {
            path: path.to_path_buf(),
            partition,
            reader: None,
            start_digest: start.prefix_blake3,
            line: start.offset - 1,
            byte: start.byte,
            chunks_sent: 0,
            at_end: false,
            last_chunk_bytes: 0,
        }
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The next message for the worker: a chunk, or the end of the file.
    fn next(&mut self, records_per_chunk: usize) -> Fed {
        match read_chunk(self, records_per_chunk) {
            Ok(Some(chunk)) => Fed::Chunk(chunk),
            Ok(None) => Fed::End {
                partition: self.partition,
            },
            Err(err) => Fed::Failed {
                error: format!("reading {}: {err}", self.path.display()),
            },
        }
    }
}

/// A thread reading a worker's files, a chunk of each in turn, so that all
/// of them advance together (the frontier waits for the slowest).
pub(super) struct Feed {
    receiver: Receiver<Fed>,
    /// A message taken off the channel but not yet wanted.
    held: Option<Fed>,
}

impl Feed {
    /// Starts reading `readers`; `wake` activates the worker's operator
    /// whenever a message is ready. The thread ends at the end of its files,
    /// or as soon as the feed is dropped.
    pub fn spawn(
        mut readers: Vec<Reader>,
        records_per_chunk: usize,
        parser: Option<ChunkParser>,
        wake: SyncActivator,
    ) -> io::Result<Self> {
        let (sender, receiver) = sync_channel(FEED_DEPTH);
        thread::Builder::new()
            .name("file-reader".into())
            .spawn(move || {
                while !readers.is_empty() {
                    let mut finished = Vec::new();
                    for (i, reader) in readers.iter_mut().enumerate() {
                        let mut fed = reader.next(records_per_chunk);
                        if let (Fed::Chunk(chunk), Some(parser)) = (&mut fed, &parser) {
                            let (partition, seq) = (chunk.partition, chunk.seq);
                            let parsed = parser.parse(std::mem::take(chunk));
                            *chunk = Chunk {
                                partition,
                                seq,
                                parsed: Some(Box::new(parsed)),
                                ..Chunk::default()
                            };
                        }
                        if !matches!(fed, Fed::Chunk(_)) {
                            finished.push(i);
                        }
                        // An error: the worker dropped the feed (the job stops).
                        if sender.send(fed).is_err() {
                            return;
                        }
                        let _ = wake.activate();
                    }
                    for i in finished.into_iter().rev() {
                        readers.remove(i);
                    }
                }
            })?;
        Ok(Feed {
            receiver,
            held: None,
        })
    }

    /// The next message, if one is ready and `wanted` accepts it; one that
    /// is not wanted yet is kept for a later call.
    pub fn next_if(&mut self, wanted: impl Fn(&Fed) -> bool) -> Option<Fed> {
        let fed = match self.held.take() {
            Some(fed) => fed,
            None => match self.receiver.try_recv() {
                Ok(fed) => fed,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return None,
            },
        };
        if wanted(&fed) {
            Some(fed)
        } else {
            self.held = Some(fed);
            None
        }
    }
}

/// Reads up to a chunk of records; `None` once the file is at its end and
/// nothing was left to send.
fn read_chunk(reader: &mut Reader, records_per_chunk: usize) -> io::Result<Option<Chunk>> {
    if reader.at_end {
        return Ok(None);
    }
    if reader.reader.is_none() {
        reader.reader = Some(open_at(reader)?);
    }
    let file = reader.reader.as_mut().expect("opened above");
    let records = records_per_chunk.max(1);
    let mut chunk = Chunk {
        partition: reader.partition,
        seq: reader.chunks_sent,
        first_line: reader.line + 1,
        bytes: Vec::with_capacity(reader.last_chunk_bytes + reader.last_chunk_bytes / 8),
        ends: Vec::with_capacity(records),
        ..Chunk::default()
    };
    while chunk.ends.len() < records {
        let Some((oversized, consumed)) = append_record(file, &mut chunk.bytes, MAX_RECORD_BYTES)?
        else {
            reader.at_end = true;
            break;
        };
        reader.line += 1;
        reader.byte += consumed;
        if oversized {
            chunk.oversized.push(chunk.ends.len() as u32);
        }
        chunk.ends.push(chunk.bytes.len() as u32);
    }
    let digest = file.digest();
    if reader.at_end {
        reader.reader = None;
    }
    if chunk.ends.is_empty() {
        return Ok(None);
    }
    reader.last_chunk_bytes = chunk.bytes.len();
    chunk.next_line = reader.line + 1;
    chunk.end_byte = reader.byte;
    chunk.prefix_blake3 = digest;
    reader.chunks_sent += 1;
    Ok(Some(chunk))
}

/// Opens the reader's file at its start position. The bytes before it are
/// read and digested on the way (once per run, at memory speed), so that
/// every later checkpoint carries the digest of its whole prefix; on a
/// resume they must be the bytes the ledger's position was taken on. The
/// job checked that before it started; a file replaced since is a fault.
fn open_at(reader: &Reader) -> io::Result<DigestingReader<File>> {
    let mut file = DigestingReader::new(File::open(&reader.path)?);
    let skipped = file.skip(reader.byte)?;
    if skipped < reader.byte || reader.start_digest.is_some_and(|d| d != file.digest()) {
        return Err(io::Error::other(format!(
            "its first {} bytes changed since the job started (the file was replaced)",
            reader.byte
        )));
    }
    Ok(file)
}
