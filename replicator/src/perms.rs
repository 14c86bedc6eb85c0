//! File and directory permissions the daemon enforces whatever the umask:
//! `state_dir` (and the group directories under it) 0700, `run_dir` 0750,
//! state, bitmap, activity log and journal files 0600.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of `state_dir` and of every directory under it.
pub const STATE_DIR_MODE: u32 = 0o700;
/// Mode of `run_dir` (the group may reach the sockets, nobody else).
pub const RUN_DIR_MODE: u32 = 0o750;
/// Mode of the files the daemon keeps (state, bitmaps, activity log,
/// journal).
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Creates `dir`, and the missing directories above it, with `mode` whatever
/// the umask, and makes their entries durable (fsyncs each one's parent). If `dir` already exists with permission bits beyond `mode`,
/// they are removed and a warning naming `what` is logged. Existing parents
/// are left alone. A shared sticky, world-writable directory (such as
/// `/tmp`) is refused rather than tightened.
pub fn ensure_dir(dir: &Path, mode: u32, what: &str) -> io::Result<()> {
    if create_dir_durably(dir, Some(mode))? {
        Ok(())
    } else {
        tighten_dir(dir, mode, what)
    }
}

/// Creates `dir` and the missing directories above it — with exactly
/// `mode`, or as the umask says (`None`) — and makes their entries
/// durable (fsyncs each one's parent): a power cut must not take back a
/// directory whose files were made durable (a group's journal, a drill
/// copy a client flushed, a drill report). Returns whether anything was
/// created (existing directories are left as they are).
pub fn create_dir_durably(dir: &Path, mode: Option<u32>) -> io::Result<bool> {
    let mut missing: Vec<PathBuf> = Vec::new();
    for ancestor in dir.ancestors() {
        if ancestor.as_os_str().is_empty() {
            break;
        }
        match fs::symlink_metadata(ancestor) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(ancestor.to_path_buf()),
            Err(e) => return Err(e),
        }
    }
    if missing.is_empty() {
        return Ok(false);
    }
    fs::DirBuilder::new().recursive(true).mode(mode.unwrap_or(0o777)).create(dir)?;
    if let Some(mode) = mode {
        // The umask may have narrowed (or, for `mode` bits it masks,
        // hidden) what we asked for: set the exact mode on what we created.
        for created in missing.iter().rev() {
            fs::set_permissions(created, fs::Permissions::from_mode(mode))?;
        }
    }
    for created in &missing {
        crate::durable::sync_parent(created)?;
    }
    Ok(true)
}

fn tighten_dir(dir: &Path, mode: u32, what: &str) -> io::Result<()> {
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a directory"));
    }
    let current = meta.permissions().mode() & 0o7777;
    if current & 0o1000 != 0 && current & 0o002 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "a shared world-writable directory (mode {current:04o}); use a directory of its own for the {what}"
            ),
        ));
    }
    tighten(dir, current, mode, what)
}

/// Removes the permission bits of the regular file `path` beyond `mode`
/// (logging it); anything that is not a regular file (a block device
/// journal) is left alone.
pub fn tighten_file(path: &Path, mode: u32, what: &str) -> io::Result<()> {
    let meta = fs::metadata(path)?;
    if !meta.is_file() {
        return Ok(());
    }
    tighten(path, meta.permissions().mode() & 0o7777, mode, what)
}

fn tighten(path: &Path, current: u32, mode: u32, what: &str) -> io::Result<()> {
    let wider = current & 0o777 & !mode;
    if wider == 0 {
        return Ok(());
    }
    let narrowed = current & !wider;
    fs::set_permissions(path, fs::Permissions::from_mode(narrowed))?;
    tracing::warn!(
        "{what} {} had mode {current:04o}, wider than {mode:04o}: tightened to {narrowed:04o}",
        path.display()
    );
    Ok(())
}

/// Serialises the tests that change the process-wide umask.
#[cfg(test)]
pub(crate) static UMASK_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` with the process umask set to `mask`, restoring it afterwards.
#[cfg(test)]
pub(crate) fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    use nix::sys::stat::{umask, Mode};
    let _guard = UMASK_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let old = umask(Mode::from_bits_truncate(mask as libc::mode_t));
    let out = f();
    umask(old);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
    }

    #[test]
    fn dirs_get_their_mode_whatever_the_umask() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).expect("chmod root");
        let state = root.path().join("a").join("state");
        let run = root.path().join("run");
        with_umask(0o000, || {
            ensure_dir(&state, STATE_DIR_MODE, "state_dir").expect("state_dir");
            ensure_dir(&run, RUN_DIR_MODE, "run_dir").expect("run_dir");
        });
        assert_eq!(mode_of(&state), 0o700);
        assert_eq!(mode_of(&root.path().join("a")), 0o700, "a parent we created");
        assert_eq!(mode_of(&run), 0o750);
        assert_eq!(mode_of(root.path()), 0o755, "an existing parent is left alone");

        // Existing and too wide: tightened; existing and narrower: kept.
        fs::set_permissions(&run, fs::Permissions::from_mode(0o777)).expect("chmod");
        ensure_dir(&run, RUN_DIR_MODE, "run_dir").expect("tighten");
        assert_eq!(mode_of(&run), 0o750);
        fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).expect("chmod");
        ensure_dir(&run, RUN_DIR_MODE, "run_dir").expect("keep");
        assert_eq!(mode_of(&run), 0o700);

        // A /tmp-like directory is refused, not tightened.
        let shared = root.path().join("shared");
        fs::create_dir(&shared).expect("mkdir");
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).expect("chmod");
        let err = ensure_dir(&shared, RUN_DIR_MODE, "run_dir").expect_err("shared dir");
        assert!(err.to_string().contains("shared world-writable"), "{err}");
        assert_eq!(mode_of(&shared), 0o1777);

        // A file in the way is an error.
        let file = root.path().join("file");
        fs::write(&file, b"x").expect("write");
        assert!(ensure_dir(&file, STATE_DIR_MODE, "state_dir").is_err());
    }
}
