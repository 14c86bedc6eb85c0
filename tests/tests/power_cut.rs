//! A power cut of the primary, emulated on its files: the daemon is killed
//! with SIGKILL, then everything a power cut may drop is dropped — every
//! journal record (no client FLUSH or FUA happened, so none was ever made
//! durable), some O_DIRECT volume writes (a disk's volatile cache may lose
//! any of them) — and the recorded kernel boot id is changed, as a reboot
//! changes it. The state file and the activity log were written with fsync
//! and survive.
//!
//! Before the activity log, the restarted primary resumed from the
//! secondary's checkpoint and both sites reported PAIR, lag 0 while their
//! volumes differed. Now it detects the power cut (the boot id changed),
//! starts a new epoch and resynchronises exactly the regions the activity
//! log names.

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use replicator::nbd_client::NbdClient;
use replicator_tests::pattern::{random_bytes, written_prefix, Rng};
use replicator_tests::{Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;

/// Overwrites `len` bytes at `offset` of `path` with zeroes.
fn zero(path: &std::path::Path, offset: u64, len: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).expect("open");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(&vec![0u8; len as usize]).expect("write");
    f.sync_all().expect("sync");
}

#[test]
fn primary_power_cut_resyncs_the_activity_log_and_the_sites_converge() {
    for mode in [Mode::Async, Mode::Sync] {
        let name = format!("pc{}", mode.as_str());
        let vol = format!("{name}-vol");
        let group = GroupSpec::new(&name, mode).volume(&vol, 64 * MIB).link_timeout(Duration::from_secs(1));
        let mut cluster = Cluster::new(ClusterOpts::group(group));
        cluster.pair_create(&name);
        cluster.wait_pair(&name, Duration::from_secs(60));

        // 64 writes of 64 KiB into the first 8 MiB, no FLUSH, no FUA.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let mut rng = Rng::new(42);
        let offsets: Vec<u64> = (0..64).map(|_| rng.below(8 * MIB / BLOCK) * BLOCK).collect();
        rt.block_on(async {
            let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), &vol).await.expect("connect");
            for (i, off) in offsets.iter().enumerate() {
                client.write(*off, &random_bytes(i as u64 + 7, BLOCK as usize), false).await.expect("write");
            }
        });
        cluster.wait_drained(&name);
        // The secondary persists its checkpoint at least every 500 ms.
        std::thread::sleep(Duration::from_secs(1));

        cluster.kill9(Site::A);
        let state_dir = cluster.root().join("site-a/state/groups").join(&name);
        let journal = state_dir.join("journal");
        let journal_len = std::fs::metadata(&journal).expect("journal").len();
        zero(&journal, 4096, journal_len - 4096);
        for off in offsets.iter().take(8) {
            zero(&cluster.volume_path(Site::A, &vol), *off, BLOCK);
        }
        let state_path = state_dir.join("state.json");
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state_path).expect("state")).expect("state json");
        state["boot_id"] = serde_json::Value::String("boot-before-the-power-cut".into());
        std::fs::write(&state_path, serde_json::to_vec_pretty(&state).expect("json")).expect("write state");

        cluster.start(Site::A);
        let s = cluster.wait_until(Site::A, &name, "PAIR after the resync", Duration::from_secs(60), |s| {
            s.state == "PAIR" && s.connected && s.dirty_bytes == 0
        });
        assert_eq!((s.generation, s.epoch), (1, 1), "a power cut starts a new epoch: {s:?}");
        let log = cluster.log(Site::A);
        assert!(log.contains("power cut detected"), "the primary must say it detected a power cut:\n{log}");
        assert!(
            s.copy_total_bytes > 0 && s.copy_total_bytes <= 8 * MIB,
            "only the activity log's regions (two 4 MiB extents) are copied, not the 64 MiB volume: {s:?}"
        );
        cluster.assert_converged(&name);
    }
}

/// The secondary puts every record into its restore journal and applies it
/// only once the journal holds it durably (non-overlapping records
/// concurrently). Killed in the middle of a stream of writes, with the
/// primary gone too, it must restart on its own into the primary's image
/// after exactly the writes through some N: the replica a failover would
/// use, without any help from the primary.
#[test]
fn a_secondary_killed_mid_stream_restarts_alone_into_a_write_order_prefix() {
    const WRITES: u64 = 400;
    let group = GroupSpec::new("cu", Mode::Async).volume("cu-vol", 32 * MIB).link_timeout(Duration::from_secs(1));
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("cu");
    cluster.wait_pair("cu", Duration::from_secs(60));
    // Each write goes to its own 64 KiB block, in order: the image after
    // writes through N has blocks 0..N written and the rest zero.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    // Write i is record base + i + 1.
    let base = cluster.status(Site::A, "cu").last_seq;
    let mut durable_at_kill = 0;
    rt.block_on(async {
        let client = NbdClient::connect_unix(&cluster.nbd_socket(Site::A), "cu-vol").await.expect("connect");
        for i in 0..WRITES {
            client.write(i * BLOCK, &random_bytes(i + 1, BLOCK as usize), false).await.expect("write");
            if i == WRITES / 2 {
                // Somewhere in the middle of the stream, while records are
                // in flight to the secondary's journal and volume.
                durable_at_kill = cluster.status(Site::A, "cu").durable_seq;
                cluster.kill9(Site::B);
            }
        }
    });
    cluster.stop(Site::A);
    cluster.start(Site::B);
    let b = cluster.status(Site::B, "cu");
    assert!(b.consistent, "the replica replays its restore journal on its own and is consistent: {b:?}");
    cluster.stop(Site::B);

    let image = std::fs::read(cluster.volume_path(Site::B, "cu-vol")).expect("read the replica");
    let n = written_prefix(&image, WRITES, BLOCK);
    eprintln!("the replica restarted alone holds writes 0..{n} of {WRITES}");
    // Every record it had acknowledged as durable in its restore journal.
    let acked = durable_at_kill.saturating_sub(base);
    assert!(n >= acked, "the replica holds writes 0..{n}, but it had acknowledged 0..{acked} as durable");
}

/// The dirty bitmaps are saved in place, in two copies (`slotted_file.rs`):
/// a power cut during a save leaves the other. Should both be damaged
/// anyway (the disk, not a power cut), the daemon starts, marks the whole
/// volume dirty and copies it, as for a bitmap that does not decode.
#[test]
fn a_dirty_bitmap_with_neither_copy_intact_resyncs_the_whole_volume() {
    let group = GroupSpec::new("bm", Mode::Async).volume("bm-vol", 8 * MIB);
    let mut cluster = Cluster::new(ClusterOpts::group(group));
    cluster.pair_create("bm");
    cluster.wait_pair("bm", Duration::from_secs(60));
    cluster.stop(Site::A);
    let path = cluster.root().join("site-a/state/groups/bm/bitmap-bm-vol");
    let mut bytes = std::fs::read(&path).expect("bitmap");
    assert!(bytes.starts_with(b"RPLSLOT1"), "the bitmap is saved in two copies");
    let slot = bytes.len() / 2;
    for crc_at in [24, slot + 24] {
        bytes[crc_at] ^= 0xff;
    }
    std::fs::write(&path, &bytes).expect("damage both copies");

    cluster.start(Site::A);
    let log = std::fs::read_to_string(cluster.log_path(Site::A)).expect("log");
    assert!(log.contains("dirty bitmap unreadable"), "{log}");
    // The status never says PAIR while the volume is compared and copied
    // (the secondary keeps a consistent image meanwhile): COPY until done.
    let s = cluster.wait_until(Site::A, "bm", "PAIR after the copy", Duration::from_secs(60), |s| {
        s.state == "PAIR" && s.connected && s.dirty_bytes == 0
    });
    assert_eq!((s.copy_total_bytes, s.copy_done_bytes), (8 * MIB, 8 * MIB), "the whole volume is copied: {s:?}");
    let log = std::fs::read_to_string(cluster.log_path(Site::A)).expect("log");
    let restarted = log.rsplit("starting site-a").next().unwrap_or_default();
    assert!(restarted.contains("from=COPY to=PAIR"), "the restart starts in COPY:\n{restarted}");
    cluster.stop(Site::A);
    cluster.stop(Site::B);
    cluster.assert_volumes_identical("bm");
}
