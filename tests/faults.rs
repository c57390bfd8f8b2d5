//! Faults on one side never take the other down, and never lose or double
//! bill anything (issue 8; docs/operations.md, "Guarantees"):
//!
//! * the billing output refuses writes: live ticks go on, `/healthz` and
//!   `/metrics` say billing is stalled and why, and once the output takes
//!   writes again billing catches up exactly once;
//! * hundreds of SSE clients that never read: billing finalizes everything,
//!   exactly as without them;
//! * the broker goes away mid-run and comes back: `/healthz` says so while
//!   it is away, then the job goes on, losing nothing;
//! * operator mistakes exit 2 and leave the output as it was;
//! * `-X` secrets never reach the logs.
//!
//! All on librdkafka's mock cluster in this process, over TCP.

use rdkafka::mocking::MockCluster;
use serde_json::Value;
use testkit::kafka::{generated_traffic, loaded_mock_topic, publish_all};
use testkit::outputs::{
    assert_ledger_matches, assert_reference, billing_files, reference, wait_for_all_files,
};
use testkit::{dir_bytes, http_get, metric, topic_args, topic_job, wait_for, Job, Livepipe};

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// Only a guard against hanging; nothing here measures speed.
const LIMIT: Duration = Duration::from_secs(180);

fn health(addr: &str) -> Value {
    serde_json::from_str(&http_get(addr, "/healthz").1).unwrap_or(Value::Null)
}

/// Waits until `/healthz` says `degraded` with `part` (`billing`,
/// `input`) starting with `state`.
fn wait_for_degraded(job: &mut Job, addr: &str, part: &str, state: &str) {
    let what = format!("/healthz to report {part} {state}");
    wait_for(job, LIMIT, &what, || {
        let h = health(addr);
        h["status"] == "degraded" && h[part].as_str().is_some_and(|p| p.starts_with(state))
    });
}

/// Waits until the job has assigned its partitions.
fn wait_until_reading(job: &mut Job) {
    let log = job.stderr.clone();
    wait_for(job, LIMIT, "the job to read its partitions", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("reading Kafka partitions")
    });
}

/// Live ticks keep coming: the tick counter moves on over a few seconds.
fn assert_live_ticks(job: &mut Job, addr: &str) {
    let before = metric(addr, "livepipe_live_ticks_total").unwrap_or(0.0);
    wait_for(job, LIMIT, "live ticks to go on", || {
        metric(addr, "livepipe_live_ticks_total").unwrap_or(0.0) >= before + 2.0
    });
}

/// Every marker names its CSV's exact bytes; no temp file is left.
fn assert_files_whole(out: &Path) {
    let all = dir_bytes(&out.join("billing"));
    assert!(
        all.keys().all(|name| !name.starts_with('.')),
        "temp files left: {:?}",
        all.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &all {
        if let Some(csv) = name.strip_suffix(".done") {
            let marker: Value = serde_json::from_slice(bytes).unwrap();
            let sum = {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&all[csv]))
            };
            assert_eq!(marker["sha256"].as_str(), Some(sum.as_str()), "{name}");
        }
    }
}

/// A job on a loaded mock topic, serving HTTP, with the reference's answer.
struct Rig {
    _dir: tempfile::TempDir,
    cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    want: testkit::reference::Expected,
    out: std::path::PathBuf,
    job: Job,
    addr: String,
}

impl Rig {
    fn start(events: u64, seed: u64, partitions: i32) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let records = generated_traffic(events, seed);
        let want = reference(&records);
        let cluster = loaded_mock_topic(&records, partitions);
        let out = dir.path().join("out");
        let log = dir.path().join("job.log");
        let mut job = topic_job(&cluster.bootstrap_servers(), "events", "2", &out, &log);
        let addr = job.addr();
        wait_until_reading(&mut job);
        Rig {
            _dir: dir,
            cluster,
            want,
            out,
            job,
            addr,
        }
    }

    /// Waits for every expected file, stops the job, and checks the files
    /// against the reference and the ledger against the files.
    fn finish(mut self) {
        wait_for_all_files(&mut self.job, &self.out, &self.want, LIMIT);
        self.job.stop();
        let files = billing_files(&self.out);
        assert_reference(&files, &self.want);
        assert_ledger_matches(&self.out, &files);
        assert_files_whole(&self.out);
    }
}

#[test]
fn a_billing_output_that_refuses_writes_stalls_billing_only_then_catches_up_exactly_once() {
    let mut rig = Rig::start(60_000, 81, 4);
    let addr = rig.addr.clone();
    // The billing directory stops taking files: it is moved aside and a
    // plain file takes its name (a real filesystem fault; permissions would
    // not stop root).
    let billing = rig.out.join("billing");
    let aside = rig.out.join("billing.aside");
    std::fs::rename(&billing, &aside).unwrap();
    std::fs::write(&billing, b"in the way").unwrap();

    wait_for_degraded(&mut rig.job, &addr, "billing", "stalled");
    let said = health(&addr);
    assert!(
        said["billing"].as_str().unwrap().contains("directory"),
        "the cause is named: {said}"
    );
    assert_eq!(metric(&addr, "livepipe_billing_stalled"), Some(1.0));
    // Creators do not notice: ticks go on, the board is served.
    assert_live_ticks(&mut rig.job, &addr);
    assert_eq!(http_get(&addr, "/api/live").0, 200);
    assert_eq!(http_get(&addr, "/healthz").0, 200);

    // The output takes writes again: billing catches up on its own.
    std::fs::remove_file(&billing).unwrap();
    std::fs::rename(&aside, &billing).unwrap();
    wait_for(&mut rig.job, LIMIT, "the stall to clear", || {
        health(&addr)["billing"] == "running"
    });
    assert_eq!(metric(&addr, "livepipe_billing_stalled"), Some(0.0));
    rig.finish();
}

#[test]
fn sse_clients_that_never_read_neither_stall_nor_change_billing() {
    let mut rig = Rig::start(60_000, 82, 4);
    let addr = rig.addr.clone();
    // 300 clients on the board stream and on one stream's events, none of
    // which ever reads a byte.
    let mut idle = Vec::new();
    for i in 0..300 {
        let path = if i % 2 == 0 {
            "/api/board/events"
        } else {
            "/api/live/stream-1/events"
        };
        let mut stream = TcpStream::connect(&addr).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        idle.push(stream);
    }
    wait_for(&mut rig.job, LIMIT, "the idle clients to be served", || {
        metric(&addr, "livepipe_sse_clients").unwrap_or(0.0) >= 150.0
    });
    wait_for_all_files(&mut rig.job, &rig.out, &rig.want, LIMIT);
    assert_live_ticks(&mut rig.job, &addr);
    rig.finish();
    drop(idle);
}

#[test]
fn a_broker_outage_is_reported_and_loses_nothing() {
    // The mock keeps ~5 MiB per partition: 8 of them hold 150k records.
    let mut rig = Rig::start(150_000, 83, 8);
    let addr = rig.addr.clone();
    rig.cluster.broker_down(1).expect("broker down");
    wait_for_degraded(&mut rig.job, &addr, "input", "waiting");
    assert_eq!(metric(&addr, "livepipe_input_unreachable"), Some(1.0));
    assert_live_ticks(&mut rig.job, &addr);
    rig.cluster.broker_up(1).expect("broker up");
    wait_for(
        &mut rig.job,
        LIMIT,
        "/healthz to report reading again",
        || health(&addr)["input"] == "reading",
    );
    // The log says it once each way, not once per reconnect attempt, and
    // holds no librdkafka statistics dump (those are DEBUG).
    let log = rig.job.log();
    let down = log.matches("Kafka: brokers unreachable").count();
    let up = log.matches("Kafka: brokers reachable again").count();
    assert!(
        down >= 1 && up >= 1,
        "the outage and the recovery logged:\n{log}"
    );
    assert!(up <= down && down <= up + 1, "paired changes:\n{log}");
    assert!(down <= 3, "one line per change, not per retry:\n{log}");
    assert!(!log.contains("Client stats"), "statistics at INFO:\n{log}");
    rig.finish();
}

#[test]
fn operator_mistakes_exit_2_and_leave_the_output_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let records = generated_traffic(20_000, 84);
    let want = reference(&records);
    let cluster = MockCluster::new(1).expect("mock cluster");
    for topic in ["events", "other"] {
        cluster.create_topic(topic, 2, 1).expect("topic");
        publish_all(&cluster.bootstrap_servers(), topic, &records);
    }
    let brokers = cluster.bootstrap_servers();
    let out = dir.path().join("out");
    let mut job = topic_job(&brokers, "events", "2", &out, &dir.path().join("a.log"));
    wait_for_all_files(&mut job, &out, &want, LIMIT);
    job.stop();
    let before = dir_bytes(&out.join("billing"));
    let livepipe = |args: &[&str]| Livepipe::new().args(args).output();

    // Another topic into an --out whose ledger belongs to this one.
    let other = livepipe(&topic_args(&brokers, "other", &out));
    let said = testkit::refused(&other);
    assert!(said.contains("belongs to another input"), "{said}");
    assert!(said.contains("fresh --out"), "says what to do: {said}");

    // A port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let fresh = dir.path().join("fresh");
    let busy = livepipe(&[
        "run",
        "--brokers",
        &brokers,
        "--topic",
        "events",
        "--http",
        &port,
        "--out",
        fresh.to_str().unwrap(),
    ]);
    let said = testkit::refused(&busy);
    assert!(
        said.contains("cannot listen") && said.contains("127.0.0.1:0"),
        "{said}"
    );
    assert!(
        !fresh.exists(),
        "nothing written for a job that did not start"
    );

    // An input that cannot be read.
    let unreadable = livepipe(&[
        "run",
        "--input",
        dir.path().to_str().unwrap(),
        "--out",
        fresh.to_str().unwrap(),
    ]);
    assert_eq!(unreadable.status.code(), Some(2));
    assert!(!fresh.exists());

    assert_eq!(
        dir_bytes(&out.join("billing")),
        before,
        "the output is as it was"
    );
}

#[test]
fn kafka_secrets_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let records = generated_traffic(5_000, 85);
    let cluster = loaded_mock_topic(&records, 2);
    let secret = "hunter2-do-not-log";
    let property = format!("sasl.password={secret}");
    // The same secret from a properties file, which keeps it off the
    // command line.
    let config = dir.path().join("kafka.properties");
    std::fs::write(
        &config,
        format!("# client secrets\nssl.key.password = {secret}\n"),
    )
    .unwrap();
    let log = dir.path().join("job.log");
    let out = dir.path().join("out");
    let brokers = cluster.bootstrap_servers();
    let mut args = topic_args(&brokers, "events", &out);
    args.extend(["--kafka-config", config.to_str().unwrap(), "-X", &property]);
    let mut job = Job::start(&args, &log);
    wait_until_reading(&mut job);
    std::thread::sleep(Duration::from_secs(2));
    job.send("TERM");
    let text = job.log();
    let _ = job.wait(LIMIT);
    assert!(!text.contains(secret), "a secret in the log:\n{text}");
    // A property librdkafka refuses is named without its value.
    let refused = Livepipe::new()
        .args(["run", "--brokers", "127.0.0.1:1", "-X"])
        .arg(format!("no.such.password={secret}"))
        .output();
    let said = testkit::refused(&refused);
    assert!(!said.contains(secret), "{said}");
    // A properties file with a line that is not KEY=VALUE: named by line.
    std::fs::write(&config, format!("{secret}\n")).unwrap();
    let malformed = Livepipe::new()
        .args(["run", "--brokers", "127.0.0.1:1", "--kafka-config"])
        .arg(&config)
        .output();
    let said = testkit::refused(&malformed);
    assert!(said.contains("line 1 is not KEY=VALUE"), "{said}");
    assert!(!said.contains(secret), "{said}");
}
