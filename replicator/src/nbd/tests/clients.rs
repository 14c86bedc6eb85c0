//! Real NBD clients against the server: `qemu-io` (libnbd-independent,
//! qemu's own NBD client) and `nbdinfo` (libnbd). A test whose tool is not
//! installed prints a note and passes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;

/// The tool's path, or `None` (with a note) if it is not installed.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|path| path.is_file());
    if found.is_none() {
        println!("note: {name} is not installed; skipping this test");
    }
    found
}

/// Runs a command off the async runtime (with a hard time limit) and
/// returns its exit success and combined output.
async fn run(program: &Path, args: Vec<String>) -> (bool, String) {
    let program = program.to_owned();
    let described = format!("{} {}", program.display(), args.join(" "));
    let output = step(
        &described.clone(),
        tokio::task::spawn_blocking(move || Command::new("timeout").arg("60").arg(&program).args(&args).output()),
    )
    .await
    .expect("join")
    .expect("spawn");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("$ {described}\n{text}");
    (output.status.success(), text)
}

/// `qemu-io` on export `name` of `server`, running `commands` in order.
async fn qemu_io(qemu_io: &Path, server: &Server, name: &str, commands: &[&str]) -> String {
    let mut args = vec![
        "--image-opts".to_owned(),
        format!("driver=nbd,server.type=unix,server.path={},export={name}", server.sock.display()),
    ];
    for command in commands {
        args.push("-c".to_owned());
        args.push((*command).to_owned());
    }
    let (ok, output) = run(qemu_io, args).await;
    assert!(ok, "qemu-io failed:\n{output}");
    for bad in ["failed", "error", "Error", "Pattern verification"] {
        assert!(!output.contains(bad), "qemu-io reported a problem:\n{output}");
    }
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_io_reads_and_writes() {
    let Some(qemu_io_path) = tool("qemu-io") else {
        return;
    };
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    export.fill(0, SIZE as usize, 0xee);

    qemu_io(
        &qemu_io_path,
        &server,
        "vol",
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -f -P 0xcd 64k 4k",
            "write -z 128k 64k",
            "discard 256k 64k",
            // Unaligned: qemu must turn it into a read-modify-write of whole
            // 512-byte blocks, as advertised.
            "write -P 0x77 1000 300",
            "flush",
        ],
    )
    .await;

    export.assert_bytes(0, &[0xab; 1000]);
    export.assert_bytes(65536, &[0xcd; 4096]);
    export.assert_bytes(65536 + 4096, &[0xee; 4096]);
    export.assert_bytes(131072, &[0; 65536]);
    export.assert_bytes(1000, &[0x77; 300]);
    export.assert_bytes(1300, &[0xab; 65536 - 1300]);
    assert!(export.flushes.load(Ordering::SeqCst) >= 1);
    assert!(export.zeroes.load(Ordering::SeqCst) >= 1);
    assert!(export.trims.load(Ordering::SeqCst) >= 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_io_keeps_many_requests_in_flight() {
    let Some(qemu_io_path) = tool("qemu-io") else {
        return;
    };
    let server = Server::start(MemCatalog::standard());
    let export = server.export("vol");
    // Slow enough that qemu's requests pile up in the server.
    *lock(&export.delay_all) = Some(Duration::from_millis(50));

    let patterns: Vec<u8> = (1..=12).map(|i| i * 0x11).collect();
    let mut commands: Vec<String> =
        patterns.iter().enumerate().map(|(i, p)| format!("aio_write -P {p:#x} {}k 64k", i * 64)).collect();
    commands.push("aio_flush".into());
    commands.push("flush".into());
    commands.extend(patterns.iter().enumerate().map(|(i, p)| format!("aio_read -P {p:#x} {}k 64k", i * 64)));
    commands.push("aio_flush".into());
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(&qemu_io_path, &server, "vol", &commands).await;

    for (i, p) in patterns.iter().enumerate() {
        export.assert_bytes(i as u64 * 65536, &[*p; 65536]);
    }
    let overlap = export.max_in_flight.load(Ordering::SeqCst);
    assert!(overlap >= 4, "requests were not processed concurrently (max {overlap} in flight)");
    assert!(export.flushes.load(Ordering::SeqCst) >= 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_io_sees_read_only_exports_and_refusals() {
    let Some(qemu_io_path) = tool("qemu-io") else {
        return;
    };
    let server = Server::start(MemCatalog::standard());
    server.export("ro").fill(0, 4096, 0x42);

    let args = |name: &str, command: &str| {
        vec![
            "-r".to_owned(),
            "--image-opts".to_owned(),
            format!("driver=nbd,server.type=unix,server.path={},export={name}", server.sock.display()),
            "-c".to_owned(),
            command.to_owned(),
        ]
    };
    let (ok, output) = run(&qemu_io_path, args("ro", "read -P 0x42 0 4k")).await;
    assert!(ok && !output.contains("failed"), "{output}");

    let (_, output) = run(&qemu_io_path, args("locked", "read 0 4k")).await;
    assert!(output.contains(LOCKED_MESSAGE), "refusal message not shown:\n{output}");
    let (_, output) = run(&qemu_io_path, args("nope", "read 0 4k")).await;
    assert!(output.contains("nope"), "unknown export not reported:\n{output}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nbdinfo_reports_what_clients_depend_on() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let server = Server::start(MemCatalog::standard());
    let uri = format!("nbd+unix:///vol?socket={}", server.sock.display());

    let (ok, output) = run(&nbdinfo, vec!["--json".into(), uri.clone()]).await;
    assert!(ok, "nbdinfo failed:\n{output}");
    let compact: String = output.chars().filter(|c| !c.is_whitespace()).collect();
    for expected in [
        format!("\"export-size\":{SIZE}"),
        "\"can_flush\":true".into(),
        "\"can_fua\":true".into(),
        "\"can_multi_conn\":true".into(),
        "\"can_trim\":true".into(),
        "\"can_zero\":true".into(),
        "\"is_read_only\":false".into(),
        format!("\"block_size_minimum\":{}", SIZES.minimum),
        format!("\"block_size_preferred\":{}", SIZES.preferred),
        format!("\"block_size_maximum\":{}", SIZES.maximum),
    ] {
        assert!(compact.contains(&expected), "missing {expected} in:\n{output}");
    }

    let ro_uri = format!("nbd+unix:///ro?socket={}", server.sock.display());
    let (ok, output) = run(&nbdinfo, vec!["--json".into(), ro_uri]).await;
    assert!(ok, "nbdinfo failed:\n{output}");
    let compact: String = output.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(compact.contains("\"is_read_only\":true"), "{output}");

    let list_uri = format!("nbd+unix://?socket={}", server.sock.display());
    let (_, output) = run(&nbdinfo, vec!["--list".into(), list_uri]).await;
    for name in ["\"vol\"", "\"ro\""] {
        assert!(output.contains(name), "--list misses {name}:\n{output}");
    }

    // The default export (empty name) when there is exactly one.
    let single = Server::start(MemCatalog::single());
    let uri = format!("nbd+unix://?socket={}", single.sock.display());
    let (ok, output) = run(&nbdinfo, vec!["--size".into(), uri]).await;
    assert!(ok, "{output}");
    assert_eq!(output.trim(), SIZE.to_string());
    single.stop().await;
    server.stop().await;
}
