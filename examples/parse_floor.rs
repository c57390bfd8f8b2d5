//! The parse floor of a JSONL event file on its own: read the file, cut it
//! into one range per thread at line ends, parse every line into a typed
//! record with borrowed strings, nothing else (`testkit::floor`). No job
//! over the file can be faster; BENCHMARKS.md states livepipe's throughput
//! as a ratio of this, measured on the same file in the same window.
//!
//! ```sh
//! cargo run --release --example parse_floor -- events.jsonl 2
//! ```

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(path), threads) = (args.next(), args.next()) else {
        eprintln!("usage: parse_floor FILE [THREADS]");
        return ExitCode::from(2);
    };
    let threads: usize = match threads.as_deref().unwrap_or("2").parse() {
        Ok(n) if n > 0 => n,
        _ => {
            eprintln!("parse_floor: THREADS must be a positive number");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) => {
            eprintln!("parse_floor: reading {path}: {err}");
            return ExitCode::from(2);
        }
    };
    let lines = testkit::floor::bare_parse_file(&bytes, threads);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{lines} lines in {secs:.3} s = {:.0} lines/s on {threads} threads",
        lines as f64 / secs
    );
    ExitCode::SUCCESS
}
