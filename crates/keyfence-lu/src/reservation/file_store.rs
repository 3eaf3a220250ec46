//! The file-backed [`PrStore`]: one JSON file per logical unit, replaced
//! atomically (write a temporary file, fsync it, rename it over the old
//! one, fsync the directory), so a crash at any point leaves either the
//! old or the new state on disk, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use keyfence_pr::{PrState, PrStore, StateRecord, StoreError, Version};
use serde::{Deserialize, Serialize};

/// The `format` field of a keyfence PR state file.
pub const FORMAT: &str = "keyfence-pr-state/1";

/// The file as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    pub format: String,
    /// Store version, incremented by every write (compare-and-swap).
    pub version: Version,
    pub target: String,
    pub lun: u64,
    pub state: StateRecord,
}

/// Where the PR state of `lun` of `target` lives under `data_dir`.
pub fn state_path(data_dir: &Path, target: &str, lun: u64) -> PathBuf {
    let mut dir: String = target
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    if dir.is_empty() || dir == "." || dir == ".." {
        dir = format!("_{dir}");
    }
    data_dir.join("pr").join(dir).join(format!("lun{lun}.json"))
}

/// Read and validate a state file. `Ok(None)` if it does not exist.
pub fn read_state_file(path: &Path) -> Result<Option<StateFile>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::Io(format!("{}: {e}", path.display()))),
    };
    let f: StateFile = serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
    if f.format != FORMAT {
        return Err(StoreError::Corrupt(format!(
            "{}: unknown format {:?}",
            path.display(),
            f.format
        )));
    }
    f.state
        .validate()
        .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
    Ok(Some(f))
}

fn io_err(path: &Path, e: std::io::Error) -> StoreError {
    // ENOSPC / EDQUOT: the registration could not be made durable for
    // lack of resources.
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        StoreError::NoSpace(format!("{}: {e}", path.display()))
    } else {
        StoreError::Io(format!("{}: {e}", path.display()))
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

/// A [`PrStore`] keeping one LU's state in one file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    target: String,
    lun: u64,
    /// Serialises writers within this process.
    lock: Mutex<()>,
}

impl FileStore {
    pub fn new(path: PathBuf, target: &str, lun: u64) -> Self {
        FileStore {
            path,
            target: target.to_owned(),
            lun,
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn dir(&self) -> &Path {
        self.path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    fn current_version(&self) -> Result<Version, StoreError> {
        Ok(read_state_file(&self.path)?.map_or(0, |f| f.version))
    }

    fn write_atomically(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let dir = self.dir();
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pr".into());
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| io_err(&tmp, e))?;
            f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
            f.sync_all().map_err(|e| io_err(&tmp, e))?;
            fs::rename(&tmp, &self.path).map_err(|e| io_err(&self.path, e))?;
            sync_dir(dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

impl PrStore for FileStore {
    fn load(&self) -> Result<Option<(Version, PrState)>, StoreError> {
        Ok(read_state_file(&self.path)?.map(|f| (f.version, PrState::from(f.state))))
    }

    fn compare_and_swap(
        &self,
        expected: Version,
        new: Option<&PrState>,
    ) -> Result<Version, StoreError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let found = self.current_version().unwrap_or(0);
        if found != expected {
            return Err(StoreError::VersionMismatch { expected, found });
        }
        match new {
            Some(state) => {
                let version = expected.wrapping_add(1).max(1);
                let file = StateFile {
                    format: FORMAT.into(),
                    version,
                    target: self.target.clone(),
                    lun: self.lun,
                    state: StateRecord::from(state.durable()),
                };
                let mut bytes = serde_json::to_vec_pretty(&file)
                    .map_err(|e| StoreError::Io(format!("encoding PR state: {e}")))?;
                bytes.push(b'\n');
                self.write_atomically(&bytes)?;
                Ok(version)
            }
            None => {
                match fs::remove_file(&self.path) {
                    Ok(()) => sync_dir(self.dir())?,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&self.path, e)),
                }
                Ok(0)
            }
        }
    }
}
