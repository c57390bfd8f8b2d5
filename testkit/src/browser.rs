//! A real headless Chromium for integration tests, driven over the DevTools
//! protocol.
//!
//! # Why DevTools and not a downloaded browser
//!
//! The machines that build and test this project (developers' and CI's) have
//! no internet access beyond the package registries, so nothing in a test may
//! download a browser build (no Playwright / Puppeteer / chromedriver
//! bundles, no npm). Instead `.ci/run` installs Debian's `chromium` package
//! and the tests talk to it directly: chromium is started as a child process
//! with `--remote-debugging-port=0`, the port it picked is read from the
//! `DevTools listening on ws://...` line on its stderr, the page target is
//! found through `GET /json/list`, and commands are sent over a plain
//! (synchronous) `tungstenite` WebSocket. That needs nothing but the crates
//! already in `[dev-dependencies]`.
//!
//! # Flags
//!
//! Chromium is started with exactly:
//!
//! - `--headless`, `--disable-gpu`: no display, no GPU on these machines.
//! - `--no-sandbox`: the tests (and CI) run as root, where the sandbox refuses
//!   to start.
//! - `--disable-quic --no-first-run --disable-background-networking
//!   --disable-component-update --disable-sync`: without these chromium keeps
//!   trying to reach Google's services (component updates, sync, safe-browsing
//!   lists, variations, QUIC probes) and floods the closed network with
//!   connection attempts that can only fail.
//! - `--remote-debugging-port=0`: let the OS pick a free port, so tests can
//!   run in parallel.
//! - `--user-data-dir=<fresh TempDir>`: a throw-away profile owned by the
//!   [`Browser`], removed when it is dropped.
//!
//! # Use
//!
//! ```ignore
//! let mut browser = Browser::start();
//! browser.navigate("http://127.0.0.1:8080/");
//! browser.wait_for("document.getElementById('n') !== null", Duration::from_secs(10));
//! let text = browser.eval("document.getElementById('n').textContent");
//! ```
//!
//! Every socket read has a timeout, so a broken or wedged browser makes the
//! test fail with a message instead of hanging it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// How long chromium may take to print its DevTools address and expose a
/// page target.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a navigation may take until `Page.loadEventFired`.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long any single DevTools command may take to answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for connects, writes and the small `/json/list` HTTP exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How many of chromium's last stderr lines are kept for error messages.
const STDERR_TAIL: usize = 40;

/// The chromium binary to use: `$LIVEPIPE_CHROMIUM` if set (and non-empty),
/// else `/usr/bin/chromium` if it exists, else `chromium` or
/// `chromium-browser` found on `$PATH`.
pub fn chromium_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LIVEPIPE_CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let debian = Path::new("/usr/bin/chromium");
    if debian.is_file() {
        return Some(debian.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
    })
}

/// [`chromium_path`], or `None` after saying the test is skipped. Under
/// `CI=true` a missing chromium is a failure, never a silent skip.
pub fn chromium_or_skip() -> Option<PathBuf> {
    let found = chromium_path();
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but no chromium: .ci/run must install Debian's chromium package");
        }
        eprintln!("skipped: no chromium (apt-get install chromium, or set LIVEPIPE_CHROMIUM)");
    }
    found
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// The chromium child process and its profile directory. Killing is
/// idempotent; the profile is removed only after the process is gone.
struct Process {
    child: Child,
    reaped: bool,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    // Declared last so it is dropped (removed) after `child` is killed.
    _profile: tempfile::TempDir,
}

impl Process {
    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // Fails only if it already exited; `wait` reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    fn stderr_tail(&self) -> String {
        match self.stderr_tail.lock() {
            Ok(tail) => tail.iter().cloned().collect::<Vec<_>>().join("\n"),
            Err(_) => String::from("<stderr unavailable>"),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A headless chromium with one page, controlled over DevTools.
pub struct Browser {
    ws: WebSocket<TcpStream>,
    next_id: u64,
    /// Events read while waiting for a command's answer, oldest first.
    events: VecDeque<Value>,
    process: Process,
    /// How long chromium took from spawn until the page WebSocket was open.
    startup: Duration,
}

impl Browser {
    /// Starts the chromium found by [`chromium_path`].
    ///
    /// Panics if there is none, or if it cannot be started; tests that should
    /// be skipped without a browser check [`chromium_path`] first.
    pub fn start() -> Browser {
        let path = chromium_path().expect(
            "no chromium found: set LIVEPIPE_CHROMIUM or install Debian's `chromium` package",
        );
        Browser::start_with(&path)
    }

    /// Starts the chromium binary at `path` on `about:blank` and connects to
    /// its page target.
    pub fn start_with(path: &Path) -> Browser {
        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        let profile = tempfile::Builder::new()
            .prefix("livepipe-chromium-")
            .tempdir()
            .expect("create a temporary chromium profile directory");
        let mut child = Command::new(path)
            .arg("--headless")
            .arg("--no-sandbox")
            .arg("--disable-gpu")
            .arg("--disable-quic")
            .arg("--no-first-run")
            .arg("--disable-background-networking")
            .arg("--disable-component-update")
            .arg("--disable-sync")
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start chromium at {}: {e}", path.display()));
        let stderr = child.stderr.take().expect("chromium stderr is piped");
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        // From here on, dropping `process` (also by a panic) kills chromium.
        let process = Process {
            child,
            reaped: false,
            stderr_tail: Arc::clone(&stderr_tail),
            _profile: profile,
        };

        // Drain stderr for chromium's whole life so it never blocks on a full
        // pipe; hand lines to this thread until the DevTools address is seen.
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        thread::Builder::new()
            .name("chromium-stderr".into())
            .spawn(move || {
                let mut lines_tx = Some(lines_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(tx) = &lines_tx {
                        if tx.send(line.clone()).is_err() {
                            lines_tx = None;
                        }
                    }
                    if let Ok(mut tail) = stderr_tail.lock() {
                        if tail.len() == STDERR_TAIL {
                            tail.pop_front();
                        }
                        tail.push_back(line);
                    }
                }
            })
            .expect("spawn the chromium stderr reader thread");

        let browser_ws = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.trim().strip_prefix("DevTools listening on ") {
                        break rest.to_string();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "chromium did not print its DevTools address within {START_TIMEOUT:?}; stderr:\n{}",
                    process.stderr_tail()
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "chromium closed stderr (exited?) before printing its DevTools address; stderr:\n{}",
                    process.stderr_tail()
                ),
            }
        };
        drop(lines_rx);
        let host_port = ws_host_port(&browser_ws)
            .unwrap_or_else(|| panic!("cannot parse DevTools address {browser_ws:?}"))
            .to_string();

        let page_ws = find_page_target(&host_port, deadline, &process);
        let ws = connect_ws(&page_ws);
        Browser {
            ws,
            next_id: 0,
            events: VecDeque::new(),
            process,
            startup: started.elapsed(),
        }
    }

    /// How long chromium took from spawn until the page WebSocket was open.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Loads `url` in the page and waits for its `load` event.
    pub fn navigate(&mut self, url: &str) {
        self.call("Page.enable", json!({}));
        // Anything from before this navigation is not what we wait for.
        self.events.clear();
        let result = self.call("Page.navigate", json!({ "url": url }));
        if let Some(err) = result.get("errorText").and_then(Value::as_str) {
            panic!("navigating to {url} failed: {err}");
        }
        let deadline = Instant::now() + LOAD_TIMEOUT;
        loop {
            while let Some(event) = self.events.pop_front() {
                if event["method"] == "Page.loadEventFired" {
                    self.events.clear();
                    return;
                }
            }
            let msg = self.recv(deadline).unwrap_or_else(|| {
                panic!("{url} did not fire its load event within {LOAD_TIMEOUT:?}")
            });
            if msg.get("id").is_none() {
                self.events.push_back(msg);
            }
        }
    }

    /// Evaluates `js` in the page (awaiting a returned promise) and returns
    /// its value as JSON (`null` for `undefined`). Panics if it throws.
    pub fn eval(&mut self, js: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
        );
        if let Some(details) = result.get("exceptionDetails") {
            let text = details["text"].as_str().unwrap_or("exception");
            let description = details["exception"]["description"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| details["exception"]["value"].to_string());
            panic!("evaluating {js:?} threw: {text} {description}");
        }
        result["result"]
            .get("value")
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Polls [`eval`](Self::eval) of `js` every 200 ms until it returns a
    /// truthy value (anything but `null`, `false`, `0` and `""`), and returns
    /// it. Panics with the last value after `limit`. An exception in `js`
    /// panics at once, so write the predicate to be safe before the page is
    /// ready (e.g. `document.getElementById('n') !== null`).
    pub fn wait_for(&mut self, js: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let value = self.eval(js);
            if truthy(&value) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!("{js:?} was still not truthy after {limit:?}; last value: {value}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// [`wait_for`](Self::wait_for) each of `predicates` in turn, each
    /// within `limit`.
    pub fn wait_for_all(&mut self, predicates: &[&str], limit: Duration) {
        for js in predicates {
            self.wait_for(js, limit);
        }
    }

    /// Sends one DevTools command and returns its `result`, keeping events
    /// that arrive meanwhile in `self.events`. Panics on a protocol error.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({ "id": id, "method": method, "params": params });
        if let Err(e) = self.ws.send(Message::text(request.to_string())) {
            panic!(
                "sending {method} to chromium failed: {e}; chromium stderr:\n{}",
                self.process.stderr_tail()
            );
        }
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let Some(mut msg) = self.recv(deadline) else {
                panic!(
                    "chromium did not answer {method} within {CALL_TIMEOUT:?}; stderr:\n{}",
                    self.process.stderr_tail()
                );
            };
            match msg.get("id").and_then(Value::as_u64) {
                Some(got) if got == id => {
                    if let Some(err) = msg.get("error") {
                        panic!("{method} failed: {err}");
                    }
                    return msg["result"].take();
                }
                Some(_) => {} // an answer to an earlier, abandoned command
                None => self.events.push_back(msg),
            }
        }
    }

    /// Reads the next JSON message, or `None` once `deadline` has passed.
    /// Panics if the connection breaks.
    fn recv(&mut self, deadline: Instant) -> Option<Value> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if let Err(e) = self.ws.get_ref().set_read_timeout(Some(left)) {
                panic!("setting the DevTools socket read timeout failed: {e}");
            }
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    return Some(serde_json::from_str(text.as_str()).unwrap_or_else(|e| {
                        panic!("chromium sent invalid JSON ({e}): {}", text.as_str())
                    }));
                }
                Ok(Message::Close(frame)) => panic!(
                    "chromium closed the DevTools connection ({frame:?}); stderr:\n{}",
                    self.process.stderr_tail()
                ),
                Ok(_) => {} // ping/pong/binary: nothing for us
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {} // loop: returns None if the deadline has passed
                Err(e) => panic!(
                    "reading from chromium's DevTools socket failed: {e}; stderr:\n{}",
                    self.process.stderr_tail()
                ),
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Best effort: the process is killed right after anyway.
        let _ = self
            .ws
            .get_ref()
            .set_write_timeout(Some(Duration::from_millis(200)));
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
        self.process.kill();
    }
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// `host:port` of a `ws://host:port/path` URL.
fn ws_host_port(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("ws://")?;
    let end = rest.find('/').unwrap_or(rest.len());
    Some(&rest[..end]).filter(|hp| !hp.is_empty())
}

/// Polls `/json/list` until a target of type "page" shows up and returns its
/// `webSocketDebuggerUrl`.
fn find_page_target(host_port: &str, deadline: Instant, process: &Process) -> String {
    loop {
        let problem = match http_get(host_port, "/json/list") {
            Ok(body) => match serde_json::from_str::<Vec<Value>>(&body) {
                Ok(targets) => {
                    let page_ws = targets
                        .iter()
                        .filter(|t| t["type"] == "page")
                        .find_map(|t| t["webSocketDebuggerUrl"].as_str());
                    if let Some(url) = page_ws {
                        return url.to_string();
                    }
                    format!("no page target yet in {body}")
                }
                Err(e) => format!("invalid /json/list answer ({e}): {body}"),
            },
            Err(e) => format!("GET /json/list failed: {e}"),
        };
        if Instant::now() >= deadline {
            panic!(
                "chromium exposed no page target within {START_TIMEOUT:?}: {problem}; stderr:\n{}",
                process.stderr_tail()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn connect_tcp(host_port: &str) -> std::io::Result<TcpStream> {
    let addr = host_port.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no address for {host_port}"),
        )
    })?;
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The body of a 200 answer to `GET http://HOST_PORT/PATH`.
fn http_get(host_port: &str, path: &str) -> Result<String, String> {
    let response = crate::http::try_get(host_port, path)?;
    match response.status {
        200 => Ok(response.body),
        status => Err(format!("HTTP answer {status}")),
    }
}

/// Opens the DevTools WebSocket at `url` over a TcpStream with timeouts.
fn connect_ws(url: &str) -> WebSocket<TcpStream> {
    let host_port =
        ws_host_port(url).unwrap_or_else(|| panic!("cannot parse DevTools WebSocket URL {url:?}"));
    let stream = connect_tcp(host_port)
        .unwrap_or_else(|e| panic!("connecting to chromium's DevTools at {host_port} failed: {e}"));
    match tungstenite::client(url, stream) {
        Ok((ws, _response)) => ws,
        Err(e) => panic!("DevTools WebSocket handshake with {url} failed: {e}"),
    }
}
