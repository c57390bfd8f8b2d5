//! The HTTP port against a hostile or careless client, over real sockets
//! to a real `livepipe run` (reading a mock Kafka cluster, so that it stays
//! up): slow and idle connections are closed, connections beyond the cap
//! are closed at once, stream ids are percent-decoded, every response
//! carries its security headers, `HEAD` works, a foreign `Host` is refused
//! with `--http-allowed-hosts`, and the dashboard runs under its CSP.
//!
//! Nothing here measures a duration: the timeouts are waited for with a
//! generous hang-guard, and the assertion is that the server acted.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use serde_json::Value;
use testkit::browser::{chromium_or_skip, Browser};
use testkit::http::sse_lines;
use testkit::now_ms;
use testkit::{topic_args, wait_for, Job, Livepipe};

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Keeps a broken build from hanging CI; nothing waits this long when the
/// server does its job.
const HANG_GUARD: Duration = Duration::from_secs(90);
const LIMIT: Duration = Duration::from_secs(120);
/// The server's header-read timeout (`livepipe_sinks::http`).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream id that needs percent-encoding: a space, a slash, non-ASCII.
const ODD_ID: &str = "room 1/ü-é";
const ODD_PATH: &str = "room%201%2F%C3%BC-%C3%A9";

/// A mock Kafka cluster with a topic `events` and a producer into it.
struct Topic {
    _cluster: MockCluster<'static, DefaultProducerContext>,
    brokers: String,
    producer: ThreadedProducer<DefaultProducerContext>,
}

impl Topic {
    fn new() -> Topic {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("events", 1, 1).expect("topic");
        let brokers = cluster.bootstrap_servers();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("producer");
        Topic {
            _cluster: cluster,
            brokers,
            producer,
        }
    }

    /// `viewer` joins `stream` now.
    fn join(&self, stream: &str, viewer: &str) {
        let record = serde_json::json!({
            "type": "join", "event_id": format!("j-{stream}-{viewer}"), "ts": now_ms(),
            "stream_id": stream, "viewer_id": viewer,
        })
        .to_string();
        self.producer
            .send(BaseRecord::<(), str>::to("events").payload(&record))
            .map_err(|(err, _)| err)
            .expect("sent");
        self.producer
            .flush(Duration::from_secs(10))
            .expect("flushed");
    }

    /// `livepipe run` on the topic, any free HTTP port, plus `extra`.
    fn args<'a>(&'a self, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = topic_args(&self.brokers, "events", out);
        args.extend(["--workers", "1"]);
        args.extend_from_slice(extra);
        args
    }
}

/// A job serving HTTP, with the streams `streams` (id, viewers) on its
/// board.
fn live_job(topic: &Topic, dir: &Path, extra: &[&str], streams: &[(&str, usize)]) -> (Job, String) {
    let log = dir.join("job.log");
    let out = dir.join("out");
    let mut job = Job::start(&topic.args(&out, extra), &log);
    for (stream, viewers) in streams {
        for viewer in 0..*viewers {
            topic.join(stream, &format!("v{viewer}"));
        }
    }
    let base = job.addr();
    for (stream, _) in streams {
        let path = format!("/api/live/{}", encode(stream));
        wait_for(&mut job, LIMIT, &format!("{stream:?} on the board"), || {
            exchange(&base, "GET", &path, &base).status == 200
        });
    }
    (job, base)
}

/// Percent-encodes all but unreserved characters, like `encodeURIComponent`.
fn encode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn connect(base: &str) -> TcpStream {
    let stream = TcpStream::connect(base).expect("connect");
    stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
    stream.set_write_timeout(Some(HANG_GUARD)).unwrap();
    stream
}

struct Response {
    status: u16,
    /// Lowercase names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!("{err}: {}", String::from_utf8_lossy(&self.body));
        })
    }
}

/// Parses a response head (up to and without the blank line).
fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    (status, headers)
}

/// One request on a connection of its own (`Connection: close`), with
/// `host` as `Host` (none if empty); the whole response.
fn exchange(base: &str, method: &str, path: &str, host: &str) -> Response {
    let mut stream = connect(base);
    let host = if host.is_empty() {
        String::new()
    } else {
        format!("Host: {host}\r\n")
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\n{host}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .expect("the response, then EOF");
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&bytes)));
    let (status, headers) = parse_head(&String::from_utf8_lossy(&bytes[..split]));
    Response {
        status,
        headers,
        body: bytes[split + 4..].to_vec(),
    }
}

/// Reads one response with a `Content-Length` off a kept-alive connection.
fn read_response(stream: &mut TcpStream) -> Response {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("a response head");
        head.push(byte[0]);
    }
    let (status, headers) = parse_head(std::str::from_utf8(&head[..head.len() - 4]).unwrap());
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let length: usize = response
        .header("content-length")
        .expect("content-length")
        .parse()
        .unwrap();
    response.body = vec![0; length];
    stream.read_exact(&mut response.body).expect("the body");
    response
}

/// Whether the server closed `stream` (EOF or reset) before the hang-guard
/// ran out; what it sent before is discarded.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true, // reset
        }
    }
}

#[test]
fn slow_and_idle_connections_are_closed_while_streams_stay_open() {
    let topic = Topic::new();
    let dir = tempfile::tempdir().unwrap();
    let (job, base) = live_job(&topic, dir.path(), &[], &[("s1", 1)]);

    // Half a request line, then nothing.
    let mut slow = connect(&base);
    slow.write_all(b"GET /api/li").unwrap();
    // Nothing at all.
    let mut silent = connect(&base);
    // One request on a kept-alive connection, then nothing.
    let mut idle = connect(&base);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle).status, 200);
    // An SSE stream is a request in flight, not an idle connection.
    let opened_ms = now_ms();
    let mut lines = sse_lines(&base, "/api/live/s1/events", LIMIT);

    assert!(
        closed_by_server(&mut slow),
        "a half request line stays open"
    );
    assert!(
        closed_by_server(&mut silent),
        "a silent connection stays open"
    );
    assert!(
        closed_by_server(&mut idle),
        "an idle keep-alive connection stays open"
    );

    // The SSE connection still delivers ticks the server made after its
    // header-read timeout would have struck.
    let past_timeout = opened_ms + HEADER_READ_TIMEOUT.as_millis() as u64 + 1_000;
    loop {
        let line = lines
            .next()
            .expect("the SSE stream stays open")
            .expect("an SSE line");
        if let Some(data) = line.strip_prefix("data:") {
            let snapshot: Value = serde_json::from_str(data.trim()).unwrap();
            if snapshot["emitted_at"].as_u64().unwrap() > past_timeout {
                break;
            }
        }
    }

    // Without --http-allowed-hosts any Host is served, as before.
    assert_eq!(
        exchange(&base, "GET", "/api/live", "evil.example").status,
        200
    );
    job.stop();
}

#[test]
fn stream_ids_are_percent_decoded_and_every_response_has_its_headers() {
    let topic = Topic::new();
    let dir = tempfile::tempdir().unwrap();
    let (job, base) = live_job(
        &topic,
        dir.path(),
        &["--http-allowed-hosts", "localhost,Dash.Example"],
        &[(ODD_ID, 2), ("plain", 1)],
    );

    // One stream's snapshot and its SSE feed, by the encoded id.
    let one = exchange(&base, "GET", &format!("/api/live/{ODD_PATH}"), &base);
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["stream_id"], ODD_ID);
    let snapshot = sse_lines(&base, &format!("/api/live/{ODD_PATH}/events"), LIMIT)
        .map(|line| line.expect("an SSE line"))
        .find_map(|line| line.strip_prefix("data:").map(str::to_string))
        .expect("a snapshot");
    let snapshot: Value = serde_json::from_str(snapshot.trim()).unwrap();
    assert_eq!(snapshot["stream_id"], ODD_ID);
    // An unknown id is echoed decoded, in JSON only; bytes that are not
    // UTF-8 are a 400.
    let unknown = exchange(&base, "GET", "/api/live/%3Cb%3Ex%3C%2Fb%3E", &base);
    assert_eq!(unknown.status, 404);
    assert!(unknown
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(unknown.json()["stream_id"], "<b>x</b>");
    let invalid = exchange(&base, "GET", "/api/live/%FF/events", &base);
    assert_eq!(invalid.status, 400);
    assert!(invalid.json()["error"].is_string());

    // Headers, on every route and on errors.
    let odd = format!("/api/live/{ODD_PATH}");
    let routes = [
        "/",
        "/api/live?limit=1",
        odd.as_str(),
        "/api/live/no-such-stream",
        "/metrics",
        "/healthz",
        "/no/such/route",
    ];
    for path in routes {
        let got = exchange(&base, "GET", path, &base);
        assert_eq!(
            got.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        if path != "/" {
            assert_eq!(got.header("cache-control"), Some("no-store"), "{path}");
        }
    }
    let page = exchange(&base, "GET", "/", &base);
    assert_eq!(page.status, 200);
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    let csp = page.header("content-security-policy").expect("a CSP");
    for directive in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "connect-src 'self'",
        "script-src 'sha256-",
        "style-src 'sha256-",
    ] {
        assert!(csp.contains(directive), "{directive} missing in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");

    // HEAD wherever GET is: the same status and headers, no body.
    for path in routes {
        let get = exchange(&base, "GET", path, &base);
        let head = exchange(&base, "HEAD", path, &base);
        assert_eq!(head.status, get.status, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} has a body");
        for name in ["content-type", "x-content-type-options", "cache-control"] {
            assert_eq!(head.header(name), get.header(name), "HEAD {path}: {name}");
        }
        if path == "/" {
            assert_eq!(
                head.header("content-length"),
                Some(&*get.body.len().to_string())
            );
        }
    }
    let events = exchange(&base, "HEAD", "/api/board/events", &base);
    assert_eq!(events.status, 200);
    assert_eq!(events.header("content-type"), Some("text/event-stream"));
    assert!(events.body.is_empty());
    let post = exchange(&base, "POST", "/", &base);
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    assert_eq!(post.header("x-content-type-options"), Some("nosniff"));

    // Hosts: listed names (any case, any port, a trailing dot) and
    // addresses are served; another name gets a JSON 421, but /healthz.
    let port = base.rsplit(':').next().unwrap();
    for host in [
        format!("localhost:{port}"),
        "dash.example".to_string(),
        "DASH.EXAMPLE.:80".to_string(),
        base.clone(),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(
            exchange(&base, "GET", "/api/live", &host).status,
            200,
            "{host}"
        );
    }
    for host in [
        format!("evil.example:{port}"),
        "dash.example.evil.example".into(),
        String::new(),
    ] {
        for path in [
            "/",
            "/api/live",
            odd.as_str(),
            "/metrics",
            "/api/board/events",
        ] {
            let refused = exchange(&base, "GET", path, &host);
            assert_eq!(refused.status, 421, "Host {host:?} {path}");
            assert!(refused.json()["error"].is_string());
            assert_eq!(refused.header("x-content-type-options"), Some("nosniff"));
        }
        assert_ne!(
            exchange(&base, "GET", "/healthz", &host).status,
            421,
            "/healthz for probes"
        );
    }
    job.stop();
}

#[test]
fn connections_beyond_the_cap_are_closed_at_once() {
    let topic = Topic::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("job.log");
    let out = dir.path().join("out");
    topic.join("s1", "v1");
    // 256 open files: the cap is half of that, not 4,096 connections that
    // would take the descriptors billing needs.
    let mut job = Livepipe::new()
        .log("info")
        .open_files(256)
        .args(topic.args(&out, &[]))
        .start(&log);
    let base = job.addr();
    let text = job.log();
    assert!(
        text.contains(&format!("serving the dashboard at http://{base}/")),
        "the address is logged too:\n{text}"
    );
    let cap: usize = text
        .split("at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no connection cap logged:\n{text}"));
    assert_eq!(cap, 128, "half of 256 open files");

    // Fill the cap with SSE clients; each got its 200, so each holds a
    // connection slot.
    let held: Vec<TcpStream> = (0..cap)
        .map(|_| {
            let mut stream = connect(&base);
            stream
                .write_all(b"GET /api/board/events HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).expect("a response");
            assert_eq!(&head, b"HTTP/1.1 200", "held connections are served");
            stream
        })
        .collect();

    // Beyond it: closed, without a byte, idle or not.
    for request in [&b""[..], b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"] {
        for _ in 0..3 {
            let mut extra = connect(&base);
            let _ = extra.write_all(request); // may already be reset
            let mut bytes = Vec::new();
            match extra.read_to_end(&mut bytes) {
                Ok(_) => {}
                Err(err) => assert!(
                    !matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                    "a connection beyond the cap stays open"
                ),
            }
            assert!(bytes.is_empty(), "served beyond the cap: {bytes:?}");
        }
    }

    // One held connection ends: its slot serves again.
    drop(held.into_iter().next());
    let started = Instant::now();
    loop {
        let mut stream = connect(&base);
        if stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .is_ok()
        {
            let mut bytes = Vec::new();
            let _ = stream.read_to_end(&mut bytes);
            if bytes.starts_with(b"HTTP/1.1 200") {
                break;
            }
        }
        // A hang guard, not a measurement.
        if started.elapsed() > HANG_GUARD {
            panic!("no slot came free within {HANG_GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // A full server still stops at once on SIGTERM.
    let status = job.signal_within("TERM", HANG_GUARD);
    assert!(status.success(), "exit {status}:\n{}", job.log());
}

#[test]
fn the_dashboard_follows_an_odd_stream_id_under_its_csp() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let topic = Topic::new();
    let dir = tempfile::tempdir().unwrap();
    // The odd stream has the most viewers: the page selects it and opens
    // its per-stream feed.
    let (mut job, base) = live_job(&topic, dir.path(), &[], &[(ODD_ID, 2), ("plain", 1)]);

    let mut browser = Browser::start_with(&chromium);
    // Record CSP violations from before the page's own script runs.
    browser.call(
        "Page.addScriptToEvaluateOnNewDocument",
        serde_json::json!({ "source": "window.__csp = []; document.addEventListener(\
            'securitypolicyviolation', (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));" }),
    );
    browser.navigate(&format!("http://{base}/"));
    browser.wait_for_all(
        &[
            "document.getElementById('status').textContent === 'LIVE'",
            &format!("document.getElementById('sel-name').textContent === {ODD_ID:?}"),
        ],
        Duration::from_secs(60),
    );
    // The board feed and the odd stream's own feed: two SSE clients.
    wait_for(&mut job, LIMIT, "the per-stream feed of the odd id", || {
        exchange(&base, "GET", "/metrics", &base)
            .body
            .split(|&b| b == b'\n')
            .any(|line| line == b"livepipe_sse_clients 2")
    });
    assert_eq!(browser.eval("JSON.stringify(window.__csp)"), "[]");
    // The policy is enforced: a script injected inline does not run.
    let ran = browser.eval(
        "(() => { const s = document.createElement('script'); s.textContent = 'window.__ran = 1'; \
         document.body.appendChild(s); return window.__ran === 1; })()",
    );
    assert_eq!(ran, Value::Bool(false));
    browser.wait_for("window.__csp.length > 0", Duration::from_secs(60));
    drop(browser);
    job.stop();
}
