//! Timely timestamps.
//!
//! Records travel at a *coarse* timely time: their partition's watermark
//! rounded down to `time_granularity_ms`. Every distinct timestamp costs
//! progress-tracking and merge work, so milliseconds would be ruinous; the
//! exact watermark and `ts` stay in the data, and every business decision
//! (late or not, which period) is made on those exact values.
//!
//! The invariant that makes this exact: a record carried at time `t` has an
//! exact watermark `w` with `coarse(w) == t`. So once the frontier has passed
//! `coarse(d)`, every record with `w <= d` has been seen; records in the
//! same coarse bucket with `w > d` are told apart by their data.

/// Wall-clock ms since the Unix epoch (0 if the clock is before it): the one
/// reading of the wall clock the whole job uses.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Timely time of the whole graph: coarse event time in ms.
pub type Time = u64;

/// Rounds an exact event time down to the granularity of timely times.
pub fn coarse(ms: u64, granularity_ms: u64) -> Time {
    ms - ms % granularity_ms
}

/// The smallest timely time strictly after the bucket holding `ms`.
pub fn after(ms: u64, granularity_ms: u64) -> Time {
    coarse(ms, granularity_ms).saturating_add(granularity_ms)
}
