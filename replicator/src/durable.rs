//! Making names and small files durable. A power cut drops what is not
//! (DESIGN.md, fault model): a file's bytes need an fsync of the file, its
//! name an fsync of the directory that holds it. Every file the daemon and
//! the CLI write whole (state, records, reports, certificates, unit
//! drop-ins, new volume files) goes through [`put_file`]: made whole under a
//! temporary name, fsynced, renamed into place, its directory fsynced, so a
//! crash at any instant leaves either the old file or the new one, never a
//! torn one.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// What [`put_file`] does when `path` already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (atomically: readers see the old file or the new one).
    Replace,
    /// Leave it and fail with [`io::ErrorKind::AlreadyExists`].
    Keep,
}

/// Fsyncs the directory `dir`, so that the names in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot fsync the directory {}: {e}", dir.display())))
}

/// Fsyncs the directory holding `path` (`.` for a bare name).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    sync_dir(parent(path))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes the file `path` durably and atomically: `fill` writes it under a
/// temporary name in the same directory (per process, made exclusively
/// with `O_NOFOLLOW` after a stale one is removed, so no planted link is
/// followed), created with exactly `mode` whatever the umask; then it is
/// fsynced, put in place as `existing` says, and the directory fsynced. On
/// failure the temporary file is removed and `path` is untouched.
pub fn put_file(
    path: &Path,
    mode: u32,
    existing: Existing,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let written = (|| {
        let mut f =
            fs::OpenOptions::new().write(true).create_new(true).mode(mode).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        // The umask may only narrow the mode; make it exact.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        fill(&mut f)?;
        f.sync_all()?;
        match existing {
            Existing::Replace => fs::rename(&tmp, path),
            Existing::Keep => rename_noreplace(&tmp, path),
        }
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// Removes the regular files named `*.tmp` in `dir` and the directories
/// below it (the temporary files of [`put_file`], and earlier builds'
/// `NAME.tmp`) that a crash left behind, at most four levels down. Only for
/// a tree no other process writes; symbolic links are not followed; a file
/// that cannot be removed is said, not fatal.
pub fn remove_temporaries(dir: &Path) {
    remove_temporaries_below(dir, 4);
}

fn remove_temporaries_below(dir: &Path, depth: u32) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            if depth > 0 {
                remove_temporaries_below(&path, depth - 1);
            }
        } else if kind.is_file() && path.extension().is_some_and(|e| e == "tmp") {
            match fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed a temporary file a crash left"),
                Err(e) => tracing::warn!(path = %path.display(), "cannot remove a temporary file a crash left: {e}"),
            }
        }
    }
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        // A file system without RENAME_NOREPLACE: checked (any name, a
        // dangling link too), then renamed (only a creator racing this one
        // could slip in between).
        Err(nix::errno::Errno::EINVAL) => match fs::symlink_metadata(to) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(from, to),
            Err(e) => Err(e),
            Ok(_) => Err(io::ErrorKind::AlreadyExists.into()),
        },
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn puts_replaces_or_keeps_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        put_file(&path, 0o640, Existing::Keep, |f| f.write_all(b"one")).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        let kept = put_file(&path, 0o640, Existing::Keep, |f| f.write_all(b"two")).unwrap_err();
        assert_eq!(kept.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        put_file(&path, 0o600, Existing::Replace, |f| f.write_all(b"three")).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"three");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // A failing fill leaves the old file.
        let failed = put_file(&path, 0o600, Existing::Replace, |_| Err(io::Error::other("no"))).unwrap_err();
        assert_eq!(failed.to_string(), "no");
        assert_eq!(fs::read(&path).unwrap(), b"three");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
        // A link planted at the temporary name is not followed.
        let target = dir.path().join("target");
        let tmp = dir.path().join(format!(".g.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        put_file(&dir.path().join("g"), 0o600, Existing::Replace, |f| f.write_all(b"g")).unwrap();
        assert!(!target.exists());
        assert_eq!(fs::read(dir.path().join("g")).unwrap(), b"g");
        // What a crash leaves is removed, the rest kept.
        fs::write(dir.path().join(".h.123.tmp"), b"half").unwrap();
        fs::write(dir.path().join("state.tmp"), b"half").unwrap();
        // Also in the directories below (drill reports, drill copies).
        let reports = dir.path().join("drill-reports");
        fs::create_dir(&reports).unwrap();
        fs::write(reports.join(".r.json.123.tmp"), b"half").unwrap();
        fs::write(reports.join("r.json"), b"{}").unwrap();
        // A link to a directory elsewhere is not followed.
        let elsewhere = tempfile::tempdir().unwrap();
        fs::write(elsewhere.path().join("theirs.tmp"), b"theirs").unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("link")).unwrap();
        remove_temporaries(dir.path());
        let mut names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["drill-reports", "f", "g", "link"].map(std::ffi::OsString::from));
        let names: Vec<_> = fs::read_dir(&reports).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["r.json"].map(std::ffi::OsString::from));
        assert!(elsewhere.path().join("theirs.tmp").exists());
    }
}
