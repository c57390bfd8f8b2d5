//! The billing sink on its own: which files appear when, and what is in them.

use livepipe_dataflow::billing::{AdDetails, BillingEvent, ImpressionFact, Outcome};
use livepipe_dataflow::config::PipelineConfig;
use livepipe_dataflow::event::Position;
use livepipe_sinks::billing::{BillingSink, Marker};
use livepipe_sinks::ledger::{Ledger, LEDGER_FILE};
use livepipe_sinks::side::SideOutputs;

use testkit::outputs::query_strings;

use std::path::Path;
use std::sync::Arc;

const PERIOD: u64 = 1_000;
const WINDOW: u64 = 500;
const HEADER: &str = "impression_id,ad_id,campaign_id,advertiser_id,stream_id,viewer_id,impression_ts,qualified_ts,price_micros\n";

fn config() -> PipelineConfig {
    PipelineConfig {
        billing_period_ms: PERIOD,
        qualify_window_ms: WINDOW,
        time_granularity: Some(100),
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

/// Each of `csvs` followed by its marker, as [`files`] lists them.
fn with_markers(csvs: &[&str]) -> Vec<String> {
    csvs.iter()
        .flat_map(|csv| [csv.to_string(), format!("{csv}.done")])
        .collect()
}

/// A sink on a fresh output directory.
fn fresh() -> (tempfile::TempDir, BillingSink) {
    let dir = tempfile::tempdir().unwrap();
    let sink = open(dir.path());
    (dir, sink)
}

/// `a` billed in period 1000, `b` expired in period 3000.
fn a_billed_and_b_expired(sink: &mut BillingSink) {
    sink.accept(outcome("a", 1_100, Some(1_200))).unwrap();
    sink.accept(outcome("b", 3_100, None)).unwrap();
}

/// Moves the frontier to `frontier` and waits for the files that made
/// final (a running sink writes them on a thread of its own).
fn advance_to(sink: &mut BillingSink, frontier: u64) {
    sink.advance(Some(frontier)).unwrap();
    sink.wait_for_files().unwrap();
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
    let (dir, mut sink) = fresh();
    // Period 3000 is final (its deadline passed) and reaches the sink first...
    sink.accept(outcome("b", 3_100, Some(3_200))).unwrap();
    sink.advance(Some(1_000)).unwrap();
    assert!(files(dir.path()).is_empty(), "period 1000 is not final yet");
    // ...then period 1000's outcome; nothing new when the frontier moves on.
    sink.accept(outcome("a", 1_100, None)).unwrap();
    sink.advance(Some(1_200)).unwrap();
    sink.advance(None).unwrap();
    // Periods 1000 (expired only) and 2000 (nothing) bill nothing: one
    // header-only file covers the run.
    assert_eq!(
        files(dir.path()),
        with_markers(&["billable-1000-3000.csv", "billable-3000-4000.csv"])
    );
    let billing = dir.path().join("billing");
    assert_eq!(
        std::fs::read_to_string(billing.join("billable-1000-3000.csv")).unwrap(),
        HEADER
    );
    let header = HEADER;
    assert_eq!(
        std::fs::read_to_string(billing.join("billable-3000-4000.csv")).unwrap(),
        format!("{header}b,ad,\"c,1\",adv,s,v,3100,3200,7\n")
    );
}

#[test]
fn a_period_is_written_only_once_its_last_deadline_has_passed() {
    let (dir, mut sink) = fresh();
    sink.accept(outcome("a", 1_000, Some(1_001))).unwrap();
    // The last impression of [1000, 2000) has its deadline at 1999 + 500.
    advance_to(&mut sink, 2_400);
    assert!(files(dir.path()).is_empty());
    advance_to(&mut sink, 2_500);
    assert_eq!(files(dir.path()).len(), 2);
    // Quiet periods after the last impression get no file (yet): a later
    // impression would cover the gap with a header-only file.
    advance_to(&mut sink, 3_500);
    assert_eq!(files(dir.path()).len(), 2);
}

#[test]
fn an_id_is_final_once_whatever_comes_later() {
    let (dir, mut sink) = fresh();
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

#[test]
fn a_file_lists_its_period_rows_from_every_commit_and_from_an_earlier_run() {
    let (dir, mut sink) = fresh();
    // Period 1000's rows come in three commits, the first two before a
    // restart; none is final before the last.
    sink.accept(outcome("m", 1_300, Some(1_310))).unwrap();
    sink.accept(outcome("x", 1_100, None)).unwrap();
    sink.advance(Some(1_000)).unwrap();
    sink.accept(outcome("z", 1_200, Some(1_210))).unwrap();
    sink.advance(Some(1_100)).unwrap();
    drop(sink);
    assert!(files(dir.path()).is_empty());

    let mut again = open(dir.path());
    again.accept(outcome("a", 1_400, Some(1_410))).unwrap();
    again.accept(outcome("n", 2_100, Some(2_110))).unwrap();
    again.advance(Some(2_500)).unwrap();
    again.advance(None).unwrap();
    let billing = dir.path().join("billing");
    let header = HEADER;
    assert_eq!(
        std::fs::read_to_string(billing.join("billable-1000-2000.csv")).unwrap(),
        format!(
            "{header}a,ad,\"c,1\",adv,s,v,1400,1410,7\n\
             m,ad,\"c,1\",adv,s,v,1300,1310,7\n\
             z,ad,\"c,1\",adv,s,v,1200,1210,7\n"
        )
    );
    assert_eq!(
        std::fs::read_to_string(billing.join("billable-2000-3000.csv")).unwrap(),
        format!("{header}n,ad,\"c,1\",adv,s,v,2100,2110,7\n")
    );
    // And the file says what the ledger says.
    let billed = query_strings(
        &dir.path().join(LEDGER_FILE),
        "SELECT impression_id FROM finalized WHERE billed = 1 ORDER BY impression_id",
    );
    assert_eq!(billed, ["a", "m", "n", "z"]);
}

fn marker(out: &Path, csv: &str) -> Marker {
    serde_json::from_slice(&std::fs::read(out.join(format!("billing/{csv}.done"))).unwrap())
        .unwrap()
}

#[test]
fn a_run_without_billed_rows_is_one_file_written_with_the_period_after_it() {
    let (dir, mut sink) = fresh();
    a_billed_and_b_expired(&mut sink);
    sink.advance(Some(1_000)).unwrap();
    // Three years of periods later (an impression far ahead of the others).
    let far = 1_000 + 3 * 365 * 24 * 3_600_000;
    sink.accept(outcome("c", far + 50, Some(far + 60))).unwrap();
    // [2000, 4000) is final, but the run it belongs to may go on: no file.
    advance_to(&mut sink, 4_600);
    assert_eq!(files(dir.path()).len(), 2, "{:?}", files(dir.path()));
    // One file for the whole run, not one per period (the listing below).
    advance_to(&mut sink, far + PERIOD + WINDOW);
    let run = format!("billable-2000-{far}.csv");
    let last = format!("billable-{far}-{}.csv", far + PERIOD);
    let mut want = with_markers(&["billable-1000-2000.csv", &run, &last]);
    want.sort();
    assert_eq!(files(dir.path()), want);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("billing").join(&run)).unwrap(),
        HEADER
    );
    let run_marker = marker(dir.path(), &run);
    assert_eq!(
        (run_marker.period_start_ms, run_marker.period_end_ms),
        (2_000, far)
    );
    assert_eq!((run_marker.rows, run_marker.total_price_micros), (0, 0));
    // The ledger records each file with its range.
    let ledger = Ledger::open(&dir.path().join(LEDGER_FILE)).unwrap();
    assert_eq!(ledger.next_unwritten_period().unwrap(), Some(far + PERIOD));
    let commit = ledger.begin().unwrap();
    assert_eq!(commit.file_for(3_000).unwrap(), Some(run.clone()));
    assert_eq!(commit.file_for(far - PERIOD).unwrap(), Some(run));
    assert_eq!(commit.file_for(far).unwrap(), Some(last));
    assert_eq!(commit.file_for(far + PERIOD).unwrap(), None);
    assert_eq!(commit.file_for(0).unwrap(), None);
}

#[test]
fn the_tail_run_is_written_at_the_end_of_the_input_only() {
    let (dir, mut sink) = fresh();
    a_billed_and_b_expired(&mut sink);
    advance_to(&mut sink, 10_000);
    assert_eq!(files(dir.path()), with_markers(&["billable-1000-2000.csv"]));
    sink.advance(None).unwrap();
    assert_eq!(
        files(dir.path()),
        with_markers(&["billable-1000-2000.csv", "billable-2000-4000.csv"])
    );
}

#[test]
fn an_outcome_for_a_period_already_covered_is_late_and_stays_out_of_the_ledger() {
    let (dir, mut sink) = fresh();
    sink.accept(outcome("a", 1_100, Some(1_200))).unwrap();
    sink.accept(outcome("b", 4_100, Some(4_200))).unwrap();
    sink.advance(None).unwrap();
    let before: Vec<Vec<u8>> = files(dir.path())
        .iter()
        .map(|f| std::fs::read(dir.path().join("billing").join(f)).unwrap())
        .collect();
    assert_eq!(files(dir.path()).len(), 6);

    // A finished run resumed on an appended file: new outcomes in a period
    // with a file of its own, in a run's period, and before the first file.
    let mut again = open(dir.path());
    again.accept(outcome("c", 1_500, Some(1_600))).unwrap();
    again.accept(outcome("d", 2_500, Some(2_600))).unwrap();
    again.accept(outcome("e", 500, Some(600))).unwrap();
    again.accept(outcome("f", 5_100, Some(5_200))).unwrap();
    again.advance(None).unwrap();
    let late = std::fs::read_to_string(dir.path().join("late.jsonl")).unwrap();
    for id in ["c", "d", "e"] {
        assert!(
            late.lines()
                .any(|l| l.contains(&format!("\"impression_id\":\"{id}\""))
                    && l.contains("already_final")),
            "{id} is late: {late}"
        );
    }
    assert!(!late.contains("\"impression_id\":\"f\""));
    let names = files(dir.path());
    let after: Vec<Vec<u8>> = names[..6]
        .iter()
        .map(|f| std::fs::read(dir.path().join("billing").join(f)).unwrap())
        .collect();
    assert_eq!(before, after, "no file changes");
    assert_eq!(names[6..], with_markers(&["billable-5000-6000.csv"]));
    // The ledger bills what the files show: a, b and f.
    let billed = query_strings(
        &dir.path().join(LEDGER_FILE),
        "SELECT impression_id FROM finalized ORDER BY impression_id",
    );
    assert_eq!(billed, ["a", "b", "f"]);
}

#[test]
fn markers_carry_campaigns_and_old_markers_still_read() {
    let (dir, mut sink) = fresh();
    sink.accept(outcome("a", 1_100, Some(1_150))).unwrap();
    sink.accept(outcome("b", 1_200, Some(1_250))).unwrap();
    sink.advance(None).unwrap();
    let written = marker(dir.path(), "billable-1000-2000.csv");
    let campaign = &written.campaigns["c,1"];
    assert_eq!((campaign.rows, campaign.price_micros), (2, 14));

    let old = r#"{"file":"billable-0-60000.csv","period_start_ms":0,"period_end_ms":60000,
        "rows":0,"total_price_micros":0,"sha256":"00"}"#;
    let old: Marker = serde_json::from_str(old).unwrap();
    assert!(old.campaigns.is_empty());
}

#[test]
fn the_ledger_records_late_records_but_not_replays() {
    let (dir, mut sink) = fresh();
    sink.accept(outcome("a", 1_100, Some(1_150))).unwrap();
    sink.advance(None).unwrap();
    drop(sink);
    // The next run reads the canonical record again (a replay), a
    // duplicate of it with another event id and a producer retry of it
    // (same event id, another position): the last two are late.
    let mut again = open(dir.path());
    again.accept(outcome("a", 1_100, Some(1_150))).unwrap();
    for (event_id, offset) in [("e-a-other", 2), ("e-a", 3)] {
        let BillingEvent::Final(mut duplicate) = outcome("a", 1_100, Some(1_150)) else {
            unreachable!()
        };
        duplicate.impression.event_id = event_id.into();
        duplicate.impression.position.offset = offset;
        again.accept(BillingEvent::Final(duplicate)).unwrap();
    }
    again.advance(None).unwrap();
    drop(again);
    let late = query_strings(
        &dir.path().join(LEDGER_FILE),
        "SELECT reason || ':' || record_offset FROM late ORDER BY record_offset",
    );
    assert_eq!(late, ["already_final:2", "already_final:3"]);
}
