//! The knobs of the two paths, with the defaults the contract fixes
//! (docs/contract.md, Command line).

use serde::{Deserialize, Serialize};

/// Everything the dataflow needs to know about the business rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// An `ad_progress` qualifies with `watched_ms >= qualify_ms`.
    pub qualify_ms: u64,
    /// A qualifying `ad_progress` has `ts` in `[imp.ts, imp.ts + qualify_window_ms]`.
    pub qualify_window_ms: u64,
    /// Per-partition watermark = highest `ts` seen minus this.
    pub allowed_lateness_ms: u64,
    /// Billing files cover `[k * period, (k + 1) * period)` of impression time.
    pub billing_period_ms: u64,
    /// A viewer counts while its latest presence signal is newer than `now - ttl`.
    pub presence_ttl_ms: u64,
    /// A caught-up partition with nothing new for this long stops holding
    /// the watermark back (Kafka only; a file at its end stops at once).
    pub idle_timeout_ms: u64,
    /// Granularity of timely timestamps, if not the one the qualify window
    /// implies ([`granularity_for`]; read it with
    /// [`PipelineConfig::time_granularity_ms`]). Exact milliseconds stay in
    /// the data; progress tracking only sees coarse times (see
    /// [`crate::time`]).
    pub time_granularity: Option<u64>,
    /// How long billing keeps an impression's records after it is final, so
    /// late duplicates and late progress are recognised as late in the
    /// dataflow. Past this the ledger is the guard (see `billing`).
    pub state_retention_ms: u64,
    /// Wall-clock period of the live snapshots.
    pub tick_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            qualify_ms: 2_000,
            qualify_window_ms: 300_000,
            allowed_lateness_ms: 5_000,
            billing_period_ms: 60_000,
            presence_ttl_ms: 30_000,
            idle_timeout_ms: 10_000,
            time_granularity: None,
            state_retention_ms: 600_000,
            tick_ms: 1_000,
        }
    }
}

/// The granularity of timely times for a qualify window: a thirtieth of
/// it, between 1 s and 10 s.
///
/// Every distinct time costs progress tracking and merge work in every
/// operator (a replay of four hours of traffic at 1 s carries 14,400 of
/// them, and they were a tenth of its cost). Nothing can be final before
/// its window has passed, so rounding to a thirtieth of the window delays
/// finalization by at most about 3% of what it waits anyway; exactness
/// does not depend on the granularity at all (see [`crate::time`]).
pub fn granularity_for(qualify_window_ms: u64) -> u64 {
    (qualify_window_ms / 30).clamp(1_000, 10_000)
}

impl PipelineConfig {
    /// Granularity of timely timestamps: the one set, or a thirtieth of the
    /// qualify window.
    pub fn time_granularity_ms(&self) -> u64 {
        self.time_granularity
            .unwrap_or_else(|| granularity_for(self.qualify_window_ms))
    }

    /// Checks the values that would make the pipeline meaningless, with a
    /// message naming the flag to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.billing_period_ms == 0 {
            return Err("--billing-period-ms must be at least 1".into());
        }
        if self.presence_ttl_ms == 0 {
            return Err("--presence-ttl-ms must be at least 1".into());
        }
        if self.time_granularity == Some(0) {
            return Err("the time granularity must be at least 1 ms".into());
        }
        if self.tick_ms == 0 {
            return Err("the live tick must be at least 1 ms".into());
        }
        // Deadlines are `ts + window` with ts < 2^53; keep all sums far from overflow.
        const LIMIT: u64 = 1 << 60;
        for (flag, value) in [
            ("--qualify-window-ms", self.qualify_window_ms),
            ("--allowed-lateness-ms", self.allowed_lateness_ms),
            ("--billing-period-ms", self.billing_period_ms),
            ("--presence-ttl-ms", self.presence_ttl_ms),
        ] {
            if value >= LIMIT {
                return Err(format!("{flag} is too large (at most {})", LIMIT - 1));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_a_thirtieth_of_the_window_between_one_and_ten_seconds() {
        for (window, granularity) in [
            (0, 1_000),
            (2_000, 1_000),
            (30_000, 1_000),
            (60_000, 2_000),
            (300_000, 10_000),
            (3_600_000, 10_000),
            (u64::MAX, 10_000),
        ] {
            assert_eq!(granularity_for(window), granularity, "window {window}");
        }
        assert_eq!(PipelineConfig::default().time_granularity_ms(), 10_000);
        // Derived from the window it is set with, unless set itself.
        let short = PipelineConfig {
            qualify_window_ms: 2_000,
            ..PipelineConfig::default()
        };
        assert_eq!(short.time_granularity_ms(), 1_000);
        let fixed = PipelineConfig {
            time_granularity: Some(100),
            ..short
        };
        assert_eq!(fixed.time_granularity_ms(), 100);
    }
}
