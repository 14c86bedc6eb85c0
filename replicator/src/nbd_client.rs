//! A small asynchronous NBD client (fixed newstyle, NBD_OPT_GO, simple
//! replies, pipelined requests). Used by `replicator demo`, the benchmarks
//! and the end-to-end tests; applications use their own clients (qemu,
//! nbd-client, nbdfuse, fio).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

use crate::nbd::proto::{
    CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPTION_REPLY_MAGIC, OPT_GO, REP_ACK, REP_INFO, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    /// Socket error.
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol or refused.
    #[error("NBD: {0}")]
    Protocol(String),
    /// The server answered a request with an error code.
    #[error("NBD server returned error {0}")]
    Server(u32),
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

type Pending = Arc<Mutex<HashMap<u64, (u32, oneshot::Sender<Result<Vec<u8>, NbdClientError>>)>>>;

/// A connected client for one export. Dropping it closes the connection
/// (as a client process exiting would), without `NBD_CMD_DISC`: at once on
/// a multi-thread runtime, on a current-thread one when the runtime next
/// runs or is dropped.
#[derive(Debug)]
pub struct NbdClient {
    writer: tokio::sync::Mutex<WriteHalf<Box<dyn StreamDebug>>>,
    /// The task reading replies, which holds the socket's read half.
    reader: tokio::task::AbortHandle,
    pending: Pending,
    next_cookie: AtomicU64,
    size: u64,
    flags: u16,
}

trait StreamDebug: Stream + std::fmt::Debug {}
impl<T: Stream + std::fmt::Debug> StreamDebug for T {}

impl NbdClient {
    /// Connects over a Unix socket and opens `export`.
    pub async fn connect_unix(socket: &Path, export: &str) -> Result<Self, NbdClientError> {
        let s = tokio::net::UnixStream::connect(socket).await?;
        Self::handshake(Box::new(s), export).await
    }

    /// Connects over TCP and opens `export`.
    pub async fn connect_tcp(addr: std::net::SocketAddr, export: &str) -> Result<Self, NbdClientError> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Self::handshake(Box::new(s), export).await
    }

    async fn handshake(mut s: Box<dyn StreamDebug>, export: &str) -> Result<Self, NbdClientError> {
        if s.read_u64().await? != NBDMAGIC || s.read_u64().await? != IHAVEOPT {
            return Err(NbdClientError::Protocol("not a newstyle NBD server".into()));
        }
        let _server_flags = s.read_u16().await?;
        s.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await?;
        let name = export.as_bytes();
        s.write_u64(IHAVEOPT).await?;
        s.write_u32(OPT_GO).await?;
        s.write_u32(4 + name.len() as u32 + 2).await?;
        s.write_u32(name.len() as u32).await?;
        s.write_all(name).await?;
        s.write_u16(0).await?;
        s.flush().await?;
        let (mut size, mut flags) = (None, 0);
        loop {
            if s.read_u64().await? != OPTION_REPLY_MAGIC {
                return Err(NbdClientError::Protocol("bad option reply magic".into()));
            }
            let _opt = s.read_u32().await?;
            let rep = s.read_u32().await?;
            let len = s.read_u32().await? as usize;
            if len > 1 << 20 {
                return Err(NbdClientError::Protocol("option reply too long".into()));
            }
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).await?;
            if rep & 0x8000_0000 != 0 {
                return Err(NbdClientError::Protocol(format!(
                    "export {export:?} refused: {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            if rep == REP_INFO && data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[2..10]);
                size = Some(u64::from_be_bytes(b));
                flags = u16::from_be_bytes([data[10], data[11]]);
            }
            if rep == REP_ACK {
                break;
            }
        }
        let size = size.ok_or_else(|| NbdClientError::Protocol("server sent no export size".into()))?;
        let (reader, writer) = tokio::io::split(s);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let reader = tokio::spawn(read_replies(reader, pending.clone())).abort_handle();
        Ok(Self {
            writer: tokio::sync::Mutex::new(writer),
            reader,
            pending,
            next_cookie: AtomicU64::new(1),
            size,
            flags,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server advertised.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<Vec<u8>, NbdClientError> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read_len = if cmd == CMD_READ { len } else { 0 };
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(cookie, (read_len, tx));
        let mut header = [0u8; 28];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&flags.to_be_bytes());
        header[6..8].copy_from_slice(&cmd.to_be_bytes());
        header[8..16].copy_from_slice(&cookie.to_be_bytes());
        header[16..24].copy_from_slice(&offset.to_be_bytes());
        header[24..28].copy_from_slice(&len.to_be_bytes());
        {
            let mut w = self.writer.lock().await;
            w.write_all(&header).await?;
            if let Some(d) = data {
                w.write_all(d).await?;
            }
            w.flush().await?;
        }
        rx.await.map_err(|_| NbdClientError::Protocol("connection closed before the reply".into()))?
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, NbdClientError> {
        self.request(CMD_READ, 0, offset, len, None).await
    }

    /// Writes `data` at `offset` (FUA if asked).
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, Some(data)).await.map(|_| ())
    }

    /// Zeroes a range.
    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<(), NbdClientError> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, None).await.map(|_| ())
    }

    /// Discards a range.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), NbdClientError> {
        self.request(CMD_TRIM, 0, offset, len, None).await.map(|_| ())
    }

    /// Flush.
    pub async fn flush(&self) -> Result<(), NbdClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, None).await.map(|_| ())
    }

    /// Sends NBD_CMD_DISC.
    pub async fn disconnect(&self) -> Result<(), NbdClientError> {
        let mut header = [0u8; 28];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        let mut w = self.writer.lock().await;
        w.write_all(&header).await?;
        w.flush().await?;
        Ok(())
    }
}

async fn read_replies(mut r: ReadHalf<Box<dyn StreamDebug>>, pending: Pending) {
    let fail_all = |pending: &Pending, why: &str| {
        let mut p = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, (_, tx)) in p.drain() {
            let _ = tx.send(Err(NbdClientError::Protocol(why.to_string())));
        }
    };
    loop {
        let mut head = [0u8; 16];
        if r.read_exact(&mut head).await.is_err() {
            fail_all(&pending, "connection closed");
            return;
        }
        let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let error = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&head[8..16]);
        let cookie = u64::from_be_bytes(c);
        if magic != SIMPLE_REPLY_MAGIC {
            fail_all(&pending, "bad reply magic");
            return;
        }
        let entry = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&cookie);
        let Some((read_len, tx)) = entry else {
            fail_all(&pending, "reply for an unknown request");
            return;
        };
        if error != 0 {
            let _ = tx.send(Err(NbdClientError::Server(error)));
            continue;
        }
        let mut data = vec![0u8; read_len as usize];
        if r.read_exact(&mut data).await.is_err() {
            let _ = tx.send(Err(NbdClientError::Protocol("connection closed inside a read reply".into())));
            fail_all(&pending, "connection closed");
            return;
        }
        let _ = tx.send(Ok(data));
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // The read half lives in the reader task: ending it closes the
        // socket once the write half goes with `self`.
        self.reader.abort();
    }
}
