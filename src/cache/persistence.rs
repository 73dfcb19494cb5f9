//! The cache file: versioned JSON, written atomically and readable by the owner only.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::cache::entry::CacheEntry;

/// The persistence format's version, written into every file.
const FILE_VERSION: u32 = 1;

/// The persisted form: versioned so that a later format is refused, not misread.
#[derive(Serialize)]
struct SavedRef<'a> {
    version: u32,
    entries: &'a [CacheEntry],
}

#[derive(Deserialize)]
struct Saved {
    entries: Vec<CacheEntry>,
}

/// Read first, so that another version is reported as such rather than as a field error.
#[derive(Deserialize)]
struct SavedHeader {
    version: u32,
}

/// Why the cache file was not written or read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The io error is in the message, not a `source()`, so a chain prints it once.
    #[error("cache file {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    #[error("cache file {} is corrupt, ignoring it: {problem}", path.display())]
    Corrupt { path: PathBuf, problem: Corrupt },
}

/// What is wrong with a cache file's text.
#[derive(Debug, thiserror::Error)]
pub enum Corrupt {
    #[error("{0}")]
    Json(serde_json::Error),
    #[error("version {0} is not supported (this build reads version {FILE_VERSION})")]
    Version(u32),
}

/// Writes `entries` to `path`, atomically.
pub fn save(path: &Path, entries: &[CacheEntry]) -> Result<(), FileError> {
    let saved = SavedRef {
        version: FILE_VERSION,
        entries,
    };
    write_atomically(path, |w| {
        serde_json::to_writer(w, &saved).map_err(io::Error::from)
    })
    .map_err(|error| FileError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// The entries in `path`; none when there is no such file.
pub fn read(path: &Path) -> Result<Option<Vec<CacheEntry>>, FileError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(FileError::Io {
                path: path.to_path_buf(),
                error,
            });
        }
    };
    parse(&bytes)
        .map(Some)
        .map_err(|problem| FileError::Corrupt {
            path: path.to_path_buf(),
            problem,
        })
}

fn parse(bytes: &[u8]) -> Result<Vec<CacheEntry>, Corrupt> {
    let header: SavedHeader = serde_json::from_slice(bytes).map_err(Corrupt::Json)?;
    if header.version != FILE_VERSION {
        return Err(Corrupt::Version(header.version));
    }
    let saved: Saved = serde_json::from_slice(bytes).map_err(Corrupt::Json)?;
    Ok(saved.entries)
}

/// Writes through `fill` into a fresh temporary file beside `path`, then renames it over
/// `path`, so that a crash leaves the old file or the new one, never half of one.
pub(crate) fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let temp = path.with_file_name(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_new(&temp, fill).and_then(|()| fs::rename(&temp, path));
    if result.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = fs::remove_file(&temp);
    }
    result
}

fn write_new(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    // create_new: never follow a link someone planted at the temporary name.
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut writer = BufWriter::new(options.open(path)?);
    fill(&mut writer)?;
    writer.flush()?;
    writer.get_ref().sync_all()
}
