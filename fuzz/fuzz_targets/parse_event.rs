//! Any bytes as a record: the parser answers with an event or a rejection,
//! never a panic, and never allocates more than the record could justify
//! (libFuzzer's `-malloc_limit_mb` catches that). Its fast path for flat
//! records answers exactly as the general pass alone does.

#![no_main]

use libfuzzer_sys::fuzz_target;
use livepipe_dataflow::parse::{parse_event, parse_event_general, MAX_RECORD_BYTES};

fuzz_target!(|record: &[u8]| {
    let parsed = parse_event(record);
    assert_eq!(parsed, parse_event_general(record));
    match parsed {
        Ok(event) => {
            // What the parser accepts it accepted whole: ids are non-empty
            // and the record was within the size bound.
            assert!(record.len() <= MAX_RECORD_BYTES);
            assert!(!event.event_id.is_empty());
            assert!(!event.stream_id.is_empty());
        }
        Err(rejection) => {
            // Every rejection has a reason code for rejected.jsonl.
            assert!(!rejection.code().is_empty());
        }
    }
});
