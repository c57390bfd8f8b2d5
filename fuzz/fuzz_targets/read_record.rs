//! Any bytes as a file: the bounded line reader splits them into records
//! that cover the input exactly, keeps the first `MAX` bytes of each, and
//! flags the longer ones, without ever panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use livepipe_dataflow::lines::read_record;

/// Small, so that the fuzzer reaches the oversized path easily.
const MAX: usize = 64;

fuzz_target!(|input: &[u8]| {
    // A tiny buffer makes records straddle many refills.
    let mut reader = std::io::BufReader::with_capacity(7, input);
    let mut buf = Vec::new();
    let mut at = 0usize;
    while let Some((oversized, taken)) = read_record(&mut reader, &mut buf, MAX).unwrap() {
        let span = &input[at..at + taken as usize];
        let content = span.strip_suffix(b"\n").unwrap_or(span);
        assert!(!content.contains(&b'\n'), "one record per line");
        assert_eq!(oversized, content.len() > MAX);
        assert_eq!(buf, &content[..content.len().min(MAX)]);
        at += taken as usize;
    }
    assert_eq!(at, input.len(), "records cover the input");
});
