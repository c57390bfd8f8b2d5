//! The live sink over real sockets: JSON routes, JSON 404s, SSE ticks,
//! `/metrics` and `/healthz`, while billing is frozen by a partition that
//! never advances — the creator path does not wait for the frontier.

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use serde_json::Value;
use testkit::http::{get, sse_lines, Response, HTTP_TIMEOUT};
use testkit::kafka::mock_cluster;
use testkit::now_ms;
use testkit::{topic_args, wait_for, Job};

use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer")
}

fn send(producer: &ThreadedProducer<DefaultProducerContext>, partition: i32, record: String) {
    producer
        .send(
            BaseRecord::<(), str>::to("events")
                .partition(partition)
                .payload(&record),
        )
        .map_err(|(err, _)| err)
        .expect("sent");
    producer.flush(Duration::from_secs(10)).expect("flushed");
}

fn join(stream: &str, viewer: &str, ts: u64) -> String {
    format!(
        r#"{{"type":"join","event_id":"j-{viewer}","ts":{ts},"stream_id":"{stream}","viewer_id":"{viewer}"}}"#
    )
}

/// Reads `n` `snapshot` events from an SSE route.
fn snapshots(base: &str, path: &str, n: usize) -> Vec<Value> {
    let mut lines = sse_lines(base, path, HTTP_TIMEOUT);
    let mut events = Vec::new();
    let mut event = String::new();
    while events.len() < n {
        let line = lines.next().expect("stream open").expect("line");
        if let Some(name) = line.strip_prefix("event:") {
            event = name.trim().to_string();
        } else if let Some(data) = line.strip_prefix("data:") {
            if event == "snapshot" {
                events.push(serde_json::from_str(data.trim()).unwrap());
            }
        }
    }
    events
}

#[test]
fn the_live_api_ticks_every_second_while_billing_is_frozen() {
    let cluster = mock_cluster("events", 2);
    let brokers = cluster.bootstrap_servers();
    let producer = producer(&brokers);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("job.log");
    let out = dir.path().join("out");

    // Partition 1 holds one record an hour old and is never idle (a day's
    // idle timeout): billing's watermark cannot pass it.
    let start = now_ms();
    send(&producer, 1, join("frozen", "old", start - 3_600_000));
    send(
        &producer,
        0,
        format!(
            r#"{{"type":"impression","event_id":"i1","ts":{start},"stream_id":"s1","viewer_id":"v0","impression_id":"imp","ad_id":"a","campaign_id":"c","advertiser_id":"d","price_micros":5}}"#
        ),
    );
    let mut args = topic_args(&brokers, "events", &out);
    args.extend([
        "--idle-timeout-ms",
        "86400000",
        "--qualify-window-ms",
        "1000",
    ]);
    let mut job = Job::start(&args, &log);
    let mut viewers = 0;
    let mut add_viewer = || {
        viewers += 1;
        send(&producer, 0, join("s1", &format!("v{viewers}"), now_ms()));
    };
    add_viewer();
    let base = job.addr();
    wait_for(&mut job, LIMIT, "stream s1 on the board", || {
        get(&base, "/api/live/s1").status == 200
    });

    // JSON routes.
    let Response {
        status,
        content_type,
        body,
        ..
    } = get(&base, "/api/live?limit=1");
    assert_eq!(status, 200);
    assert!(content_type.starts_with("application/json"));
    let list: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["stream_id"], "s1", "most viewers first: {body}");
    for field in ["viewers", "chat_per_min", "as_of", "emitted_at"] {
        assert!(list[0][field].is_u64(), "{field} in {body}");
    }
    let Response { status, body, .. } = get(&base, "/api/live/no-such-stream");
    assert_eq!(status, 404);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"], "unknown stream");
    assert_eq!(get(&base, "/api/live/no-such-stream/events").status, 404);
    assert_eq!(get(&base, "/no/such/route").status, 404);
    let Response { status, body, .. } = get(&base, "/");
    assert_eq!(status, 200);
    assert!(body.contains("<html") || body.contains("<!doctype") || body.contains("<!DOCTYPE"));

    // SSE: a snapshot per tick, with fresh counts, although billing's
    // frontier is stuck an hour back.
    let mut seen = Vec::new();
    for _ in 0..3 {
        add_viewer();
        seen.extend(snapshots(&base, "/api/live/s1/events", 2));
    }
    let emitted: Vec<u64> = seen
        .iter()
        .map(|s| s["emitted_at"].as_u64().unwrap())
        .collect();
    assert!(
        emitted.windows(2).all(|w| w[0] <= w[1]),
        "ticks in order: {emitted:?}"
    );
    // Each connection sees the current snapshot, then the next tick's.
    for pair in emitted.chunks(2) {
        assert!(
            pair[0] < pair[1],
            "a new tick on every connection: {emitted:?}"
        );
    }
    let last = seen.last().unwrap();
    assert!(
        last["viewers"].as_u64().unwrap() > seen[0]["viewers"].as_u64().unwrap(),
        "counts move on while billing is frozen: {seen:?}"
    );

    // Billing is frozen: the impression is pending, nothing final.
    let Response {
        status,
        content_type,
        body: metrics,
        ..
    } = get(&base, "/metrics");
    assert_eq!(status, 200);
    assert!(content_type.contains("openmetrics-text"), "{content_type}");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    for line in [
        "livepipe_events_in_total{type=\"join\"}",
        "livepipe_pending_impressions 1",
        "livepipe_billed_total 0",
        "livepipe_partition_offset{topic=\"events\",partition=\"1\"} 1",
        "livepipe_live_ticks_total",
        "livepipe_sse_clients",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    assert!(!out.join("billing").read_dir().unwrap().any(|_| true));
    let Response {
        status,
        body: health,
        ..
    } = get(&base, "/healthz");
    assert_eq!(status, 200, "{health}");

    // An SSE client that stays connected does not keep the job from
    // stopping.
    let mut held = std::net::TcpStream::connect(&base).unwrap();
    std::io::Write::write_all(
        &mut held,
        b"GET /api/live/s1/events HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    job.stop();
}

/// `(status, body)` of a stream's history, the body parsed.
fn history(base: &str, stream: &str) -> (u16, Value) {
    let response = get(base, &format!("/api/live/{stream}/history"));
    assert!(
        response.content_type.starts_with("application/json"),
        "{}",
        response.content_type
    );
    (
        response.status,
        serde_json::from_str(&response.body).unwrap(),
    )
}

#[test]
fn a_streams_history_grows_a_tick_at_a_time_oldest_first() {
    let cluster = mock_cluster("events", 1);
    let brokers = cluster.bootstrap_servers();
    let producer = producer(&brokers);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = topic_args(&brokers, "events", &out);
    args.extend(["--workers", "2"]);
    let mut job = Job::start(&args, &dir.path().join("job.log"));
    send(&producer, 0, join("s1", "v1", now_ms()));
    let base = job.addr();

    let mut points = Vec::new();
    wait_for(&mut job, LIMIT, "three ticks of history", || {
        let (status, body) = history(&base, "s1");
        points = body.as_array().cloned().unwrap_or_default();
        status == 200 && points.len() >= 3
    });
    let ticks = |points: &[Value]| -> Vec<u64> {
        points
            .iter()
            .map(|p| p["emitted_at"].as_u64().unwrap())
            .collect()
    };
    let first = ticks(&points);
    // Each tick once (two workers publish their parts of it), oldest first.
    assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");
    assert!(points.iter().all(|p| p["stream_id"] == "s1"), "{points:?}");
    assert_eq!(points[0]["viewers"], 1, "{points:?}");

    // More ticks, more points: the old ones stay, in front.
    send(&producer, 0, join("s1", "v2", now_ms()));
    let mut later = Vec::new();
    wait_for(&mut job, LIMIT, "more history", || {
        later = ticks(history(&base, "s1").1.as_array().unwrap());
        later.len() >= first.len() + 2
    });
    assert_eq!(&later[..first.len()], &first[..], "{later:?}");
    // One point per tick at most: never more points than seconds of ticks.
    let span = (later.last().unwrap() - later[0]) / 1000 + 2;
    assert!(later.len() as u64 <= span, "{later:?}");

    let response = get(&base, "/api/live/no-such-stream/history");
    assert_eq!(response.status, 404);
    let error: Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!(error["error"], "unknown stream");
    assert_eq!(error["stream_id"], "no-such-stream");
    job.stop();
}
