//! Billing policy past one impression: when a billing period is final,
//! which files cover the periods, and from where a source may resume.
//!
//! [`crate::billing`] decides each impression; this module decides what
//! the billing sink does with the decisions, so the whole billing rule
//! lives in this crate, next to the dataflow that keeps its invariants.
//! The sink executes: it asks [`BillingPolicy`] and [`Coverage`], queries
//! its ledger, and writes what they say. (The rules are in
//! `docs/contract.md`, "Billing rules" and "Billing files".)

use crate::config::PipelineConfig;
use crate::time::{coarse, Time};

/// The rules that decide finality and resumption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BillingPolicy {
    billing_period_ms: u64,
    qualify_window_ms: u64,
    allowed_lateness_ms: u64,
    time_granularity_ms: u64,
}

impl BillingPolicy {
    pub fn new(config: &PipelineConfig) -> Self {
        BillingPolicy {
            billing_period_ms: config.billing_period_ms,
            qualify_window_ms: config.qualify_window_ms,
            allowed_lateness_ms: config.allowed_lateness_ms,
            time_granularity_ms: config.time_granularity_ms(),
        }
    }

    pub fn period_ms(&self) -> u64 {
        self.billing_period_ms
    }

    /// The billing period that holds impression time `ts`: its start.
    pub fn period_start(&self, ts: u64) -> u64 {
        ts - ts % self.billing_period_ms
    }

    /// A period is final once every impression in it is: the frontier
    /// (`None`: the input is exhausted) has passed the deadline of its
    /// last millisecond.
    pub fn period_is_final(&self, period: u64, frontier: Option<Time>) -> bool {
        let last_deadline = period + self.billing_period_ms - 1 + self.qualify_window_ms;
        frontier.is_none_or(|f| f > coarse(last_deadline, self.time_granularity_ms))
    }

    /// The event time below which a source's records can no longer change
    /// anything that is not final at `frontier`: an impression that is not
    /// final has its records at watermarks above it. Positions reached
    /// below it are safe to resume from. `None`: everything is final.
    pub fn resume_bound(&self, frontier: Option<Time>) -> Option<u64> {
        frontier.map(|f| {
            f.saturating_sub(
                self.qualify_window_ms + self.allowed_lateness_ms + self.time_granularity_ms,
            )
        })
    }
}

/// Which periods hold finalized impressions, and which the files cover.
///
/// From the first period that held a finalized impression to the latest
/// final one, every period is covered by exactly one file: a period with
/// billed rows has its own; a maximal run of periods without any has one
/// header-only file spanning the run. Files stop at the last period that
/// held a finalized impression, so the same input gives the same files
/// however far the watermark runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// The first period no file covers yet (the end of the last file).
    /// Before the first file it is the least period finalized so far and
    /// may still move back: outcomes of a later period can reach the sink
    /// before those of an earlier one. Once a period is final nothing
    /// earlier can come, so writing fixes it.
    next: Option<u64>,
    files_started: bool,
    /// The greatest period holding a finalized impression.
    last: Option<u64>,
}

/// The files to write next, each `[start, end)` in ms of impression time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextFiles {
    /// The run of periods without billed rows before `billed`, if any.
    pub empty_run: Option<(u64, u64)>,
    /// The next period with billed rows, if it is final.
    pub billed: Option<(u64, u64)>,
}

impl Coverage {
    /// Where an earlier run left off: the end of its last file, and the
    /// first and last periods it finalized impressions in.
    pub fn resumed(end_of_files: Option<u64>, finalized: Option<(u64, u64)>) -> Self {
        Coverage {
            next: end_of_files.or(finalized.map(|(first, _)| first)),
            files_started: end_of_files.is_some(),
            last: finalized.map(|(_, last)| last),
        }
    }

    /// Whether a file already covers `period`. An outcome for such a
    /// period comes too late for the files, so it stays out of the ledger
    /// too: the ledger bills only what files show. Periods before the
    /// first file count the same, since coverage starts there.
    pub fn covers(&self, period: u64) -> bool {
        self.files_started && self.next.is_some_and(|next| period < next)
    }

    /// The first period no file covers (before the first file: the least
    /// period finalized so far), if any impression was finalized: billed
    /// rows from here on are not in a file yet.
    pub fn first_uncovered(&self) -> Option<u64> {
        self.next
    }

    /// Notes a period that holds a newly finalized impression.
    pub fn saw(&mut self, period: u64) {
        if !self.files_started {
            self.next = Some(self.next.map_or(period, |next| next.min(period)));
        }
        self.last = Some(self.last.map_or(period, |last| last.max(period)));
    }

    /// The first period due a file at `frontier`, if any is.
    pub fn due(&self, policy: &BillingPolicy, frontier: Option<Time>) -> Option<u64> {
        let (next, last) = (self.next?, self.last?);
        (next <= last && policy.period_is_final(next, frontier)).then_some(next)
    }

    /// The files to write next, given `next_billed`: the first period at or
    /// after [`Self::due`] that has billed rows (the ledger knows). `None`
    /// when nothing is due, or when the run of empty periods may still go
    /// on (it is written with the billable period after it). Moves the
    /// coverage past the files it returns.
    pub fn take_files(
        &mut self,
        policy: &BillingPolicy,
        next_billed: Option<u64>,
        frontier: Option<Time>,
    ) -> Option<NextFiles> {
        let next = self.due(policy, frontier)?;
        let period_ms = policy.period_ms();
        let billable = next_billed.filter(|&period| policy.period_is_final(period, frontier));
        let run_end = match billable {
            Some(period) => period,
            // The end of the input: the run goes to the last period.
            None if frontier.is_none() => self.last? + period_ms,
            None => return None,
        };
        let files = NextFiles {
            empty_run: (next < run_end).then_some((next, run_end)),
            billed: billable.map(|period| (period, period + period_ms)),
        };
        self.next = Some(billable.map_or(run_end, |period| period + period_ms));
        self.files_started = true;
        Some(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BillingPolicy {
        BillingPolicy::new(&PipelineConfig {
            billing_period_ms: 60_000,
            qualify_window_ms: 300_000,
            allowed_lateness_ms: 5_000,
            time_granularity: Some(1_000),
            ..PipelineConfig::default()
        })
    }

    #[test]
    fn a_period_is_final_once_the_frontier_passes_its_last_deadline() {
        // The last deadline of [60 000, 120 000) is 119 999 + 300 000,
        // whose coarse time is 419 000.
        for (frontier, is_final) in [
            (Some(0), false),
            (Some(419_000), false),
            (Some(419_001), true),
            (Some(420_000), true),
            (None, true),
        ] {
            assert_eq!(
                policy().period_is_final(60_000, frontier),
                is_final,
                "{frontier:?}"
            );
        }
    }

    #[test]
    fn sources_resume_below_everything_that_is_not_final() {
        for (frontier, bound) in [
            (None, None),
            (Some(1_000), Some(0)),
            (Some(1_000_000), Some(1_000_000 - 306_000)),
        ] {
            assert_eq!(policy().resume_bound(frontier), bound, "{frontier:?}");
        }
    }

    #[test]
    fn periods_are_taken_from_impression_time() {
        for (ts, start) in [(0, 0), (59_999, 0), (60_000, 60_000), (61_234, 60_000)] {
            assert_eq!(policy().period_start(ts), start);
        }
    }

    /// One coverage step: periods seen (in minutes), the ledger's next
    /// billed period, the frontier; what is written and where it stands.
    struct Step {
        seen: &'static [u64],
        next_billed: Option<u64>,
        frontier: Option<Time>,
        files: Option<NextFiles>,
        covers_after: &'static [(u64, bool)],
    }

    const MIN: u64 = 60_000;
    /// A frontier at which periods up to `minute` (inclusive) are final.
    fn final_through(minute: u64) -> Option<Time> {
        Some((minute + 1) * MIN + 300_000)
    }

    #[test]
    fn coverage_writes_billed_periods_and_runs_between_them() {
        let steps = [
            // Nothing final yet: nothing written, nothing covered.
            Step {
                seen: &[3, 1],
                next_billed: Some(MIN),
                frontier: Some(0),
                files: None,
                covers_after: &[(MIN, false)],
            },
            // Minute 1 billed and final: its file, no run before it.
            Step {
                seen: &[],
                next_billed: Some(MIN),
                frontier: final_through(1),
                files: Some(NextFiles {
                    empty_run: None,
                    billed: Some((MIN, 2 * MIN)),
                }),
                covers_after: &[(MIN, true), (2 * MIN, false)],
            },
            // Minute 3 billed, final: the empty run [2, 3) first.
            Step {
                seen: &[],
                next_billed: Some(3 * MIN),
                frontier: final_through(5),
                files: Some(NextFiles {
                    empty_run: Some((2 * MIN, 3 * MIN)),
                    billed: Some((3 * MIN, 4 * MIN)),
                }),
                covers_after: &[(3 * MIN, true), (4 * MIN, false)],
            },
            // Minute 3 was the last: nothing more while the input goes on.
            Step {
                seen: &[],
                next_billed: None,
                frontier: final_through(9),
                files: None,
                covers_after: &[(4 * MIN, false)],
            },
            // Minute 7 seen; billed rows only at 7, not final yet: the run
            // before it waits for it.
            Step {
                seen: &[7],
                next_billed: Some(7 * MIN),
                frontier: final_through(5),
                files: None,
                covers_after: &[(4 * MIN, false)],
            },
            // The end of the input: everything up to the last period.
            Step {
                seen: &[],
                next_billed: Some(7 * MIN),
                frontier: None,
                files: Some(NextFiles {
                    empty_run: Some((4 * MIN, 7 * MIN)),
                    billed: Some((7 * MIN, 8 * MIN)),
                }),
                covers_after: &[(7 * MIN, true), (8 * MIN, false)],
            },
        ];
        let policy = policy();
        let mut coverage = Coverage::default();
        for (n, step) in steps.iter().enumerate() {
            for &minute in step.seen {
                coverage.saw(minute * MIN);
            }
            let files = coverage.take_files(&policy, step.next_billed, step.frontier);
            assert_eq!(files, step.files, "step {n}");
            for &(period, covered) in step.covers_after {
                assert_eq!(coverage.covers(period), covered, "step {n}, {period}");
            }
        }
    }

    #[test]
    fn a_trailing_run_without_billed_rows_is_written_at_the_end_of_the_input() {
        let policy = policy();
        // An earlier run wrote files up to minute 2 and finalized
        // impressions up to minute 4, none billed after minute 1.
        let mut coverage = Coverage::resumed(Some(2 * MIN), Some((MIN, 4 * MIN)));
        assert!(coverage.covers(MIN));
        assert_eq!(coverage.take_files(&policy, None, final_through(9)), None);
        let files = coverage.take_files(&policy, None, None);
        assert_eq!(
            files,
            Some(NextFiles {
                empty_run: Some((2 * MIN, 5 * MIN)),
                billed: None,
            })
        );
        assert_eq!(coverage.take_files(&policy, None, None), None);
    }

    #[test]
    fn before_the_first_file_an_earlier_period_moves_coverage_back() {
        let mut coverage = Coverage::default();
        coverage.saw(5 * MIN);
        coverage.saw(2 * MIN);
        assert_eq!(coverage.due(&policy(), None), Some(2 * MIN));
        assert!(!coverage.covers(2 * MIN));
    }
}
