//! The data directory as a resource one server owns: created when
//! missing, locked for the server's lifetime (so that two servers never
//! share backing files and PR state), and on a failed start left as it
//! was found.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use keyfence_lu::backend::try_flock;

use super::ServerError;

/// Name of the lock file inside the data directory; it holds the pid of
/// the server that owns the directory.
pub const LOCK_FILE: &str = "keyfence.lock";

/// An exclusive `flock` on `DATA_DIR/keyfence.lock`, released when
/// dropped (or when the process dies).
#[derive(Debug)]
pub(crate) struct DataDirLock {
    _file: File,
}

/// What a start created, to undo if it fails.
#[derive(Debug, Default)]
pub(crate) struct Created {
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

impl Created {
    /// Create `dir` and its missing ancestors, remembering which.
    pub fn create_dir_all(&mut self, dir: &Path) -> std::io::Result<()> {
        let mut missing = Vec::new();
        let mut cur = Some(dir);
        while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty()) {
            if d.is_dir() {
                break;
            }
            missing.push(d.to_path_buf());
            cur = d.parent();
        }
        for d in missing.into_iter().rev() {
            match std::fs::create_dir(&d) {
                Ok(()) => self.dirs.push(d),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Remember a file this start created.
    pub fn file(&mut self, path: PathBuf) {
        self.files.push(path);
    }

    /// Remove what was created, newest first. Directories are removed
    /// only when empty, so nothing anyone else put there is lost.
    pub fn undo(self) {
        for f in self.files.iter().rev() {
            let _ = std::fs::remove_file(f);
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl DataDirLock {
    /// Lock `dir` (which exists) for this process. The lock file is
    /// recorded in `created` when this call made it.
    pub fn acquire(dir: &Path, created: &mut Created) -> Result<DataDirLock, ServerError> {
        let path = dir.join(LOCK_FILE);
        let err = |err| ServerError::DataDir {
            path: path.clone(),
            err,
        };
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        if !existed {
            created.file(path.clone());
        }
        if !try_flock(&file, false).map_err(err)? {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(ServerError::DataDirInUse {
                dir: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        // Ours now: record who holds it for the next one to be told.
        file.set_len(0).map_err(err)?;
        file.rewind().map_err(err)?;
        writeln!(file, "{}", std::process::id()).map_err(err)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_has_one_owner_and_failed_starts_leave_nothing() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        let mut created = Created::default();
        created.create_dir_all(&dir).unwrap();
        let lock = DataDirLock::acquire(&dir, &mut created).unwrap();
        let held = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(held.trim(), std::process::id().to_string());

        let mut other = Created::default();
        let e = DataDirLock::acquire(&dir, &mut other).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && !msg.contains('\n'),
            "{msg}"
        );
        other.undo();
        assert!(dir.join(LOCK_FILE).exists(), "the holder's lock file stays");

        drop(lock);
        created.undo();
        assert!(!base.path().join("a").exists());
    }
}
