//! Durable, atomic file replacement: a reader sees the old file, or the new
//! one whole, never a part; after a crash, at worst a stray temp file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Prefix of temp files, so leftovers from a crash are easy to recognise.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Writes `bytes` to `path` atomically: temp file in the same directory,
/// fsync, rename over `path`. The caller fsyncs the directory (see
/// [`sync_dir`]) once after a group of renames.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let temp = dir.join(format!("{TEMP_PREFIX}{}", name.to_string_lossy()));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, path)
}

/// Makes the renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
