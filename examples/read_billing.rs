//! How billing should read livepipe's output: trust a period file only once
//! its completion marker exists, check the file against it, and walk the
//! coverage.
//!
//! ```sh
//! cargo run --example read_billing -- out/billing
//! ```
//!
//! A file covers one period with billed rows, or a run of periods with
//! nothing billed (header only). Sorted by start, each marker's
//! `[period_start_ms, period_end_ms)` begins where the previous one ended;
//! everything from the first start to the last end is final. A gap between
//! two markers (or anything past the last end) is not final yet: its file
//! has not appeared.
//!
//! Prints one line per file (rows, total price), the gaps, and the final
//! range; exits non-zero if any file disagrees with its marker or two
//! markers overlap.

use serde_json::Value;
use sha2::{Digest, Sha256};

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "out/billing".into()),
    );
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) => {
            eprintln!("error: {}: {err}", dir.display());
            return ExitCode::from(2);
        }
    };
    // Markers, not CSVs, say which periods are final.
    let paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".csv.done"))
        .collect();
    let mut bad = 0;
    let mut markers: Vec<(u64, u64, Value)> = Vec::new();
    for marker_path in paths {
        let marker: Value = match std::fs::read(&marker_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(marker) => marker,
            Err(err) => {
                eprintln!("{}: unreadable marker: {err}", marker_path.display());
                bad += 1;
                continue;
            }
        };
        match (
            marker["period_start_ms"].as_u64(),
            marker["period_end_ms"].as_u64(),
        ) {
            (Some(start), Some(end)) if start < end => markers.push((start, end, marker)),
            _ => {
                eprintln!("{}: marker without a period range", marker_path.display());
                bad += 1;
            }
        }
    }
    // Coverage: in start order, each file begins where the previous ended.
    markers.sort_by_key(|&(start, end, _)| (start, end));
    let mut covered: Option<(u64, u64)> = None;
    let mut gaps = 0;
    let (mut all_rows, mut all_total) = (0u64, 0u64);
    for (start, end, marker) in &markers {
        let (start, end) = (*start, *end);
        match covered {
            Some((_, previous_end)) if start < previous_end => {
                eprintln!("[{start}, {end}) overlaps the file before it (ends at {previous_end})");
                bad += 1;
                continue;
            }
            Some((_, previous_end)) if start > previous_end => {
                println!("[{previous_end}, {start}): not final yet (no file)");
                gaps += 1;
            }
            _ => {}
        }
        covered = Some((covered.map_or(start, |(first, _)| first), end));
        let file = marker["file"].as_str().unwrap_or_default();
        let bytes = std::fs::read(dir.join(file)).unwrap_or_default();
        // Count records, not lines: a quoted field may hold a newline.
        let rows = csv::Reader::from_reader(bytes.as_slice()).records().count() as u64;
        let sha = hex::encode(Sha256::digest(&bytes));
        if Some(sha.as_str()) != marker["sha256"].as_str() || Some(rows) != marker["rows"].as_u64()
        {
            eprintln!("{file}: does not match its marker");
            bad += 1;
            continue;
        }
        let total = marker["total_price_micros"].as_u64().unwrap_or(0);
        all_rows += rows;
        all_total += total;
        if rows == 0 {
            println!("{file}: nothing to bill in [{start}, {end})");
        } else {
            println!("{file}: {rows} billable impressions, {total} micros");
        }
    }
    match covered {
        Some((first, last)) if gaps == 0 => {
            println!("final: [{first}, {last}); later periods are not final yet")
        }
        Some((first, last)) => println!("final: [{first}, {last}) but for the {gaps} gap(s) above"),
        None => println!("nothing final yet"),
    }
    println!("total: {all_rows} billable impressions, {all_total} micros");
    if bad > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
