//! The spike part of the e2e harness: steady traffic, then an ad spike and
//! a chat and join storm, and what creators and billing feel before,
//! during and after each.
//!
//! Traffic is the generator at a steady total rate with `ts` = now
//! ([`testkit::kafka::Traffic::with_spikes`]), passed through the
//! generator's `Spiked`: the spiked kinds come at `multiplier` times their usual rate
//! inside each window, everything else is unchanged. The windows are in
//! event time, which is the wall clock here, so they are laid out before
//! the traffic starts and the phases of the measurement follow them.

use livepipe_tools::generator::spike::{Spike, SpikeKind};

use std::collections::BTreeMap;
use std::time::Duration;

use super::live::{percentile, FinalityWatch, Job, Phase};

/// The phases of a run, in order: a name and the spike it runs under.
pub fn phases(kinds: &[SpikeKind]) -> Vec<(String, Option<SpikeKind>)> {
    let mut phases = vec![("before".to_string(), None)];
    for &kind in kinds {
        let name = match kind {
            SpikeKind::Ads => "ad spike",
            SpikeKind::ChatJoin => "chat+join storm",
        };
        phases.push((format!("during {name}"), Some(kind)));
        phases.push((format!("after {name}"), None));
    }
    phases
}

/// The spikes of `phases` as windows of event time, each phase `length`
/// long, the first starting at `start_ms`.
pub fn windows(
    phases: &[(String, Option<SpikeKind>)],
    start_ms: u64,
    length: Duration,
    multiplier: u32,
) -> Vec<Spike> {
    let length = length.as_millis() as u64;
    phases
        .iter()
        .enumerate()
        .filter_map(|(n, (_, kind))| {
            let from_ts = start_ms + n as u64 * length;
            kind.map(|kind| Spike {
                kind,
                multiplier,
                from_ts,
                until_ts: from_ts + length,
            })
        })
        .collect()
}

/// Cumulative bucket counts of `livepipe_operator_invocation_seconds`, by
/// path and bound (`+Inf` as infinity), from a `/metrics` text.
pub struct Invocations(BTreeMap<(String, u64), f64>);

impl Invocations {
    pub fn read(job: &Job) -> Invocations {
        let text = job.get("/metrics");
        let mut buckets = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("livepipe_operator_invocation_seconds_bucket{le=\"")
            else {
                continue;
            };
            let parsed = (|| {
                let (le, rest) = rest.split_once("\",path=\"")?;
                let (path, count) = rest.split_once("\"} ")?;
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some(((path.to_string(), le.to_bits()), count.trim().parse().ok()?))
            })();
            buckets.extend(parsed);
        }
        Invocations(buckets)
    }

    /// Per path, in `source, live, billing` order: the least bucket bound
    /// (ms) under which every invocation since `earlier` fell, i.e. the
    /// longest invocation in between, rounded up to a bucket bound.
    pub fn longest_since(&self, earlier: &Invocations) -> [f64; 3] {
        ["source", "live", "billing"].map(|path| {
            let delta = |bits: u64| {
                let key = (path.to_string(), bits);
                self.0.get(&key).unwrap_or(&0.0) - earlier.0.get(&key).unwrap_or(&0.0)
            };
            let all = delta(f64::INFINITY.to_bits());
            let mut bounds: Vec<f64> = (self.0.keys())
                .filter(|(p, _)| p == path)
                .map(|(_, bits)| f64::from_bits(*bits))
                .collect();
            bounds.sort_by(f64::total_cmp);
            bounds
                .into_iter()
                .find(|le| delta(le.to_bits()) >= all)
                .map_or(f64::NAN, |le| le * 1e3)
        })
    }
}

/// One row of the table: what a phase measured.
pub struct Row {
    pub phase: String,
    pub live: Phase,
    pub finality_ms: Vec<f64>,
    /// The longest operator invocation per path during the phase, as the
    /// histogram's bucket bound at or above it (ms).
    pub longest_invocation_ms: [f64; 3],
    pub pending: f64,
}

impl Row {
    /// The row of a phase that ran from `start` (the histogram then) to now.
    pub fn measure(
        phase: &str,
        live: Phase,
        finality: &mut FinalityWatch,
        job: &Job,
        start: &Invocations,
    ) -> Row {
        Row {
            phase: phase.to_string(),
            live,
            finality_ms: finality.drain_ms(),
            longest_invocation_ms: Invocations::read(job).longest_since(start),
            pending: job
                .metric("livepipe_pending_impressions")
                .unwrap_or(f64::NAN),
        }
    }
}

/// Prints the table of `rows`.
pub fn print_table(rows: &[Row]) {
    println!(
        "| phase | live samples | live p50 ms | live p99 ms | live max ms | finality samples \
         | finality p50 ms | finality p99 ms | finality max ms | longest invocation ms \
         source/live/billing (<= bucket bound) | pending impressions at the end |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let l = &row.live.latencies_ms;
        let f = &row.finality_ms;
        let [source, live, billing] = row.longest_invocation_ms;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {source} / {live} / {billing} | {:.0} |",
            row.phase,
            l.len(),
            percentile(l, 0.5),
            percentile(l, 0.99),
            l.last().copied().unwrap_or(f64::NAN),
            f.len(),
            percentile(f, 0.5),
            percentile(f, 0.99),
            f.last().copied().unwrap_or(f64::NAN),
            row.pending,
        );
    }
}
