//! The dashboard in a real headless Chromium (Debian's package, driven over
//! the DevTools protocol; nothing is downloaded): the demo's page shows
//! streams, and its numbers change between two reads.

use testkit::browser::{chromium_or_skip, Browser};
use testkit::{demo_args, Job};

use std::time::Duration;

#[test]
fn the_dashboard_shows_live_streams_in_a_real_browser() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("demo.log");
    let out = dir.path().join("out");
    let mut args = demo_args(&out);
    args.extend(["--workers", "2"]);
    let mut job = Job::start(&args, &log);
    let base = job.addr();

    let mut browser = Browser::start_with(&chromium);
    browser.navigate(&format!("http://{base}/"));
    browser.wait_for_all(
        &[
            "document.querySelectorAll('#top tr[data-stream]').length >= 5",
            "document.getElementById('status').textContent === 'LIVE'",
        ],
        Duration::from_secs(60),
    );
    let read = "JSON.stringify({ total: document.getElementById('total-viewers').textContent, \
                streams: document.getElementById('stream-count').textContent, \
                asOf: (document.getElementById('as-of') || {}).textContent, \
                top: document.getElementById('top').textContent, \
                selected: document.getElementById('sel-viewers').textContent })";
    let first = browser.eval(read);
    std::thread::sleep(Duration::from_secs(3));
    let second = browser.eval(read);
    assert_ne!(first, second, "the page did not change in 3 s: {first}");
    let page: serde_json::Value = serde_json::from_str(second.as_str().unwrap()).unwrap();
    let streams: u64 = page["streams"]
        .as_str()
        .unwrap()
        .replace(',', "")
        .parse()
        .unwrap();
    assert!(streams >= 5, "{page}");
    assert!(page["top"].as_str().unwrap().contains("stream-1"), "{page}");
    assert_eq!(
        browser.eval("document.getElementById('status').textContent"),
        "LIVE"
    );
    drop(browser);
    job.stop();
}
