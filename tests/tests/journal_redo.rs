//! The primary's journal as its redo log: a FLUSH makes only the journal
//! durable (one fdatasync, one device flush), and the volumes are synced in
//! the background. A power cut right after such a FLUSH must still find
//! every flushed write, put back on the volume by the replay at restart —
//! also after `pair delete`, which forgets the journal.
//!
//! Both sites run on `powercut-fs` (see `src/bin/powercut-fs.rs`), which
//! keeps every write not made durable, O_DIRECT ones included, in a
//! volatile cache that the cut drops. Before each cut the test checks that
//! the primary's volume file still has such pages: the FLUSH did not sync it,
//! so what the restart finds came from the journal.
//!
//! Needs root and /dev/fuse (fuse3's fusermount3 is installed by run-all.sh).

use std::time::Duration;

use nix::sys::signal::Signal;
use replicator::nbd_client::NbdClient;
use replicator_tests::pattern::{stamp, BLOCK};
use replicator_tests::{require, require_root, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;
/// Blocks written before the FLUSH, spread over the volume's first 8 MiB.
const BLOCKS: u64 = 32;
const STRIDE: u64 = 8 * MIB / BLOCKS;
/// The background syncs of the volumes (journal release every 2 s, the
/// activity log's) can land between the FLUSH and the cut: the scenario is
/// retried until one cut finds the volume unsynced.
const ATTEMPTS: u64 = 4;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Writes `BLOCKS` stamped blocks (version `version`), then a FLUSH.
fn write_and_flush(cluster: &Cluster, vol: &str, version: u64) {
    runtime().block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), vol).await.expect("connect");
        for b in 0..BLOCKS {
            let block = b * STRIDE / BLOCK as u64;
            client.write(block * BLOCK as u64, &stamp(block, version), false).await.expect("write");
        }
        client.flush().await.expect("flush");
        let _ = client.disconnect().await;
    });
}

/// Reads the blocks back through NBD on site-a; returns those not holding
/// version `version`.
fn wrong_blocks(cluster: &Cluster, vol: &str, version: u64) -> Vec<u64> {
    runtime().block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), vol).await.expect("connect");
        let mut wrong = Vec::new();
        for b in 0..BLOCKS {
            let block = b * STRIDE / BLOCK as u64;
            let data = client.read(block * BLOCK as u64, BLOCK as u32).await.expect("read");
            if data != stamp(block, version) {
                wrong.push(block);
            }
        }
        let _ = client.disconnect().await;
        wrong
    })
}

/// Dirty (never synced) pages of the volume file on site-a's powercut-fs.
fn volume_dirty_pages(cluster: &Cluster, vol: &str) -> u64 {
    let files = cluster.fs_command(Site::A, "files");
    let name = format!("/{vol}.img=");
    files.split_whitespace().find_map(|f| f.find(&name).and_then(|i| f[i + name.len()..].parse().ok())).unwrap_or(0)
}

fn cluster(test: &str, name: &str, vol: &str) -> Option<Cluster> {
    if !require_root(test) {
        return None;
    }
    require("fusermount3");
    let spec = GroupSpec::new(name, Mode::Async).volume(vol, 64 * MIB).link_timeout(Duration::from_secs(1));
    let cluster = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
    cluster.pair_create(name);
    cluster.wait_pair(name, Duration::from_secs(60));
    Some(cluster)
}

#[test]
fn a_flush_syncs_only_the_journal_and_a_power_cut_replays_it() {
    let (name, vol) = ("redo", "redo-vol");
    let Some(mut cluster) = cluster("a_flush_syncs_only_the_journal", name, vol) else { return };
    let mut caught = false;
    for attempt in 1..=ATTEMPTS {
        write_and_flush(&cluster, vol, attempt);
        let dirty = volume_dirty_pages(&cluster, vol);
        let cut = cluster.power_cut(Site::A);
        cluster.start(Site::A);
        cluster.wait_until(Site::A, name, "PAIR after the power cut", Duration::from_secs(60), |s| {
            s.state == "PAIR" && s.connected && s.dirty_bytes == 0
        });
        let wrong = wrong_blocks(&cluster, vol, attempt);
        assert!(
            wrong.is_empty(),
            "attempt {attempt}: blocks {wrong:?} lost a write acknowledged before a FLUSH \
             (volume pages unsynced at the cut: {dirty}; {cut:?})\n{}",
            cluster.diagnostics()
        );
        if dirty > 0 {
            caught = true;
            let log = cluster.log(Site::A);
            assert!(log.contains("replayed the journal onto the local volumes"), "the restart must replay:\n{log}");
            break;
        }
    }
    assert!(caught, "in {ATTEMPTS} attempts the volume was always synced before the cut: the FLUSH synced it?");
    cluster.assert_converged(name);
}

#[test]
fn pair_delete_syncs_the_volumes_before_it_forgets_the_journal() {
    let (name, vol) = ("redodel", "redodel-vol");
    let Some(mut cluster) = cluster("pair_delete_syncs_the_volumes", name, vol) else { return };
    write_and_flush(&cluster, vol, 1);
    let dirty = volume_dirty_pages(&cluster, vol);
    let out = cluster.cli(Site::A, &["pair", "delete", name]);
    assert!(out.status.success(), "pair delete: {}", String::from_utf8_lossy(&out.stderr));
    let cut = cluster.power_cut(Site::A);
    cluster.start(Site::A);
    let s = cluster
        .wait_until(Site::A, name, "SIMPLEX after the power cut", Duration::from_secs(30), |s| s.state == "SIMPLEX");
    let wrong = wrong_blocks(&cluster, vol, 1);
    assert!(
        wrong.is_empty(),
        "blocks {wrong:?} lost a write acknowledged before a FLUSH, the pair deleted after it \
         (volume pages unsynced before the delete: {dirty}; {cut:?}; {s:?})\n{}",
        cluster.diagnostics()
    );
}

/// Bitmap mode's replay skips the journal's records under dirty chunks (a
/// write that bypassed the journal may have overwritten them): before the
/// bitmap naming such a chunk is saved, the writes a FLUSH made durable in
/// the journal alone must be on the volume.
#[test]
fn bitmap_mode_syncs_the_volumes_before_a_replay_could_skip_flushed_records() {
    let (name, vol) = ("redobm", "redobm-vol");
    if !require_root("bitmap_mode_syncs_the_volumes") {
        return;
    }
    require("fusermount3");
    let spec = GroupSpec::new(name, Mode::Async)
        .volume(vol, 64 * MIB)
        .journal_size(16 * MIB)
        .link_timeout(Duration::from_secs(1))
        .extra("on_journal_full = \"suspend\"");
    let mut cluster = Cluster::new(ClusterOpts::group(spec).with_power_cut_fs());
    cluster.pair_create(name);
    cluster.wait_pair(name, Duration::from_secs(60));

    // The secondary stops taking records (so nothing frees journal space
    // and syncs the volumes for it), then R: flushed, durable in the
    // journal alone. 1 MiB writes past the blocks fill the journal, and
    // the primary goes to bitmap mode.
    cluster.signal(Site::B, Signal::SIGSTOP);
    write_and_flush(&cluster, vol, 1);
    let entered = "journal full: tracking writes in the dirty bitmap";
    runtime().block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), vol).await.expect("connect");
        let fill = vec![0x5a; MIB as usize];
        for i in 0..48 {
            if cluster.log(Site::A).contains(entered) {
                break;
            }
            client.write(16 * MIB + i * MIB, &fill, false).await.expect("fill write");
        }
        // W: in bitmap mode, the block after each of R's, in the same
        // 64 KiB bitmap chunk; never flushed.
        for b in 0..BLOCKS {
            let block = b * STRIDE / BLOCK as u64 + 1;
            client.write(block * BLOCK as u64, &stamp(block, 2), false).await.expect("bitmap-mode write");
        }
        let _ = client.disconnect().await;
    });
    let log = cluster.log(Site::A);
    assert!(log.contains(entered), "the primary never went to bitmap mode:\n{log}");
    let cut = cluster.power_cut(Site::A);
    cluster.signal(Site::B, Signal::SIGCONT);
    cluster.start(Site::A);
    cluster.wait_until(Site::A, name, "PAIR after the power cut", Duration::from_secs(90), |s| {
        s.state == "PAIR" && s.connected && s.dirty_bytes == 0
    });
    let wrong = wrong_blocks(&cluster, vol, 1);
    assert!(
        wrong.is_empty(),
        "blocks {wrong:?} lost a write acknowledged before a FLUSH, bitmap mode entered after it ({cut:?})\n{}",
        cluster.diagnostics()
    );
    cluster.assert_converged(name);
}
