//! The fuzz targets (`fuzz/`, cargo-fuzz) run for a bounded time: the
//! record parser and the bounded line reader must neither panic nor
//! allocate beyond what a record justifies, on anything libFuzzer finds
//! from the seed corpus of valid and malformed records in `fuzz/corpus/`.
//!
//! Needs `cargo fuzz` (installed by `.ci/run`); cargo-fuzz wants nightly
//! flags, which `RUSTC_BOOTSTRAP=1` unlocks on the stable toolchain.
//! `LIVEPIPE_FUZZ_SECONDS` is the time per target (default 30 under
//! `CI=true`); without it and outside CI the test skips, and under
//! `CI=true` a missing cargo-fuzz fails it.

use std::path::Path;
use std::process::Command;

fn seconds() -> Option<u64> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    match std::env::var("LIVEPIPE_FUZZ_SECONDS") {
        Ok(value) => Some(value.parse().expect("LIVEPIPE_FUZZ_SECONDS is a number")),
        Err(_) if ci => Some(30),
        Err(_) => None,
    }
}

#[test]
fn fuzz_targets_find_nothing() {
    let Some(seconds) = seconds() else {
        eprintln!("skipped: set LIVEPIPE_FUZZ_SECONDS (and install cargo-fuzz) to fuzz");
        return;
    };
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        installed,
        "cargo-fuzz is missing: cargo install cargo-fuzz --locked"
    );
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for target in ["parse_event", "read_record"] {
        // New inputs go to a scratch corpus; the committed one only seeds.
        let scratch = tempfile::tempdir().unwrap();
        let seeds = fuzz.join("corpus").join(target);
        let status = Command::new("cargo")
            .current_dir(&fuzz)
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target])
            .arg(scratch.path())
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // Up to a Kafka message's size; no input may make the parser
            // allocate more than 64 MiB at once or the process 2 GiB.
            .args([
                "-max_len=1048576",
                "-malloc_limit_mb=64",
                "-rss_limit_mb=2048",
            ])
            .status()
            .expect("cargo fuzz runs");
        assert!(
            status.success(),
            "fuzz target {target} failed: the input is under fuzz/artifacts/{target}/ \
             (replay: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {target} <file>)"
        );
    }
}
