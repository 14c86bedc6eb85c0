//! fio through its NBD engine (libnbd) against a sync-paired export:
//! random 4 KiB writes at queue depth 16 with crc32c verification, then
//! both sites stop cleanly and must hold identical bytes.

use std::process::Command;
use std::time::Duration;

use replicator_tests::{describe_output, require, run_with_timeout, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;

fn fio_verify(c: &Cluster, export: &str, rw: &str, size: &str, seed: u64) {
    let fio = require("fio");
    let out = run_with_timeout(
        Command::new(fio)
            .arg("--name=verify")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", c.nbd_uri(Site::A, export)))
            .arg(format!("--rw={rw}"))
            .arg("--bs=4k")
            .arg("--iodepth=16")
            .arg(format!("--size={size}"))
            .arg("--verify=crc32c")
            .arg("--do_verify=1")
            .arg("--verify_fatal=1")
            .arg(format!("--randseed={seed}"))
            .arg("--output-format=normal")
            // fio leaves its verify state file in the working directory.
            .current_dir(c.root()),
        Duration::from_secs(300),
    );
    let text = describe_output(&out);
    if !out.status.success() || text.contains("verify: bad") || text.contains("err=") && !text.contains("err= 0") {
        panic!("fio --rw={rw} on {export} failed: {}\n{text}\n{}", out.status, c.diagnostics());
    }
}

#[test]
fn fio_randwrite_verify_sync_pair() {
    let (group, vol) = ("fio", "fio-vol");
    let mut c = Cluster::new(ClusterOpts::group(
        GroupSpec::new(group, Mode::Sync).volume(vol, 64 * MIB).journal_size(128 * MIB),
    ));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));

    fio_verify(&c, vol, "randwrite", "32M", 1);
    // A second pass overwrites the same region in another order.
    fio_verify(&c, vol, "randwrite", "32M", 2);

    c.assert_no_session_breaks("after fio");
    let s = c.wait_drained(group);
    assert!(s.last_seq >= 16384, "fio wrote 2 x 8192 blocks; status: {s:?}");
    c.stop(Site::A);
    c.stop(Site::B);
    c.assert_volumes_identical(group);
}
