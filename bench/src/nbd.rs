//! The benchmark's own NBD client: blocking, one thread, pipelined.
//!
//! One thread keeps `queue_depth` requests in flight on one connection:
//! it sends them all, then for every reply it reads, records the latency and
//! sends the next request in the freed slot (the cookie is the slot number).
//! Nothing sits between the socket and the clock but two system calls, so
//! the client costs the same few microseconds against every server, and
//! every configuration is measured through exactly the same client.
//! (Validated against `fio --ioengine=nbd`, see `fio_check` in `main.rs`.)
//!
//! Handshake: fixed newstyle, `NBD_OPT_GO`, simple replies (every server
//! compared here speaks them).

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::stats::RunOutcome;
use crate::workload::{OpGen, OpKind, Rng, Workload};

use replicator::nbd::proto::FLAG_SEND_FLUSH;
use replicator::nbd::proto::{
    CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_WRITE, IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC as OPT_REPLY_MAGIC,
    OPT_GO, REP_ACK, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// A reply must arrive within this time, or the cell fails (a hung server
/// must not hang the benchmark).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Payloads up to this size are copied behind the header (one system call).
const COPY_LIMIT: usize = 64 << 10;

/// A connected export.
#[derive(Debug)]
pub struct NbdConn {
    w: UnixStream,
    r: BufReader<UnixStream>,
    size: u64,
    flags: u16,
    out: Vec<u8>,
    scratch: Vec<u8>,
}

fn rd_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn rd_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn rd_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Encodes a request header.
pub fn request_header(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

impl NbdConn {
    /// Connects to a Unix socket and opens `export`.
    pub fn connect(socket: &Path, export: &str) -> io::Result<NbdConn> {
        let s = UnixStream::connect(socket)
            .map_err(|e| io::Error::new(e.kind(), format!("connect {}: {e}", socket.display())))?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let mut r = BufReader::with_capacity(256 << 10, s.try_clone()?);
        let mut w = s;
        if rd_u64(&mut r)? != NBDMAGIC || rd_u64(&mut r)? != IHAVEOPT {
            return Err(proto("not a fixed-newstyle NBD server"));
        }
        let _server_flags = rd_u16(&mut r)?;
        let name = export.as_bytes();
        let mut m = Vec::new();
        m.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        m.extend_from_slice(&(name.len() as u32).to_be_bytes());
        m.extend_from_slice(name);
        m.extend_from_slice(&0u16.to_be_bytes());
        w.write_all(&m)?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            if rd_u64(&mut r)? != OPT_REPLY_MAGIC {
                return Err(proto("bad option reply magic"));
            }
            let _opt = rd_u32(&mut r)?;
            let rep = rd_u32(&mut r)?;
            let len = rd_u32(&mut r)? as usize;
            if len > 1 << 20 {
                return Err(proto("option reply too long"));
            }
            let mut data = vec![0u8; len];
            r.read_exact(&mut data)?;
            if rep & 0x8000_0000 != 0 {
                return Err(proto(format!("export {export:?} refused: {}", String::from_utf8_lossy(&data))));
            }
            if rep == REP_INFO && data.len() >= 12 && data[0..2] == [0, 0] {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[2..10]);
                size = Some(u64::from_be_bytes(b));
                flags = u16::from_be_bytes([data[10], data[11]]);
            }
            if rep == REP_ACK {
                break;
            }
        }
        let size = size.ok_or_else(|| proto("the server sent no export size"))?;
        Ok(NbdConn { w, r, size, flags, out: Vec::with_capacity(COPY_LIMIT + 64), scratch: vec![0u8; 1 << 20] })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn send(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> io::Result<()> {
        let h = request_header(cmd, flags, cookie, offset, len);
        match data {
            Some(d) if d.len() > COPY_LIMIT => {
                self.w.write_all(&h)?;
                self.w.write_all(d)
            }
            _ => {
                self.out.clear();
                self.out.extend_from_slice(&h);
                if let Some(d) = data {
                    self.out.extend_from_slice(d);
                }
                self.w.write_all(&self.out)
            }
        }
    }

    /// Reads one reply header: (cookie, error).
    fn reply(&mut self) -> io::Result<(u64, u32)> {
        let magic = rd_u32(&mut self.r)?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(proto(format!("bad reply magic {magic:#x}")));
        }
        let error = rd_u32(&mut self.r)?;
        let cookie = rd_u64(&mut self.r)?;
        Ok((cookie, error))
    }

    fn read_payload(&mut self, len: usize) -> io::Result<()> {
        if self.scratch.len() < len {
            self.scratch.resize(len, 0);
        }
        self.r.read_exact(&mut self.scratch[..len])
    }

    fn wait_one(&mut self, cookie: u64, read_len: usize) -> io::Result<()> {
        let (c, err) = self.reply()?;
        if c != cookie {
            return Err(proto(format!("reply for cookie {c}, expected {cookie}")));
        }
        if err != 0 {
            return Err(io::Error::other(format!("server error {err}")));
        }
        if read_len > 0 {
            self.read_payload(read_len)?;
        }
        Ok(())
    }

    /// One write, waiting for its reply.
    pub fn write_at(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.send(CMD_WRITE, flags, 1, offset, data.len() as u32, Some(data))?;
        self.wait_one(1, 0)
    }

    /// One FLUSH, waiting for its reply.
    pub fn flush(&mut self) -> io::Result<()> {
        self.send(CMD_FLUSH, 0, 2, 0, 0, None)?;
        self.wait_one(2, 0)
    }

    /// Runs `workload` for `warmup` (not counted) then `duration`, bounded
    /// also by the workload's operation cap. Latency and throughput count
    /// the operations that complete inside the measured window.
    pub fn run(
        &mut self,
        workload: Workload,
        warmup: Duration,
        duration: Duration,
        seed: u64,
    ) -> io::Result<RunOutcome> {
        #[derive(Clone, Copy)]
        struct Slot {
            kind: OpKind,
            len: u64,
            start: Instant,
            flushing: bool,
            busy: bool,
        }
        if workload == Workload::Wal && self.flags & FLAG_SEND_FLUSH == 0 {
            return Err(proto("the export does not advertise FLUSH (NBD_FLAG_SEND_FLUSH)"));
        }
        let qd = workload.queue_depth();
        let mut gen = OpGen::new(workload, self.size, seed);
        let mut data = vec![0u8; 2 << 20];
        Rng::new(seed ^ 0x5eed).fill(&mut data);
        let now = Instant::now();
        let begin = now + warmup;
        let end = begin + duration;
        let max_ops = workload.max_ops();
        let mut slots = vec![Slot { kind: OpKind::Write, len: 0, start: now, flushing: false, busy: false }; qd];
        let mut out = RunOutcome { lat_ns: Vec::with_capacity(200_000), ..RunOutcome::default() };
        let mut issued = 0u64;
        let mut busy = 0usize;
        let mut last_done = begin;

        let issue = |conn: &mut NbdConn, slot: &mut Slot, cookie: u64, gen: &mut OpGen| -> io::Result<()> {
            let op = gen.next_op();
            *slot = Slot { kind: op.kind, len: op.len, start: Instant::now(), flushing: false, busy: true };
            match op.kind {
                OpKind::Read => conn.send(CMD_READ, 0, cookie, op.offset, op.len as u32, None),
                OpKind::Write | OpKind::WriteFlush => {
                    // A different slice of random data each time.
                    let at = (op.offset / 4096 * 4096) as usize % (data.len() - op.len as usize);
                    let at = at / 4096 * 4096;
                    conn.send(CMD_WRITE, 0, cookie, op.offset, op.len as u32, Some(&data[at..at + op.len as usize]))
                }
            }
        };

        for (i, slot) in slots.iter_mut().enumerate() {
            issue(self, slot, i as u64, &mut gen)?;
            issued += 1;
            busy += 1;
        }
        while busy > 0 {
            let (cookie, err) = self.reply()?;
            let i = usize::try_from(cookie)
                .ok()
                .filter(|&i| i < qd && slots[i].busy)
                .ok_or_else(|| proto(format!("reply for unknown cookie {cookie}")))?;
            let slot = slots[i];
            if err == 0 && slot.kind == OpKind::Read && !slot.flushing {
                self.read_payload(slot.len as usize)?;
            }
            if err == 0 && slot.kind == OpKind::WriteFlush && !slot.flushing {
                slots[i].flushing = true;
                self.send(CMD_FLUSH, 0, cookie, 0, 0, None)?;
                continue;
            }
            let done = Instant::now();
            if err != 0 {
                out.errors += 1;
            } else {
                out.all_ops += 1;
            }
            if err == 0 && done >= begin && done <= end {
                out.ops += 1;
                out.bytes += slot.len;
                out.lat_ns.push(done.duration_since(slot.start).as_nanos() as u64);
                last_done = done;
            }
            if done < end && out.ops + (busy as u64) < max_ops && issued < max_ops * 4 {
                issue(self, &mut slots[i], cookie, &mut gen)?;
                issued += 1;
            } else {
                slots[i].busy = false;
                busy -= 1;
            }
        }
        let finish = if out.ops >= max_ops { last_done } else { end.min(Instant::now()) };
        out.secs = finish.saturating_duration_since(begin).as_secs_f64();
        if out.errors > 0 && out.ops == 0 {
            return Err(io::Error::other(format!("all {} requests failed", out.errors)));
        }
        Ok(out)
    }

    /// Polite disconnect.
    pub fn disconnect(mut self) {
        let h = request_header(CMD_DISC, 0, 0, 0, 0);
        let _ = self.w.write_all(&h);
    }
}
