//! The binary as a child process: started, waited on, stopped with a
//! signal, and killed if a test fails halfway.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// A running `livepipe`; killed on drop unless stopped.
pub struct Job {
    child: Option<Child>,
    pub stderr: PathBuf,
}

impl Job {
    /// Starts `livepipe ARGS`; its stderr goes to `log` for the failure
    /// messages.
    pub fn start(args: &[&str], log: &Path) -> Job {
        let stderr = std::fs::File::create(log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_livepipe"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("livepipe starts");
        Job {
            child: Some(child),
            stderr: log.to_path_buf(),
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Fails the test with the job's log if it has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("livepipe exited early ({status}):\n{}", self.log());
        }
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`) and waits for the exit.
    pub fn signal(&mut self, signal: &str) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("kill runs");
        if !sent.success() {
            // Only acceptable if it had already exited.
            let status = child.try_wait().expect("try_wait");
            return status.unwrap_or_else(|| panic!("kill -{signal} failed"));
        }
        // A job that does not stop is a failure, not a hang.
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no exit within 60 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` without waiting for the exit.
    pub fn send(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status();
    }

    /// Waits for the job to exit; fails after `limit`.
    pub fn wait(mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no exit within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the job the way an operator does (SIGTERM) and expects exit 0.
    pub fn stop(mut self) {
        let status = self.signal("TERM");
        assert!(
            status.success(),
            "exit {status} after SIGTERM:\n{}",
            self.log()
        );
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `done` every 100 ms; fails with `what` (and the job's log) if it
/// is not true within `limit`. The limit only keeps a broken build from
/// hanging CI; nothing here measures speed.
pub fn wait_for(job: &mut Job, limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        job.assert_running();
        if started.elapsed() > limit {
            panic!("gave up waiting for {what}:\n{}", job.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// File name -> bytes of every file in `dir` (none if it does not exist).
pub fn dir_bytes(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Default::default();
    };
    entries
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// The dashboard address a job logged ("serving the dashboard at
/// http://ADDR/"), once it has.
pub fn http_addr(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let rest = text.split("serving the dashboard at http://").nth(1)?;
    Some(rest.split('/').next()?.to_string())
}

/// `livepipe run` on a Kafka topic the way the backfill tests run it: a
/// 1 s idle timeout (the topic is preloaded), any free HTTP port.
pub fn topic_job(brokers: &str, topic: &str, workers: &str, out: &Path, log: &Path) -> Job {
    Job::start(
        &[
            "run",
            "--brokers",
            brokers,
            "--topic",
            topic,
            "--workers",
            workers,
            "--idle-timeout-ms",
            "1000",
            "--http",
            "127.0.0.1:0",
            "--out",
            out.to_str().unwrap(),
        ],
        log,
    )
}

/// `GET http://ADDR/PATH`: status and body (empty for error statuses).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    match ureq::get(&format!("http://{addr}{path}")).call() {
        Ok(mut response) => (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        ),
        Err(ureq::Error::StatusCode(code)) => (code, String::new()),
        Err(err) => panic!("GET {path}: {err}"),
    }
}

/// `livepipe ARGS` run to its end (warnings only in its log).
pub fn livepipe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_livepipe"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("livepipe runs")
}

/// Writes `records` as a JSON-lines file.
pub fn write_jsonl(path: &Path, records: &[Vec<u8>]) {
    let mut bytes = Vec::new();
    for record in records {
        bytes.extend_from_slice(record);
        bytes.push(b'\n');
    }
    std::fs::write(path, bytes).unwrap();
}
