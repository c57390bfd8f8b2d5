//! The job as a multi-process timely cluster on loopback: two processes of
//! one worker each read a file or a topic, and process 0's `--out` must hold
//! billing files identical to one process's and to the independent
//! reference. Then stopping and failing: SIGTERM to either process stops
//! both as one (nothing finalized that was not final, no lost peer
//! reported), a killed process takes the other down with a message naming
//! it, and a full restart resumes exactly once from process 0's ledger,
//! the billing files the reference's byte for byte. Also the
//! start-up mistakes: a missing peer, a peer of another job, a missing or
//! short secret. And the cluster port under attack: clients without the
//! secret (garbage, a hello with the right settings, a wrong proof, a byte
//! at a time) and a real process with the wrong secret neither stop
//! process 0, learn the job's settings, nor join, and the real process 1
//! still joins; the secret is never logged.

use serde_json::Value;
use testkit::kafka::{generated_traffic, loaded_mock_topic};
use testkit::outputs::{
    assert_ledger_matches, assert_reference, billing_files, reference, wait_for_all_files,
};
use testkit::reference::{expected, expected_live, Expected, Rules};
use testkit::{http_get, run_input, wait_for, Job, Livepipe};

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Only a guard against hanging; nothing here measures speed.
const LIMIT: Duration = Duration::from_secs(180);

/// Free loopback ports, one per process.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A two-process cluster's hostfile, secret and HTTP ports.
struct Layout {
    hostfile: PathBuf,
    /// The `--cluster-secret-file`, and what it holds.
    secret_file: PathBuf,
    secret: String,
    /// Process 0's cluster port.
    cluster: u16,
    http: Vec<u16>,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        let ports = free_ports(4);
        let hostfile = dir.join("hosts");
        std::fs::write(
            &hostfile,
            format!(
                "# two processes on loopback\n127.0.0.1:{}\n127.0.0.1:{}\n",
                ports[0], ports[1]
            ),
        )
        .unwrap();
        let secret = format!("cluster-test-secret-{}-{}", ports[0], ports[1]);
        let secret_file = dir.join("cluster-secret");
        // A trailing newline, as `base64 > FILE` leaves: it is trimmed.
        std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
        Layout {
            hostfile,
            secret_file,
            secret,
            cluster: ports[0],
            http: ports[2..].to_vec(),
        }
    }

    /// `livepipe run ARGS` as process `process` of 2, one worker.
    fn start(&self, process: usize, args: &[&str], out: &Path, log: &Path) -> Job {
        self.start_with_secret(process, args, out, log, &self.secret_file)
    }

    /// [`Layout::start`] with another `--cluster-secret-file`.
    fn start_with_secret(
        &self,
        process: usize,
        args: &[&str],
        out: &Path,
        log: &Path,
        secret_file: &Path,
    ) -> Job {
        let process_flag = process.to_string();
        let http = format!("127.0.0.1:{}", self.http[process]);
        let mut all: Vec<&str> = vec!["run"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[
            "--workers",
            "1",
            "--processes",
            "2",
            "--process",
            &process_flag,
            "--hostfile",
            self.hostfile.to_str().unwrap(),
            "--cluster-secret-file",
            secret_file.to_str().unwrap(),
            "--http",
            &http,
            "--out",
            out.to_str().unwrap(),
        ]);
        Job::start(&all, log)
    }
}

fn write_records(path: &Path, records: &[Vec<u8>]) {
    let mut bytes = Vec::new();
    for record in records {
        bytes.extend_from_slice(record);
        bytes.push(b'\n');
    }
    std::fs::write(path, bytes).unwrap();
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn get(port: u16, path: &str) -> (u16, String) {
    http_get(&format!("127.0.0.1:{port}"), path)
}

#[test]
fn two_processes_replay_a_file_like_the_reference_and_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let records = generated_traffic(120_000, 61);
    let input = dir.path().join("events.jsonl");
    write_records(&input, &records);
    let want = reference(&records);
    assert!(want.files.len() > 1);
    let input = input.to_str().unwrap();

    let single = dir.path().join("single");
    run_input(input, &single, &["--workers", "2"]);

    // Process 1 first: the order the processes start in does not matter.
    let layout = Layout::new(dir.path());
    let (out0, out1) = (dir.path().join("out0"), dir.path().join("out1"));
    let one = layout.start(1, &["--input", input], &out1, &dir.path().join("p1.log"));
    std::thread::sleep(Duration::from_millis(700));
    let zero = layout.start(0, &["--input", input], &out0, &dir.path().join("p0.log"));
    let (log0, log1) = (zero.stderr.clone(), one.stderr.clone());
    let status0 = zero.wait(LIMIT);
    let status1 = one.wait(LIMIT);
    assert!(
        status0.success(),
        "process 0: {status0}\n{}",
        lines(&log0).join("\n")
    );
    assert!(
        status1.success(),
        "process 1: {status1}\n{}",
        lines(&log1).join("\n")
    );

    // One billing output, in process 0's --out: the reference's files, and
    // byte for byte those of one process with two workers.
    let files = billing_files(&out0);
    assert_reference(&files, &want);
    assert_eq!(files, billing_files(&single), "cluster vs one process");
    assert_ledger_matches(&out0, &files);
    assert!(!out1.join("billing").exists() && !out1.join("ledger.sqlite").exists());

    // live.json gathers every stream, with the numbers one process gives
    // (each process's workers counted their own streams on one clock).
    let (now, want_live) =
        expected_live(&records.iter().map(|r| &r[..]).collect::<Vec<_>>(), 30_000);
    let live: Vec<Value> =
        serde_json::from_slice(&std::fs::read(out0.join("live.json")).unwrap()).unwrap();
    let got_live: BTreeMap<String, (u64, u64)> = live
        .iter()
        .map(|s| {
            assert_eq!(s["as_of"].as_u64(), Some(now));
            (
                s["stream_id"].as_str().unwrap().to_string(),
                (
                    s["viewers"].as_u64().unwrap(),
                    s["chat_per_min"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got_live, want_live, "live.json");
    assert!(!out1.join("live.json").exists());

    // Each process dead-letters what its workers parsed: together, exactly
    // one process's dead letters.
    let mut rejected: Vec<String> = lines(&out0.join("rejected.jsonl"));
    let theirs = lines(&out1.join("process-1").join("rejected.jsonl"));
    assert!(!theirs.is_empty(), "process 1 parsed some of the file");
    rejected.extend(theirs);
    rejected.sort();
    let mut alone = lines(&single.join("rejected.jsonl"));
    alone.sort();
    assert_eq!(rejected, alone, "dead letters");
}

/// Two processes reading a loaded 4-partition mock topic, each with its
/// own `--out`, and the reference's answer for the records.
struct TopicCluster {
    dir: tempfile::TempDir,
    _broker: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    brokers: String,
    records: Vec<Vec<u8>>,
    want: testkit::reference::Expected,
    layout: Layout,
    out: [PathBuf; 2],
}

impl TopicCluster {
    fn new(events: u64, seed: u64) -> TopicCluster {
        let dir = tempfile::tempdir().unwrap();
        let records = generated_traffic(events, seed);
        let want = reference(&records);
        let broker = loaded_mock_topic(&records, 4);
        let brokers = broker.bootstrap_servers();
        let layout = Layout::new(dir.path());
        let out = [dir.path().join("out0"), dir.path().join("out1")];
        TopicCluster {
            dir,
            _broker: broker,
            brokers,
            records,
            want,
            layout,
            out,
        }
    }

    /// Process `process` on the topic, logging to `<log>.log`.
    fn start(&self, process: usize, log: &str) -> Job {
        let args = [
            "--brokers",
            &self.brokers,
            "--topic",
            "events",
            "--idle-timeout-ms",
            "1000",
        ];
        let log = self.dir.path().join(format!("{log}.log"));
        self.layout.start(process, &args, &self.out[process], &log)
    }

    /// Both processes started afresh on the `--out`s of the earlier runs:
    /// they resume from process 0's ledger, and once stopped together the
    /// billing files and the ledger are the reference's.
    fn restart_to_the_reference(&self) {
        let (want, out0) = (&self.want, &self.out[0]);
        let mut zero = self.start(0, "final-p0");
        let mut one = self.start(1, "final-p1");
        // Formed before anything else: the earlier rounds' files may all be
        // there already, and a stop before a process is up is not the stop
        // this checks.
        for job in [&mut zero, &mut one] {
            wait_formed(job);
        }
        wait_for_all_files(&mut zero, out0, want, LIMIT);
        stop_together(vec![zero, one]);
        let files = billing_files(out0);
        assert_reference(&files, want);
        assert_ledger_matches(out0, &files);
    }
}

/// SIGTERM to every process at once, as an orchestrator stops a cluster:
/// each exits 0.
fn stop_together(jobs: Vec<Job>) {
    for job in &jobs {
        job.send("TERM");
    }
    for job in jobs {
        let log = job.stderr.clone();
        let status = job.wait(LIMIT);
        assert!(
            status.success(),
            "exit {status} after SIGTERM:\n{}",
            lines(&log).join("\n")
        );
    }
}

#[test]
fn two_processes_read_a_topic_like_the_reference() {
    let topic = TopicCluster::new(60_000, 62);
    let (layout, want, [out0, out1]) = (&topic.layout, &topic.want, &topic.out);
    let mut zero = topic.start(0, "p0");
    let mut one = topic.start(1, "p1");
    wait_for_all_files(&mut zero, out0, want, LIMIT);
    one.assert_running();

    // The dashboard is process 0's and shows every stream, wherever it was
    // counted; process 1 serves its own health and metrics only.
    let streams: BTreeSet<String> = expected_live(
        &topic.records.iter().map(|r| &r[..]).collect::<Vec<_>>(),
        30_000,
    )
    .1
    .into_keys()
    .collect();
    wait_for(
        &mut zero,
        LIMIT,
        "every stream on process 0's board",
        || {
            let (status, body) = get(layout.http[0], "/api/live");
            let board: Vec<Value> = serde_json::from_str(&body).unwrap_or_default();
            status == 200 && board.len() == streams.len()
        },
    );
    assert_eq!(get(layout.http[1], "/healthz").0, 200);
    let (status, metrics) = get(layout.http[1], "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("livepipe_events_in_total"), "{metrics}");
    assert_eq!(get(layout.http[1], "/api/live").0, 404);

    // Stopped together, both exit 0.
    stop_together(vec![zero, one]);
    let files = billing_files(out0);
    assert_reference(&files, want);
    assert_ledger_matches(out0, &files);
    assert!(!out1.join("billing").exists());
}

#[test]
fn a_lost_process_stops_the_other_and_a_full_restart_bills_exactly_once() {
    let topic = TopicCluster::new(60_000, 63);
    let out0 = &topic.out[0];

    // Each process in turn is killed (SIGKILL) mid-run, without a word to
    // its peer: the survivor exits 1 naming it.
    for (round, victim) in [(0, 1usize), (1, 0)] {
        let mut jobs = vec![
            topic.start(0, &format!("r{round}-p0")),
            topic.start(1, &format!("r{round}-p1")),
        ];
        for job in jobs.iter_mut() {
            wait_formed(job);
        }
        std::thread::sleep(Duration::from_millis(1_500));
        let survivor = jobs.remove(1 - victim);
        let mut victim_job = jobs.remove(0);
        victim_job.signal("KILL");
        let (status, said) = survivor.finish(LIMIT);
        assert_eq!(
            status.code(),
            Some(1),
            "round {round}: survivor exit\n{said}"
        );
        let named = format!("lost process {victim} (127.0.0.1:");
        assert!(
            said.contains(&named),
            "round {round}: names the lost peer\n{said}"
        );
        eprintln!(
            "round {round}: {} billing files so far",
            billing_files(out0).len()
        );
    }

    // A full restart resumes from process 0's ledger and bills exactly once.
    topic.restart_to_the_reference();
}

/// Waits until `job` has logged that the cluster formed.
fn wait_formed(job: &mut Job) {
    let path = job.stderr.clone();
    wait_for(job, LIMIT, "the cluster to form", || {
        lines(&path).iter().any(|l| l.contains("cluster formed"))
    });
}

/// Every billing CSV in `out` so far is the reference's, byte for byte: a
/// stop finalized nothing that was not final. (A CSV may still lack its
/// marker; it is whole all the same, renamed into place.)
fn assert_only_final(out: &Path, want: &Expected, round: &str) {
    let files = billing_files(out);
    let csvs: Vec<&String> = files.keys().filter(|n| n.ends_with(".csv")).collect();
    for name in &csvs {
        assert!(
            want.files.get(*name) == Some(&files[*name]),
            "{round}: {name} is not the reference's"
        );
    }
    eprintln!("{round}: {} billing files so far", csvs.len());
}

/// After a stop that one process got: the signalled process and its peer
/// both exit with `code`, the peer saying who stopped it and neither
/// reporting a lost peer.
fn assert_stopped_as_one(jobs: Vec<Job>, victim: usize, code: i32, round: &str) {
    for (process, job) in jobs.into_iter().enumerate() {
        let (status, said) = job.finish(LIMIT);
        assert_eq!(
            status.code(),
            Some(code),
            "{round}: process {process} exit\n{said}"
        );
        assert!(
            !said.contains("lost process"),
            "{round}: process {process}\n{said}"
        );
        if process != victim {
            let told = format!("process {victim} (127.0.0.1:");
            assert!(
                said.contains(&told) && said.contains("was told to stop"),
                "{round}: process {process} names who stopped it\n{said}"
            );
        }
    }
}

/// An orchestrator stops a cluster's pods one at a time: SIGTERM to either
/// process stops both, each exiting 0 as if it had been signalled itself,
/// with nothing finalized that was not final; a full restart resumes and
/// the billing files are the reference's.
#[test]
fn sigterm_to_either_process_stops_a_topic_cluster_as_one() {
    let topic = TopicCluster::new(60_000, 66);
    let (want, out0) = (&topic.want, &topic.out[0]);
    for (round, victim) in [(0, 1usize), (1, 0)] {
        let round = format!("round {round}, SIGTERM to process {victim}");
        let mut jobs = vec![topic.start(0, "p0"), topic.start(1, "p1")];
        for job in jobs.iter_mut() {
            wait_formed(job);
        }
        // A topic never ends: any moment is mid-run. The first round waits
        // for billing to be under way; the second has little left to bill
        // (the loaded topic's watermark stops where it ends), so it only
        // lets the cluster read for a moment.
        if round.starts_with("round 0") {
            wait_for(&mut jobs[0], LIMIT, "the first billing file", || {
                !billing_files(out0).is_empty()
            });
        } else {
            std::thread::sleep(Duration::from_millis(1_500));
        }
        jobs[victim].send("TERM");
        assert_stopped_as_one(jobs, victim, 0, &round);
        assert_only_final(out0, want, &round);
    }
    topic.restart_to_the_reference();
}

/// Two processes replaying one file, each with its own `--out`, and the
/// reference's answer. 50 ms periods: some 5,000 files, each fsynced, so
/// that process 0 writes them for seconds after the dataflow has ended; a
/// 10 s window, so that impressions become final (and files are written)
/// from the first seconds of the file's 500 s on.
struct FileCluster {
    dir: tempfile::TempDir,
    input: PathBuf,
    want: Expected,
    layout: Layout,
    out: [PathBuf; 2],
}

impl FileCluster {
    fn new(events: u64, seed: u64) -> FileCluster {
        let dir = tempfile::tempdir().unwrap();
        let records = generated_traffic(events, seed);
        let input = dir.path().join("events.jsonl");
        write_records(&input, &records);
        let rules = Rules {
            period: 50,
            window: 10_000,
            ..Rules::DEFAULTS
        };
        let lines_in: Vec<&[u8]> = records.iter().map(|r| &r[..]).collect();
        let want = expected(&lines_in, rules);
        let layout = Layout::new(dir.path());
        let out = [dir.path().join("out0"), dir.path().join("out1")];
        FileCluster {
            dir,
            input,
            want,
            layout,
            out,
        }
    }

    /// Process `process` on the file, logging to `<log>.log`.
    fn start(&self, process: usize, log: &str) -> Job {
        let args = [
            "--input",
            self.input.to_str().unwrap(),
            "--billing-period-ms",
            "50",
            "--qualify-window-ms",
            "10000",
        ];
        let log = self.dir.path().join(format!("{log}.log"));
        self.layout.start(process, &args, &self.out[process], &log)
    }

    /// Both processes run again to the end of the file: they resume from
    /// process 0's ledger, and the billing files and the ledger are the
    /// reference's.
    fn restart_to_the_reference(&self) {
        for job in [self.start(0, "final-p0"), self.start(1, "final-p1")] {
            let (status, said) = job.finish(LIMIT);
            assert!(status.success(), "restart: {status}\n{said}");
        }
        let files = billing_files(&self.out[0]);
        let csvs: BTreeMap<_, _> = files
            .iter()
            .filter(|(n, _)| n.ends_with(".csv"))
            .map(|(n, b)| (n.clone(), b.clone()))
            .collect();
        assert_eq!(csvs, self.want.files);
        assert_ledger_matches(&self.out[0], &files);
    }
}

/// The same on a file input, stopped mid-run: both processes stop as one,
/// each exiting 1 like a single process whose file run is stopped before
/// its end (exit 0 would say the input was finished), neither reporting a
/// lost peer. A restart of both reads the file to its end, and the billing
/// files equal the reference byte for byte.
#[test]
fn sigterm_to_either_process_stops_a_file_cluster_as_one() {
    let cluster = FileCluster::new(200_000, 67);
    for (round, victim) in [(0, 1usize), (1, 0)] {
        let round = format!("round {round}, SIGTERM to process {victim}");
        let mut jobs = vec![cluster.start(0, "p0"), cluster.start(1, "p1")];
        for job in jobs.iter_mut() {
            wait_formed(job);
        }
        // The first round waits for billing to be under way (the files
        // trail the dataflow: this may be while the workers still read or
        // while process 0 writes files after its end, which a stop must
        // reach all the same); the second stops at once.
        if round.starts_with("round 0") {
            wait_for(&mut jobs[0], LIMIT, "the first billing file", || {
                !billing_files(&cluster.out[0]).is_empty()
            });
        }
        jobs[victim].send("TERM");
        assert_stopped_as_one(jobs, victim, 1, &round);
        assert_only_final(&cluster.out[0], &cluster.want, &round);
    }
    cluster.restart_to_the_reference();
}

/// A process that has read its part of a file waits for the rest of the
/// cluster, and a stop still reaches every process then: while process 0's
/// billing output refuses writes (its sink retrying, the dataflow done),
/// SIGTERM to process 1 stops both, each exiting 1 (the billing files are
/// not complete). Once the output takes writes again, a restart completes
/// them exactly.
#[test]
fn a_stop_reaches_process_0_while_it_still_writes_billing_files() {
    let cluster = FileCluster::new(200_000, 68);
    let mut jobs = vec![cluster.start(0, "p0"), cluster.start(1, "p1")];
    for job in jobs.iter_mut() {
        wait_formed(job);
    }
    // The billing directory stops taking files: it is moved aside and a
    // plain file takes its name (permissions would not stop root).
    let billing = cluster.out[0].join("billing");
    let aside = cluster.out[0].join("billing.aside");
    std::fs::rename(&billing, &aside).unwrap();
    std::fs::write(&billing, b"in the way").unwrap();
    let health = cluster.layout.http[0];
    wait_for(&mut jobs[0], LIMIT, "process 0's billing to stall", || {
        get(health, "/healthz").1.contains("\"billing\":\"stalled")
    });
    let log = jobs[1].stderr.clone();
    wait_for(&mut jobs[1], LIMIT, "process 1 to finish its part", || {
        lines(&log)
            .iter()
            .any(|l| l.contains("part of the job is done"))
    });

    jobs[1].send("TERM");
    assert_stopped_as_one(jobs, 1, 1, "stalled");
    std::fs::remove_file(&billing).unwrap();
    std::fs::rename(&aside, &billing).unwrap();
    assert_only_final(&cluster.out[0], &cluster.want, "stalled");
    cluster.restart_to_the_reference();
}

#[test]
fn a_process_whose_peer_never_comes_gives_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    write_records(&input, &generated_traffic(100, 64));
    let layout = Layout::new(dir.path());
    let out = dir.path().join("out");
    let job = Job::start(
        &[
            "run",
            "--input",
            input.to_str().unwrap(),
            "--workers",
            "1",
            "--processes",
            "2",
            "--process",
            "1",
            "--hostfile",
            layout.hostfile.to_str().unwrap(),
            "--cluster-secret-file",
            layout.secret_file.to_str().unwrap(),
            "--cluster-timeout",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
        &dir.path().join("p1.log"),
    );
    let (status, said) = job.finish(LIMIT);
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains("gave up forming the cluster after 2 s"),
        "{said}"
    );
    assert!(said.contains("process 0 (127.0.0.1:"), "{said}");
}

#[test]
fn a_peer_started_with_other_flags_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    write_records(&input, &generated_traffic(100, 65));
    let input = input.to_str().unwrap();
    let layout = Layout::new(dir.path());
    let zero = layout.start(
        0,
        &["--input", input],
        &dir.path().join("out0"),
        &dir.path().join("p0.log"),
    );
    let one = layout.start(
        1,
        &["--input", input, "--qualify-ms", "3000"],
        &dir.path().join("out1"),
        &dir.path().join("p1.log"),
    );
    for job in [zero, one] {
        let (status, said) = job.finish(LIMIT);
        assert_eq!(status.code(), Some(2), "{said}");
        assert!(said.contains("--qualify-ms"), "{said}");
    }
    // Refused before any data moved: nothing billed.
    assert!(billing_files(&dir.path().join("out0")).is_empty());
}

#[test]
fn cluster_flags_are_checked_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1:7400\n127.0.0.1:7401\n").unwrap();
    let hosts = hosts.to_str().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let secret = secret.to_str().unwrap();
    let short = dir.path().join("short-secret");
    std::fs::write(&short, "hunter2-hunter\n").unwrap();
    let short = short.to_str().unwrap();
    let with_secret = ["--cluster-secret-file", secret];
    let cases: [(&[&str], &[&str], &str); 7] = [
        (
            &["--processes", "3", "--process", "0"],
            &with_secret,
            "lists 2 processes",
        ),
        (
            &["--processes", "2", "--process", "2"],
            &with_secret,
            "out of range",
        ),
        (&["--processes", "2"], &with_secret, "--process"),
        (
            &["--processes", "2", "--process", "0"],
            &with_secret,
            "demo runs as one process",
        ),
        // A cluster needs a secret, and says how to make one.
        (
            &["--processes", "2", "--process", "0"],
            &[],
            "head -c 32 /dev/urandom | base64",
        ),
        (
            &["--processes", "2", "--process", "0"],
            &["--cluster-secret-file", short],
            "fewer than 16",
        ),
        (
            &["--processes", "2", "--process", "0"],
            &["--cluster-secret-file", "/nonexistent/secret"],
            "--cluster-secret-file /nonexistent/secret: cannot read",
        ),
    ];
    for (flags, secret_flags, hint) in cases {
        let mut args = vec!["run", "--out", dir.path().to_str().unwrap()];
        args.extend_from_slice(flags);
        args.extend_from_slice(secret_flags);
        if flags.len() > 2 {
            args.extend_from_slice(&["--hostfile", hosts]);
        }
        let output = Livepipe::new().args(&args).output();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(hint), "{args:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "echoed a secret: {stderr}");
    }
}

/// What a client got from process 0's cluster port after sending `bytes`:
/// everything until process 0 closed the connection.
fn poke(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Only a guard against hanging: process 0 closes within seconds.
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let _ = stream.write_all(bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Until EOF, or a reset (it closes with our bytes unread).
    while let Ok(read @ 1..) = stream.read(&mut buf) {
        got.extend_from_slice(&buf[..read]);
    }
    got
}

/// Whether `got` holds anything of the job's settings (its hello).
fn holds_settings(got: &[u8], input: &str) -> bool {
    let text = String::from_utf8_lossy(got);
    text.contains("--qualify") || text.contains(input) || text.contains("shape")
}

/// A client that connects to `port` and sends a plausible hello header
/// one byte at a time, reconnecting whenever it is cut off, until stopped.
/// Returns what it received from the port, all connections together.
fn trickle(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut got = Vec::new();
        // An old-style hello announcing 1000 bytes, then the body, slowly.
        let mut bytes = b"livepipe\0\0\x03\xe8".to_vec();
        bytes.extend(std::iter::repeat_n(b'{', 1000));
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
                std::thread::sleep(Duration::from_millis(300));
                continue;
            };
            stream
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            for byte in &bytes {
                if stop.load(Ordering::Relaxed) || stream.write_all(&[*byte]).is_err() {
                    break;
                }
                let mut buf = [0u8; 256];
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(read) => got.extend_from_slice(&buf[..read]),
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        }
        got
    })
}

/// Process 0 of a two-process file job, listening for process 1.
struct Waiting {
    layout: Layout,
    input: String,
    want: testkit::reference::Expected,
    log0: PathBuf,
}

impl Waiting {
    /// Generated traffic (`events`, `seed`) in a file under `dir`, and
    /// process 0 started on it, once it waits for its peer.
    fn start(dir: &Path, events: u64, seed: u64) -> (Waiting, Job) {
        let records = generated_traffic(events, seed);
        let input = dir.join("events.jsonl");
        write_records(&input, &records);
        let input = input.to_str().unwrap().to_string();
        let layout = Layout::new(dir);
        let mut zero = layout.start(
            0,
            &["--input", &input],
            &dir.join("out0"),
            &dir.join("p0.log"),
        );
        let log0 = zero.stderr.clone();
        wait_for(&mut zero, LIMIT, "process 0 to listen", || {
            lines(&log0)
                .iter()
                .any(|l| l.contains("forming the cluster"))
        });
        let waiting = Waiting {
            layout,
            input,
            want: reference(&records),
            log0,
        };
        (waiting, zero)
    }

    /// The real process 1 joins; both bill as the reference does. Returns
    /// both logs.
    fn join_process_1(&self, zero: Job, dir: &Path) -> (String, String) {
        let out0 = dir.join("out0");
        let one = self.layout.start(
            1,
            &["--input", &self.input],
            &dir.join("out1"),
            &dir.join("p1.log"),
        );
        let log1 = one.stderr.clone();
        let status0 = zero.wait(LIMIT);
        let status1 = one.wait(LIMIT);
        let (said0, said1) = (lines(&self.log0).join("\n"), lines(&log1).join("\n"));
        assert!(status0.success(), "process 0: {status0}\n{said0}");
        assert!(status1.success(), "process 1: {status1}\n{said1}");
        let files = billing_files(&out0);
        assert_reference(&files, &self.want);
        assert_ledger_matches(&out0, &files);
        (said0, said1)
    }
}

/// The handshake's opening (`lpcauth1`, a nonce, the claimed and the
/// dialed process) followed by a made-up proof.
fn opening_with_a_guessed_proof(claimed: u32, dialed: u32) -> Vec<u8> {
    let mut bytes = b"lpcauth1".to_vec();
    bytes.extend_from_slice(&[7u8; 32]);
    bytes.extend_from_slice(&claimed.to_be_bytes());
    bytes.extend_from_slice(&dialed.to_be_bytes());
    bytes.extend_from_slice(&[0u8; 32]);
    bytes
}

#[test]
fn clients_without_the_secret_neither_stop_process_0_learn_the_job_nor_join() {
    let dir = tempfile::tempdir().unwrap();
    let (waiting, mut zero) = Waiting::start(dir.path(), 30_000, 66);
    let (layout, input, log0) = (&waiting.layout, waiting.input.as_str(), &waiting.log0);

    // One client trickles bytes all along, reconnecting when cut off.
    let stop_trickling = Arc::new(AtomicBool::new(false));
    let trickler = trickle(layout.cluster, stop_trickling.clone());

    // A hello with this job's very settings, claiming to be process 1: the
    // way in before cluster secrets.
    let hello = serde_json::json!({
        "livepipe": env!("CARGO_PKG_VERSION"),
        "process": 1,
        "processes": 2,
        "shape": {"--workers": "1", "--input": input, "--qualify-ms": "2000"},
    })
    .to_string();
    let mut old_hello = b"livepipe".to_vec();
    old_hello.extend_from_slice(&(hello.len() as u32).to_be_bytes());
    old_hello.extend_from_slice(hello.as_bytes());
    let garbage: Vec<u8> = (0..80u8).map(|i| i.wrapping_mul(37)).collect();
    let attempts: [(&str, Vec<u8>); 5] = [
        ("garbage", garbage),
        ("a hello with the right settings", old_hello),
        ("a guessed proof", opening_with_a_guessed_proof(1, 0)),
        ("claiming process 0", opening_with_a_guessed_proof(0, 0)),
        ("claiming process 7", opening_with_a_guessed_proof(7, 0)),
    ];
    for (what, bytes) in &attempts {
        let got = poke(layout.cluster, bytes);
        assert!(
            !holds_settings(&got, input),
            "{what}: learnt the settings: {}",
            String::from_utf8_lossy(&got)
        );
        // At most a status byte and process 0's nonce, then a refusal.
        assert!(got.len() <= 34, "{what}: got {} bytes", got.len());
        zero.assert_running();
    }
    let said = lines(log0).join("\n");
    assert!(!said.contains("cluster formed"), "{said}");
    for reason in [
        "it is not a livepipe process",
        "without proving the cluster secret",
        "did not prove that it holds the cluster secret",
        "which does not connect to this one",
    ] {
        assert!(
            said.contains("ignoring a connection that is not a peer of this cluster")
                && said.contains(reason),
            "{reason}:\n{said}"
        );
    }

    // The real process 1 joins while the trickling goes on, and the job
    // bills as the reference does.
    let (said0, said1) = waiting.join_process_1(zero, dir.path());
    stop_trickling.store(true, Ordering::Relaxed);
    let trickled = trickler.join().unwrap();
    assert!(
        !holds_settings(&trickled, input),
        "the trickler learnt the settings"
    );
    for said in [&said0, &said1] {
        assert!(!said.contains(&layout.secret), "logged the secret:\n{said}");
    }
}

#[test]
fn a_peer_with_the_wrong_secret_is_refused_and_logged_while_process_0_waits() {
    let dir = tempfile::tempdir().unwrap();
    let (waiting, mut zero) = Waiting::start(dir.path(), 20_000, 67);
    let (layout, input, log0) = (&waiting.layout, waiting.input.as_str(), &waiting.log0);

    // Process 1 with another secret: refused at every attempt until it
    // gives up (exit 1, saying why); process 0 logs each refusal and waits.
    let wrong = "a-different-secret-of-this-test";
    let wrong_file = dir.path().join("wrong-secret");
    std::fs::write(&wrong_file, wrong).unwrap();
    let impostor = layout.start_with_secret(
        1,
        &["--input", input, "--cluster-timeout", "3"],
        &dir.path().join("out1"),
        &dir.path().join("wrong-p1.log"),
        &wrong_file,
    );
    let (status, said_wrong) = impostor.finish(LIMIT);
    assert_eq!(status.code(), Some(1), "{said_wrong}");
    assert!(
        said_wrong.contains("refused this process's proof of the cluster secret"),
        "{said_wrong}"
    );
    wait_for(&mut zero, LIMIT, "process 0 to log the refusal", || {
        lines(log0)
            .iter()
            .any(|l| l.contains("did not prove that it holds the cluster secret"))
    });
    zero.assert_running();

    // The real process 1 joins.
    let (said0, said1) = waiting.join_process_1(zero, dir.path());
    for said in [&said0, &said1, &said_wrong] {
        assert!(!said.contains(&layout.secret), "logged the secret:\n{said}");
        assert!(!said.contains(wrong), "logged the wrong secret:\n{said}");
    }
}
