//! Files under `--out`: durable, atomic, private, and never through a link.
//!
//! * Atomic replacement: a reader sees the old file, or the new one whole,
//!   never a part; after a crash, at worst a stray temp file.
//! * Private: billing files, markers, the ledger and the side outputs hold
//!   viewer ids and prices, so they are created `0640` and directories
//!   `0750` (group-readable for a billing reader's group, nothing for
//!   others), whatever the umask allows beyond that.
//! * No links followed: whoever can write into `--out` could otherwise plant
//!   `OUT/.tmp-live.json -> /some/victim` and have the job overwrite the
//!   victim. Temp files are created exclusively (`O_CREAT | O_EXCL`, which
//!   never follows a final link), appended files are opened with
//!   `O_NOFOLLOW`, and output directories that are links are refused.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Prefix of temp files, so leftovers from a crash are easy to recognise.
pub const TEMP_PREFIX: &str = ".tmp-";
/// Mode of every file the job creates under `--out`.
pub const FILE_MODE: u32 = 0o640;
/// Mode of every directory the job creates under `--out`.
pub const DIR_MODE: u32 = 0o750;

/// Writes `bytes` to `path` atomically: temp file in the same directory,
/// fsync, rename over `path`. The caller fsyncs the directory (see
/// [`sync_dir`]) once after a group of renames.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut staged = StagedFiles::default();
    staged.stage(path, bytes)?;
    staged.install()
}

/// Files written under temp names, then made durable together and renamed
/// into place in the order they were staged.
///
/// Creating and fsyncing files one after the other makes each creation
/// wait for the journal commit of the previous fsync: a commit of many
/// period files spent most of its time in `openat` and `fsync`. Written
/// first, with their writeback started at once, the files share journal
/// commits, and the fsyncs that follow mostly find their work done. What
/// a reader can see is unchanged: each file appears whole, after it is
/// durable, and in staging order (a period file before its marker).
/// Dropped before [`StagedFiles::install`], the temp files are removed.
#[derive(Default)]
pub struct StagedFiles {
    /// Temp path, final path and open file, in staging order.
    files: Vec<(PathBuf, PathBuf, File)>,
}

impl StagedFiles {
    /// How many files are staged.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Writes `bytes` to a temp file beside `path`, to be renamed over it
    /// by [`StagedFiles::install`].
    pub fn stage(&mut self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        let temp = dir.join(format!("{TEMP_PREFIX}{}", name.to_string_lossy()));
        let create = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&temp)
        };
        let mut file = match create() {
            // A leftover (a crash mid-write) or a planted file or link
            // (`O_EXCL` refuses even a dangling one): removing a link
            // removes the link, never what it points to.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&temp)?;
                create()?
            }
            created => created?,
        };
        if let Err(err) = file.write_all(bytes) {
            let _ = fs::remove_file(&temp);
            return Err(err);
        }
        start_writeback(&file);
        self.files.push((temp, path.to_path_buf(), file));
        Ok(())
    }

    /// Makes every staged file durable, then renames each over its path,
    /// in staging order.
    pub fn install(mut self) -> io::Result<()> {
        for (_, _, file) in &self.files {
            file.sync_all()?;
        }
        // Renamed files leave the list as they go, so that a failed rename
        // leaves only the temp files not yet renamed for `drop` to remove.
        self.files.reverse();
        while let Some((temp, path, file)) = self.files.pop() {
            if let Err(err) = fs::rename(&temp, &path) {
                self.files.push((temp, path, file));
                return Err(err);
            }
        }
        Ok(())
    }
}

impl Drop for StagedFiles {
    fn drop(&mut self) {
        for (temp, _, _) in self.files.drain(..) {
            let _ = fs::remove_file(temp);
        }
    }
}

/// Starts writing `file`'s dirty pages back without waiting: the fsync
/// that follows then waits on I/O already under way. Only a hint; errors
/// surface at the fsync.
fn start_writeback(file: &File) {
    // SAFETY: `sync_file_range` reads no memory of ours; the descriptor is
    // open for as long as `file` lives.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Opens `path` for appending, creating it `0640`; a link there is an
/// error (`ELOOP`), not followed.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Creates `dir` (and missing parents) `0750` if needed, and refuses it if
/// it is a symbolic link: output written through a link lands elsewhere,
/// and the start-up cleanup of temp files would run in another directory.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    refuse_link(dir)?;
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    refuse_link(dir)
}

/// An error if `path` is a symbolic link.
pub fn refuse_link(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link; livepipe writes its outputs only into real \
                 directories (give the link's target instead)",
                path.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// Makes the renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn a_planted_temp_link_is_replaced_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let out = dir.path().join("out");
        create_private_dir(&out).unwrap();
        symlink(&victim, out.join(".tmp-live.json")).unwrap();
        write_atomic(&out.join("live.json"), b"[]").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(out.join("live.json")).unwrap(), b"[]");
        let mode = fs::metadata(out.join("live.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777 & !FILE_MODE, 0, "at most 0640: {mode:o}");
    }

    #[test]
    fn staged_files_appear_only_when_installed_and_are_removed_if_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let names = |dir: &Path| {
            let mut names: Vec<String> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        fs::write(dir.path().join("a"), b"old").unwrap();
        let mut staged = StagedFiles::default();
        staged.stage(&dir.path().join("a"), b"new a").unwrap();
        staged.stage(&dir.path().join("b"), b"new b").unwrap();
        assert_eq!(staged.len(), 2);
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"old");
        assert_eq!(names(dir.path()), [".tmp-a", ".tmp-b", "a"]);
        staged.install().unwrap();
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"new a");
        assert_eq!(fs::read(dir.path().join("b")).unwrap(), b"new b");
        assert_eq!(names(dir.path()), ["a", "b"]);

        let mut abandoned = StagedFiles::default();
        abandoned.stage(&dir.path().join("c"), b"c").unwrap();
        drop(abandoned);
        assert_eq!(names(dir.path()), ["a", "b"]);

        // A rename that fails (a directory is in the way) stops the install;
        // what was renamed stays, no temp file is left behind.
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d").join("x"), b"x").unwrap();
        let mut blocked = StagedFiles::default();
        blocked.stage(&dir.path().join("c"), b"c").unwrap();
        blocked.stage(&dir.path().join("d"), b"d").unwrap();
        blocked.stage(&dir.path().join("e"), b"e").unwrap();
        assert!(blocked.install().is_err());
        assert_eq!(names(dir.path()), ["a", "b", "c", "d"]);
        assert!(dir.path().join("d").is_dir());
    }

    #[test]
    fn appending_through_a_link_fails_and_directories_that_are_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        symlink(&victim, dir.path().join("rejected.jsonl")).unwrap();
        assert!(open_append(&dir.path().join("rejected.jsonl")).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");

        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        symlink(&elsewhere, dir.path().join("billing")).unwrap();
        let refused = create_private_dir(&dir.path().join("billing")).unwrap_err();
        assert!(refused.to_string().contains("symbolic link"), "{refused}");
        let fresh = dir.path().join("fresh/billing");
        create_private_dir(&fresh).unwrap();
        let mode = fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777 & !DIR_MODE, 0, "at most 0750: {mode:o}");
    }
}
