//! Transmission phase, driven by hand: every command, every validation
//! rule with its exact error, concurrency, limits, and clean ends.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::super::proto::{
    CMD_DISC, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES,
};
use super::super::{ServeOptions, MAX_PAYLOAD};
use super::*;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Sends a command without payload and returns its reply's error.
async fn command(client: &mut RawClient, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> u32 {
    client.send_request(kind, flags, cookie, offset, len, &[]).await;
    let reply = client.reply().await;
    assert_eq!(reply.cookie, cookie);
    reply.error
}

#[tokio::test]
async fn every_command_reaches_the_export() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    let (mut client, info) = server.open("vol").await;
    assert_eq!(info.size, SIZE);
    assert_eq!(info.sizes, Some(SIZES));

    let data = pattern(1, 64 * 1024);
    assert_eq!(client.write(1, 8192, &data, 0).await, 0);
    assert_eq!(client.write(2, SIZE - 4096, &data[..4096], CMD_FLAG_FUA).await, 0);
    export.assert_bytes(8192, &data);
    export.assert_bytes(SIZE - 4096, &data[..4096]);

    let (error, read) = client.read(3, 8192, 64 * 1024).await;
    assert_eq!(error, 0);
    assert_eq!(read, data);

    assert_eq!(command(&mut client, CMD_FLUSH, 0, 4, 0, 0).await, 0);
    assert_eq!(command(&mut client, CMD_WRITE_ZEROES, 0, 5, 8192, 4096).await, 0);
    assert_eq!(command(&mut client, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 6, 12288, 4096).await, 0);
    assert_eq!(command(&mut client, CMD_TRIM, 0, 7, 0, 4096).await, 0);
    export.assert_bytes(8192, &[0; 8192]);
    export.assert_bytes(16384, &data[8192..12288]);
    // Largest read allowed, and zeroes longer than the maximum payload.
    let (error, read) = client.read(8, 0, SIZES.maximum).await;
    assert_eq!((error, read.len()), (0, SIZES.maximum as usize));
    assert_eq!(command(&mut client, CMD_WRITE_ZEROES, 0, 9, 0, 2 << 20).await, 0);
    export.assert_bytes(0, &[0; 2 << 20]);

    assert_eq!(export.writes.load(Ordering::SeqCst), 2);
    assert_eq!(export.flushes.load(Ordering::SeqCst), 1);
    assert_eq!(export.zeroes.load(Ordering::SeqCst), 3);
    assert_eq!(export.trims.load(Ordering::SeqCst), 1);

    client.send_request(CMD_DISC, 0, 10, 0, 0, &[]).await;
    client.assert_closed().await;
    server.stop().await;
}

#[tokio::test]
async fn out_of_range_requests_get_the_spec_errors() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    export.fill(0, SIZE as usize, 0xee);
    let before = export.snapshot();
    let (mut client, _) = server.open("vol").await;

    let tail = SIZE - 512;
    assert_eq!(client.read(1, tail, 1024).await.0, EINVAL);
    assert_eq!(client.read(2, SIZE, 512).await.0, EINVAL);
    assert_eq!(client.read(3, u64::MAX - 511, 1024).await.0, EINVAL);
    // The write's payload is read and dropped: the next request parses.
    assert_eq!(client.write(4, tail, &[1; 1024], 0).await, ENOSPC);
    assert_eq!(client.write(5, u64::MAX - 511, &[1; 1024], 0).await, ENOSPC);
    assert_eq!(command(&mut client, CMD_WRITE_ZEROES, 0, 6, tail, 1024).await, ENOSPC);
    assert_eq!(command(&mut client, CMD_TRIM, 0, 7, tail, 1024).await, EINVAL);

    assert_eq!(export.snapshot(), before, "export modified by rejected requests");
    assert_eq!(export.writes.load(Ordering::SeqCst), 0);
    let (error, data) = client.read(8, tail, 512).await;
    assert_eq!((error, data), (0, vec![0xee; 512]));
    server.stop().await;
}

#[tokio::test]
async fn empty_unaligned_and_oversized_requests_are_invalid() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    let (mut client, _) = server.open("vol").await;

    assert_eq!(client.read(1, 0, 0).await.0, EINVAL);
    assert_eq!(client.write(2, 0, &[], 0).await, EINVAL);
    assert_eq!(command(&mut client, CMD_TRIM, 0, 3, 0, 0).await, EINVAL);
    assert_eq!(command(&mut client, CMD_WRITE_ZEROES, 0, 4, 0, 0).await, EINVAL);

    assert_eq!(client.read(5, 100, 512).await.0, EINVAL);
    assert_eq!(client.read(6, 0, 100).await.0, EINVAL);
    assert_eq!(client.write(7, 0, &[9; 100], 0).await, EINVAL);
    assert_eq!(client.write(8, 256, &[9; 512], 0).await, EINVAL);

    // Longer than the advertised maximum: a read is served (up to the
    // protocol's 32 MiB; `request` tests the limit)...
    let (errno, data) = client.read(9, 0, SIZES.maximum + 512).await;
    assert_eq!((errno, data.len()), (0, SIZES.maximum as usize + 512));
    assert_eq!(export.writes.load(Ordering::SeqCst), 0);
    assert_eq!(client.read(10, 0, 512).await.0, 0);
    server.stop().await;
}

#[tokio::test]
async fn a_write_above_the_maximum_is_refused_and_one_above_32_mib_closes() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    let before = export.snapshot();
    let (mut client, _) = server.open("vol").await;
    // ...a write above the negotiated maximum but within the protocol's
    // 32 MiB (which a client that never asked for block sizes may send):
    // its payload is read and dropped, the write refused, and the
    // connection stays usable.
    assert_eq!(client.write(1, 0, &pattern(3, 2 << 20), 0).await, EINVAL);
    assert_eq!(export.snapshot(), before);
    assert_eq!(client.write(2, 0, &[4; 512], 0).await, 0);
    // Beyond 32 MiB a write's payload cannot be trusted: hard disconnect.
    // Only the header is sent; the server must not wait for the payload.
    client.send_request(CMD_WRITE, 0, 3, 4096, MAX_PAYLOAD + 512, &[]).await;
    client.assert_closed().await;
    assert_eq!(export.writes.load(Ordering::SeqCst), 1);

    let (mut other, _) = server.open("vol").await;
    assert_eq!(other.write(1, 0, &[4; 512], 0).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn unknown_commands_and_flags() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    let (mut client, _) = server.open("vol").await;

    // CACHE (5), BLOCK_STATUS (7), RESIZE (8), and made-up commands.
    for (cookie, kind) in [(1, 5u16), (2, 7), (3, 8), (4, 99), (5, u16::MAX)] {
        assert_eq!(command(&mut client, kind, 0, cookie, 0, 512).await, EINVAL, "command {kind}");
    }
    // Flags that do not apply, or that were not negotiated.
    assert_eq!(command(&mut client, CMD_READ, CMD_FLAG_NO_HOLE, 6, 0, 512).await, EINVAL);
    assert_eq!(command(&mut client, CMD_READ, 1 << 2, 7, 0, 512).await, EINVAL); // DF
    assert_eq!(command(&mut client, CMD_FLUSH, 1 << 15, 8, 0, 0).await, EINVAL);
    assert_eq!(client.write(9, 0, &[1; 512], CMD_FLAG_NO_HOLE).await, EINVAL);
    assert_eq!(command(&mut client, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 10, 0, 512).await, EINVAL);
    // FUA is accepted on any command.
    client.send_request(CMD_READ, CMD_FLAG_FUA, 11, 0, 512, &[]).await;
    assert_eq!(client.reply_with(|_| 512).await.error, 0);

    assert_eq!(export.writes.load(Ordering::SeqCst), 0);
    assert_eq!(export.zeroes.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn read_only_export_refuses_writes() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("ro");
    export.fill(0, 4096, 0x33);
    let (mut client, info) = server.open("ro").await;
    assert_ne!(info.flags & super::super::proto::FLAG_READ_ONLY, 0);

    assert_eq!(client.write(1, 0, &[1; 4096], 0).await, EPERM);
    assert_eq!(command(&mut client, CMD_TRIM, 0, 2, 0, 4096).await, EPERM);
    assert_eq!(command(&mut client, CMD_WRITE_ZEROES, 0, 3, 0, 4096).await, EPERM);
    assert_eq!(command(&mut client, CMD_FLUSH, 0, 4, 0, 0).await, 0);
    let (error, data) = client.read(5, 0, 4096).await;
    assert_eq!((error, data), (0, vec![0x33; 4096]));

    // An export demoted after the handshake refuses writes too.
    let vol = server.export("vol");
    let (mut client, _) = server.open("vol").await;
    vol.read_only.store(true, Ordering::SeqCst);
    assert_eq!(client.write(6, 0, &[1; 512], 0).await, EPERM);
    assert_eq!(vol.writes.load(Ordering::SeqCst), 0);
    // Each refusal reaches the export's counters.
    assert_eq!(export.refused.load(Ordering::SeqCst) + vol.refused.load(Ordering::SeqCst), 4);
    server.stop().await;
}

#[tokio::test]
async fn bad_magic_closes_and_others_are_unaffected() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    let (mut other, _) = server.open("vol").await;
    let (mut client, _) = server.open("vol").await;
    let mut request = Vec::new();
    request.extend(0x1256_0953u32.to_be_bytes());
    request.extend([0u8; 24]);
    client.send(&request).await;
    client.assert_closed().await;

    assert_eq!(other.write(1, 0, &[8; 512], 0).await, 0);
    export.assert_bytes(0, &[8; 512]);
    server.stop().await;
}

#[tokio::test]
async fn client_vanishing_mid_payload_writes_nothing() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    let before = export.snapshot();

    let (mut client, _) = server.open("vol").await;
    client.send_request(CMD_WRITE, 0, 1, 0, 64 * 1024, &[0xaa; 1000]).await;
    drop(client);
    // Mid-header, too.
    let (mut client, _) = server.open("vol").await;
    client.send(&REQUEST_MAGIC.to_be_bytes()).await;
    drop(client);

    // Another connection works, and by the time it has, the first two are
    // long gone.
    let (mut other, _) = server.open("vol").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(other.read(1, 0, 512).await.0, 0);
    assert_eq!(export.writes.load(Ordering::SeqCst), 0);
    assert_eq!(export.snapshot(), before);
    server.stop().await;
}

#[tokio::test]
async fn requests_run_concurrently_and_reply_out_of_order() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    export.fill(4096, 4096, 0x44);
    lock(&export.delay_at).insert(0, Duration::from_millis(400));
    let (mut client, _) = server.open("vol").await;

    client.send_request(CMD_READ, 0, 1, 0, 4096, &[]).await;
    client.send_request(CMD_READ, 0, 2, 4096, 4096, &[]).await;
    let first = client.reply_with(|_| 4096).await;
    let second = client.reply_with(|_| 4096).await;
    assert_eq!((first.cookie, first.error), (2, 0));
    assert_eq!(first.data, vec![0x44; 4096]);
    assert_eq!((second.cookie, second.error), (1, 0));
    assert_eq!(export.max_in_flight.load(Ordering::SeqCst), 2);
    server.stop().await;
}

#[tokio::test]
async fn many_pipelined_writes_all_complete() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    let (client, _) = server.open("vol").await;

    // More than the in-flight limit (256), sent before reading any reply.
    let count = 600u64;
    let mut batch = Vec::new();
    for i in 0..count {
        let data = pattern(i as u8, 4096);
        let mut request = Vec::new();
        request.extend(REQUEST_MAGIC.to_be_bytes());
        request.extend(0u16.to_be_bytes());
        request.extend(CMD_WRITE.to_be_bytes());
        request.extend(i.to_be_bytes());
        request.extend((i * 4096).to_be_bytes());
        request.extend(4096u32.to_be_bytes());
        request.extend(data);
        batch.extend(request);
    }
    let (mut read_half, mut write_half) = client.stream.into_split();
    let sender = tokio::spawn(async move {
        write_half.write_all(&batch).await.expect("send batch");
        write_half
    });
    let mut seen = HashSet::new();
    for _ in 0..count {
        let mut header = [0u8; 16];
        step("reply", read_half.read_exact(&mut header)).await.expect("reply");
        assert_eq!(&header[4..8], &[0, 0, 0, 0]);
        let cookie = u64::from_be_bytes(header[8..].try_into().expect("8 bytes"));
        assert!(seen.insert(cookie), "duplicate reply for {cookie}");
    }
    assert_eq!(seen.len() as u64, count);
    let _ = step("sender", sender).await;
    for i in 0..count {
        export.assert_bytes(i * 4096, &pattern(i as u8, 4096));
    }
    assert_eq!(export.writes.load(Ordering::SeqCst), count as usize);
    server.stop().await;
}

#[tokio::test]
async fn in_flight_requests_are_bounded() {
    let options = ServeOptions { max_in_flight_requests: 4, ..ServeOptions::default() };
    let server = Server::start_with(MemCatalog::standard(), options);
    let export = server.export("vol");
    *lock(&export.delay_all) = Some(Duration::from_millis(50));
    let (mut client, _) = server.open("vol").await;
    for cookie in 0..16 {
        client.send_request(CMD_READ, 0, cookie, cookie * 4096, 4096, &[]).await;
    }
    for _ in 0..16 {
        assert_eq!(client.reply_with(|_| 4096).await.error, 0);
    }
    assert_eq!(export.max_in_flight.load(Ordering::SeqCst), 4);

    // Byte budget: 64 KiB lets two 32 KiB reads run at once, never three.
    let options = ServeOptions { max_in_flight_bytes: 64 * 1024, ..ServeOptions::default() };
    let server = Server::start_with(MemCatalog::standard(), options);
    let export = server.export("vol");
    *lock(&export.delay_all) = Some(Duration::from_millis(50));
    let (mut client, _) = server.open("vol").await;
    for cookie in 0..8 {
        client.send_request(CMD_READ, 0, cookie, cookie * 32768, 32768, &[]).await;
    }
    for _ in 0..8 {
        assert_eq!(client.reply_with(|_| 32768).await.error, 0);
    }
    assert_eq!(export.max_in_flight.load(Ordering::SeqCst), 2);
    // A single request larger than the whole budget still runs.
    let (error, data) = client.read(99, 0, 1 << 20).await;
    assert_eq!((error, data.len()), (0, 1 << 20));
    server.stop().await;
}

#[tokio::test]
async fn disc_finishes_in_flight_requests_first() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    lock(&export.delay_at).insert(0, Duration::from_millis(300));
    let (mut client, _) = server.open("vol").await;
    let data = pattern(9, 4096);
    client.send_request(CMD_WRITE, 0, 41, 0, 4096, &data).await;
    client.send_request(CMD_DISC, 0, 42, 0, 0, &[]).await;
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (41, 0));
    client.assert_closed().await;
    export.assert_bytes(0, &data);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_then_closes() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    lock(&export.delay_at).insert(0, Duration::from_millis(300));
    let (mut client, _) = server.open("vol").await;
    let data = pattern(5, 4096);
    client.send_request(CMD_WRITE, 0, 1, 0, 4096, &data).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.request_shutdown();
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (1, 0));
    client.assert_closed().await;
    export.assert_bytes(0, &data);
    // No new connections.
    assert!(UnixStream::connect(&server.sock).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn shutdown_grace_bounds_a_client_that_stops_reading() {
    let options = ServeOptions { shutdown_grace: Duration::from_millis(300), ..ServeOptions::default() };
    let server = Server::start_with(MemCatalog::standard(), options);
    let (mut client, _) = server.open("vol").await;
    // Queue far more reply data than the socket buffers hold, read none.
    for cookie in 0..64 {
        client.send_request(CMD_READ, 0, cookie, 0, 1 << 20, &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.request_shutdown();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(server.is_finished(), "serve did not return after the grace period");
    server.stop().await;
}

/// A request still running in the export when the grace period and the
/// backstop have passed is reported: the daemon must not record a clean
/// shutdown while an export future may still write.
#[tokio::test]
async fn shutdown_reports_requests_still_running_in_the_export() {
    let options = ServeOptions { shutdown_grace: Duration::from_millis(200), ..ServeOptions::default() };
    let server = Server::start_with(MemCatalog::standard(), options);
    let export = server.export("vol");
    // Longer than the grace period plus the backstop.
    let stuck = super::super::SHUTDOWN_BACKSTOP + Duration::from_secs(5);
    lock(&export.delay_at).insert(0, stuck);
    let (mut client, _) = server.open("vol").await;
    client.send_request(CMD_WRITE, 0, 1, 0, 4096, &pattern(3, 4096)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let drain = server.stop_drain().await;
    assert_eq!(drain, Drain::Incomplete { requests: 1 });
    assert!(started.elapsed() < stuck, "serve waited for the stuck request instead of reporting it");
}

/// A connection closed by the grace period (its request outlived it) counts
/// as drained once that request has finished in the export.
#[tokio::test]
async fn shutdown_waits_for_requests_of_a_connection_closed_by_the_grace_period() {
    let options = ServeOptions { shutdown_grace: Duration::from_millis(200), ..ServeOptions::default() };
    let server = Server::start_with(MemCatalog::standard(), options);
    let export = server.export("vol");
    lock(&export.delay_at).insert(0, Duration::from_millis(800));
    let (mut client, _) = server.open("vol").await;
    client.send_request(CMD_WRITE, 0, 1, 0, 4096, &pattern(4, 4096)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.stop_drain().await, Drain::Complete);
    export.assert_bytes(0, &pattern(4, 4096));
}

#[tokio::test]
async fn export_errors_and_panics_become_error_replies() {
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    lock(&export.fail_at).insert(8192, NbdErrno::Io);
    lock(&export.fail_at).insert(16384, NbdErrno::NoSpc);
    *lock(&export.panic_at) = Some(32768);
    let (mut client, _) = server.open("vol").await;

    assert_eq!(client.read(1, 8192, 4096).await.0, EIO);
    assert_eq!(client.write(2, 16384, &[1; 4096], 0).await, ENOSPC);
    assert_eq!(client.read(3, 32768, 4096).await.0, EIO);
    assert_eq!(client.write(4, 32768, &[1; 4096], 0).await, EIO);
    // Still in step.
    assert_eq!(client.write(5, 0, &[2; 4096], 0).await, 0);
    export.assert_bytes(0, &[2; 4096]);
    server.stop().await;
}

#[tokio::test]
async fn flush_covers_writes_from_every_connection() {
    // CAN_MULTI_CONN is advertised; the server passes FLUSH through to the
    // export (whose flush is connection-independent) and does not reorder a
    // flush ahead of writes already acknowledged.
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    let (mut a, info) = server.open("vol").await;
    assert_ne!(info.flags & super::super::proto::FLAG_CAN_MULTI_CONN, 0);
    let (mut b, _) = server.open("vol").await;
    assert_eq!(a.write(1, 0, &[1; 4096], 0).await, 0);
    assert_eq!(b.write(1, 4096, &[2; 4096], 0).await, 0);
    assert_eq!(command(&mut a, CMD_FLUSH, 0, 2, 0, 0).await, 0);
    assert_eq!(export.flushes.load(Ordering::SeqCst), 1);
    assert_eq!(b.read(3, 0, 8192).await.1, [vec![1; 4096], vec![2; 4096]].concat());
    server.stop().await;
}

/// Connections beyond the cap are accepted and closed at once (their file
/// descriptors are not kept); a freed slot takes a new connection.
#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let options = ServeOptions { max_connections: 8, ..ServeOptions::default() };
    let server = Server::start_with(MemCatalog::standard(), options);
    let (mut first, _) = server.open("vol").await;
    let mut others = Vec::new();
    for _ in 0..6 {
        others.push(server.open("vol").await.0);
    }
    // One still in the handshake holds a slot too.
    let mut second = RawClient::connect(&server.sock).await;
    second.greet(3).await;
    let mut third = RawClient::connect(&server.sock).await;
    third.assert_closed().await;

    assert_eq!(first.read(1, 0, 4096).await.0, 0);
    drop(first);
    let mut again = connect_once_freed(&server.sock).await;
    again.go("vol").await;
    assert_eq!(again.read(2, 0, 4096).await.0, 0);
    drop(second);
    drop(others);
    server.stop().await;
}

/// Connects until the server greets (a slot freed by a client that went
/// away is released once the server has seen it go), and greets back.
async fn connect_once_freed(sock: &Path) -> RawClient {
    let deadline = std::time::Instant::now() + STEP;
    let mut client = loop {
        let mut client = RawClient::connect(sock).await;
        let mut magic = [0u8; 8];
        match tokio::time::timeout(STEP, client.stream.read_exact(&mut magic)).await {
            Ok(Ok(_)) if u64::from_be_bytes(magic) == NBDMAGIC => break client,
            _ if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("the freed slot never took a new connection: {other:?}"),
        }
    };
    // The rest of the greeting.
    client.read_exact(10).await;
    client.send(&3u32.to_be_bytes()).await;
    client
}

/// Connections that stay in their handshake (a host without a certificate
/// on a TLS listener) hold at most a quarter of the shared slots per
/// listener: another listener sharing the limits still takes clients.
#[tokio::test]
async fn silent_handshakes_on_one_listener_leave_the_others_their_slots() {
    let options = ServeOptions { max_connections: 8, ..ServeOptions::default() };
    let limits = super::super::SharedLimits::new(&options);
    let catalog = MemCatalog::standard();
    let dir = tempfile::tempdir().expect("tempdir");
    let (shutdown, rx) = watch::channel(false);
    let mut servers = Vec::new();
    for name in ["tcp-like.sock", "local.sock"] {
        let listener = UnixListener::bind(dir.path().join(name)).expect("bind");
        servers.push(tokio::spawn(super::super::serve_shared(
            listener,
            Arc::clone(&catalog),
            rx.clone(),
            options,
            limits.clone(),
        )));
    }
    let (busy, local) = (dir.path().join("tcp-like.sock"), dir.path().join("local.sock"));
    // Two connections greeted and silent: the busy listener's share.
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut c = RawClient::connect(&busy).await;
        c.greet(3).await;
        silent.push(c);
    }
    let mut third = RawClient::connect(&busy).await;
    third.assert_closed().await;
    // The other listener serves, up to the slots left.
    let mut served = Vec::new();
    for _ in 0..6 {
        let mut c = RawClient::connect(&local).await;
        c.greet(3).await;
        c.go("vol").await;
        assert_eq!(c.read(1, 0, 4096).await.0, 0);
        served.push(c);
    }
    let mut over = RawClient::connect(&local).await;
    over.assert_closed().await;
    // A silent connection that finishes its handshake frees its share.
    silent[0].go("vol").await;
    drop(served.pop());
    let mut next = connect_once_freed(&busy).await;
    next.go("vol").await;
    assert_eq!(next.read(2, 0, 4096).await.0, 0);
    drop((silent, served, next));
    let _ = shutdown.send(true);
    for s in servers {
        assert_eq!(s.await.expect("server task"), Drain::Complete);
    }
}

/// The byte budget is shared by all connections: with two clients holding
/// it (their 1 MiB replies unread), a third client's read waits until one
/// of them takes its reply.
#[tokio::test]
async fn in_flight_bytes_are_bounded_across_connections() {
    let options =
        ServeOptions { max_in_flight_bytes: 1 << 20, max_total_in_flight_bytes: 2 << 20, ..ServeOptions::default() };
    // Three exports: one export holds at most half of the shared budget
    // (see the next test).
    let catalog = MemCatalog::standard();
    catalog.add("third", MemExport::new(SIZE));
    let server = Server::start_with(catalog, options);
    let (mut a, _) = server.open("vol").await;
    let (mut b, _) = server.open("ro").await;
    let (mut c, _) = server.open("third").await;
    // A 1 MiB reply does not fit in a Unix socket's buffers: each holds its
    // budget until its client reads it.
    a.send_request(CMD_READ, 0, 1, 0, 1 << 20, &[]).await;
    b.send_request(CMD_READ, 0, 2, 1 << 20, 1 << 20, &[]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send_request(CMD_READ, 0, 3, 0, 4096, &[]).await;
    let early = tokio::time::timeout(Duration::from_millis(500), c.reply_with(|_| 4096)).await;
    assert!(early.is_err(), "a read ran while two connections held the whole shared budget");

    let reply = a.reply_with(|_| 1 << 20).await;
    assert_eq!((reply.cookie, reply.error), (1, 0));
    let reply = c.reply_with(|_| 4096).await;
    assert_eq!((reply.cookie, reply.error), (3, 0));
    let reply = b.reply_with(|_| 1 << 20).await;
    assert_eq!((reply.cookie, reply.error), (2, 0));
    server.stop().await;
}

/// One connection holds at most a quarter of its group's share of the
/// budget: a client that sends reads and takes none of their replies
/// leaves the group's other clients room (it held the whole share until
/// the reply timeout, 60 s at the defaults).
#[tokio::test]
async fn one_connection_cannot_hold_its_groups_whole_budget() {
    let options = ServeOptions { max_total_in_flight_bytes: 8 << 20, ..ServeOptions::default() };
    let server = Server::start_with(MemCatalog::standard(), options);
    let (mut greedy, _) = server.open("vol").await;
    let (mut other, _) = server.open("vol").await;
    for cookie in 0..8 {
        greedy.send_request(CMD_READ, 0, cookie, (cookie % 4) << 20, 1 << 20, &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let read = tokio::time::timeout(Duration::from_secs(5), other.read(99, 0, 1 << 20)).await;
    assert_eq!(read.expect("a read behind the greedy client's unread replies").0, 0);
    drop(greedy);
    server.stop().await;
}

/// A client that stops taking its replies is disconnected after the reply
/// timeout, and what its replies held goes back to the shared budget.
#[tokio::test]
async fn a_client_that_stops_reading_replies_is_disconnected() {
    let options = ServeOptions {
        max_total_in_flight_bytes: 1 << 20,
        reply_timeout: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let server = Server::start_with(MemCatalog::standard(), options);
    let (mut stalled, _) = server.open("vol").await;
    let (mut other, _) = server.open("vol").await;
    stalled.send_request(CMD_READ, 0, 1, 0, 1 << 20, &[]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Waits for the budget the stalled client holds, then runs.
    let (error, data) = other.read(2, 1 << 20, 1 << 20).await;
    assert_eq!((error, data.len()), (0, 1 << 20));
    // The stalled client gets part of its reply, then the end.
    let mut got = Vec::new();
    step("stalled client closed", stalled.stream.read_to_end(&mut got)).await.expect("read to end");
    assert!(got.len() < 16 + (1 << 20), "the whole reply was sent: {} bytes", got.len());
    server.stop().await;
}

/// A client that stops in the middle of a write payload is disconnected
/// after the payload timeout, and the shared budget its payload held goes
/// back to the other clients.
#[tokio::test]
async fn a_client_that_stops_sending_a_write_payload_is_disconnected() {
    let options = ServeOptions {
        max_total_in_flight_bytes: 1 << 20,
        payload_timeout: Duration::from_millis(300),
        ..ServeOptions::default()
    };
    let server = Server::start_with(MemCatalog::standard(), options);
    let export = server.export("vol");
    let (mut stalled, _) = server.open("vol").await;
    let (mut other, _) = server.open("vol").await;
    // A 1 MiB write of which only 4 KiB are sent: it holds the whole budget.
    stalled.send_request(CMD_WRITE, 0, 1, 0, 1 << 20, &pattern(5, 4096)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Waits for that budget, then runs.
    assert_eq!(step("a write behind the stalled payload", other.write(2, 1 << 20, &pattern(6, 4096), 0)).await, 0);
    stalled.assert_closed().await;
    assert_eq!(export.writes.load(Ordering::SeqCst), 1);
    export.assert_bytes(1 << 20, &pattern(6, 4096));
    server.stop().await;
}

/// Sends a request's 1 MiB payload 4 KiB every 100 ms (40 KB/s) from a
/// task of its own; the task returns how many 4 KiB pieces went out before
/// the server closed the connection (256: all of them).
fn trickle_payload(mut client: RawClient) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let chunk = pattern(5, 4096);
        for sent in 0..256 {
            if client.stream.write_all(&chunk).await.is_err() {
                return sent;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        256
    })
}

/// A client that trickles a write payload (4 KiB every 100 ms: each read
/// well within the payload timeout) is disconnected once the payload is
/// late by the minimum rate, and the budget it held goes to the other
/// clients. (It kept the budget for as long as it trickled: this 1 MiB
/// payload 26 s, past the test's step.)
#[tokio::test]
async fn a_client_that_trickles_a_write_payload_is_disconnected() {
    let options = ServeOptions {
        max_total_in_flight_bytes: 1 << 20,
        payload_timeout: Duration::from_millis(300),
        min_transfer_rate: 1 << 20,
        ..ServeOptions::default()
    };
    let server = Server::start_with(MemCatalog::standard(), options);
    let export = server.export("vol");
    let (mut trickler, _) = server.open("vol").await;
    let (mut other, _) = server.open("vol").await;
    trickler.send_request(CMD_WRITE, 0, 1, 0, 1 << 20, &[]).await;
    let trickle = trickle_payload(trickler);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(step("a write behind the trickled payload", other.write(2, 1 << 20, &pattern(6, 4096), 0)).await, 0);
    let sent = step("the trickler cut off", trickle).await.expect("trickle task");
    assert!(sent < 256, "the whole trickled payload was taken");
    assert_eq!(export.writes.load(Ordering::SeqCst), 1);
    export.assert_bytes(1 << 20, &pattern(6, 4096));
    server.stop().await;
}

/// The payload of a rejected write (beyond the end of the export) is
/// read and dropped as one transfer: a client trickling it (4 KiB every
/// 100 ms, each 64 KiB piece within the payload timeout plus its length at
/// the minimum rate) is disconnected once the whole is late. (Each piece
/// had a deadline of its own: this 1 MiB payload took 26 s, past the
/// test's step, and a 32 MiB one at the defaults could take hours.)
#[tokio::test]
async fn a_client_that_trickles_a_rejected_payload_is_disconnected() {
    let options =
        ServeOptions { payload_timeout: Duration::from_secs(2), min_transfer_rate: 1 << 20, ..ServeOptions::default() };
    let server = Server::start_with(MemCatalog::standard(), options);
    let (mut trickler, _) = server.open("vol").await;
    trickler.send_request(CMD_WRITE, 0, 1, SIZE, 1 << 20, &[]).await;
    let trickle = trickle_payload(trickler);
    let sent = step("the trickler cut off", trickle).await.expect("trickle task");
    assert!(sent < 256, "the whole trickled payload was taken");
    server.stop().await;
}

/// A client that takes a reply a little at a time (4 KiB every 100 ms;
/// the socket then wakes the server's writer every few seconds, within the
/// reply timeout) is disconnected once it is late by the minimum rate, and
/// the budget the reply held goes to the other clients. (It kept the
/// budget for as long as it trickled: this 1 MiB reply 26 s, past the
/// test's step.)
#[tokio::test]
async fn a_client_that_trickles_its_reads_is_disconnected() {
    let options = ServeOptions {
        max_total_in_flight_bytes: 1 << 20,
        reply_timeout: Duration::from_secs(5),
        min_transfer_rate: 1 << 20,
        ..ServeOptions::default()
    };
    let server = Server::start_with(MemCatalog::standard(), options);
    let (mut trickler, _) = server.open("vol").await;
    let (mut other, _) = server.open("vol").await;
    trickler.send_request(CMD_READ, 0, 1, 0, 1 << 20, &[]).await;
    let trickle = tokio::spawn(async move {
        let mut got = 0;
        let mut buf = vec![0u8; 4096];
        for _ in 0..400 {
            match trickler.stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        got
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (error, data) = step("a read behind the trickled reply", other.read(2, 1 << 20, 1 << 20)).await;
    assert_eq!((error, data.len()), (0, 1 << 20));
    let got = step("the trickler cut off", trickle).await.expect("trickle task");
    assert!(got < 16 + (1 << 20), "the whole reply was sent: {got} bytes");
    server.stop().await;
}

/// A client that stops in the middle of a request header is disconnected
/// after the payload timeout (it held its connection slot for good); an idle
/// client between requests is not.
#[tokio::test]
async fn a_client_that_stops_inside_a_request_header_is_disconnected() {
    let options = ServeOptions { payload_timeout: Duration::from_millis(300), ..ServeOptions::default() };
    let server = Server::start_with(MemCatalog::standard(), options);
    let (mut stalled, _) = server.open("vol").await;
    let (mut idle, _) = server.open("vol").await;
    stalled.stream.write_all(&[0x25, 0x60, 0x95]).await.expect("three bytes of a header");
    stalled.assert_closed().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (error, data) = idle.read(1, 0, 4096).await;
    assert_eq!((error, data.len()), (0, 4096), "an idle client stays connected");
    server.stop().await;
}

/// Requests stuck in one export (its group waiting for a peer, say) hold at
/// most half of the shared byte budget: another export's clients still get
/// the rest, where they waited for the stuck ones before.
#[tokio::test]
async fn an_export_whose_requests_hang_leaves_the_other_exports_their_share() {
    let catalog = MemCatalog::standard();
    catalog.add("other", MemExport::new(SIZE));
    let options = ServeOptions { max_total_in_flight_bytes: 2 << 20, ..ServeOptions::default() };
    let server = Server::start_with(catalog, options);
    *server.export("vol").delay_all.lock().expect("lock") = Some(Duration::from_secs(3));
    let (mut stuck_a, _) = server.open("vol").await;
    let (mut stuck_b, _) = server.open("vol").await;
    stuck_a.send_request(CMD_WRITE, 0, 1, 0, 1 << 20, &pattern(1, 1 << 20)).await;
    stuck_b.send_request(CMD_WRITE, 0, 2, 1 << 20, 1 << 20, &pattern(2, 1 << 20)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut other, _) = server.open("other").await;
    let started = std::time::Instant::now();
    assert_eq!(step("a write to another export", other.write(3, 0, &pattern(3, 1 << 20), 0)).await, 0);
    assert!(started.elapsed() < Duration::from_secs(2), "it waited for the stuck export: {:?}", started.elapsed());
    assert_eq!(stuck_a.reply().await.error, 0);
    assert_eq!(stuck_b.reply().await.error, 0);
    server.stop().await;
}
