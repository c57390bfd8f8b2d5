//! The dashboard in a real headless Chromium (Debian's package, driven over
//! the DevTools protocol; nothing is downloaded): the demo's page shows
//! streams, its numbers change between two reads, and after a reload its
//! chart is drawn from the server's history at once.

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
    chart_is_full_at_once_after_a_reload(&mut browser, &base);
    drop(browser);
    job.stop();
}

/// Points the chart must have before the reload; live ticks alone add
/// one a second, so right after a reload only the history can give these.
const HISTORY_POINTS: u64 = 12;

/// Waits until the selected stream's chart holds [`HISTORY_POINTS`],
/// reloads, and checks that the chart holds them again as soon as the
/// page has its history (`data-history`, set once it is merged and drawn),
/// not a point a second from then on.
fn chart_is_full_at_once_after_a_reload(browser: &mut Browser, base: &str) {
    let points = "Number(document.getElementById('chart').dataset.points || 0)";
    browser.wait_for(
        &format!("{points} >= {HISTORY_POINTS}"),
        Duration::from_secs(60),
    );
    browser.navigate(&format!("http://{base}/"));
    browser.wait_for(
        "document.getElementById('chart').dataset.history !== undefined",
        Duration::from_secs(30),
    );
    let drawn = browser.eval(points).as_f64().unwrap();
    assert!(
        drawn >= (HISTORY_POINTS - 1) as f64,
        "the chart had {drawn} points right after the reload"
    );
}
