//! One job per output directory.
//!
//! Two jobs on one `--out` would interleave their ledger commits, billing
//! files and side outputs (seen: a ledger with 4,709 billed rows beside
//! files holding 2,627, and resume positions of the wrong input). So a job
//! holds an exclusive lock on `OUT/.lock` for its whole run, taken before
//! it touches anything else there; a second job is refused at once.
//!
//! The lock is `flock(2)` (through `std::fs::File::try_lock`): the kernel
//! releases it when the holder's process ends, however it ends, so a job
//! killed with SIGKILL never blocks its restart. The file stays behind
//! between runs (removing it on exit would let a waiting opener lock a
//! deleted inode while a third job locks a new one); it holds the current
//! holder's pid and host, so that a refusal can name who holds it.

use serde::{Deserialize, Serialize};

use crate::fsutil::{DIR_MODE, FILE_MODE};

use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

pub const LOCK_FILE: &str = ".lock";

/// Held for as long as this value lives.
#[derive(Debug)]
pub struct OutDirLock {
    file: File,
}

/// Who holds the lock, as written into the lock file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub started_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another job holds it.
    #[error("{0}")]
    Held(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl OutDirLock {
    /// Creates `dir` if needed and locks it, without waiting. Nothing in
    /// the lock file changes until [`OutDirLock::announce`], so a job that
    /// is refused later (another input, other rules) leaves it as it was.
    pub fn acquire(dir: &Path) -> Result<OutDirLock, LockError> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(OutDirLock { file }),
            Err(TryLockError::WouldBlock) => {
                let holder = read_holder(&file).map_or_else(
                    || "another livepipe job".to_string(),
                    |h| format!("livepipe pid {} on host {}", h.pid, h.host),
                );
                Err(LockError::Held(format!(
                    "--out {} is in use by {holder} (it holds {}); one job per --out: stop that \
                     job first, or give this one another --out",
                    dir.display(),
                    path.display()
                )))
            }
            Err(TryLockError::Error(err)) => Err(LockError::Io(io::Error::new(
                err.kind(),
                format!("locking {}: {err}", path.display()),
            ))),
        }
    }

    /// Writes this process into the lock file, for whoever is refused next.
    pub fn announce(&mut self, started_at_ms: u64) -> io::Result<()> {
        let holder = Holder {
            pid: std::process::id(),
            host: host_name(),
            started_at_ms,
        };
        let mut bytes = serde_json::to_vec(&holder).map_err(io::Error::from)?;
        bytes.push(b'\n');
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&bytes)
    }
}

fn read_holder(mut file: &File) -> Option<Holder> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

/// This machine's name, as the kernel knows it.
fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut first = OutDirLock::acquire(&out).unwrap();
        first.announce(42).unwrap();
        let refused = OutDirLock::acquire(&out).unwrap_err().to_string();
        assert!(
            refused.contains(&format!("pid {}", std::process::id())),
            "{refused}"
        );
        assert!(refused.contains("another --out"), "{refused}");
        drop(first);
        OutDirLock::acquire(&out).expect("free again");
    }
}
