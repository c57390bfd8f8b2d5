//! A live Kafka rig for the benches: librdkafka's mock cluster in the bench
//! process, generated traffic at a steady rate with `ts` = now, the release
//! binary reading it, and the probes that measure what the users feel.

use livepipe_tools::publish::producer_config;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use testkit::now_ms;

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The release binary on a topic; stopped with SIGTERM on drop.
pub struct Job {
    job: testkit::Job,
    pub base: String,
    pub out: PathBuf,
}

impl Job {
    pub fn start(brokers: &str, topic: &str, dir: &Path, extra: &[&str]) -> Job {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let out = dir.join("out");
        let mut job = testkit::Livepipe::new()
            .log("info")
            .args(["run", "--brokers", brokers, "--topic", topic])
            .args(["--workers", "2", "--http", "127.0.0.1:0", "--out"])
            .arg(&out)
            .args(extra)
            .start(&dir.join("job.log"));
        let base = job.addr();
        Job { job, base, out }
    }

    pub fn pid(&self) -> u32 {
        self.job.pid()
    }

    /// Resident memory of the job, from `/proc`.
    pub fn rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    /// The body of `GET PATH` ("" without an answer).
    pub fn get(&self, path: &str) -> String {
        testkit::http::try_get(&self.base, path)
            .map(|r| r.body)
            .unwrap_or_default()
    }

    /// A gauge or counter from `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        testkit::parse_metric(&self.get("/metrics"), name)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // Killed by `testkit::Job`'s own drop instead while panicking.
        if !std::thread::panicking() {
            let _ = self.job.signal("TERM");
        }
    }
}

/// What the board reader saw: a probe stream first seen, or a board event.
pub enum Seen {
    Probe(String, Instant),
    Board(Instant),
}

/// Reads `/api/board/events`, reporting probe streams as they first show.
pub fn read_board(base: String, seen: mpsc::Sender<Seen>) {
    let mut stream = TcpStream::connect(&base).expect("connect");
    write!(
        stream,
        "GET /api/board/events HTTP/1.1\r\nHost: {base}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut known = HashSet::new();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let at = Instant::now();
        let Ok(board) = serde_json::from_str::<Vec<serde_json::Value>>(data.trim()) else {
            continue;
        };
        if seen.send(Seen::Board(at)).is_err() {
            return;
        }
        for snapshot in board {
            let id = snapshot["stream_id"].as_str().unwrap_or_default();
            if id.starts_with("probe-") && known.insert(id.to_string()) {
                let _ = seen.send(Seen::Probe(id.to_string(), at));
            }
        }
    }
}

/// Probe joins produced every 250 ms on streams of their own, and when each
/// first showed on the board.
pub struct Prober {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
    seen: mpsc::Receiver<Seen>,
    next: u64,
}

/// One phase of probing: latencies and gaps between board events, sorted.
pub struct Phase {
    pub latencies_ms: Vec<f64>,
    pub gaps_ms: Vec<f64>,
}

const PROBE_EVERY: Duration = Duration::from_millis(250);

impl Prober {
    pub fn new(brokers: &str, topic: &str, base: &str) -> Prober {
        let (seen_tx, seen) = mpsc::channel();
        let base = base.to_string();
        std::thread::spawn(move || read_board(base, seen_tx));
        Prober {
            producer: producer_config(brokers, &[])
                .set("linger.ms", "0")
                .create()
                .expect("producer"),
            topic: topic.to_string(),
            seen,
            next: 0,
        }
    }

    /// Probes for `length`, calling `between` every 10 ms or so.
    pub fn phase(&mut self, length: Duration, mut between: impl FnMut()) -> Phase {
        let mut sent: HashMap<String, Instant> = HashMap::new();
        let mut latencies_ms = Vec::new();
        let mut gaps_ms = Vec::new();
        let mut last_board: Option<Instant> = None;
        let started = Instant::now();
        let mut next = Instant::now();
        while started.elapsed() < length {
            if Instant::now() >= next {
                self.next += 1;
                let id = format!("probe-{}", self.next);
                let record = format!(
                    r#"{{"type":"join","event_id":"{id}","ts":{},"stream_id":"{id}","viewer_id":"probe"}}"#,
                    now_ms()
                );
                self.producer
                    .send(
                        BaseRecord::<str, str>::to(&self.topic)
                            .key(&id)
                            .payload(&record),
                    )
                    .map_err(|(err, _)| err)
                    .expect("probe sent");
                self.producer
                    .flush(Duration::from_secs(5))
                    .expect("flushed");
                sent.insert(id, Instant::now());
                next += PROBE_EVERY;
            }
            while let Ok(event) = self.seen.recv_timeout(Duration::from_millis(10)) {
                match event {
                    Seen::Probe(id, at) => {
                        if let Some(when) = sent.remove(&id) {
                            latencies_ms.push(at.duration_since(when).as_secs_f64() * 1e3);
                        }
                    }
                    Seen::Board(at) => {
                        if let Some(last) = last_board.replace(at) {
                            gaps_ms.push(at.duration_since(last).as_secs_f64() * 1e3);
                        }
                    }
                }
            }
            between();
        }
        latencies_ms.sort_by(f64::total_cmp);
        gaps_ms.sort_by(f64::total_cmp);
        Phase {
            latencies_ms,
            gaps_ms,
        }
    }
}

/// Watches a billing directory for completion markers. A period's last
/// impressions are final once the watermark (newest `ts` minus the
/// lateness, and `ts` is the wall clock here) passes its end plus the
/// qualify window; finality latency is how long after that the marker
/// appears.
pub struct FinalityWatch {
    billing: PathBuf,
    /// Wall-clock ms at which the watermark passes `period end + window`,
    /// less the period end: `window + lateness`.
    delay_ms: u64,
    seen: BTreeMap<String, f64>,
    /// Latencies noted since the last [`FinalityWatch::drain_ms`].
    fresh: Vec<f64>,
    started_ms: u64,
}

impl FinalityWatch {
    pub fn new(out: &Path, window_ms: u64, lateness_ms: u64) -> FinalityWatch {
        FinalityWatch {
            billing: out.join("billing"),
            delay_ms: window_ms + lateness_ms,
            seen: BTreeMap::new(),
            fresh: Vec::new(),
            started_ms: now_ms(),
        }
    }

    /// Notes markers that appeared since the last look.
    pub fn look(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.billing) else {
            return;
        };
        let now = now_ms();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if self.seen.contains_key(&name) {
                continue;
            }
            let Some(end) = name
                .strip_suffix(".csv.done")
                .and_then(|n| n.rsplit('-').next())
                .and_then(|end| end.parse::<u64>().ok())
            else {
                continue;
            };
            let due = end - 1 + self.delay_ms;
            // Only periods whose whole window ran while we watched.
            if end > self.started_ms {
                let latency = now as f64 - due as f64;
                self.seen.insert(name, latency);
                self.fresh.push(latency);
            }
        }
    }

    /// Finality latencies in ms noted since the last call, sorted.
    pub fn drain_ms(&mut self) -> Vec<f64> {
        let mut fresh = std::mem::take(&mut self.fresh);
        fresh.sort_by(f64::total_cmp);
        fresh
    }

    /// Finality latencies in ms, sorted.
    pub fn latencies_ms(&self) -> Vec<f64> {
        let mut all: Vec<f64> = self.seen.values().copied().collect();
        all.sort_by(f64::total_cmp);
        all
    }
}
