//! Replication through a real NBD client (qemu-io): many overlapping
//! asynchronous writes in flight, unaligned writes that share blocks, FUA,
//! write-zeroes and discard; read back through NBD; then both daemons stop
//! cleanly and the backing files must be identical byte for byte.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use replicator_tests::{describe_output, require, run_with_abort, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const VOLUME_SIZE: u64 = 64 * MIB;

/// Runs qemu-io against an export with the given commands and panics if it
/// fails or reports a failed command / pattern mismatch.
fn qemu_io(cluster: &Cluster, site: Site, export: &str, cmds: &[String]) {
    let qemu_io = require("qemu-io");
    let mut cmd = Command::new(qemu_io);
    cmd.args(["-f", "raw"]).arg(cluster.nbd_uri(site, export));
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run_with_abort(&mut cmd, Duration::from_secs(180), || {
        let b = cluster.session_breaks();
        (!b.is_empty()).then(|| {
            format!(
                "replication session broke during qemu-io:\n{}\n{}",
                b[..b.len().min(5)].join("\n"),
                cluster.diagnostics()
            )
        })
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // qemu-io reports results on stdout; anything on stderr is a failure.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let bad = text
        .lines()
        .filter(|l| l.contains("failed") || l.contains("Pattern verification") || l.contains("error"))
        .chain(stderr.lines())
        .take(20)
        .collect::<Vec<_>>();
    if !out.status.success() || !bad.is_empty() {
        panic!(
            "qemu-io on {export} ({site}) failed: {}\nfirst bad lines:\n{}\n{}\n{}",
            out.status,
            bad.join("\n"),
            describe_output(&out),
            cluster.diagnostics()
        );
    }
}

/// The writes: returns (write commands, read-back commands, expected
/// deterministic ranges (offset, len, byte)).
/// qemu-io write commands, read-back commands, and ranges expected to hold
/// one byte value: (offset, len, byte).
type Workload = (Vec<String>, Vec<String>, Vec<(u64, u64, u8)>);

fn workload(base: u64) -> Workload {
    let mut w = Vec::new();
    let mut r = Vec::new();
    let mut expect = Vec::new();

    // Batch 1: everything below is in flight at once.
    // (a) Overlapping aligned writes with different patterns over [0, 2 MiB),
    //     and large ones across them. The winner of each overlap is up to the
    //     server; both sites must agree on it.
    for i in 0..40u64 {
        w.push(format!("aio_write -P 0x{:x} {} {}", 0x10 + i, base + i * 48 * KIB, 64 * KIB));
        if i == 10 {
            w.push(format!("aio_write -P 0xa1 {} {}", base + 256 * KIB, 512 * KIB));
        }
        if i == 20 {
            w.push(format!("aio_write -P 0xa2 {} {}", base, MIB));
        }
        if i == 30 {
            w.push(format!("aio_write -P 0xa3 {} {}", base + 768 * KIB, MIB));
        }
    }
    // (b) Overlapping unaligned writes (read-modify-write of shared blocks).
    let u = base + 4 * MIB;
    for (i, (off, len)) in
        [(1000u64, 3000u64), (2500, 5000), (100, 20000), (4095, 2), (8191, 4098), (12000, 300)].iter().enumerate()
    {
        w.push(format!("aio_write -P 0x{:x} {} {}", 0x30 + i as u64, u + off, len));
    }
    // (c) Disjoint unaligned writes that share 4 KiB blocks: every one must
    //     survive (a lost read-modify-write update shows here).
    let d = base + 8 * MIB;
    for i in 0..64u64 {
        let pat = 0x40 + i as u8;
        w.push(format!("aio_write -P 0x{pat:x} {} 500", d + i * 1000));
        expect.push((d + i * 1000, 500, pat));
        expect.push((d + i * 1000 + 500, 500, 0));
    }
    // (d) FUA writes.
    w.push(format!("aio_write -f -P 0x66 {} {}", base + 12 * MIB, 128 * KIB));
    w.push(format!("aio_write -f -P 0x67 {} {}", base + 12 * MIB + 200 * KIB, 3333));
    expect.push((base + 12 * MIB, 128 * KIB, 0x66));
    expect.push((base + 12 * MIB + 200 * KIB, 3333, 0x67));
    w.push("aio_flush".into());

    // Batch 2: sequential writes over what batch 1 left, now deterministic.
    w.push(format!("write -P 0x33 {} 3000", base + 1000));
    expect.push((base + 1000, 3000, 0x33));
    w.push(format!("write -P 0x77 {} {}", base + 16 * MIB, MIB));
    w.push(format!("write -z {} {}", base + 16 * MIB + 256 * KIB, 256 * KIB));
    w.push(format!("discard {} {}", base + 16 * MIB + 768 * KIB, 128 * KIB));
    w.push(format!("write -z {} 1000", base + 16 * MIB + 100));
    expect.push((base + 16 * MIB, 100, 0x77));
    expect.push((base + 16 * MIB + 100, 1000, 0));
    expect.push((base + 16 * MIB + 1100, 256 * KIB - 1100, 0x77));
    expect.push((base + 16 * MIB + 256 * KIB, 256 * KIB, 0));
    expect.push((base + 16 * MIB + 512 * KIB, 256 * KIB, 0x77));
    expect.push((base + 16 * MIB + 896 * KIB, 128 * KIB, 0x77));
    // Batch 3: overlapping aio writes racing with a write-zeroes and a
    // discard in the same region (ambiguous; both sites must agree).
    for i in 0..16u64 {
        w.push(format!("aio_write -P 0x{:x} {} {}", 0x80 + i, base + 20 * MIB + i * 24 * KIB, 40 * KIB));
    }
    w.push(format!("aio_write -z {} {}", base + 20 * MIB + 100 * KIB, 64 * KIB));
    w.push(format!("aio_write -z -u {} {}", base + 20 * MIB + 200 * KIB, 64 * KIB));
    w.push("aio_flush".into());
    w.push(format!("discard {} {}", base + 20 * MIB + 300 * KIB, 64 * KIB));
    w.push("flush".into());

    for (off, len, pat) in &expect {
        r.push(format!("read -P 0x{pat:x} {off} {len}"));
    }
    (w, r, expect)
}

fn expect_file(path: &Path, expect: &[(u64, u64, u8)]) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for &(off, len, pat) in expect {
        let mut buf = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.read_exact(&mut buf).expect("read");
        if let Some(i) = buf.iter().position(|&b| b != pat) {
            panic!(
                "{}: byte at offset {} is 0x{:02x}, expected 0x{pat:02x} (range {off}+{len})",
                path.display(),
                off + i as u64,
                buf[i]
            );
        }
    }
}

fn single_volume(mode: Mode) {
    let group = format!("{}-g", mode.as_str());
    let vol = format!("{}-vol", mode.as_str());
    let mut c = Cluster::new(ClusterOpts::group(GroupSpec::new(&group, mode).volume(&vol, VOLUME_SIZE)));
    c.pair_create(&group);
    c.wait_pair(&group, Duration::from_secs(60));

    let (writes, reads, expect) = workload(0);
    qemu_io(&c, Site::A, &vol, &writes);
    qemu_io(&c, Site::A, &vol, &reads);

    c.assert_no_session_breaks("after the qemu-io workload");
    let s = c.wait_drained(&group);
    assert_eq!(s.role, "primary");
    assert!(s.last_seq > 100, "expected the writes to be journaled as records, status: {s:?}");
    let sb = c.status(Site::B, &group);
    assert_eq!(sb.role, "secondary");
    assert_eq!(sb.state, "PAIR");

    c.stop(Site::A);
    c.stop(Site::B);
    expect_file(&c.volume_path(Site::A, &vol), &expect);
    expect_file(&c.volume_path(Site::B, &vol), &expect);
    c.assert_volumes_identical(&group);
}

#[test]
fn sync_group_overlapping_aio_unaligned_fua_zeroes_discard() {
    single_volume(Mode::Sync);
}

#[test]
fn async_group_overlapping_aio_unaligned_fua_zeroes_discard() {
    single_volume(Mode::Async);
}

/// Two volumes in one async group: writes race on both at once (one journal,
/// one sequence across volumes); after draining, both volumes match.
#[test]
fn async_multi_volume_group() {
    let group = "multi";
    let vols = ["multi-data", "multi-index"];
    let mut c = Cluster::new(ClusterOpts::group(
        GroupSpec::new(group, Mode::Async).volume(vols[0], VOLUME_SIZE).volume(vols[1], 32 * MIB),
    ));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));

    let (w0, r0, e0) = workload(0);
    let (w1, r1, e1) = workload(MIB);
    std::thread::scope(|s| {
        let c = &c;
        let t0 = s.spawn(move || qemu_io(c, Site::A, vols[0], &w0));
        let t1 = s.spawn(move || qemu_io(c, Site::A, vols[1], &w1));
        t0.join().expect("qemu-io on the first volume");
        t1.join().expect("qemu-io on the second volume");
    });
    qemu_io(&c, Site::A, vols[0], &r0);
    qemu_io(&c, Site::A, vols[1], &r1);
    c.assert_no_session_breaks("after the qemu-io workloads");
    c.wait_drained(group);
    c.stop(Site::A);
    c.stop(Site::B);
    expect_file(&c.volume_path(Site::B, vols[0]), &e0);
    expect_file(&c.volume_path(Site::B, vols[1]), &e1);
    c.assert_volumes_identical(group);
}

/// TRIM and WRITE_ZEROES larger than the largest data record (mkfs.ext4
/// discards the whole device in one request): they must replicate, and the
/// pair must stay up.
#[test]
fn sync_group_whole_device_discard_and_large_write_zeroes() {
    let (group, vol) = ("big-trim", "big-trim-vol");
    let mut c = Cluster::new(ClusterOpts::group(GroupSpec::new(group, Mode::Sync).volume(vol, VOLUME_SIZE)));
    c.pair_create(group);
    c.wait_pair(group, Duration::from_secs(60));
    let cmds: Vec<String> = vec![
        format!("write -P 0x5a 0 {}", 8 * MIB),
        format!("write -P 0x5a {} {}", 40 * MIB, 8 * MIB),
        format!("discard 0 {VOLUME_SIZE}"),
        format!("write -P 0x5b {} {}", 2 * MIB, 64 * KIB),
        format!("write -z {} {}", MIB, 48 * MIB),
        format!("write -P 0x5c {} 4096", 3 * MIB),
        "flush".into(),
    ];
    qemu_io(&c, Site::A, vol, &cmds);
    let expect = [(0, MIB, 0u8), (MIB, 2 * MIB, 0), (3 * MIB, 4096, 0x5c), (3 * MIB + 4096, 46 * MIB - 4096, 0)];
    let reads: Vec<String> = expect.iter().map(|(o, l, p)| format!("read -P 0x{p:x} {o} {l}")).collect();
    qemu_io(&c, Site::A, vol, &reads);
    // A WRITE_ZEROES that is not whole blocks, larger than any data record:
    // its partial first and last blocks are read-modify-written, the blocks
    // between zeroed without payload (one read-modify-write of the whole
    // range was refused above 32 MiB, and held, journaled and shipped the
    // range as data below it).
    // One request (qemu-io splits its own at the advertised maximum).
    qemu_io(&c, Site::A, vol, &[format!("write -P 0x5d {} {}", 8 * MIB, 40 * MIB)]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client =
            replicator::nbd_client::NbdClient::connect_unix(&c.nbd_socket(Site::A), vol).await.expect("connect");
        client.write_zeroes(8 * MIB + 100, 39 * MIB as u32).await.expect("a 39 MiB WRITE_ZEROES at offset 8 MiB + 100");
        client.flush().await.expect("flush");
    });
    let expect = [
        (0, MIB, 0u8),
        (MIB, 2 * MIB, 0),
        (3 * MIB, 4096, 0x5c),
        (3 * MIB + 4096, 5 * MIB - 4096, 0),
        (8 * MIB, 100, 0x5d),
        (8 * MIB + 100, 39 * MIB, 0),
        (47 * MIB + 100, MIB - 100, 0x5d),
        (48 * MIB, 16 * MIB, 0),
    ];
    let reads: Vec<String> = expect.iter().map(|(o, l, p)| format!("read -P 0x{p:x} {o} {l}")).collect();
    qemu_io(&c, Site::A, vol, &reads);
    c.assert_no_session_breaks("after a whole-device discard and a 48 MiB write-zeroes");
    c.wait_drained_within(group, Duration::from_secs(30));
    let s = c.status(Site::A, group);
    assert!(s.last_error.is_none(), "last error on the primary: {:?}", s.last_error);
    c.stop(Site::A);
    c.stop(Site::B);
    expect_file(&c.volume_path(Site::B, vol), &expect);
    c.assert_volumes_identical(group);
}
