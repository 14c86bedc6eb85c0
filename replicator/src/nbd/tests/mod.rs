//! Tests of the NBD server over real sockets: an in-memory export, a
//! hand-written client for exact protocol checks (`handshake`,
//! `transmission`), and real clients, `qemu-io` and `nbdinfo` (`clients`).
//!
//! Set `RUST_LOG=debug` to see the server's logs.

mod clients;
mod handshake;
mod tls;
mod transmission;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::proto::{
    CMD_READ, CMD_WRITE, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC, OPTION_REPLY_MAGIC, OPT_GO, REP_ACK,
    REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};
use super::{
    serve_unix_with, BlockSizes, Drain, Export, ExportCatalog, ExportError, NbdErrno, OpenError, ServeOptions,
};
use crate::io::AlignedBuf;

/// Size of the test exports.
pub(super) const SIZE: u64 = 4 << 20;
/// Block sizes of the test exports.
pub(super) const SIZES: BlockSizes = BlockSizes { minimum: 512, preferred: 4096, maximum: 1 << 20 };
/// How long any single step of a test may take.
pub(super) const STEP: Duration = Duration::from_secs(20);

pub(super) fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Awaits `fut`, failing the test if it takes longer than [`STEP`].
pub(super) async fn step<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// An export backed by a `Vec<u8>`, with knobs to slow down, fail or panic
/// chosen requests and counters to check what reached it.
#[derive(Debug)]
pub(super) struct MemExport {
    pub data: Mutex<Vec<u8>>,
    pub read_only: AtomicBool,
    pub sizes: BlockSizes,
    pub writes: AtomicUsize,
    pub zeroes: AtomicUsize,
    pub trims: AtomicUsize,
    pub flushes: AtomicUsize,
    /// Requests the server answered `EPERM` without passing them on.
    pub refused: AtomicUsize,
    in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Delay for requests at a given offset.
    pub delay_at: Mutex<HashMap<u64, Duration>>,
    /// Delay for every request.
    pub delay_all: Mutex<Option<Duration>>,
    /// Error for requests at a given offset.
    pub fail_at: Mutex<HashMap<u64, NbdErrno>>,
    /// Requests at this offset panic.
    pub panic_at: Mutex<Option<u64>>,
}

impl MemExport {
    pub(super) fn new(size: u64) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; size as usize]),
            read_only: AtomicBool::new(false),
            sizes: SIZES,
            writes: AtomicUsize::new(0),
            zeroes: AtomicUsize::new(0),
            trims: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            delay_at: Mutex::new(HashMap::new()),
            delay_all: Mutex::new(None),
            fail_at: Mutex::new(HashMap::new()),
            panic_at: Mutex::new(None),
        })
    }

    /// A copy of the contents.
    pub(super) fn snapshot(&self) -> Vec<u8> {
        lock(&self.data).clone()
    }

    pub(super) fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        lock(&self.data)[offset as usize..offset as usize + len].to_vec()
    }

    /// Asserts that the export holds `expected` at `offset`, naming the
    /// first differing byte rather than dumping both buffers.
    #[track_caller]
    pub(super) fn assert_bytes(&self, offset: u64, expected: &[u8]) {
        let actual = self.bytes(offset, expected.len());
        if let Some(at) = actual.iter().zip(expected).position(|(a, e)| a != e) {
            panic!(
                "export byte {} is {:#04x}, expected {:#04x} (range {offset}+{})",
                offset + at as u64,
                actual[at],
                expected[at],
                expected.len()
            );
        }
    }

    /// Fills a range directly (test setup).
    pub(super) fn fill(&self, offset: u64, len: usize, byte: u8) {
        lock(&self.data)[offset as usize..offset as usize + len].fill(byte);
    }

    /// Common start of every operation: counts it in flight, applies the
    /// configured delay, failure or panic.
    async fn enter(&self, offset: u64) -> Result<InFlight<'_>, ExportError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let guard = InFlight(&self.in_flight);
        let delay = lock(&self.delay_at).get(&offset).copied().or(*lock(&self.delay_all));
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        if *lock(&self.panic_at) == Some(offset) {
            panic!("MemExport: injected panic at offset {offset}");
        }
        if let Some(errno) = lock(&self.fail_at).get(&offset).copied() {
            return Err(ExportError::new(errno, format!("injected failure at {offset}")));
        }
        Ok(guard)
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        lock(&self.data).len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }

    fn rejected(&self, errno: NbdErrno) {
        if errno == NbdErrno::Perm {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn block_sizes(&self) -> BlockSizes {
        self.sizes
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, ExportError> {
        let _in_flight = self.enter(offset).await?;
        let data = lock(&self.data);
        Ok(AlignedBuf::copy_from(&data[offset as usize..offset as usize + len as usize]))
    }

    async fn write(&self, offset: u64, buf: AlignedBuf, _fua: bool) -> Result<(), ExportError> {
        let _in_flight = self.enter(offset).await?;
        assert_eq!(buf.as_ptr() as usize % crate::io::IO_ALIGN, 0, "payload buffer not aligned");
        lock(&self.data)[offset as usize..offset as usize + buf.len()].copy_from_slice(&buf);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> Result<(), ExportError> {
        let _in_flight = self.enter(offset).await?;
        lock(&self.data)[offset as usize..offset as usize + len as usize].fill(0);
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, _len: u32, _fua: bool) -> Result<(), ExportError> {
        let _in_flight = self.enter(offset).await?;
        self.trims.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        let _in_flight = self.enter(u64::MAX).await?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Exports by name, plus names that exist but are refused.
#[derive(Debug, Default)]
pub(super) struct MemCatalog {
    pub exports: Mutex<BTreeMap<String, Arc<MemExport>>>,
    pub refused: Mutex<BTreeMap<String, String>>,
}

/// Message of the refused export "locked".
pub(super) const LOCKED_MESSAGE: &str = "volume locked is a replication target; promote it first";

impl MemCatalog {
    /// "vol" (read-write), "ro" (read-only), and "locked" (refused).
    pub(super) fn standard() -> Arc<Self> {
        let catalog = Self::default();
        catalog.add("vol", MemExport::new(SIZE));
        let ro = MemExport::new(SIZE);
        ro.read_only.store(true, Ordering::SeqCst);
        catalog.add("ro", ro);
        lock(&catalog.refused).insert("locked".into(), LOCKED_MESSAGE.into());
        Arc::new(catalog)
    }

    /// Just "vol".
    pub(super) fn single() -> Arc<Self> {
        let catalog = Self::default();
        catalog.add("vol", MemExport::new(SIZE));
        Arc::new(catalog)
    }

    pub(super) fn add(&self, name: &str, export: Arc<MemExport>) {
        lock(&self.exports).insert(name.into(), export);
    }

    pub(super) fn get(&self, name: &str) -> Arc<MemExport> {
        match lock(&self.exports).get(name) {
            Some(export) => Arc::clone(export),
            None => panic!("no test export {name}"),
        }
    }
}

impl ExportCatalog for MemCatalog {
    type Export = MemExport;

    fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.exports).keys().cloned().collect();
        names.extend(lock(&self.refused).keys().cloned());
        names.sort();
        names
    }

    fn open(&self, name: &str) -> Result<Arc<MemExport>, OpenError> {
        if let Some(message) = lock(&self.refused).get(name) {
            return Err(OpenError::Refused(message.clone()));
        }
        match lock(&self.exports).get(name) {
            Some(export) => Ok(Arc::clone(export)),
            None => Err(OpenError::Unknown(name.into())),
        }
    }
}

/// A server on a Unix socket in a temporary directory.
#[derive(Debug)]
pub(super) struct Server {
    _dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub catalog: Arc<MemCatalog>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Drain>,
}

impl Server {
    pub(super) fn start(catalog: Arc<MemCatalog>) -> Self {
        Self::start_with(catalog, ServeOptions::default())
    }

    pub(super) fn start_with(catalog: Arc<MemCatalog>, options: ServeOptions) -> Self {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(serve_unix_with(listener, Arc::clone(&catalog), rx, options));
        Self { _dir: dir, sock, catalog, shutdown, task }
    }

    pub(super) fn export(&self, name: &str) -> Arc<MemExport> {
        self.catalog.get(name)
    }

    /// Connects and completes the handshake with `NBD_OPT_GO`.
    pub(super) async fn open(&self, name: &str) -> (RawClient, ExportInfo) {
        let mut client = RawClient::connect(&self.sock).await;
        client.greet(3).await;
        let info = client.go(name).await;
        (client, info)
    }

    pub(super) fn request_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Shuts down, waits for the accept loop to return, and checks that
    /// every request finished in the export.
    pub(super) async fn stop(self) {
        assert_eq!(self.stop_drain().await, Drain::Complete);
    }

    /// Shuts down and returns what the accept loop reported.
    pub(super) async fn stop_drain(self) -> Drain {
        self.request_shutdown();
        step("server shutdown", self.task).await.expect("server task")
    }

    pub(super) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// What `NBD_OPT_GO` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub sizes: Option<BlockSizes>,
}

/// One fixed-newstyle option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OptionReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One simple reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
    pub data: Vec<u8>,
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data.
pub(super) fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend((name.len() as u32).to_be_bytes());
    out.extend(name.as_bytes());
    out.extend((requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend(r.to_be_bytes());
    }
    out
}

/// A hand-driven NBD client.
#[derive(Debug)]
pub(super) struct RawClient {
    pub stream: UnixStream,
}

impl RawClient {
    pub(super) async fn connect(sock: &Path) -> Self {
        let stream = step("connect", UnixStream::connect(sock)).await.expect("connect");
        Self { stream }
    }

    pub(super) async fn read_exact(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        step("read from server", self.stream.read_exact(&mut buf)).await.expect("read from server");
        buf
    }

    async fn read_u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_exact(2).await.try_into().expect("2 bytes"))
    }

    async fn read_u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_exact(4).await.try_into().expect("4 bytes"))
    }

    async fn read_u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_exact(8).await.try_into().expect("8 bytes"))
    }

    pub(super) async fn send(&mut self, bytes: &[u8]) {
        step("write to server", self.stream.write_all(bytes)).await.expect("write to server");
    }

    /// Reads the greeting, checks it, answers with `client_flags`; returns
    /// the handshake flags.
    pub(super) async fn greet(&mut self, client_flags: u32) -> u16 {
        assert_eq!(self.read_u64().await, NBDMAGIC);
        assert_eq!(self.read_u64().await, IHAVEOPT);
        let flags = self.read_u16().await;
        self.send(&client_flags.to_be_bytes()).await;
        flags
    }

    pub(super) async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::new();
        out.extend(IHAVEOPT.to_be_bytes());
        out.extend(option.to_be_bytes());
        out.extend((data.len() as u32).to_be_bytes());
        out.extend(data);
        self.send(&out).await;
    }

    pub(super) async fn option_reply(&mut self) -> OptionReply {
        assert_eq!(self.read_u64().await, OPTION_REPLY_MAGIC);
        let option = self.read_u32().await;
        let kind = self.read_u32().await;
        let len = self.read_u32().await as usize;
        let data = self.read_exact(len).await;
        OptionReply { option, kind, data }
    }

    /// Sends `NBD_OPT_INFO`/`NBD_OPT_GO` and collects `NBD_REP_INFO` replies
    /// up to the final reply, which is returned too.
    pub(super) async fn info(
        &mut self,
        option: u32,
        name: &str,
        requests: &[u16],
    ) -> (Vec<(u16, Vec<u8>)>, OptionReply) {
        self.send_option(option, &info_data(name, requests)).await;
        let mut infos = Vec::new();
        loop {
            let reply = self.option_reply().await;
            assert_eq!(reply.option, option);
            if reply.kind != REP_INFO {
                return (infos, reply);
            }
            assert!(reply.data.len() >= 2);
            let kind = u16::from_be_bytes([reply.data[0], reply.data[1]]);
            infos.push((kind, reply.data[2..].to_vec()));
        }
    }

    /// `NBD_OPT_GO` asking for block sizes; panics unless it succeeds.
    pub(super) async fn go(&mut self, name: &str) -> ExportInfo {
        let (infos, last) = self.info(OPT_GO, name, &[INFO_BLOCK_SIZE]).await;
        assert_eq!(last.kind, REP_ACK, "GO {name:?} failed: {last:?}");
        parse_infos(&infos)
    }

    pub(super) async fn send_request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut out = Vec::with_capacity(28 + payload.len());
        out.extend(REQUEST_MAGIC.to_be_bytes());
        out.extend(flags.to_be_bytes());
        out.extend(kind.to_be_bytes());
        out.extend(cookie.to_be_bytes());
        out.extend(offset.to_be_bytes());
        out.extend(len.to_be_bytes());
        out.extend(payload);
        self.send(&out).await;
    }

    /// Reads one simple reply; `data_len(cookie)` says how much data follows
    /// a successful reply for that cookie.
    pub(super) async fn reply_with(&mut self, data_len: impl Fn(u64) -> usize) -> SimpleReply {
        assert_eq!(self.read_u32().await, SIMPLE_REPLY_MAGIC);
        let error = self.read_u32().await;
        let cookie = self.read_u64().await;
        let data = if error == 0 { self.read_exact(data_len(cookie)).await } else { Vec::new() };
        SimpleReply { error, cookie, data }
    }

    /// Reads one simple reply without data.
    pub(super) async fn reply(&mut self) -> SimpleReply {
        self.reply_with(|_| 0).await
    }

    /// A read; returns the error code and the data.
    pub(super) async fn read(&mut self, cookie: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.send_request(CMD_READ, 0, cookie, offset, len, &[]).await;
        let reply = self.reply_with(|_| len as usize).await;
        assert_eq!(reply.cookie, cookie);
        (reply.error, reply.data)
    }

    /// A write of `data`; returns the error code.
    pub(super) async fn write(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.send_request(CMD_WRITE, flags, cookie, offset, data.len() as u32, data).await;
        let reply = self.reply().await;
        assert_eq!(reply.cookie, cookie);
        reply.error
    }

    /// Asserts that the server closes the connection (EOF or reset)
    /// without sending anything more.
    pub(super) async fn assert_closed(&mut self) {
        let mut buf = [0u8; 64];
        match step("server closing the connection", self.stream.read(&mut buf)).await {
            Ok(0) => {}
            Ok(n) => panic!("expected the server to close; got {n} more bytes: {:?}", &buf[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(err) => panic!("expected the server to close; got {err}"),
        }
    }
}

/// Decodes `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE`.
pub(super) fn parse_infos(infos: &[(u16, Vec<u8>)]) -> ExportInfo {
    let mut export = None;
    let mut sizes = None;
    for (kind, data) in infos {
        let be32 = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"));
        match *kind {
            INFO_EXPORT => {
                assert_eq!(data.len(), 10);
                let size = u64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
                let flags = u16::from_be_bytes([data[8], data[9]]);
                export = Some((size, flags));
            }
            INFO_BLOCK_SIZE => {
                assert_eq!(data.len(), 12);
                sizes = Some(BlockSizes { minimum: be32(0), preferred: be32(4), maximum: be32(8) });
            }
            _ => {}
        }
    }
    let (size, flags) = export.expect("NBD_INFO_EXPORT missing");
    ExportInfo { size, flags, sizes }
}

/// The test pattern: byte `i` of a buffer is `(seed + i * 7) % 251`.
pub(super) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((usize::from(seed) + i * 7) % 251) as u8).collect()
}
