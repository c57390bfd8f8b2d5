//! A file's identity up to a position: the BLAKE3 digest of its bytes
//! before it.
//!
//! A resumed file run starts at the byte position its ledger recorded. The
//! ledger also keeps the digest of every byte before that position, so that
//! another file under the same name (yesterday's `events.jsonl` replaced by
//! today's) is refused instead of being read from its middle, while a file
//! that only grew (lines appended) resumes.
//!
//! The digest is taken over *consumed* bytes ([`DigestingReader`] is the
//! file's buffered reader and hashes what the line reader consumes), so at
//! every record boundary it covers exactly the bytes before it, whatever
//! the read buffer happens to hold beyond. Consumed bytes are hashed
//! lazily, in the large pieces between two digests, because BLAKE3 is fast
//! only on large inputs (it hashes many 1 KiB chunks side by side with
//! SIMD); record by record it would not be.
//!
//! BLAKE3 rather than a non-cryptographic hash: a digest that cannot be
//! forged needs no argument about who wrote the file. Rather than SHA-256
//! (which ledgers written before schema version 2 hold, see
//! [`prefix_sha256`]): every byte of every input goes through it, and
//! SHA-256, even with the CPU's SHA extensions, took 5 % of a file
//! replay's CPU where BLAKE3 takes a fraction of that.

use sha2::{Digest, Sha256};

use std::fs::File;
use std::io::{self, BufRead, Read};
use std::path::Path;

/// Read buffer size: large reads, few system calls.
const BUFFER: usize = 1 << 20;

/// A buffered reader that digests every byte it hands out.
pub struct DigestingReader<R> {
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    /// `buf[hashed..pos]` is consumed but not hashed yet.
    hashed: usize,
    hasher: blake3::Hasher,
    consumed: u64,
}

impl<R: Read> DigestingReader<R> {
    pub fn new(inner: R) -> Self {
        DigestingReader {
            inner,
            buf: vec![0; BUFFER].into_boxed_slice(),
            pos: 0,
            filled: 0,
            hashed: 0,
            hasher: blake3::Hasher::new(),
            consumed: 0,
        }
    }

    /// Bytes consumed (and digested) so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// BLAKE3 of every byte consumed so far.
    pub fn digest(&mut self) -> [u8; 32] {
        self.hash_consumed();
        self.hasher.finalize().into()
    }

    fn hash_consumed(&mut self) {
        self.hasher.update(&self.buf[self.hashed..self.pos]);
        self.hashed = self.pos;
    }

    /// Consumes and digests up to `n` bytes; fewer only at the end of the
    /// input. Returns how many.
    pub fn skip(&mut self, n: u64) -> io::Result<u64> {
        let mut skipped = 0;
        while skipped < n {
            let available = self.fill_buf()?.len() as u64;
            if available == 0 {
                break;
            }
            let take = available.min(n - skipped);
            self.consume(take as usize);
            skipped += take;
        }
        Ok(skipped)
    }
}

impl<R: Read> Read for DigestingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for DigestingReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.filled {
            self.hash_consumed();
            self.filled = loop {
                match self.inner.read(&mut self.buf) {
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    read => break read?,
                }
            };
            self.pos = 0;
            self.hashed = 0;
        }
        Ok(&self.buf[self.pos..self.filled])
    }

    fn consume(&mut self, amt: usize) {
        let amt = amt.min(self.filled - self.pos);
        self.pos += amt;
        self.consumed += amt as u64;
    }
}

/// BLAKE3 of the first `len` bytes of the file at `path`, or `None` if
/// the file is shorter than that.
pub fn prefix_digest(path: &Path, len: u64) -> io::Result<Option<[u8; 32]>> {
    let mut reader = DigestingReader::new(File::open(path)?);
    Ok((reader.skip(len)? == len).then(|| reader.digest()))
}

/// SHA-256 of the first `len` bytes of the file at `path`, or `None` if
/// the file is shorter: what a ledger written before schema version 2
/// recorded, checked once when such a ledger is resumed.
pub fn prefix_sha256(path: &Path, len: u64) -> io::Result<Option<[u8; 32]>> {
    let mut file = io::BufReader::with_capacity(BUFFER, File::open(path)?).take(len);
    let mut hasher = Sha256::new();
    let copied = io::copy(&mut file, &mut hasher)?;
    Ok((copied == len).then(|| hasher.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use livepipe_dataflow::lines::read_record;

    fn blake3_of(bytes: &[u8]) -> [u8; 32] {
        blake3::hash(bytes).into()
    }

    #[test]
    fn the_digest_covers_exactly_the_records_read() {
        let input = b"first\nsecond line\nthird\n";
        let mut reader = DigestingReader::new(&input[..]);
        let mut line = Vec::new();
        read_record(&mut reader, &mut line, 1024).unwrap();
        assert_eq!(reader.consumed(), 6);
        assert_eq!(reader.digest(), blake3_of(b"first\n"));
        read_record(&mut reader, &mut line, 4).unwrap();
        assert_eq!(line, b"seco", "cut at the bound");
        assert_eq!(reader.digest(), blake3_of(b"first\nsecond line\n"));
    }

    #[test]
    fn skipping_digests_what_it_skips() {
        let input: Vec<u8> = (0..3 * BUFFER + 17).map(|i| i as u8).collect();
        let mut reader = DigestingReader::new(&input[..]);
        assert_eq!(reader.skip(BUFFER as u64 + 5).unwrap(), BUFFER as u64 + 5);
        assert_eq!(reader.digest(), blake3_of(&input[..BUFFER + 5]));
        assert_eq!(reader.skip(u64::MAX).unwrap(), 2 * BUFFER as u64 + 12);
        assert_eq!(reader.digest(), blake3_of(&input));
    }

    #[test]
    fn a_file_shorter_than_the_prefix_has_no_digest_of_it() {
        let dir = std::env::temp_dir().join(format!("livepipe-prefix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.jsonl");
        std::fs::write(&path, b"abc\ndef\n").unwrap();
        assert_eq!(prefix_digest(&path, 4).unwrap(), Some(blake3_of(b"abc\n")));
        assert_eq!(prefix_digest(&path, 0).unwrap(), Some(blake3_of(b"")));
        assert_eq!(prefix_digest(&path, 9).unwrap(), None);
        let sha256 = |bytes: &[u8]| -> [u8; 32] { Sha256::digest(bytes).into() };
        assert_eq!(prefix_sha256(&path, 4).unwrap(), Some(sha256(b"abc\n")));
        assert_eq!(prefix_sha256(&path, 9).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
