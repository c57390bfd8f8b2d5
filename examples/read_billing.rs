//! How billing should read livepipe's output: trust a period file only once
//! its completion marker exists, and check the file against it.
//!
//! ```sh
//! cargo run --example read_billing -- out/billing
//! ```
//!
//! Prints one line per final period (rows, total price) and exits non-zero
//! if any file disagrees with its marker.

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
    let mut markers: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".csv.done"))
        .collect();
    markers.sort();
    let mut bad = 0;
    let (mut all_rows, mut all_total) = (0u64, 0u64);
    for marker_path in markers {
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
        println!("{file}: {rows} billable impressions, {total} micros");
    }
    println!("total: {all_rows} billable impressions, {all_total} micros");
    if bad > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
