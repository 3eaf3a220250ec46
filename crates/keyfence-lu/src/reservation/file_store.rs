//! The file-backed [`PrStore`]: one JSON file per logical unit, replaced
//! atomically (write a temporary file, fsync it, rename it over the old
//! one, fsync the directory), so a crash at any point leaves either the
//! old or the new state on disk, never a torn one.
//!
//! Directories the store creates (`pr/` and `pr/<target>/`) are made
//! durable too: each new directory's parent is fsynced, so the first
//! APTPL write survives a crash like every later one. A crash between
//! writing the temporary file and renaming it leaves `.<name>.tmp.<pid>`
//! behind; [`FileStore::new`] removes such leftovers of its own file.

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
    fsync_dir(dir).map_err(|e| io_err(dir, e))
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Create `dir` and any missing ancestors, calling `sync` on the parent of
/// every directory created (after creating it), so that the new entries
/// are durable. Returns the directories created, outermost first.
pub(crate) fn create_dir_durable(
    dir: &Path,
    sync: &mut dyn FnMut(&Path) -> std::io::Result<()>,
) -> std::io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty()) {
        if d.is_dir() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    missing.reverse();
    let mut created = Vec::new();
    for d in missing {
        match fs::create_dir(&d) {
            Ok(()) => {}
            // Created concurrently: whoever created it syncs its parent.
            Err(e) if e.kind() == ErrorKind::AlreadyExists && d.is_dir() => continue,
            Err(e) => return Err(e),
        }
        let parent = d
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sync(parent)?;
        created.push(d);
    }
    Ok(created)
}

/// Is `file_name` a temporary file of the state file `name`, as written by
/// [`FileStore`] (`.<name>.tmp.<pid>`)? Returns the pid.
fn temp_file_pid(file_name: &str, name: &str) -> Option<u32> {
    let pid = file_name
        .strip_prefix('.')?
        .strip_prefix(name)?
        .strip_prefix(".tmp.")?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
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
    /// A store for the state file `path`. Temporary files a crashed
    /// earlier process left next to it are removed (see
    /// [`FileStore::remove_stale_temp_files`]); failing that is logged,
    /// not fatal.
    pub fn new(path: PathBuf, target: &str, lun: u64) -> Self {
        let store = FileStore {
            path,
            target: target.to_owned(),
            lun,
            lock: Mutex::new(()),
        };
        match store.remove_stale_temp_files() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                path = %store.path.display(),
                "removed {n} stale PR state temporary file(s)"
            ),
            Err(e) => tracing::warn!("cannot clean up PR state temporary files: {e}"),
        }
        store
    }

    /// Remove `.<name>.tmp.<pid>` files next to the state file, left by a
    /// process that died between writing and renaming. Only this store's
    /// own pattern is touched (not other LUNs' files, not other names), and
    /// not a temporary file of this process. The data directory lock keeps
    /// other processes from writing here at the same time. Returns how many
    /// were removed.
    pub fn remove_stale_temp_files(&self) -> Result<usize, StoreError> {
        let Some(name) = self.path.file_name().and_then(|n| n.to_str()) else {
            return Ok(0);
        };
        let dir = self.dir();
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(dir, e)),
        };
        let me = std::process::id();
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| io_err(dir, e))?;
            let file_name = entry.file_name();
            let Some(pid) = file_name.to_str().and_then(|f| temp_file_pid(f, name)) else {
                continue;
            };
            if pid == me || !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&entry.path(), e)),
            }
        }
        if removed > 0 {
            sync_dir(dir)?;
        }
        Ok(removed)
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
        create_dir_durable(dir, &mut fsync_dir).map_err(|e| io_err(dir, e))?;
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
        // An unreadable (corrupt) file counts as version 0: that is the
        // version a gate in the lost-reservation condition holds, and
        // REPLACE LOST RESERVATION must be able to replace it. I/O errors
        // fail the write.
        let found = match self.current_version() {
            Ok(v) => v,
            Err(StoreError::Corrupt(_)) => 0,
            Err(e) => return Err(e),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kf-filestore-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn stale_temp_files_of_this_store_are_removed_at_startup() {
        let data = scratch("stale");
        let path = state_path(&data, "iqn.2026-11.io.keyfence:t", 0);
        let dir = path.parent().unwrap().to_path_buf();
        fs::create_dir_all(&dir).unwrap();
        // Left by two processes killed between write and rename.
        fs::write(dir.join(".lun0.json.tmp.4242"), b"{").unwrap();
        fs::write(dir.join(".lun0.json.tmp.77"), b"{").unwrap();
        // Not ours: other LUN, other names, not a pid.
        let keep = [
            ".lun1.json.tmp.4242",
            ".lun0.json.tmp.",
            ".lun0.json.tmp.12x",
            "lun0.json.tmp.5",
            ".lun0.json.bak",
            "notes.txt",
        ];
        for k in keep {
            fs::write(dir.join(k), b"x").unwrap();
        }
        // This process's own temporary name is left alone.
        let own = format!(".lun0.json.tmp.{}", std::process::id());
        fs::write(dir.join(&own), b"{").unwrap();

        let store = FileStore::new(path.clone(), "iqn.2026-11.io.keyfence:t", 0);
        assert!(!dir.join(".lun0.json.tmp.4242").exists());
        assert!(!dir.join(".lun0.json.tmp.77").exists());
        for k in keep {
            assert!(dir.join(k).exists(), "{k} must be kept");
        }
        assert!(dir.join(&own).exists());
        assert_eq!(store.remove_stale_temp_files().unwrap(), 0);
        let _ = fs::remove_dir_all(&data);
    }

    #[test]
    fn new_directories_are_made_durable_in_their_parents() {
        let data = scratch("durable");
        fs::create_dir_all(&data).unwrap();
        let path = state_path(&data, "iqn.2026-11.io.keyfence:t", 0);
        let dir = path.parent().unwrap();
        let mut synced = Vec::new();
        let created = create_dir_durable(dir, &mut |p: &Path| {
            synced.push(p.to_path_buf());
            fsync_dir(p)
        })
        .unwrap();
        let pr = data.join("pr");
        assert_eq!(created, vec![pr.clone(), dir.to_path_buf()]);
        // The data dir gets the new pr/ entry, pr/ the new target entry.
        assert_eq!(synced, vec![data.clone(), pr.clone()]);
        // Nothing to create: nothing synced.
        synced.clear();
        let again = create_dir_durable(dir, &mut |p: &Path| {
            synced.push(p.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert!(again.is_empty() && synced.is_empty());

        // A store's first write goes through the same path.
        let store = FileStore::new(state_path(&data, "iqn.2026-11.io.keyfence:u", 3), "u", 3);
        let st = PrState::default();
        store.compare_and_swap(0, Some(&st)).unwrap();
        assert!(store.path().exists());
        let _ = fs::remove_dir_all(&data);
    }
}
