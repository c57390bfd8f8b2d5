//! The live path's state stays bounded however many distinct streams come
//! in: quiet streams retire (from the dataflow and from the board), and
//! past `MAX_LIVE_STREAMS` new streams are refused and counted. Counts, not
//! time: nothing here depends on how fast the machine is.

use livepipe_dataflow::live::{LiveStreams, LiveUpdate, SignalKind, MAX_LIVE_STREAMS};
use livepipe_sinks::live::LiveBoard;
use serde_json::Value;
use testkit::reference::expected_live;
use testkit::run_input;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

const T0: u64 = 1_700_000_000_000;
const TTL: u64 = 30_000;

fn run_file(input: &Path, out: &Path, workers: &str) {
    run_input(input, out, &["--workers", workers]);
}

fn live_json(out: &Path) -> Vec<Value> {
    serde_json::from_slice(&std::fs::read(out.join("live.json")).unwrap()).unwrap()
}

fn event(kind: &str, id: &str, ts: u64, stream: &str, viewer: &str) -> String {
    format!(
        r#"{{"type":"{kind}","event_id":"{id}","ts":{ts},"stream_id":"{stream}","viewer_id":"{viewer}"}}"#
    ) + "\n"
}

#[test]
fn twenty_thousand_streams_over_ten_minutes_leave_only_the_recent_in_live_json() {
    // 20,000 streams, one viewer each joining (and every third chatting),
    // one every 30 ms of event time, plus streams placed on the edges of
    // the retirement rule at the end.
    let mut text = String::new();
    let mut last = T0;
    for i in 0..20_000u64 {
        let ts = T0 + i * 30;
        last = ts;
        // Stream `s-i`'s one viewer `vi` does `kind` at `ts`.
        let on_stream = |kind: &str, id: char, ts: u64| {
            event(
                kind,
                &format!("{id}{i}"),
                ts,
                &format!("s-{i}"),
                &format!("v{i}"),
            )
        };
        text += &on_stream("join", 'j', ts);
        if i % 3 == 0 {
            text += &on_stream("chat", 'c', ts);
        }
        if i % 7 == 0 {
            text += &on_stream("leave", 'l', ts + 10);
        }
    }
    let now = last + 10;
    for (name, kind, ts) in [
        // Kept while a live event has ts + 2 ttl >= now ...
        ("edge-kept", "leave", now - 2 * TTL),
        ("edge-gone", "heartbeat", now - 2 * TTL - 1),
        // ... or a chat has ts + 60 s + ttl >= now.
        ("chat-kept", "chat", now - 60_000 - TTL),
        ("chat-gone", "chat", now - 60_000 - TTL - 1),
    ] {
        text += &event(kind, name, ts, name, "v");
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("many.jsonl");
    std::fs::write(&input, &text).unwrap();
    let lines: Vec<&[u8]> = text.lines().map(str::as_bytes).collect();
    let (want_now, want) = expected_live(&lines, TTL);
    assert_eq!(want_now, now);
    for (name, kept) in [
        ("edge-kept", true),
        ("edge-gone", false),
        ("chat-kept", true),
        ("chat-gone", false),
    ] {
        assert_eq!(want.contains_key(name), kept, "{name}");
    }
    // Joins of the last 2 TTL (2,000 streams), chats of the last 90 s.
    assert!(want.len() < 4_000, "{}", want.len());

    for workers in ["1", "2"] {
        let out = dir.path().join(format!("out-{workers}"));
        run_file(&input, &out, workers);
        let got: BTreeMap<String, (u64, u64)> = live_json(&out)
            .iter()
            .map(|s| {
                assert_eq!(s["as_of"].as_u64(), Some(now));
                let count = |f: &str| s[f].as_u64().unwrap();
                (
                    s["stream_id"].as_str().unwrap().to_string(),
                    (count("viewers"), count("chat_per_min")),
                )
            })
            .collect();
        assert_eq!(got, want, "{workers} workers");
    }
}

#[test]
fn past_the_bound_live_json_holds_max_live_streams() {
    // More distinct streams than the bound, all present at once: one
    // worker holds exactly MAX_LIVE_STREAMS of them, refuses the rest.
    let streams = MAX_LIVE_STREAMS + 20_000;
    let mut text = String::with_capacity(streams * 100);
    for i in 0..streams {
        let _ = write!(
            text,
            r#"{{"type":"join","event_id":"j{i}","ts":{},"stream_id":"s-{i}","viewer_id":"v"}}"#,
            T0 + (i as u64 % 1_000)
        );
        text.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("flood.jsonl");
    std::fs::write(&input, &text).unwrap();
    let out = dir.path().join("out");
    run_file(&input, &out, "1");
    let live = live_json(&out);
    assert_eq!(live.len(), MAX_LIVE_STREAMS);
    assert!(live.iter().all(|s| s["viewers"] == 1));
}

/// Applies what `tick` emits to `board`, and returns how many streams it
/// reported refused.
fn tick_into(streams: &mut LiveStreams, board: &LiveBoard, now: u64) -> u64 {
    let mut updates = Vec::new();
    streams.tick(now, 0, |u| updates.push(u));
    let dropped = updates
        .iter()
        .map(|u| match u {
            LiveUpdate::Dropped(n) => *n,
            _ => 0,
        })
        .sum();
    board.apply(updates);
    dropped
}

#[test]
fn a_flood_of_distinct_streams_keeps_the_state_and_the_board_bounded() {
    let bound = 1_000;
    let mut streams = LiveStreams::new(TTL, bound);
    let board = LiveBoard::default();
    // 200,000 made-up streams in 20 seconds of event time, each sending
    // twice; a tick per second.
    let mut refused = 0;
    for second in 0..20u64 {
        for i in 0..10_000u64 {
            let id = format!("flood-{}", second * 10_000 + i);
            for _ in 0..2 {
                let ts = T0 + second * 1_000;
                streams.apply(id.as_str().into(), "v".into(), ts, SignalKind::Presence, ts);
            }
        }
        refused += tick_into(&mut streams, &board, T0 + second * 1_000);
        assert!(streams.len() <= bound && board.len() <= bound);
    }
    assert_eq!(streams.len(), bound);
    assert_eq!(board.len(), bound);
    assert_eq!(refused, 200_000 - bound as u64, "every refused stream once");
    assert_eq!(board.streams_dropped(), refused);

    // The flood goes quiet: its streams show 0 for a TTL, then retire from
    // the dataflow and the board.
    tick_into(&mut streams, &board, T0 + 50_000);
    assert_eq!(board.len(), bound);
    assert!(board.top(bound).iter().all(|s| s.viewers == 0));
    tick_into(&mut streams, &board, T0 + 81_000);
    assert!(streams.is_empty());
    assert_eq!(board.len(), 0);

    // Room again: new streams are held and shown.
    let ts = T0 + 81_000;
    streams.apply("real".into(), "v".into(), ts, SignalKind::Presence, ts);
    assert_eq!(tick_into(&mut streams, &board, T0 + 81_000), 0);
    assert_eq!(board.top(1)[0].stream_id, "real");
}
