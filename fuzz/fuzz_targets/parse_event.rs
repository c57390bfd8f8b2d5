//! Any bytes as a record: the parser answers with an event or a rejection,
//! never a panic, and never allocates more than the record could justify
//! (libFuzzer's `-malloc_limit_mb` catches that).

#![no_main]

use libfuzzer_sys::fuzz_target;
use livepipe_dataflow::parse::{parse_event, MAX_RECORD_BYTES};

fuzz_target!(|record: &[u8]| {
    match parse_event(record) {
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
