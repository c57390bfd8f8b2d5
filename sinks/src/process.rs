//! The process's own CPU, memory, start time and open files, for the
//! standard `process_*` metrics.
//!
//! No crate for this is in the offline registry the build uses, and the
//! numbers are four fields of `/proc`, so they are read here: on each
//! scrape, from `/proc/self/stat`, `/proc/self/fd` and `/proc/stat`'s boot
//! time. Elsewhere than Linux nothing is read and the metrics are left out.

use std::fs;
use std::io;

/// What `/proc` says about this process; a field is `None` when it could
/// not be read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, bytes.
    pub resident_bytes: Option<u64>,
    /// Virtual memory size, bytes.
    pub virtual_bytes: Option<u64>,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    /// Reads this process's numbers now (all `None` off Linux).
    pub fn current() -> ProcessStats {
        let mut stats = ProcessStats::default();
        if let Ok(stat) = fs::read_to_string("/proc/self/stat") {
            let boot = fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|text| boot_time(&text));
            stats = from_stat(&stat, clock_ticks(), page_size(), boot).unwrap_or_default();
        }
        stats.open_fds = count_fds().ok();
        stats.max_fds = max_fds();
        stats
    }
}

/// The fields of `/proc/self/stat` (see proc(5)) given its text, the clock
/// ticks per second, the page size and the boot time (seconds since the
/// epoch). `None` if the text is not a stat line.
pub fn from_stat(stat: &str, ticks: f64, page: u64, boot: Option<u64>) -> Option<ProcessStats> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself: split after its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); field N is rest[N - 3].
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let cpu = field(14)? + field(15)?;
    Some(ProcessStats {
        cpu_seconds: Some(cpu as f64 / ticks),
        resident_bytes: field(24).map(|pages| pages * page),
        virtual_bytes: field(23),
        start_time_seconds: boot
            .zip(field(22))
            .map(|(boot, start)| boot as f64 + start as f64 / ticks),
        open_fds: None,
        max_fds: None,
    })
}

/// The `btime` line of `/proc/stat`: when the machine booted.
pub fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

fn count_fds() -> io::Result<u64> {
    Ok(fs::read_dir("/proc/self/fd")?.count() as u64)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096)
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    // rlim_t is not u64 on every target.
    #[allow(clippy::unnecessary_cast)]
    read.then_some(limit.rlim_cur as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_cpu_memory_and_start() {
        // A command name with a space and a parenthesis, as proc(5) allows.
        let stat = "4242 (live pipe) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    150 50 0 0 20 0 9 0 1000 104857600 2560 18446744073709551615";
        let stats = from_stat(stat, 100.0, 4096, Some(1_700_000_000)).unwrap();
        assert_eq!(stats.cpu_seconds, Some(2.0));
        assert_eq!(stats.resident_bytes, Some(2560 * 4096));
        assert_eq!(stats.virtual_bytes, Some(104_857_600));
        assert_eq!(stats.start_time_seconds, Some(1_700_000_010.0));
        assert_eq!(from_stat("garbage", 100.0, 4096, None), None);
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn this_process_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let stats = ProcessStats::current();
            assert!(stats.resident_bytes.unwrap() > 0, "{stats:?}");
            assert!(stats.open_fds.unwrap() > 0, "{stats:?}");
            assert!(stats.start_time_seconds.unwrap() > 1.6e9, "{stats:?}");
        }
    }
}
