//! Hostile producers and hostile output directories: one record stamped
//! minutes ahead of the clock changes no billed row, and links planted in
//! `--out` overwrite nothing.

use livepipe_tools::generator::{GenConfig, Generator};
use testkit::now_ms;
use testkit::outputs::{assert_ledger_matches, assert_reference, billing_files, reference};
use testkit::{input_args, livepipe, write_jsonl};

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Output;

fn run_file(file: &Path, out: &Path) -> Output {
    let mut args = input_args(file, out);
    args.extend(["--workers", "2"]);
    livepipe(&args)
}

/// Runs `file` into a fresh `out` in which `link` already points at
/// `target`.
fn run_with_link(file: &Path, out: &Path, link: &str, target: &Path) -> Output {
    std::fs::create_dir(out).unwrap();
    symlink(target, out.join(link)).unwrap();
    run_file(file, out)
}

#[test]
fn one_record_minutes_ahead_of_the_clock_changes_no_billed_row() {
    let dir = tempfile::tempdir().unwrap();
    // Honest traffic of the last minute: impressions whose windows are
    // still open when the file is read.
    let start = now_ms() - 60_000;
    let honest: Vec<Vec<u8>> = Generator::new(&GenConfig {
        seed: 71,
        events: 20_000,
        start_ts: start,
        rate: 400,
        late_rate: 0.0,
        ..GenConfig::default()
    })
    .collect();
    // One player with its clock nine minutes ahead (the parser accepts up
    // to ten), in the middle of the traffic.
    let ahead = format!(
        r#"{{"type":"heartbeat","event_id":"skewed-1","ts":{},"stream_id":"stream-1","viewer_id":"skewed"}}"#,
        now_ms() + 9 * 60_000
    );
    let mut records = honest.clone();
    records.insert(honest.len() / 3, ahead.into_bytes());
    let (file, out) = (dir.path().join("x.jsonl"), dir.path().join("out"));
    write_jsonl(&file, &records);
    let run = run_file(&file, &out);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // What billing must be: the honest traffic alone, as if the skewed
    // record had never dragged the watermark.
    let want = reference(&honest);
    assert!(
        want.files
            .values()
            .any(|csv| csv.split(|&b| b == b'\n').count() > 2),
        "the traffic bills something"
    );
    let files = billing_files(&out);
    assert_reference(&files, &want);
    assert_ledger_matches(&out, &files);
}

#[test]
fn links_planted_in_out_overwrite_nothing_and_outputs_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.jsonl");
    write_jsonl(&file, &testkit::kafka::generated_traffic(5_000, 72));
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();

    // A temp-file name pointing at the victim: replaced, not followed.
    let out = dir.path().join("out");
    let run = run_with_link(&file, &out, ".tmp-live.json", &victim);
    assert_eq!(run.status.code(), Some(0));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!std::fs::symlink_metadata(out.join("live.json"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Viewer ids and prices are nobody else's business (the test made
    // `out` itself, with its own mode).
    for path in all_paths(&out).into_iter().skip(1) {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode & 0o027, 0, "{} is {mode:o}", path.display());
    }

    // A side output pointing at the victim: the job stops, the victim stays.
    let run = run_with_link(&file, &dir.path().join("out2"), "rejected.jsonl", &victim);
    assert_ne!(run.status.code(), Some(0));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

    // billing/ as a link to another directory: refused before anything.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join(".tmp-keep"), b"mine").unwrap();
    let run = run_with_link(&file, &dir.path().join("out3"), "billing", &elsewhere);
    let said = testkit::refused(&run);
    assert!(said.contains("symbolic link"), "{said}");
    assert!(
        elsewhere.join(".tmp-keep").exists(),
        "nothing cleaned there"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 1);
}

/// Every file and directory below `dir`, `dir` included.
fn all_paths(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < found.len() {
        if found[i].is_dir() {
            let entries: Vec<_> = std::fs::read_dir(&found[i])
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            found.extend(entries);
        }
        i += 1;
    }
    found
}
