//! Checks the headless-chromium test support itself: a page served from this
//! process is loaded in a real chromium and its live DOM is read twice.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use testkit::browser::{chromium_path, Browser};

const PAGE: &str = r#"<!doctype html>
<html>
<head><meta charset="utf-8"><title>livepipe browser selftest</title></head>
<body>
<div id="n">0</div>
<script>
  let n = 0;
  setInterval(() => { n += 1; document.getElementById('n').textContent = String(n); }, 200);
</script>
</body>
</html>
"#;

/// Serves `PAGE` at `/` (404 elsewhere) on an ephemeral loopback port, from a
/// background thread that lives as long as the test process.
fn serve_page() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener
        .local_addr()
        .expect("local address of the listener");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            // A broken connection only affects that one request.
            let _ = answer(stream);
        }
    });
    format!("http://{addr}/")
}

fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&request);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = if path == "/" {
        ("200 OK", "text/html; charset=utf-8", PAGE)
    } else {
        ("404 Not Found", "text/plain", "not found\n")
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[test]
fn chromium_renders_a_local_page() {
    if chromium_path().is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "no chromium found in CI: .ci/run must install Debian's `chromium` package \
                 (apt-get install -y chromium) or set LIVEPIPE_CHROMIUM"
            );
        }
        eprintln!(
            "skipping chromium_renders_a_local_page: no chromium found \
             (apt-get install chromium, or set LIVEPIPE_CHROMIUM)"
        );
        return;
    }

    let url = serve_page();
    let started = Instant::now();
    let mut browser = Browser::start();
    eprintln!(
        "chromium started in {:?} (DevTools page connected)",
        browser.startup_time()
    );

    browser.navigate(&url);
    eprintln!("page loaded {:?} after start", started.elapsed());
    browser.wait_for(
        "document.getElementById('n') !== null",
        Duration::from_secs(10),
    );

    let read = "Number(document.getElementById('n').textContent)";
    let first = browser
        .eval(read)
        .as_f64()
        .expect("the counter is a number");
    thread::sleep(Duration::from_secs(1));
    let second = browser
        .eval(read)
        .as_f64()
        .expect("the counter is a number");
    eprintln!("counter: {first} then {second}");
    assert_ne!(
        first, second,
        "the page's setInterval counter did not change in 1 s"
    );
    assert!(
        second > first,
        "the counter went backwards: {first} -> {second}"
    );
}
