//! Bounded turns: no operator holds its worker for long.
//!
//! Both paths run on the same timely workers, and a worker runs one
//! operator at a time. A live tick is only as punctual as the longest
//! invocation of any operator scheduled before it on its worker, so an
//! operator with a lot to do (billing settling a whole period of
//! impressions when the frontier jumps, the live path applying a burst of
//! signals) does a [`Slice`] of it, keeps the rest with its capabilities,
//! activates itself and returns. Timely then runs whatever else is due
//! (a tick, a source poll) before it comes back.
//!
//! [`Turns`] measures what the slices achieve: the longest invocation per
//! path and a histogram of all of them, timed with two clock reads per
//! invocation ([`Turns::time`]).

use prometheus_client::metrics::histogram::Histogram;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long one slice of work may take before the operator yields. Well
/// under the live tick (a second) and the contract's latency budget, yet
/// long enough that rescheduling costs nothing noticeable.
pub const SLICE_TIME: Duration = Duration::from_millis(2);

/// The clock is read once per this many units of work, not per unit.
const CHECK_EVERY: usize = 64;

/// One invocation's budget: at most `max` units of work and about
/// [`SLICE_TIME`] (whichever comes first).
#[derive(Debug)]
pub struct Slice {
    started: Instant,
    done: usize,
    max: usize,
    time: Duration,
}

impl Slice {
    pub fn new(max: usize) -> Self {
        Slice::with_time(max, SLICE_TIME)
    }

    pub fn with_time(max: usize, time: Duration) -> Self {
        Slice {
            started: Instant::now(),
            done: 0,
            max,
            time,
        }
    }

    /// Whether one more unit of work fits in the slice; if so it is counted.
    /// Once it says no it keeps saying no.
    pub fn take(&mut self) -> bool {
        if self.done >= self.max {
            return false;
        }
        if self.done > 0
            && self.done.is_multiple_of(CHECK_EVERY)
            && self.started.elapsed() >= self.time
        {
            self.max = self.done;
            return false;
        }
        self.done += 1;
        true
    }

    /// Whether the slice was used up (the operator has more to do).
    pub fn exhausted(&self) -> bool {
        self.done >= self.max
    }
}

/// Which path an operator belongs to, for `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Reading the input and splitting it (shared by both paths).
    Source = 0,
    Live = 1,
    Billing = 2,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Source, Path::Live, Path::Billing];

    /// The `path` label.
    pub fn label(self) -> &'static str {
        match self {
            Path::Source => "source",
            Path::Live => "live",
            Path::Billing => "billing",
        }
    }
}

/// Bucket bounds (seconds) of [`Turns::histogram`]: a slice is meant to
/// stay under [`SLICE_TIME`]; tens of milliseconds delay a tick visibly.
pub const INVOCATION_BUCKETS: [f64; 12] = [
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// Operator invocation times per path, every worker's.
#[derive(Debug)]
pub struct Turns {
    /// The longest invocation since the start, in nanoseconds.
    max_nanos: [AtomicU64; 3],
    histograms: [Histogram; 3],
}

impl Default for Turns {
    fn default() -> Self {
        Turns {
            max_nanos: Default::default(),
            histograms: std::array::from_fn(|_| Histogram::new(INVOCATION_BUCKETS)),
        }
    }
}

impl Turns {
    /// Times an invocation of an operator of `path` until the guard drops.
    pub fn time(&self, path: Path) -> TurnTimer<'_> {
        TurnTimer {
            turns: self,
            path,
            started: Instant::now(),
        }
    }

    /// Records one invocation of `path` that took `took`.
    pub fn record(&self, path: Path, took: Duration) {
        let slot = path as usize;
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.max_nanos[slot].fetch_max(nanos, Ordering::Relaxed);
        self.histograms[slot].observe(took.as_secs_f64());
    }

    /// The longest invocation of `path` since the start, in seconds.
    pub fn max_seconds(&self, path: Path) -> f64 {
        self.max_nanos[path as usize].load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Every invocation of `path` (seconds).
    pub fn histogram(&self, path: Path) -> &Histogram {
        &self.histograms[path as usize]
    }
}

/// Records the invocation's duration when dropped (see [`Turns::time`]).
pub struct TurnTimer<'a> {
    turns: &'a Turns,
    path: Path,
    started: Instant,
}

impl Drop for TurnTimer<'_> {
    fn drop(&mut self) {
        self.turns.record(self.path, self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_stops_at_its_count_and_stays_stopped() {
        let mut slice = Slice::with_time(3, Duration::from_secs(60));
        assert!(slice.take() && slice.take() && slice.take());
        assert!(!slice.take());
        assert!(!slice.take());
        assert!(slice.exhausted());
    }

    #[test]
    fn a_slice_stops_when_its_time_is_up() {
        let mut slice = Slice::with_time(usize::MAX, Duration::ZERO);
        let taken = std::iter::from_fn(|| slice.take().then_some(())).count();
        assert_eq!(taken, CHECK_EVERY);
        assert!(slice.exhausted());
    }

    #[test]
    fn turns_keep_the_longest_invocation_per_path() {
        let turns = Turns::default();
        turns.record(Path::Billing, Duration::from_millis(3));
        turns.record(Path::Billing, Duration::from_millis(1));
        turns.record(Path::Live, Duration::from_micros(5));
        assert_eq!(turns.max_seconds(Path::Billing), 0.003);
        assert_eq!(turns.max_seconds(Path::Live), 0.000005);
        assert_eq!(turns.max_seconds(Path::Source), 0.0);
        drop(turns.time(Path::Source));
        assert!(turns.max_seconds(Path::Source) > 0.0);
    }
}
