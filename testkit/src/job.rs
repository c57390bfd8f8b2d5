//! The binary as a child process: run to its end, or started, waited on,
//! stopped with a signal, and killed if a test fails halfway. Every wait
//! has a deadline: a job that hangs fails the test with its log instead of
//! hanging CI.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a job run to its end may take ([`Livepipe::output`]); only a
/// guard against hanging, nothing here measures speed.
pub const RUN_LIMIT: Duration = Duration::from_secs(600);
/// How long a started job may take to write its HTTP address.
pub const ADDR_LIMIT: Duration = Duration::from_secs(180);
/// How long a job may take to exit after SIGTERM ([`Job::signal`]).
pub const STOP_LIMIT: Duration = Duration::from_secs(60);

/// The `livepipe` binary Cargo built for the running test or bench: it
/// sits in the profile directory, next to the `deps/` directory holding
/// the test's own executable. `$LIVEPIPE_BIN`, if set, wins.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("LIVEPIPE_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let profile = exe
        .parent()
        .filter(|dir| dir.ends_with("deps"))
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in a target/*/deps directory", exe.display()));
    let bin = profile.join(format!("livepipe{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not built (run the root package's tests or benches, or set LIVEPIPE_BIN)",
        bin.display()
    );
    bin
}

/// `livepipe ARGS`, to be run to its end or started as a [`Job`].
#[derive(Clone, Debug)]
pub struct Livepipe {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    /// A program (and its arguments) to run the binary under.
    under: Vec<OsString>,
    limit: Duration,
}

impl Default for Livepipe {
    fn default() -> Livepipe {
        Livepipe {
            args: Vec::new(),
            envs: Vec::new(),
            under: Vec::new(),
            limit: RUN_LIMIT,
        }
    }
}

impl Livepipe {
    /// The binary with no arguments; `RUST_LOG` is the test's own unless
    /// [`log`](Self::log) sets it.
    pub fn new() -> Livepipe {
        Livepipe::default()
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Livepipe {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Livepipe {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Livepipe {
        self.envs
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// `RUST_LOG=level`.
    pub fn log(self, level: &str) -> Livepipe {
        self.env("RUST_LOG", level)
    }

    /// Runs it as `PROGRAM ARGS BINARY ...` (e.g. under `/usr/bin/time`).
    pub fn under(mut self, program: impl AsRef<OsStr>, args: &[&str]) -> Livepipe {
        self.under = std::iter::once(program.as_ref().to_os_string())
            .chain(args.iter().map(OsString::from))
            .collect();
        self
    }

    /// Runs it under `ulimit -n files` (through `sh`).
    pub fn open_files(self, files: u32) -> Livepipe {
        let script = format!("ulimit -n {files} && exec \"$0\" \"$@\"");
        self.under("sh", &["-c", &script])
    }

    /// How long [`output`](Self::output) may take [default: [`RUN_LIMIT`]].
    pub fn within(mut self, limit: Duration) -> Livepipe {
        self.limit = limit;
        self
    }

    fn command(&self, extra: &[OsString]) -> Command {
        let mut command = match self.under.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary());
                command
            }
            None => Command::new(binary()),
        };
        command.args(&self.args).args(extra);
        command.envs(self.envs.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs to the end and returns what it wrote; fails the test if it
    /// takes longer than its limit ([`within`](Self::within)).
    pub fn output(self) -> Output {
        let mut child = self
            .command(&[])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("livepipe starts");
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
        let status = match wait_until(&mut child, self.limit) {
            Some(status) => status,
            None => {
                let stderr = stderr.join().unwrap_or_default();
                panic!(
                    "livepipe {:?} did not exit within {:?}:\n{}",
                    self.args,
                    self.limit,
                    String::from_utf8_lossy(&stderr)
                );
            }
        };
        Output {
            status,
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
        }
    }

    /// Runs to the end and fails the test, with its stderr, unless it
    /// exits 0.
    pub fn success(self) -> Output {
        let args = self.args.clone();
        let output = self.output();
        assert!(
            output.status.success(),
            "livepipe {args:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Starts it; its stderr goes to `log` for the failure messages. A
    /// `run` also writes its HTTP address next to `log` (`--addr-file`),
    /// where [`Job::addr`] finds it.
    pub fn start(self, log: &Path) -> Job {
        let stderr = std::fs::File::create(log).expect("log file");
        let addr_file = (self.args.first().is_some_and(|a| a == "run")).then(|| {
            let mut name = log.as_os_str().to_os_string();
            name.push(".addr");
            PathBuf::from(name)
        });
        if let Some(stale) = &addr_file {
            // An earlier job's address must not pass for this one's.
            let _ = std::fs::remove_file(stale);
        }
        let extra: Vec<OsString> = addr_file
            .iter()
            .flat_map(|path| [OsString::from("--addr-file"), path.into()])
            .collect();
        let child = self
            .command(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("livepipe starts");
        Job {
            child: Some(child),
            stderr: log.to_path_buf(),
            addr_file,
        }
    }
}

/// Waits up to `limit` for `child` to exit; `None` (with `child` killed
/// and reaped) if it does not.
fn wait_until(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `livepipe ARGS` run to its end (warnings only in its log).
pub fn livepipe(args: &[&str]) -> Output {
    Livepipe::new().log("warn").args(args).output()
}

/// `livepipe ARGS` run to its end (warnings only in its log); fails the
/// test, with its stderr, unless it exits 0.
pub fn run_ok(args: &[&str]) -> Output {
    Livepipe::new().log("warn").args(args).success()
}

/// `livepipe run --input INPUT --out OUT ARGS` run to its end (warnings
/// only in its log); fails the test, with its stderr, unless it exits 0.
pub fn run_input(input: impl AsRef<OsStr>, out: impl AsRef<OsStr>, args: &[&str]) -> Output {
    Livepipe::new()
        .log("warn")
        .arg("run")
        .arg("--input")
        .arg(input)
        .arg("--out")
        .arg(out)
        .args(args)
        .success()
}

/// `livepipe gen --output PATH ARGS` run to its end; fails the test unless
/// it exits 0.
pub fn gen_file(path: impl AsRef<OsStr>, args: &[&str]) -> Output {
    Livepipe::new()
        .log("warn")
        .arg("gen")
        .arg("--output")
        .arg(path)
        .args(args)
        .success()
}

/// Checks that a run was refused as a usage error (exit 2) and returns what
/// it said.
pub fn refused(output: &Output) -> String {
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{said}");
    said
}

/// A running `livepipe`; killed on drop unless stopped.
pub struct Job {
    child: Option<Child>,
    pub stderr: PathBuf,
    addr_file: Option<PathBuf>,
}

impl Job {
    /// Starts `livepipe ARGS` with `RUST_LOG=info`; its stderr goes to
    /// `log` for the failure messages.
    pub fn start(args: &[&str], log: &Path) -> Job {
        Livepipe::new().log("info").args(args).start(log)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The address (`HOST:PORT`) its HTTP server listens on, from its
    /// `--addr-file`, once it is there; fails the test if the job exits or
    /// [`ADDR_LIMIT`] passes first.
    pub fn addr(&mut self) -> String {
        let path = self
            .addr_file
            .clone()
            .expect("only a `run` job serves HTTP");
        let mut addr = None;
        wait_for(self, ADDR_LIMIT, "the HTTP server's address", || {
            addr = std::fs::read_to_string(&path).ok();
            addr.is_some()
        });
        addr.unwrap().trim_end().to_string()
    }

    /// Whether it has written its HTTP address yet (never waits).
    pub fn serving(&self) -> bool {
        self.addr_file.as_ref().is_some_and(|path| path.exists())
    }

    /// Fails the test with the job's log if it has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("livepipe exited early ({status}):\n{}", self.log());
        }
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`) and waits for the exit, at
    /// most [`STOP_LIMIT`].
    pub fn signal(&mut self, signal: &str) -> ExitStatus {
        self.signal_within(signal, STOP_LIMIT)
    }

    /// Sends `signal` and waits for the exit; fails after `limit`.
    pub fn signal_within(&mut self, signal: &str, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        if !kill(&child, signal) {
            // Only acceptable if it had already exited.
            let status = child.try_wait().expect("try_wait");
            return status.unwrap_or_else(|| panic!("kill -{signal} failed"));
        }
        // A job that does not stop is a failure, not a hang.
        wait_until(&mut child, limit)
            .unwrap_or_else(|| panic!("no exit within {limit:?} of SIG{signal}:\n{}", self.log()))
    }

    /// Sends `signal` without waiting for the exit.
    pub fn send(&self, signal: &str) {
        kill(self.child.as_ref().expect("running"), signal);
    }

    /// Waits for the job to exit; fails after `limit`.
    pub fn wait(mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_until(&mut child, limit)
            .unwrap_or_else(|| panic!("no exit within {limit:?}:\n{}", self.log()))
    }

    /// Waits for the job to exit (failing after `limit`) and returns how,
    /// with its log.
    pub fn finish(self, limit: Duration) -> (ExitStatus, String) {
        let log = self.stderr.clone();
        let status = self.wait(limit);
        (status, std::fs::read_to_string(log).unwrap_or_default())
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

/// `kill -SIGNAL` of the child; whether it was sent.
fn kill(child: &Child, signal: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success())
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
/// A running job may rename a temporary file between the listing and the
/// read: such a file is left out (the next poll sees its final name).
pub fn dir_bytes(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Default::default();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter_map(|p| match std::fs::read(&p) {
            Ok(bytes) => Some((p.file_name().unwrap().to_string_lossy().to_string(), bytes)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => panic!("reading {}: {err}", p.display()),
        })
        .collect()
}

/// The arguments of `livepipe run` on a Kafka topic into `out`, serving
/// HTTP on any free port; more flags can follow.
pub fn topic_args<'a>(brokers: &'a str, topic: &'a str, out: &'a Path) -> Vec<&'a str> {
    let out = out.to_str().expect("a UTF-8 path");
    vec![
        "run",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--http",
        "127.0.0.1:0",
        "--out",
        out,
    ]
}

/// The arguments of `livepipe run --input INPUT --out OUT`; more flags can
/// follow.
pub fn input_args<'a>(input: &'a Path, out: &'a Path) -> Vec<&'a str> {
    let input = input.to_str().expect("a UTF-8 path");
    vec![
        "run",
        "--input",
        input,
        "--out",
        out.to_str().expect("a UTF-8 path"),
    ]
}

/// The arguments of `livepipe run` on the embedded demo (no source flags)
/// into `out`, serving HTTP on any free port; more flags can follow.
pub fn demo_args(out: &Path) -> Vec<&str> {
    let out = out.to_str().expect("a UTF-8 path");
    vec!["run", "--out", out, "--http", "127.0.0.1:0"]
}

/// `livepipe run` on a Kafka topic the way the backfill tests run it: a
/// 1 s idle timeout (the topic is preloaded), any free HTTP port.
pub fn topic_job(brokers: &str, topic: &str, workers: &str, out: &Path, log: &Path) -> Job {
    let mut args = topic_args(brokers, topic, out);
    args.extend(["--workers", workers, "--idle-timeout-ms", "1000"]);
    Job::start(&args, log)
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
