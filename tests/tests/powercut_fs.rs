//! `powercut-fs` itself (no daemon): through a real mount, driven by the
//! daemon's own I/O layer (io_uring, O_DIRECT, RWF_DSYNC, fdatasync,
//! fallocate) and plain file calls, a cut loses exactly what was not made
//! durable. The power-loss tests (power_loss.rs) rely on this.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use replicator::io::{AlignedBuf, BackendChoice, IoEngine, OpenOptions};
use replicator::slotted_file::{self, SlottedFile};
use replicator_tests::{reply_number, require, require_root, PowerCutMount};

const PAGE: usize = 4096;

fn fsync_dir(dir: &Path) {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).unwrap_or_else(|e| panic!("fsync {}: {e}", dir.display()));
}

/// Writes `data` to a new (or truncated) file and fsyncs the file only.
fn write_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

/// A fresh mount for one test.
fn mount(test: &str) -> Option<(tempfile::TempDir, PowerCutMount)> {
    if !require_root(test) {
        return None;
    }
    require("fusermount3");
    let dir = tempfile::Builder::new().prefix("powercut-fs-test-").tempdir().expect("tempdir");
    let fs = PowerCutMount::start(dir.path(), dir.path().join("powercut-fs.log"));
    Some((dir, fs))
}

/// The names in a directory of the mount, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn power_cut(fs: &PowerCutMount) -> String {
    let line = fs.command("cut").unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{line}");
    line
}

fn page_of(path: &Path, page: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).expect("open");
    let mut buf = vec![0u8; PAGE];
    f.read_exact_at(&mut buf, (page * PAGE) as u64).expect("read");
    buf
}

fn filled(b: u8) -> Vec<u8> {
    vec![b; PAGE]
}

#[test]
fn powercut_fs_loses_exactly_what_was_not_made_durable() {
    if !require_root("powercut_fs_loses_exactly_what_was_not_made_durable") {
        return;
    }
    require("fusermount3");
    let dir = tempfile::Builder::new().prefix("powercut-fs-test-").tempdir().expect("tempdir");
    let fs = PowerCutMount::start(dir.path(), dir.path().join("powercut-fs.log"));
    let m = fs.mountpoint().to_path_buf();
    let cmd = |c: &str| fs.command(c).unwrap_or_else(|e| panic!("{e}"));

    // Volume-style I/O, exactly as the daemon does it.
    let vol = m.join("vol.img");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let backend = rt.block_on(async {
        let engine = IoEngine::new(BackendChoice::Auto);
        let opts = OpenOptions { create_size: Some(1 << 20), create: true, direct: true, read_only: false };
        let f = engine.open(&vol, &opts).expect("open the volume on the mount");
        assert!(f.is_direct(), "O_DIRECT must work through the mount");
        // Page 2: written, then fdatasync.
        f.write_at(AlignedBuf::copy_from(&filled(b'S')), 2 * PAGE as u64).await.0.expect("write");
        f.sync_data().await.expect("fdatasync");
        // Page 4: synced 'O', then overwritten without a sync.
        f.write_at(AlignedBuf::copy_from(&filled(b'O')), 4 * PAGE as u64).await.0.expect("write");
        f.sync_data().await.expect("fdatasync");
        f.write_at(AlignedBuf::copy_from(&filled(b'N')), 4 * PAGE as u64).await.0.expect("write");
        // Page 3: durable 'D', then zeroed (fallocate ZERO_RANGE: volatile,
        // like a write).
        f.write_at_durable(AlignedBuf::copy_from(&filled(b'D')), 3 * PAGE as u64).await.0.expect("durable write");
        f.write_zeroes(3 * PAGE as u64, PAGE as u64).await.expect("write_zeroes");
        // Page 0: an O_DIRECT write, never made durable.
        f.write_at(AlignedBuf::copy_from(&filled(b'V')), 0).await.0.expect("write");
        // Page 1: a FUA-style write (RWF_DSYNC with io_uring).
        f.write_at_durable(AlignedBuf::copy_from(&filled(b'F')), PAGE as u64).await.0.expect("durable write");
        format!("{:?}", f.backend())
    });
    eprintln!("I/O backend: {backend}; {}", cmd("stats"));
    assert!(reply_number(&cmd("stats"), "dsync_writes") >= 2, "RWF_DSYNC writes reach the FS flagged O_DSYNC");
    // Before the cut, reads see everything.
    assert_eq!(page_of(&vol, 0), filled(b'V'));
    assert_eq!(page_of(&vol, 3), filled(0));
    assert_eq!(page_of(&vol, 4), filled(b'N'));

    // State-file style: write + rename without fsync, and with fsync; both
    // names made durable by an fsync of the directory.
    let mut t = std::fs::File::create(m.join("a.tmp")).expect("create");
    t.write_all(b"{\"unsynced\":1}").expect("write");
    drop(t);
    std::fs::rename(m.join("a.tmp"), m.join("a.json")).expect("rename");
    let mut t = std::fs::File::create(m.join("b.tmp")).expect("create");
    t.write_all(b"{\"synced\":1}").expect("write");
    t.sync_all().expect("fsync");
    drop(t);
    std::fs::rename(m.join("b.tmp"), m.join("b.json")).expect("rename");
    fsync_dir(&m);

    // flock is handled by the kernel, and excludes.
    let l1 = std::fs::File::create(m.join("lock")).expect("lock file");
    let l2 = std::fs::File::open(m.join("lock")).expect("lock file");
    let _held = nix::fcntl::Flock::lock(l1, nix::fcntl::FlockArg::LockExclusiveNonblock).expect("flock");
    assert!(
        nix::fcntl::Flock::lock(l2, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err(),
        "a second exclusive flock must fail"
    );

    // An unlinked file's pages go with it.
    std::fs::write(m.join("gone"), vec![7u8; 3 * PAGE]).expect("write");
    let before = reply_number(&cmd("stats"), "dirty");
    std::fs::remove_file(m.join("gone")).expect("unlink");
    assert_eq!(reply_number(&cmd("stats"), "dirty"), before - 3);

    let cut = cmd("cut");
    eprintln!("{cut}");
    assert!(reply_number(&cut, "dropped") >= 4, "{cut}");
    // The lock file and the unlinked file were never durable names.
    assert_eq!(reply_number(&cut, "undone"), 3, "{cut}");
    assert!(!m.join("lock").exists() && !m.join("gone").exists());
    assert_eq!(reply_number(&cmd("stats"), "dirty"), 0);
    assert_eq!(page_of(&vol, 0), filled(0), "an O_DIRECT write without a sync is lost");
    assert_eq!(page_of(&vol, 1), filled(b'F'), "an RWF_DSYNC write survives");
    assert_eq!(page_of(&vol, 2), filled(b'S'), "an fdatasynced write survives");
    assert_eq!(page_of(&vol, 3), filled(b'D'), "zeroing without a sync is lost");
    assert_eq!(page_of(&vol, 4), filled(b'O'), "the overwrite is lost, the synced data stays");
    let a = std::fs::read(m.join("a.json")).expect("read");
    assert!(a.iter().all(|&b| b == 0), "a renamed file's unsynced data is lost (size is metadata): {a:?}");
    assert_eq!(std::fs::read(m.join("b.json")).expect("read"), b"{\"synced\":1}");

    // A disk may keep any subset: 'cut keep' keeps about that fraction.
    let f = std::fs::OpenOptions::new().write(true).open(&vol).expect("open");
    for p in 0..64usize {
        f.write_all_at(&filled(b'K'), (p * PAGE) as u64).expect("write");
    }
    let cut = cmd("cut keep 42 0.5");
    let kept = reply_number(&cut, "kept");
    assert_eq!(kept + reply_number(&cut, "dropped"), 64, "{cut}");
    assert!((10..=54).contains(&kept), "{cut}");
    let on_disk = (0..64).filter(|&p| page_of(&vol, p) == filled(b'K')).count() as u64;
    assert_eq!(on_disk, kept, "exactly the kept pages are on the backing file");
    // And they are in the backing file itself.
    let backing = std::fs::read(dir.path().join("backing/vol.img")).expect("backing");
    assert_eq!(backing.chunks(PAGE).take(64).filter(|c| c.iter().all(|&b| b == b'K')).count() as u64, kept);
    drop(f);
    drop(fs);
}

#[test]
fn a_fsynced_file_whose_directory_was_not_fsynced_is_gone_after_a_cut() {
    let Some((dir, fs)) = mount("a_fsynced_file_whose_directory_was_not_fsynced_is_gone_after_a_cut") else {
        return;
    };
    let m = fs.mountpoint().to_path_buf();
    write_synced(&m.join("f"), b"data");
    let stats = fs.command("stats").expect("stats");
    assert_eq!(reply_number(&stats, "pending_names"), 1, "{stats}");
    assert_eq!(reply_number(&stats, "dirty"), 0, "{stats}");
    let pending = fs.command("names").expect("names");
    assert!(pending.contains("create ") && pending.ends_with("/f"), "{pending}");
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 1, "{cut}");
    assert!(!m.join("f").exists(), "the name was never durable");
    assert!(!dir.path().join("backing/f").exists(), "and the backing directory agrees");
    assert_eq!(names(&m), Vec::<String>::new());
    // The name can be made again, and this time made durable.
    write_synced(&m.join("f"), b"again");
    fsync_dir(&m);
    power_cut(&fs);
    assert_eq!(std::fs::read(m.join("f")).expect("read"), b"again");
}

#[test]
fn a_fsynced_file_in_a_fsynced_directory_survives_a_cut_with_its_data() {
    let Some((_dir, fs)) = mount("a_fsynced_file_in_a_fsynced_directory_survives_a_cut_with_its_data") else {
        return;
    };
    let m = fs.mountpoint().to_path_buf();
    write_synced(&m.join("f"), b"durable");
    fsync_dir(&m);
    assert_eq!(reply_number(&fs.command("stats").expect("stats"), "pending_names"), 0);
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 0, "{cut}");
    assert_eq!(std::fs::read(m.join("f")).expect("the file survives"), b"durable");
}

#[test]
fn a_rename_over_a_file_without_a_directory_fsync_is_undone_by_a_cut() {
    let Some((dir, fs)) = mount("a_rename_over_a_file_without_a_directory_fsync_is_undone_by_a_cut") else {
        return;
    };
    let m = fs.mountpoint().to_path_buf();
    // Both names durable: "state" with its old content, "state.tmp" with
    // what was fsynced of it.
    write_synced(&m.join("state"), b"old state");
    write_synced(&m.join("state.tmp"), b"tmp synced");
    fsync_dir(&m);
    // The temporary file changes without an fsync, then replaces "state".
    let t = std::fs::OpenOptions::new().write(true).open(m.join("state.tmp")).expect("open");
    t.write_all_at(b"TMP", 0).expect("write");
    drop(t);
    std::fs::rename(m.join("state.tmp"), m.join("state")).expect("rename over");
    assert_eq!(std::fs::read(m.join("state")).expect("read"), b"TMP synced");
    assert_eq!(names(&m), vec!["state"]);
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 1, "{cut}");
    assert_eq!(names(&m), vec!["state", "state.tmp"]);
    assert_eq!(std::fs::read(m.join("state")).expect("read"), b"old state", "the old file is back under its name");
    assert_eq!(std::fs::read(m.join("state.tmp")).expect("read"), b"tmp synced", "only what was fsynced");
    let graveyard = dir.path().join("backing/.powercut-fs-graveyard");
    assert_eq!(std::fs::read_dir(&graveyard).expect("graveyard").count(), 0, "nothing left in the graveyard");

    // The daemon's way: fsync the file, rename, fsync the directory.
    write_synced(&m.join("state.tmp"), b"new state");
    std::fs::rename(m.join("state.tmp"), m.join("state")).expect("rename over");
    assert_eq!(std::fs::read_dir(&graveyard).expect("graveyard").count(), 1, "the old file waits in the graveyard");
    fsync_dir(&m);
    assert_eq!(std::fs::read_dir(&graveyard).expect("graveyard").count(), 0, "and goes once the rename is durable");
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 0, "{cut}");
    assert_eq!(names(&m), vec!["state"]);
    assert_eq!(std::fs::read(m.join("state")).expect("read"), b"new state");
}

#[test]
fn an_unlink_without_a_directory_fsync_is_undone_by_a_cut() {
    let Some((_dir, fs)) = mount("an_unlink_without_a_directory_fsync_is_undone_by_a_cut") else {
        return;
    };
    let m = fs.mountpoint().to_path_buf();
    write_synced(&m.join("f"), b"keep me");
    fsync_dir(&m);
    std::fs::remove_file(m.join("f")).expect("unlink");
    assert!(!m.join("f").exists());
    assert_eq!(names(&m), Vec::<String>::new());
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 1, "{cut}");
    assert_eq!(names(&m), vec!["f"]);
    assert_eq!(std::fs::read(m.join("f")).expect("the unlinked file is back"), b"keep me");
    // With the directory fsynced, the unlink is durable.
    std::fs::remove_file(m.join("f")).expect("unlink");
    fsync_dir(&m);
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 0, "{cut}");
    assert_eq!(names(&m), Vec::<String>::new());
}

#[test]
fn a_mkdir_without_an_fsync_of_its_parent_is_undone_by_a_cut() {
    let Some((_dir, fs)) = mount("a_mkdir_without_an_fsync_of_its_parent_is_undone_by_a_cut") else {
        return;
    };
    let m = fs.mountpoint().to_path_buf();
    std::fs::create_dir_all(m.join("kept")).expect("mkdir");
    fsync_dir(&m);
    std::fs::create_dir(m.join("d")).expect("mkdir");
    // Everything inside d is durable, d's own name is not.
    write_synced(&m.join("d/f"), b"data");
    std::fs::create_dir(m.join("d/sub")).expect("mkdir");
    fsync_dir(&m.join("d"));
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 1, "{cut}");
    assert_eq!(names(&m), vec!["kept"]);
    assert!(!m.join("d/f").exists());
    // The directory can be made again, empty.
    std::fs::create_dir(m.join("d")).expect("mkdir again");
    assert_eq!(names(&m.join("d")), Vec::<String>::new());
}

#[test]
fn a_rename_between_directories_is_durable_once_both_are_fsynced() {
    let Some((_dir, fs)) = mount("a_rename_between_directories_is_durable_once_both_are_fsynced") else {
        return;
    };
    let m = fs.mountpoint().to_path_buf();
    std::fs::create_dir(m.join("x")).expect("mkdir");
    std::fs::create_dir(m.join("y")).expect("mkdir");
    write_synced(&m.join("x/f"), b"f");
    fsync_dir(&m);
    fsync_dir(&m.join("x"));
    std::fs::rename(m.join("x/f"), m.join("y/f")).expect("rename");
    fsync_dir(&m.join("y"));
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 1, "only the target directory was fsynced: {cut}");
    assert_eq!(names(&m.join("x")), vec!["f"]);
    assert_eq!(names(&m.join("y")), Vec::<String>::new());
    std::fs::rename(m.join("x/f"), m.join("y/f")).expect("rename");
    fsync_dir(&m.join("y"));
    fsync_dir(&m.join("x"));
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 0, "{cut}");
    assert_eq!(names(&m.join("y")), vec!["f"]);
}

#[test]
fn rename_noreplace_and_exchange_are_undone_by_a_cut() {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    let Some((_dir, fs)) = mount("rename_noreplace_and_exchange_are_undone_by_a_cut") else {
        return;
    };
    let m = fs.mountpoint().to_path_buf();
    write_synced(&m.join("a"), b"a");
    write_synced(&m.join("b"), b"b");
    fsync_dir(&m);
    let noreplace = renameat2(AT_FDCWD, &m.join("a"), AT_FDCWD, &m.join("b"), RenameFlags::RENAME_NOREPLACE);
    assert_eq!(noreplace, Err(nix::errno::Errno::EEXIST));
    renameat2(AT_FDCWD, &m.join("a"), AT_FDCWD, &m.join("c"), RenameFlags::RENAME_NOREPLACE).expect("noreplace");
    renameat2(AT_FDCWD, &m.join("b"), AT_FDCWD, &m.join("c"), RenameFlags::RENAME_EXCHANGE).expect("exchange");
    assert_eq!(std::fs::read(m.join("c")).expect("read"), b"b");
    assert_eq!(std::fs::read(m.join("b")).expect("read"), b"a");
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 2, "{cut}");
    assert_eq!(names(&m), vec!["a", "b"]);
    assert_eq!(std::fs::read(m.join("a")).expect("read"), b"a");
    assert_eq!(std::fs::read(m.join("b")).expect("read"), b"b");
}

#[test]
fn the_graveyard_is_invisible_through_the_mount() {
    let Some((dir, fs)) = mount("the_graveyard_is_invisible_through_the_mount") else {
        return;
    };
    let m = fs.mountpoint().to_path_buf();
    let name = ".powercut-fs-graveyard";
    assert!(dir.path().join("backing").join(name).is_dir(), "it exists in the backing directory");
    write_synced(&m.join("f"), b"f");
    fsync_dir(&m);
    std::fs::remove_file(m.join("f")).expect("unlink");
    assert_eq!(names(&m), Vec::<String>::new(), "not listed");
    let err = |r: std::io::Result<()>| r.expect_err("must fail").raw_os_error();
    assert_eq!(err(std::fs::metadata(m.join(name)).map(drop)), Some(libc::ENOENT));
    assert_eq!(err(std::fs::remove_dir(m.join(name))), Some(libc::ENOENT));
    assert_eq!(err(std::fs::create_dir(m.join(name))), Some(libc::EPERM));
    assert_eq!(err(std::fs::File::create(m.join(name)).map(drop)), Some(libc::EPERM));
    write_synced(&m.join("g"), b"g");
    assert_eq!(err(std::fs::rename(m.join("g"), m.join(name))), Some(libc::EPERM));
    // In a subdirectory the name is an ordinary one.
    std::fs::create_dir(m.join("d")).expect("mkdir");
    std::fs::create_dir(m.join("d").join(name)).expect("mkdir in a subdirectory");
    let cut = power_cut(&fs);
    assert_eq!(reply_number(&cut, "undone"), 4, "{cut}");
    assert_eq!(names(&m), vec!["f"]);
}

/// A metadata file (`SlottedFile`: the activity log, the dirty bitmaps)
/// opened after a daemon was killed between writing a save and syncing it
/// makes that save durable before anything else: the next save writes the
/// other slot, which may hold the only durable copy, and a power cut
/// during it would leave neither slot intact and new. (The save seen at
/// open stayed in the page cache only: a power cut took it back.)
#[test]
fn a_metadata_save_seen_at_open_is_made_durable_first() {
    let Some((dir, fs)) = mount("a_metadata_save_seen_at_open_is_made_durable_first") else {
        return;
    };
    let _ = dir;
    let (target, helper) = (fs.mountpoint().join("activity-log"), fs.mountpoint().join("helper"));
    let payload = |n: u8| vec![n; 6000];
    let mut f = SlottedFile::open(&target).expect("open");
    f.save(&payload(1)).expect("save 1");
    f.save(&payload(2)).expect("save 2");
    drop(f);
    // The image a third save writes into slot 0, taken from another file
    // saved the same way.
    let mut h = SlottedFile::open(&helper).expect("open");
    for n in 1..=3 {
        h.save(&payload(n)).expect("helper save");
    }
    let slot_len = std::fs::metadata(&target).expect("metadata").len() as usize / 2;
    let third = std::fs::read(&helper).expect("read helper")[..slot_len].to_vec();
    // A daemon killed after writing the third save, before its sync.
    std::fs::OpenOptions::new().write(true).open(&target).expect("open").write_all_at(&third, 0).expect("write");
    assert_eq!(slotted_file::read(&target).expect("read"), Some(payload(3)), "the third save, in the page cache");
    let _reopened = SlottedFile::open(&target).expect("open after the restart");
    power_cut(&fs);
    assert_eq!(
        slotted_file::read(&target).expect("read after the cut"),
        Some(payload(3)),
        "the save seen at open was lost in the power cut"
    );
}
