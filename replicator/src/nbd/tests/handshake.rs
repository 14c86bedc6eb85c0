//! Handshake phase, driven by hand: each option's exact replies, and the
//! cases that must close the connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use super::super::proto::{
    FLAG_CAN_MULTI_CONN, FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_NAME, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO,
    OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_UNKNOWN,
    REP_ERR_UNSUP, REP_SERVER,
};
use super::super::{serve_tcp, ServeOptions};
use super::*;

const RW_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN;

fn message(reply: &OptionReply) -> &str {
    std::str::from_utf8(&reply.data).expect("UTF-8 message")
}

/// After the handshake checks, the connection (or a new one) still works.
async fn assert_usable(client: &mut RawClient) {
    let info = client.go("vol").await;
    assert_eq!(info.size, SIZE);
    let (error, data) = client.read(1, 0, 512).await;
    assert_eq!((error, data.len()), (0, 512));
}

#[tokio::test]
async fn greeting_advertises_fixed_newstyle_and_no_zeroes() {
    let server = Server::start(MemCatalog::standard());
    let mut client = RawClient::connect(&server.sock).await;
    assert_eq!(client.greet(1).await, 0b11);
    assert_usable(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn list_names_every_export() {
    let server = Server::start(MemCatalog::standard());
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    client.send_option(OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let reply = client.option_reply().await;
        assert_eq!(reply.option, OPT_LIST);
        if reply.kind == REP_ACK {
            assert!(reply.data.is_empty());
            break;
        }
        assert_eq!(reply.kind, REP_SERVER);
        let len = u32::from_be_bytes(reply.data[..4].try_into().expect("4 bytes")) as usize;
        assert_eq!(reply.data.len(), 4 + len);
        names.push(String::from_utf8(reply.data[4..].to_vec()).expect("UTF-8 name"));
    }
    assert_eq!(names, ["locked", "ro", "vol"]);

    // With data: invalid, and the session continues.
    client.send_option(OPT_LIST, b"x").await;
    let reply = client.option_reply().await;
    assert_eq!((reply.option, reply.kind), (OPT_LIST, REP_ERR_INVALID));
    assert_usable(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn info_reports_size_flags_name_and_block_sizes() {
    let server = Server::start(MemCatalog::standard());
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;

    let (infos, last) = client.info(OPT_INFO, "vol", &[INFO_BLOCK_SIZE, INFO_NAME]).await;
    assert_eq!(last.kind, REP_ACK);
    let info = parse_infos(&infos);
    assert_eq!(info.size, SIZE);
    assert_eq!(info.flags, RW_FLAGS);
    assert_eq!(info.sizes, Some(SIZES));
    assert!(infos.contains(&(INFO_NAME, b"vol".to_vec())), "{infos:?}");

    let (infos, last) = client.info(OPT_INFO, "ro", &[]).await;
    assert_eq!(last.kind, REP_ACK);
    assert_eq!(parse_infos(&infos).flags, RW_FLAGS | FLAG_READ_ONLY);

    // INFO does not enter transmission: options continue.
    assert_usable(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn export_name_with_and_without_zero_padding() {
    let server = Server::start(MemCatalog::standard());
    server.export("vol").fill(0, 512, 0x5a);

    for (client_flags, padding) in [(3u32, 0usize), (1, 124), (0, 124)] {
        let mut client = RawClient::connect(&server.sock).await;
        client.greet(client_flags).await;
        client.send_option(OPT_EXPORT_NAME, b"vol").await;
        let reply = client.read_exact(10 + padding).await;
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().expect("8 bytes")), SIZE);
        assert_eq!(u16::from_be_bytes([reply[8], reply[9]]), RW_FLAGS);
        assert!(reply[10..].iter().all(|&b| b == 0));
        // The next bytes are the read's reply: nothing extra was sent.
        let (error, data) = client.read(9, 0, 512).await;
        assert_eq!(error, 0);
        assert_eq!(data, vec![0x5a; 512]);
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_options_get_err_unsup_and_the_session_continues() {
    let server = Server::start(MemCatalog::standard());
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    for (option, data, expected) in [
        (99u32, &b"some data"[..], REP_ERR_UNSUP),
        (OPT_STRUCTURED_REPLY, &[][..], REP_ERR_UNSUP),
        (9, &[0, 0, 0, 0, 0, 0, 0, 0][..], REP_ERR_UNSUP), // LIST_META_CONTEXT
        (10, &[0, 0, 0, 0, 0, 0, 0, 0][..], REP_ERR_UNSUP), // SET_META_CONTEXT
        (11, &[][..], REP_ERR_UNSUP),                      // EXTENDED_HEADERS
        (OPT_STARTTLS, &[][..], REP_ERR_POLICY),
    ] {
        client.send_option(option, data).await;
        let reply = client.option_reply().await;
        assert_eq!((reply.option, reply.kind), (option, expected), "option {option}");
        assert!(!message(&reply).is_empty());
    }
    assert_usable(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_and_refused_exports() {
    let server = Server::start(MemCatalog::standard());
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;

    for option in [OPT_INFO, OPT_GO] {
        let (infos, last) = client.info(option, "nope", &[INFO_BLOCK_SIZE]).await;
        assert!(infos.is_empty());
        assert_eq!(last.kind, REP_ERR_UNKNOWN);
        assert!(message(&last).contains("nope"), "{last:?}");

        let (infos, last) = client.info(option, "locked", &[]).await;
        assert!(infos.is_empty());
        assert_eq!(last.kind, REP_ERR_POLICY);
        assert_eq!(message(&last), LOCKED_MESSAGE);
    }
    assert_usable(&mut client).await;

    // EXPORT_NAME cannot carry an error: the server closes.
    for name in ["nope", "locked"] {
        let mut client = RawClient::connect(&server.sock).await;
        client.greet(3).await;
        client.send_option(OPT_EXPORT_NAME, name.as_bytes()).await;
        client.assert_closed().await;
    }
    let (mut client, _) = server.open("vol").await;
    let (error, _) = client.read(1, 0, 512).await;
    assert_eq!(error, 0);
    server.stop().await;
}

#[tokio::test]
async fn default_export_only_when_there_is_exactly_one() {
    let server = Server::start(MemCatalog::single());
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    let (infos, last) = client.info(OPT_GO, "", &[INFO_NAME, INFO_BLOCK_SIZE]).await;
    assert_eq!(last.kind, REP_ACK);
    assert!(infos.contains(&(INFO_NAME, b"vol".to_vec())), "{infos:?}");
    let (error, _) = client.read(1, 0, 512).await;
    assert_eq!(error, 0);

    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    client.send_option(OPT_EXPORT_NAME, b"").await;
    let reply = client.read_exact(10).await;
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().expect("8 bytes")), SIZE);
    server.stop().await;

    let server = Server::start(MemCatalog::standard());
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    let (_, last) = client.info(OPT_GO, "", &[]).await;
    assert_eq!(last.kind, REP_ERR_UNKNOWN);
    assert!(message(&last).contains("default"), "{last:?}");
    assert_usable(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn malformed_info_requests_are_invalid() {
    let server = Server::start(MemCatalog::standard());
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    let mut bad_count = info_data("vol", &[INFO_BLOCK_SIZE]);
    bad_count.truncate(bad_count.len() - 1);
    let mut long_name = info_data("vol", &[]);
    long_name[..4].copy_from_slice(&100u32.to_be_bytes());
    for data in [vec![0, 0], bad_count, long_name] {
        client.send_option(OPT_GO, &data).await;
        let reply = client.option_reply().await;
        assert_eq!((reply.option, reply.kind), (OPT_GO, REP_ERR_INVALID), "{data:?}");
    }
    assert_usable(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn abort_is_acknowledged_then_closed() {
    let server = Server::start(MemCatalog::standard());
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    client.send_option(OPT_ABORT, &[]).await;
    let reply = client.option_reply().await;
    assert_eq!((reply.option, reply.kind, reply.data.len()), (OPT_ABORT, REP_ACK, 0));
    client.assert_closed().await;
    server.stop().await;
}

#[tokio::test]
async fn violations_close_the_connection() {
    let server = Server::start(MemCatalog::standard());

    // Unknown client flags.
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(1 << 5).await;
    client.assert_closed().await;

    // Bad option magic.
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    let mut bad = Vec::new();
    bad.extend(0x1234_5678_9abc_def0u64.to_be_bytes());
    bad.extend(OPT_LIST.to_be_bytes());
    bad.extend(0u32.to_be_bytes());
    client.send(&bad).await;
    client.assert_closed().await;

    // Option data above the cap: closed without the server reading it.
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    let mut huge = Vec::new();
    huge.extend(IHAVEOPT.to_be_bytes());
    huge.extend(OPT_GO.to_be_bytes());
    huge.extend((64u32 * 1024 + 1).to_be_bytes());
    client.send(&huge).await;
    client.assert_closed().await;

    // Export name that is not UTF-8.
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    client.send_option(OPT_EXPORT_NAME, &[0xff, 0xfe]).await;
    client.assert_closed().await;

    // The server is still fine.
    let (mut client, _) = server.open("vol").await;
    let (error, _) = client.read(1, 0, 512).await;
    assert_eq!(error, 0);
    server.stop().await;
}

#[tokio::test]
async fn option_data_at_the_cap_is_read_and_answered() {
    let server = Server::start(MemCatalog::standard());
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    client.send_option(1234, &vec![7u8; 64 * 1024]).await;
    let reply = client.option_reply().await;
    assert_eq!(reply.kind, REP_ERR_UNSUP);
    assert_usable(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn idle_handshake_times_out() {
    let options = ServeOptions { handshake_timeout: Duration::from_millis(300), ..ServeOptions::default() };
    let server = Server::start_with(MemCatalog::standard(), options);

    // Silent after connecting.
    let started = Instant::now();
    let mut silent = RawClient::connect(&server.sock).await;
    let _greeting = silent.read_exact(18).await;
    silent.assert_closed().await;
    assert!(started.elapsed() >= Duration::from_millis(250));

    // Stuck in the middle of an option.
    let mut stuck = RawClient::connect(&server.sock).await;
    stuck.greet(3).await;
    stuck.send(&IHAVEOPT.to_be_bytes()).await;
    stuck.assert_closed().await;

    // The timeout does not apply to the transmission phase.
    let (mut client, _) = server.open("vol").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (error, _) = client.read(1, 0, 512).await;
    assert_eq!(error, 0);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_during_handshake_closes() {
    let server = Server::start(MemCatalog::standard());
    let mut client = RawClient::connect(&server.sock).await;
    client.greet(3).await;
    server.request_shutdown();
    client.assert_closed().await;
    server.stop().await;
}

#[tokio::test]
async fn tcp_listener_serves_the_same_protocol() {
    init_logs();
    let catalog = MemCatalog::standard();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(serve_tcp(listener, Arc::clone(&catalog), rx));

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stream.write_all(&3u32.to_be_bytes()).await.expect("flags");
    let mut go = Vec::new();
    go.extend(IHAVEOPT.to_be_bytes());
    go.extend(OPT_GO.to_be_bytes());
    let data = info_data("vol", &[]);
    go.extend((data.len() as u32).to_be_bytes());
    go.extend(data);
    stream.write_all(&go).await.expect("GO");
    // INFO_EXPORT, INFO_BLOCK_SIZE, ACK.
    let mut replies = vec![0u8; (20 + 12) + (20 + 14) + 20];
    stream.read_exact(&mut replies).await.expect("GO replies");
    assert_eq!(&replies[replies.len() - 8..replies.len() - 4], &REP_ACK.to_be_bytes());

    let payload = pattern(3, 4096);
    let mut write = Vec::new();
    write.extend(REQUEST_MAGIC.to_be_bytes());
    write.extend(0u16.to_be_bytes());
    write.extend(CMD_WRITE.to_be_bytes());
    write.extend(77u64.to_be_bytes());
    write.extend(8192u64.to_be_bytes());
    write.extend(4096u32.to_be_bytes());
    write.extend(&payload);
    stream.write_all(&write).await.expect("write request");
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).await.expect("write reply");
    assert_eq!(&reply[4..8], &0u32.to_be_bytes());
    assert_eq!(&reply[8..], &77u64.to_be_bytes());
    assert_eq!(catalog.get("vol").bytes(8192, 4096), payload);

    let _ = shutdown.send(true);
    let drain = step("tcp server shutdown", task).await.expect("server task");
    assert_eq!(drain, Drain::Complete);
}
