//! The billing sink on its own: which files appear when, and what is in them.

use livepipe_dataflow::billing::{AdDetails, BillingEvent, ImpressionFact, Outcome};
use livepipe_dataflow::config::PipelineConfig;
use livepipe_dataflow::event::Position;
use livepipe_sinks::billing::BillingSink;
use livepipe_sinks::side::SideOutputs;

use std::path::Path;
use std::sync::Arc;

const PERIOD: u64 = 1_000;
const WINDOW: u64 = 500;

fn config() -> PipelineConfig {
    PipelineConfig {
        billing_period_ms: PERIOD,
        qualify_window_ms: WINDOW,
        time_granularity_ms: 100,
        ..PipelineConfig::default()
    }
}

fn outcome(id: &str, ts: u64, qualified: Option<u64>) -> BillingEvent {
    BillingEvent::Final(Outcome {
        impression_id: id.into(),
        impression: ImpressionFact {
            ts,
            event_id: format!("e-{id}").into(),
            watermark: 0,
            position: Position {
                partition: 0,
                offset: 1,
            },
            ad: AdDetails {
                ad_id: "ad".into(),
                campaign_id: "c,1".into(),
                advertiser_id: "adv".into(),
                stream_id: "s".into(),
                viewer_id: "v".into(),
                price_micros: 7,
            }
            .into(),
        },
        qualified_ts: qualified,
        duplicates: 0,
    })
}

fn open(out: &Path) -> BillingSink {
    let side = Arc::new(SideOutputs::open(out).unwrap());
    BillingSink::open(out, config(), vec![Arc::from("f")], side, Arc::default()).unwrap()
}

fn files(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("billing"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn later_periods_arriving_first_do_not_hide_earlier_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(dir.path());
    // Period 3000 is final (its deadline passed) and reaches the sink first...
    sink.accept(outcome("b", 3_100, Some(3_200))).unwrap();
    sink.advance(Some(1_000)).unwrap();
    assert!(files(dir.path()).is_empty(), "period 1000 is not final yet");
    // ...then period 1000's outcome; nothing new when the frontier moves on.
    sink.accept(outcome("a", 1_100, None)).unwrap();
    sink.advance(Some(1_200)).unwrap();
    sink.advance(None).unwrap();
    assert_eq!(
        files(dir.path()),
        [
            "billable-1000-2000.csv",
            "billable-1000-2000.csv.done",
            "billable-2000-3000.csv",
            "billable-2000-3000.csv.done",
            "billable-3000-4000.csv",
            "billable-3000-4000.csv.done",
        ]
    );
    let billing = dir.path().join("billing");
    let header = "impression_id,ad_id,campaign_id,advertiser_id,stream_id,viewer_id,impression_ts,qualified_ts,price_micros\n";
    assert_eq!(
        std::fs::read_to_string(billing.join("billable-1000-2000.csv")).unwrap(),
        header
    );
    assert_eq!(
        std::fs::read_to_string(billing.join("billable-2000-3000.csv")).unwrap(),
        header
    );
    assert_eq!(
        std::fs::read_to_string(billing.join("billable-3000-4000.csv")).unwrap(),
        format!("{header}b,ad,\"c,1\",adv,s,v,3100,3200,7\n")
    );
}

#[test]
fn a_period_is_written_only_once_its_last_deadline_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(dir.path());
    sink.accept(outcome("a", 1_000, Some(1_001))).unwrap();
    // The last impression of [1000, 2000) has its deadline at 1999 + 500.
    sink.advance(Some(2_400)).unwrap();
    assert!(files(dir.path()).is_empty());
    sink.advance(Some(2_500)).unwrap();
    assert_eq!(files(dir.path()).len(), 2);
    // Quiet periods after the last impression get no file (yet): a later
    // impression would fill the gap with header-only files.
    sink.advance(Some(3_500)).unwrap();
    assert_eq!(files(dir.path()).len(), 2);
}

#[test]
fn an_id_is_final_once_whatever_comes_later() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = open(dir.path());
    sink.accept(outcome("a", 1_100, Some(1_200))).unwrap();
    sink.advance(Some(1_000)).unwrap();
    sink.accept(outcome("a", 1_900, None)).unwrap();
    sink.advance(None).unwrap();
    let csv = std::fs::read_to_string(dir.path().join("billing/billable-1000-2000.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2);
    assert!(csv.contains(",1100,1200,"));
    let late = std::fs::read_to_string(dir.path().join("late.jsonl")).unwrap();
    assert!(late.contains("already_final"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("expired.jsonl")).unwrap(),
        ""
    );

    // Reopened on the same directory, nothing is written again.
    let before = std::fs::read(dir.path().join("billing/billable-1000-2000.csv")).unwrap();
    let mut again = open(dir.path());
    again.accept(outcome("a", 1_100, Some(1_150))).unwrap();
    again.advance(None).unwrap();
    let after = std::fs::read(dir.path().join("billing/billable-1000-2000.csv")).unwrap();
    assert_eq!(before, after);
    assert_eq!(files(dir.path()).len(), 2);
}
