//! Where one record ends: `\n`-terminated lines read with a bound.
//!
//! A record longer than the bound is consumed whole but only its first
//! bytes are kept, and it is flagged: the caller rejects it as too large
//! instead of parsing it, and a hostile multi-gigabyte line costs no
//! memory. Pure over any [`BufRead`], so that it can be fuzzed alone
//! (`fuzz/fuzz_targets/read_record.rs`).

use std::io::{self, BufRead};

/// Reads one `\n`-terminated record into `buf` (without the `\n`), keeping at
/// most `max` bytes of it: a hostile multi-gigabyte line costs no memory.
/// Returns `None` at the end of the input, else whether the record was longer
/// than `max` and how many bytes it took in the input (its `\n` included). A
/// last line without `\n` is a record; nothing after a final `\n` is.
pub fn read_record(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Option<(bool, u64)>> {
    buf.clear();
    append_record(reader, buf, max)
}

/// [`read_record`], appending the record to what `buf` already holds: a
/// reader that packs many records into one buffer copies each byte once.
pub fn append_record(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Option<(bool, u64)>> {
    let start = buf.len();
    let mut oversized = false;
    let mut started = false;
    let mut taken = 0u64;
    loop {
        let available = match reader.fill_buf() {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if available.is_empty() {
            return Ok(started.then_some((oversized, taken)));
        }
        started = true;
        let (chunk, consumed, complete) = match memchr::memchr(b'\n', available) {
            Some(end) => (&available[..end], end + 1, true),
            None => (available, available.len(), false),
        };
        let room = max.saturating_sub(buf.len() - start);
        if chunk.len() > room {
            oversized = true;
        }
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(consumed);
        taken += consumed as u64;
        if complete {
            return Ok(Some((oversized, taken)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn records(input: &[u8], max: usize) -> Vec<(Vec<u8>, bool)> {
        let mut reader = BufReader::with_capacity(3, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some((oversized, _)) = read_record(&mut reader, &mut buf, max).unwrap() {
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

    #[test]
    fn appending_keeps_what_the_buffer_held_and_bounds_only_the_record() {
        let mut reader = BufReader::with_capacity(3, &b"0123456789\nok\n"[..]);
        let mut buf = b"held".to_vec();
        assert_eq!(
            append_record(&mut reader, &mut buf, 4).unwrap(),
            Some((true, 11))
        );
        assert_eq!(
            append_record(&mut reader, &mut buf, 4).unwrap(),
            Some((false, 3))
        );
        assert_eq!(buf, b"held0123ok");
    }
}
