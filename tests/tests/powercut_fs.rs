//! `powercut-fs` itself (no daemon): through a real mount, driven by the
//! daemon's own I/O layer (io_uring, O_DIRECT, RWF_DSYNC, fdatasync,
//! fallocate) and plain file calls, a cut loses exactly what was not made
//! durable. The power-loss tests (power_loss.rs) rely on this.

use std::io::Write;
use std::os::unix::fs::FileExt;

use replicator::io::{AlignedBuf, BackendChoice, IoEngine, OpenOptions};
use replicator_tests::{reply_number, require, require_root, PowerCutMount};

const PAGE: usize = 4096;

fn page_of(path: &std::path::Path, page: usize) -> Vec<u8> {
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

    // State-file style: write + rename without fsync, and with fsync.
    let mut t = std::fs::File::create(m.join("a.tmp")).expect("create");
    t.write_all(b"{\"unsynced\":1}").expect("write");
    drop(t);
    std::fs::rename(m.join("a.tmp"), m.join("a.json")).expect("rename");
    let mut t = std::fs::File::create(m.join("b.tmp")).expect("create");
    t.write_all(b"{\"synced\":1}").expect("write");
    t.sync_all().expect("fsync");
    drop(t);
    std::fs::rename(m.join("b.tmp"), m.join("b.json")).expect("rename");

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
