//! The exclusive lock a daemon holds on its `state_dir` for its whole life.
//!
//! Two daemons on one `state_dir` would both replay the journals onto the
//! live volumes and overwrite each other's pair state (a second one even
//! recorded a clean shutdown for the first). The daemon therefore takes a
//! non-blocking exclusive `flock` on `state_dir/lock` before it opens any
//! group, journal or volume, and writes its pid into the file so that the
//! refusal can name the holder.
//!
//! The kernel releases the lock when the process ends, however it ends
//! (`kill -9` included), so a stale lock file never blocks a restart; the
//! file itself is left in place (removing it would let a third daemon lock
//! a new file while a second one still holds the old one).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Name of the lock file inside `state_dir`.
pub const LOCK_FILE: &str = "lock";

/// Permissions of a lock file the daemon creates.
const LOCK_MODE: u32 = 0o600;

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    /// Another process holds the lock: another daemon runs on this state_dir.
    #[error(
        "state_dir {} is in use by another replicator daemon ({}holds the lock on {}); \
         stop that daemon first, or give this one its own state_dir",
        state_dir.display(),
        holder.map(|pid| format!("pid {pid} ")).unwrap_or_default(),
        lock_file.display()
    )]
    Held {
        /// The state directory.
        state_dir: PathBuf,
        /// The lock file.
        lock_file: PathBuf,
        /// The holder's pid, as it wrote it into the lock file (if readable).
        holder: Option<u32>,
    },
    /// The lock file could not be created, locked or written.
    #[error("state_dir lock {}: {source}", lock_file.display())]
    Io {
        /// The lock file.
        lock_file: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StateDirLock {
    path: PathBuf,
    _file: Flock<File>,
}

impl StateDirLock {
    /// Takes the exclusive lock on `state_dir/lock` (created with mode 0600
    /// if missing) without waiting, and records our pid in it. Fails with
    /// [`StateLockError::Held`] if another process holds it.
    pub fn acquire(state_dir: &Path) -> Result<StateDirLock, StateLockError> {
        let lock_file = state_dir.join(LOCK_FILE);
        let io_err = |source| StateLockError::Io { lock_file: lock_file.clone(), source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(LOCK_MODE)
            .open(&lock_file)
            .map_err(io_err)?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                return Err(StateLockError::Held {
                    state_dir: state_dir.to_path_buf(),
                    holder: read_pid(&mut file),
                    lock_file,
                });
            }
            Err((_, errno)) => return Err(io_err(io::Error::from(errno))),
        };
        // Only the holder writes, so a reader sees either the previous
        // holder's pid or ours, never a mix of both.
        locked.set_len(0).map_err(io_err)?;
        locked.seek(SeekFrom::Start(0)).map_err(io_err)?;
        writeln!(locked, "{}", std::process::id()).map_err(io_err)?;
        Ok(StateDirLock { path: lock_file, _file: locked })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_state_dir_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StateDirLock::acquire(dir.path()).expect("first lock");
        assert_eq!(first.path(), dir.path().join(LOCK_FILE));
        // flock conflicts between two open file descriptions, even in one
        // process: the same as a second daemon.
        let err = StateDirLock::acquire(dir.path()).expect_err("second lock");
        match &err {
            StateLockError::Held { holder, .. } => assert_eq!(*holder, Some(std::process::id())),
            other => panic!("unexpected error: {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        drop(first);
        let again = StateDirLock::acquire(dir.path()).expect("lock after release");
        drop(again);
    }

    #[test]
    fn the_lock_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let _lock = StateDirLock::acquire(dir.path()).expect("lock");
        let mode = std::fs::metadata(dir.path().join(LOCK_FILE)).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, LOCK_MODE);
    }
}
