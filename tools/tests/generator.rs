//! Tests of the synthetic traffic generator (`livepipe gen`).

use std::collections::{HashMap, HashSet};

use livepipe_tools::generator::{write_jsonl, GenConfig, GenSummary, Generator};
use serde_json::{Map, Value};

const WINDOW_MS: u64 = 300_000;
const HOUR_MS: u64 = 3_600_000;

fn config(seed: u64, events: u64) -> GenConfig {
    GenConfig {
        seed,
        events,
        ..GenConfig::default()
    }
}

fn generate(config: &GenConfig) -> (Vec<u8>, GenSummary) {
    let mut out = Vec::new();
    let summary = write_jsonl(config, &mut out).expect("writing to a Vec");
    (out, summary)
}

/// The file's lines (it ends with a newline; blank lines are lines).
fn lines(data: &[u8]) -> Vec<&[u8]> {
    assert!(data.is_empty() || data.ends_with(b"\n"));
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    lines.pop();
    lines
}

/// The top-level keys of a line that is valid JSON, in order, raw.
fn top_level_keys(line: &[u8]) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    let (mut depth, mut in_str, mut escape, mut want_key) = (0usize, false, false, false);
    let mut current: Option<Vec<u8>> = None;
    for &b in line {
        if in_str {
            if escape {
                escape = false;
            } else if b == b'\\' {
                escape = true;
            } else if b == b'"' {
                in_str = false;
                if let Some(key) = current.take() {
                    keys.push(key);
                }
                continue;
            }
            if let Some(key) = current.as_mut() {
                key.push(b);
            }
            continue;
        }
        match b {
            b'"' => {
                in_str = true;
                if depth == 1 && want_key {
                    current = Some(Vec::new());
                    want_key = false;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                want_key = depth == 1 && b == b'{';
            }
            b'}' | b']' => depth -= 1,
            b',' => want_key = depth == 1,
            _ => {}
        }
    }
    keys
}

fn id_ok(obj: &Map<String, Value>, key: &str) -> bool {
    obj.get(key)
        .and_then(Value::as_str)
        .is_some_and(|s| (1..=128).contains(&s.len()))
}

fn uint(obj: &Map<String, Value>, key: &str, max: u64) -> bool {
    obj.get(key)
        .and_then(Value::as_u64)
        .is_some_and(|n| n <= max)
}

/// The keys of an event of type `ty`, in wire order (`None`: unknown type).
fn expected_keys(ty: &str) -> Option<Vec<&'static str>> {
    let typed: &[&str] = match ty {
        "join" | "leave" | "heartbeat" | "chat" => &[],
        "impression" => &[
            "impression_id",
            "ad_id",
            "campaign_id",
            "advertiser_id",
            "price_micros",
        ],
        "ad_progress" => &["impression_id", "watched_ms"],
        _ => return None,
    };
    let common = ["type", "event_id", "ts", "stream_id", "viewer_id"];
    Some(common.iter().chain(typed).copied().collect())
}

/// A strict reading of the wire format: `Some(event)` for a valid line.
fn validate(line: &[u8]) -> Option<Map<String, Value>> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(line) else {
        return None;
    };
    let keys = top_level_keys(line);
    let distinct: HashSet<&Vec<u8>> = keys.iter().collect();
    if distinct.len() != keys.len() {
        return None; // duplicate keys
    }
    let ty = obj.get("type").and_then(Value::as_str)?;
    let expected = expected_keys(ty)?;
    let ts = obj.get("ts").and_then(Value::as_u64)?;
    if ts == 0 || ts >= 1 << 53 {
        return None;
    }
    if !["event_id", "stream_id", "viewer_id"]
        .iter()
        .all(|k| id_ok(&obj, k))
    {
        return None;
    }
    let typed_ok = match ty {
        "impression" => {
            ["impression_id", "ad_id", "campaign_id", "advertiser_id"]
                .iter()
                .all(|k| id_ok(&obj, k))
                && uint(&obj, "price_micros", 1_000_000_000_000)
        }
        "ad_progress" => id_ok(&obj, "impression_id") && uint(&obj, "watched_ms", 86_400_000),
        _ => true,
    };
    if !typed_ok {
        return None;
    }
    // Valid events have exactly the documented keys, in wire order.
    let got: Vec<&str> = keys
        .iter()
        .map(|k| std::str::from_utf8(k).unwrap())
        .collect();
    assert_eq!(
        got,
        expected,
        "key order of {}",
        String::from_utf8_lossy(line)
    );
    Some(obj)
}

struct Ev {
    line: usize,
    ts: u64,
    ty: String,
    event_id: String,
    stream_id: String,
    impression_id: Option<String>,
    watched_ms: Option<u64>,
}

struct Analysis {
    lines: usize,
    malformed: Vec<usize>,
    events: Vec<Ev>,
    /// Indexes (into `events`) of exact re-sends.
    retries: Vec<usize>,
    /// Indexes (into `events`) of events behind the lateness bound.
    late: Vec<usize>,
    impressions: u64,
}

fn str_field(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).map(str::to_string)
}

fn analyse(data: &[u8], allowed_lateness_ms: u64) -> Analysis {
    let lines = lines(data);
    let mut a = Analysis {
        lines: lines.len(),
        malformed: Vec::new(),
        events: Vec::new(),
        retries: Vec::new(),
        late: Vec::new(),
        impressions: 0,
    };
    let mut by_event_id: HashMap<String, &[u8]> = HashMap::new();
    let mut max_ts = 0u64;
    for (i, line) in lines.iter().enumerate() {
        let Some(obj) = validate(line) else {
            a.malformed.push(i);
            continue;
        };
        let ev = Ev {
            line: i,
            ts: obj["ts"].as_u64().unwrap(),
            ty: str_field(&obj, "type").unwrap(),
            event_id: str_field(&obj, "event_id").unwrap(),
            stream_id: str_field(&obj, "stream_id").unwrap(),
            impression_id: str_field(&obj, "impression_id"),
            watched_ms: obj.get("watched_ms").and_then(Value::as_u64),
        };
        let idx = a.events.len();
        match by_event_id.get(&ev.event_id) {
            Some(&earlier) => {
                // A producer retry: same event id, same payload.
                assert_eq!(
                    earlier, *line,
                    "event id {} reused with a new payload",
                    ev.event_id
                );
                a.retries.push(idx);
            }
            None => {
                by_event_id.insert(ev.event_id.clone(), line);
            }
        }
        if ev.ty == "impression" {
            a.impressions += 1;
        }
        if ev.ts + allowed_lateness_ms < max_ts {
            a.late.push(idx);
        }
        max_ts = max_ts.max(ev.ts);
        a.events.push(ev);
    }
    a
}

/// impression id -> (impression events, progress events), by index.
fn by_impression(a: &Analysis) -> HashMap<&str, (Vec<&Ev>, Vec<&Ev>)> {
    let late: HashSet<usize> = a.late.iter().copied().collect();
    let mut map: HashMap<&str, (Vec<&Ev>, Vec<&Ev>)> = HashMap::new();
    for (i, ev) in a.events.iter().enumerate() {
        if late.contains(&i) {
            continue;
        }
        if let Some(imp) = ev.impression_id.as_deref() {
            let entry = map.entry(imp).or_default();
            if ev.ty == "impression" {
                entry.0.push(ev);
            } else {
                entry.1.push(ev);
            }
        }
    }
    map
}

fn qualifies(imp: &Ev, progress: &[&Ev]) -> bool {
    progress
        .iter()
        .any(|p| p.watched_ms.unwrap() >= 2000 && p.ts >= imp.ts && p.ts <= imp.ts + WINDOW_MS)
}

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let (a, sa) = generate(&config(7, 20_000));
    let (b, sb) = generate(&config(7, 20_000));
    assert_eq!(a, b);
    assert_eq!(sa, sb);
    let (c, _) = generate(&config(8, 20_000));
    assert_ne!(a, c);
}

#[test]
fn iterator_and_writer_agree() {
    let cfg = config(3, 5_000);
    let (data, summary) = generate(&cfg);
    let mut generator = Generator::new(&cfg);
    assert_eq!(generator.size_hint(), (5_000, Some(5_000)));
    let mut joined = Vec::new();
    for record in generator.by_ref() {
        assert!(!record.contains(&b'\n'));
        joined.extend_from_slice(&record);
        joined.push(b'\n');
    }
    assert_eq!(joined, data);
    assert_eq!(generator.summary(), summary);
    assert_eq!(summary.records, 5_000);
    assert!(generator.next().is_none());
}

#[test]
fn empty_and_tiny_files() {
    let (data, summary) = generate(&config(1, 0));
    assert!(data.is_empty());
    assert_eq!(summary, GenSummary::default());
    let (data, summary) = generate(&config(1, 1));
    let a = analyse(&data, 5000);
    assert_eq!((a.lines, summary.records), (1, 1));
    // The first record is at exactly start_ts.
    assert_eq!(a.events[0].ts, GenConfig::default().start_ts);
}

#[test]
fn lines_are_valid_and_summary_matches() {
    for seed in [1, 2, 3] {
        let cfg = config(seed, 20_000);
        let (data, summary) = generate(&cfg);
        let a = analyse(&data, cfg.allowed_lateness_ms);
        assert_eq!(a.lines as u64, summary.records);
        assert_eq!(summary.records, 20_000);
        assert_eq!(a.malformed.len() as u64, summary.malformed, "seed {seed}");
        assert_eq!(a.retries.len() as u64, summary.duplicates, "seed {seed}");
        assert_eq!(a.late.len() as u64, summary.late, "seed {seed}");
        assert_eq!(a.impressions, summary.impressions, "seed {seed}");
        // Rates: small, but present.
        assert!(
            summary.malformed >= 19 && summary.malformed < 200,
            "{summary:?}"
        );
        assert!(
            summary.duplicates > 100 && summary.duplicates < 400,
            "{summary:?}"
        );
        assert!(summary.late >= 2 && summary.late < 100, "{summary:?}");
        assert!(summary.impressions > 100, "{summary:?}");
        // The first line is at exactly start_ts; the file spans about
        // events / rate seconds of event time.
        let first = &a.events[0];
        assert_eq!((first.line, first.ts), (0, cfg.start_ts));
        let last = a.events.iter().map(|e| e.ts).max().unwrap();
        let span_s = (last - cfg.start_ts) as f64 / 1000.0;
        assert!((5.0..20.0).contains(&span_s), "span {span_s} s");
        // Stream popularity is skewed.
        let mut per_stream: HashMap<&str, usize> = HashMap::new();
        for ev in &a.events {
            *per_stream.entry(&ev.stream_id).or_default() += 1;
        }
        let mut counts: Vec<usize> = per_stream.values().copied().collect();
        counts.sort_unstable();
        assert!(
            counts.len() >= 15 && counts.len() <= 20,
            "{} streams",
            counts.len()
        );
        assert!(counts[counts.len() - 1] > 5 * counts[0], "{counts:?}");
    }
}

#[test]
fn arrival_stays_within_the_lateness_bound_except_planted_late() {
    for lateness in [5000, 0, 1, 60_000] {
        let cfg = GenConfig {
            allowed_lateness_ms: lateness,
            ..config(11, 20_000)
        };
        let (data, summary) = generate(&cfg);
        let a = analyse(&data, lateness);
        assert_eq!(a.late.len() as u64, summary.late, "lateness {lateness}");
        // Late ones are hours behind the events around them.
        let mut max_ts = 0;
        let late: HashSet<usize> = a.late.iter().copied().collect();
        for (i, ev) in a.events.iter().enumerate() {
            if late.contains(&i) {
                assert!(ev.ts + HOUR_MS <= max_ts + lateness, "{}", ev.event_id);
                assert!(ev.ts + 3 * HOUR_MS >= max_ts, "{}", ev.event_id);
            }
            max_ts = max_ts.max(ev.ts);
        }
        if lateness >= 1000 {
            // The arrival order really is shuffled.
            let inversions = a.events.windows(2).filter(|w| w[1].ts < w[0].ts).count();
            assert!(inversions > 1000, "{inversions} inversions");
        }
    }
}

#[test]
fn no_faults_when_rates_are_zero() {
    let cfg = GenConfig {
        duplicate_rate: 0.0,
        late_rate: 0.0,
        malformed_rate: 0.0,
        ..config(5, 20_000)
    };
    let (data, summary) = generate(&cfg);
    let a = analyse(&data, cfg.allowed_lateness_ms);
    assert_eq!(
        (summary.malformed, summary.duplicates, summary.late),
        (0, 0, 0)
    );
    assert!(a.malformed.is_empty() && a.retries.is_empty() && a.late.is_empty());
    // ...and no impression id is shown twice.
    for (imp, (imps, _)) in by_impression(&a) {
        assert!(imps.len() <= 1, "{imp}");
    }
}

#[test]
fn impressions_qualify_and_never_qualify() {
    let cfg = config(21, 20_000);
    let (data, _) = generate(&cfg);
    let a = analyse(&data, cfg.allowed_lateness_ms);
    let last = a.events.iter().map(|e| e.ts).max().unwrap();
    let map = by_impression(&a);
    let qualified = map
        .values()
        .filter(|(imps, progress)| imps.len() == 1 && qualifies(imps[0], progress))
        .count();
    // Watched for a while (at least 5 s of event time) yet never 2000 ms.
    let stalled = map
        .values()
        .filter(|(imps, progress)| {
            imps.len() == 1
                && imps[0].ts + 5_000 < last
                && !progress.is_empty()
                && progress.iter().all(|p| p.watched_ms.unwrap() < 2000)
        })
        .count();
    assert!(qualified > 10, "{qualified} qualified");
    assert!(stalled > 5, "{stalled} stalled");
    // Cumulative progress never decreases (within one impression shown once).
    for (imps, progress) in map.values() {
        if imps.len() == 1 {
            let mut sorted: Vec<&&Ev> = progress.iter().collect();
            sorted.sort_by_key(|p| p.ts);
            assert!(sorted
                .windows(2)
                .all(|w| w[0].watched_ms <= w[1].watched_ms || w[0].ts == w[1].ts));
        }
    }
}

/// Over more than five minutes of event time: whole ad lifecycles, including
/// the window-boundary plants.
#[test]
fn full_window_lifecycles() {
    let cfg = GenConfig {
        rate: 25,
        ..config(4, 20_000)
    };
    let (data, summary) = generate(&cfg);
    let a = analyse(&data, cfg.allowed_lateness_ms);
    assert_eq!(a.late.len() as u64, summary.late);
    let last = a.events.iter().map(|e| e.ts).max().unwrap();
    assert!(last - cfg.start_ts > 2 * WINDOW_MS);
    let map = by_impression(&a);
    let (mut qualified, mut never, mut slow, mut outside) = (0, 0, 0, 0);
    let (mut at_end, mut past_end) = (false, false);
    for (imps, progress) in map.values() {
        if imps.len() != 1 || imps[0].ts + WINDOW_MS + 130_000 > last {
            continue; // lifecycle not complete in the file
        }
        let imp = imps[0];
        let first_ok = progress
            .iter()
            .filter(|p| p.watched_ms.unwrap() >= 2000)
            .map(|p| p.ts - imp.ts)
            .min();
        match first_ok {
            None => never += 1,
            Some(d) if d <= WINDOW_MS => {
                qualified += 1;
                slow += usize::from(d >= 60_000);
                at_end |= d == WINDOW_MS;
            }
            Some(d) => {
                outside += 1;
                past_end |= d == WINDOW_MS + 1;
            }
        }
        assert_eq!(
            first_ok.is_some_and(|d| d <= WINDOW_MS),
            qualifies(imp, progress)
        );
    }
    let total = (qualified + never + outside) as f64;
    assert!(total > 200.0, "{total} impressions");
    let never_share = never as f64 / total;
    assert!(
        (0.2..0.4).contains(&never_share),
        "never-qualify share {never_share}"
    );
    assert!(slow > 0 && outside > 0, "slow {slow}, outside {outside}");
    assert!(at_end && past_end, "window-boundary plants");
}

const MALFORMED_KINDS: [&str; 19] = [
    "blank",
    "invalid utf-8",
    "lone surrogate",
    "truncated",
    "not json",
    "[1]",
    "not an object",
    "duplicate keys",
    "unknown type",
    "missing field",
    "float ts",
    "string ts",
    "negative ts",
    "negative price",
    "price too large",
    "watched too large",
    "129-byte id",
    "empty id",
    "non-string id",
];

/// What is wrong with a malformed line (`"other"`: none of the known kinds).
fn malformed_kind(line: &[u8]) -> &'static str {
    if line.is_empty() {
        return "blank";
    }
    let Ok(text) = std::str::from_utf8(line) else {
        return "invalid utf-8";
    };
    if text.contains("\\ud800") {
        return "lone surrogate";
    }
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        let truncated = text.starts_with("{\"") && !text.ends_with('}');
        return if truncated { "truncated" } else { "not json" };
    };
    let Value::Object(obj) = value else {
        return if text == "[1]" {
            "[1]"
        } else {
            "not an object"
        };
    };
    let keys = top_level_keys(line);
    if keys.iter().collect::<HashSet<_>>().len() != keys.len() {
        return "duplicate keys";
    }
    let ty = obj.get("type").and_then(Value::as_str).unwrap_or("");
    let Some(expected) = expected_keys(ty) else {
        return if obj.contains_key("type") {
            "unknown type"
        } else {
            "missing field"
        };
    };
    if !expected.iter().all(|k| obj.contains_key(*k)) {
        return "missing field";
    }
    let ts = &obj["ts"];
    let number = |key: &str| obj.get(key).and_then(Value::as_i64);
    if ts.is_f64() {
        "float ts"
    } else if ts.is_string() {
        "string ts"
    } else if number("ts").is_some_and(|t| t < 0) {
        "negative ts"
    } else if number("price_micros").is_some_and(|p| p < 0) {
        "negative price"
    } else if number("price_micros").is_some_and(|p| p > 1_000_000_000_000) {
        "price too large"
    } else if number("watched_ms").is_some_and(|w| w > 86_400_000) {
        "watched too large"
    } else if obj
        .values()
        .any(|v| v.as_str().is_some_and(|s| s.len() > 128))
    {
        "129-byte id"
    } else if obj.values().any(|v| v.as_str() == Some("")) {
        "empty id"
    } else if expected
        .iter()
        .any(|k| k.ends_with("_id") && !obj[*k].is_string())
    {
        "non-string id"
    } else {
        "other"
    }
}

/// The planted edge cases are all in every file of 10 000 records.
#[test]
fn planted_cases_in_every_10k_file() {
    for seed in [0, 1, 2, 3, 42] {
        let cfg = config(seed, 10_000);
        let (data, summary) = generate(&cfg);
        let all = lines(&data);
        let a = analyse(&data, cfg.allowed_lateness_ms);
        assert!(!a.retries.is_empty() && summary.late > 0, "seed {seed}");

        // Malformed kinds: all of them, and nothing else.
        let kinds: HashSet<&str> = a
            .malformed
            .iter()
            .map(|&i| malformed_kind(all[i]))
            .collect();
        for kind in MALFORMED_KINDS {
            assert!(kinds.contains(kind), "seed {seed}: no {kind} line");
        }
        assert!(
            !kinds.contains("other"),
            "seed {seed}: unclassified malformed line"
        );

        // Impression edge cases.
        let map = by_impression(&a);
        let (mut dup_later, mut dup_earlier, mut two_streams, mut progress_first) =
            (false, false, false, false);
        let (mut w2000, mut w1999, mut at_ts) = (false, false, false);
        for (imps, progress) in map.values() {
            let mut distinct: Vec<&&Ev> = Vec::new();
            for imp in imps {
                if !distinct.iter().any(|d| d.event_id == imp.event_id) {
                    distinct.push(imp);
                }
            }
            // The planted copy has the later event id ("e-<n>").
            distinct.sort_by_key(|e| e.event_id[2..].parse::<u64>().unwrap());
            if let [first, second] = distinct[..] {
                if first.stream_id != second.stream_id {
                    two_streams = true;
                } else if second.ts > first.ts {
                    dup_later = true;
                } else if second.ts < first.ts {
                    dup_earlier = true;
                }
            }
            if let (Some(imp), Some(p)) = (imps.first(), progress.first()) {
                progress_first |= p.line < imp.line;
                at_ts |= progress
                    .iter()
                    .any(|p| p.ts == imp.ts && p.watched_ms >= Some(2000));
            }
            w2000 |= progress.iter().any(|p| p.watched_ms == Some(2000));
            w1999 |= !imps.is_empty()
                && progress.iter().any(|p| p.watched_ms == Some(1999))
                && progress.iter().all(|p| p.watched_ms < Some(2000));
        }
        let cases = [
            ("duplicate impression, later ts", dup_later),
            ("duplicate impression, earlier ts", dup_earlier),
            ("impression id on two streams", two_streams),
            ("progress before its impression", progress_first),
            ("watched_ms == 2000", w2000),
            ("watched_ms == 1999, never more", w1999),
            ("qualifying progress at the impression's ts", at_ts),
        ];
        for (name, present) in cases {
            assert!(present, "seed {seed}: no {name}");
        }
    }
}

/// Not a correctness test: `cargo test --release -p livepipe-tools --test
/// generator -- --ignored --nocapture throughput`.
#[test]
#[ignore]
fn throughput() {
    let cfg = config(1, 2_000_000);
    let start = std::time::Instant::now();
    let summary = write_jsonl(&cfg, std::io::sink()).unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} records in {secs:.2} s: {:.0} records/s; {summary:?}",
        summary.records,
        summary.records as f64 / secs
    );
}
