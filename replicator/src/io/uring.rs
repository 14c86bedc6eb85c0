//! The io_uring backend: one ring, submitted to from the caller's thread,
//! its completions reaped where tokio polls its sockets.
//!
//! # Design
//!
//! * **Submission, inline.** The caller (a tokio task) takes the ring's
//!   lock, files the operation in the slab, pushes its SQE and enters the
//!   kernel once to submit it (`io_uring_enter` without waiting). No other
//!   thread is woken to do it.
//! * **Submission, batched at depth.** While at least [`BATCH_DEPTH`] reads
//!   and writes are in flight, a new operation only joins the backlog: the
//!   reaper submits the whole backlog in one `io_uring_enter` after the
//!   next completion, which one of those reads and writes brings soon. The
//!   device stays busy meanwhile, and the block layer then sends the batch
//!   with one notification (on a virtual machine, one exit instead of one
//!   per operation: `iowrite16` was 13 % of the primary's CPU at QD32).
//!   Operations depend on each other only through completions their
//!   callers await, so nothing is reordered that was ordered before.
//! * **Completion, in the reactor.** An eventfd registered with the ring
//!   (`IORING_REGISTER_EVENTFD`) is signalled for every completion. The
//!   reaper, a tokio task watching that eventfd through the reactor
//!   (`AsyncFd`, like a socket), reaps every completion under the lock and
//!   sends each result through the operation's `oneshot`; the awaiting task
//!   is usually woken on the same worker. An engine created outside a tokio
//!   runtime, or whose runtime shut down, reaps on a thread of its own
//!   instead, blocked in poll(2) on the same eventfd.
//! * **Ownership** (as in firecracker's io_uring wrapper): from submission
//!   until its completion is reaped, an operation, its buffer (an owned
//!   `AlignedBuf`, or a reference to shared `Bytes` a write only reads) and
//!   its `Arc<File>` live in a slab owned by the engine, keyed by the SQE's
//!   `user_data`. If the awaiting future is dropped, nothing changes for the
//!   kernel: the completion is reaped as usual, the `oneshot` send fails and
//!   the buffer is dropped then.
//! * Short reads and writes resubmit the remainder; `-EAGAIN`/`-EINTR`
//!   resubmit. At most as many SQEs are in flight as the completion queue
//!   holds, so completions never overflow: further operations wait in a
//!   backlog, submitted as completions make room.
//! * When the last handle is dropped, the reaper finishes what is in flight
//!   and exits; the ring closes with it.
//!
//! Kernel requirements: `IORING_OP_READ`/`WRITE`/`FALLOCATE` need Linux 5.6,
//! `IORING_OP_FSYNC` 5.1, the opcode probe 5.6, a registered eventfd 5.1.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;

use super::{AlignedBuf, IoError, RwKind};

/// Submission queue size (the completion queue is twice as large).
pub(crate) const RING_ENTRIES: u32 = 256;

/// Reads and writes in flight from which a new operation waits for the
/// next completion to be submitted with others (see the module doc).
const BATCH_DEPTH: usize = 4;

/// Largest single read or write SQE (longer buffers are done in pieces, as
/// short transfers would be). A multiple of `IO_ALIGN`.
const MAX_CHUNK: usize = 1 << 30;

/// Name of the reaper thread (no tokio runtime to reap in).
const THREAD_NAME: &str = "replicator-io-uring";

/// When the kernel refused a submission, the reaper tries again this often.
const RETRY_SUBMIT: Duration = Duration::from_millis(1);

type RwReply = oneshot::Sender<(Result<(), IoError>, AlignedBuf)>;
type UnitReply = oneshot::Sender<Result<(), IoError>>;

/// One operation, from submission until its result is sent back.
enum Op {
    Rw {
        file: Arc<File>,
        mem: RwMemory,
        offset: u64,
        /// Bytes already transferred (short transfers are continued).
        done: usize,
    },
    Fsync {
        file: Arc<File>,
        reply: UnitReply,
    },
    Fallocate {
        file: Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
        reply: UnitReply,
    },
}

/// The memory a read or write transfers, and where its result goes.
enum RwMemory {
    /// An owned buffer, handed back with the result (reads, and writes
    /// whose caller reuses the buffer).
    Owned { kind: RwKind, buf: AlignedBuf, reply: RwReply },
    /// Shared bytes written as they are (the kernel only reads them).
    Shared { durable: bool, data: Bytes, reply: UnitReply },
}

impl RwMemory {
    fn kind(&self) -> RwKind {
        match self {
            RwMemory::Owned { kind, .. } => *kind,
            RwMemory::Shared { durable: false, .. } => RwKind::Write,
            RwMemory::Shared { durable: true, .. } => RwKind::WriteDurable,
        }
    }

    fn len(&self) -> usize {
        match self {
            RwMemory::Owned { buf, .. } => buf.len(),
            RwMemory::Shared { data, .. } => data.len(),
        }
    }

    fn send(self, result: Result<(), IoError>) {
        // The awaiting future may be gone: then the memory is simply dropped
        // here, after the kernel is done with it.
        match self {
            RwMemory::Owned { buf, reply, .. } => {
                let _ = reply.send((result, buf));
            }
            RwMemory::Shared { reply, .. } => {
                let _ = reply.send(result);
            }
        }
    }
}

/// What to do with an operation after one of its completions.
enum Step {
    Resubmit(Op),
    Finished,
}

impl Op {
    /// The SQE for the (remaining part of the) operation.
    fn sqe(&mut self, user_data: u64) -> squeue::Entry {
        let entry = match self {
            Op::Rw { file, mem, offset, done } => {
                let fd = types::Fd(file.as_raw_fd());
                let at = *offset + *done as u64;
                let write = |rest: &[u8], flags| {
                    let len = rest.len().min(MAX_CHUNK) as u32;
                    opcode::Write::new(fd, rest.as_ptr(), len).offset(at).rw_flags(flags).build()
                };
                match mem {
                    RwMemory::Owned { kind: RwKind::Read, buf, .. } => {
                        let rest = &mut buf[*done..];
                        let len = rest.len().min(MAX_CHUNK) as u32;
                        opcode::Read::new(fd, rest.as_mut_ptr(), len).offset(at).build()
                    }
                    RwMemory::Owned { kind: RwKind::Write, buf, .. } => write(&buf[*done..], 0),
                    RwMemory::Owned { kind: RwKind::WriteDurable, buf, .. } => write(&buf[*done..], libc::RWF_DSYNC),
                    RwMemory::Shared { durable, data, .. } => {
                        write(&data[*done..], if *durable { libc::RWF_DSYNC } else { 0 })
                    }
                }
            }
            Op::Fsync { file, .. } => {
                opcode::Fsync::new(types::Fd(file.as_raw_fd())).flags(types::FsyncFlags::DATASYNC).build()
            }
            Op::Fallocate { file, mode, offset, len, .. } => {
                opcode::Fallocate::new(types::Fd(file.as_raw_fd()), *len).offset(*offset).mode(*mode).build()
            }
        };
        entry.user_data(user_data)
    }

    /// Accounts for one completion with result `res`; sends the result when
    /// the operation is finished.
    fn complete(self, res: i32) -> Step {
        if res == -libc::EAGAIN || res == -libc::EINTR {
            return Step::Resubmit(self);
        }
        match self {
            Op::Rw { file, mem, offset, mut done } => {
                let kind = mem.kind();
                let at = offset + done as u64;
                let result = if res < 0 {
                    Err(IoError::io(kind.name(), at, io::Error::from_raw_os_error(-res)))
                } else if res == 0 {
                    match kind {
                        RwKind::Read => Err(IoError::ShortRead { offset, wanted: mem.len(), got: done }),
                        RwKind::Write | RwKind::WriteDurable => Err(IoError::io(
                            kind.name(),
                            at,
                            io::Error::new(io::ErrorKind::WriteZero, "the kernel accepted 0 bytes"),
                        )),
                    }
                } else {
                    done += res as usize;
                    if done < mem.len() {
                        return Step::Resubmit(Op::Rw { file, mem, offset, done });
                    }
                    Ok(())
                };
                mem.send(result);
            }
            Op::Fsync { reply, .. } => {
                let result =
                    if res < 0 { Err(IoError::io("fdatasync", 0, io::Error::from_raw_os_error(-res))) } else { Ok(()) };
                let _ = reply.send(result);
            }
            Op::Fallocate { offset, reply, .. } => {
                let result = if res < 0 {
                    Err(IoError::io("fallocate", offset, io::Error::from_raw_os_error(-res)))
                } else {
                    Ok(())
                };
                let _ = reply.send(result);
            }
        }
        Step::Finished
    }

    /// For an operation the kernel may still be using when the engine is
    /// dropped with it in flight: never free its buffer (the kernel could
    /// still write into it); the awaiting future sees `EngineGone`.
    fn leak_buffer(self) {
        if let Op::Rw { mem, .. } = self {
            std::mem::forget(mem);
        }
    }
}

/// Operations owned by the engine, keyed by SQE `user_data`.
#[derive(Default)]
struct Slab {
    entries: Vec<Option<Op>>,
    free: Vec<usize>,
    len: usize,
}

impl Slab {
    fn insert(&mut self, op: Op) -> usize {
        self.len += 1;
        match self.free.pop() {
            Some(key) => {
                self.entries[key] = Some(op);
                key
            }
            None => {
                self.entries.push(Some(op));
                self.entries.len() - 1
            }
        }
    }

    fn remove(&mut self, key: usize) -> Option<Op> {
        let op = self.entries.get_mut(key)?.take()?;
        self.free.push(key);
        self.len -= 1;
        Some(op)
    }

    fn get_mut(&mut self, key: usize) -> Option<&mut Op> {
        self.entries.get_mut(key)?.as_mut()
    }

    fn drain(&mut self) -> impl Iterator<Item = Op> + '_ {
        self.free.clear();
        self.len = 0;
        self.entries.drain(..).flatten()
    }
}

/// The ring and the operations it owns, behind one lock.
struct Ring {
    ring: IoUring,
    ops: Slab,
    /// Slab keys whose next SQE has not been pushed yet, in order.
    backlog: VecDeque<usize>,
    /// SQEs pushed whose completion has not been reaped.
    in_flight: usize,
    /// Of those, reads and writes (short; each completion submits the
    /// backlog).
    rw_in_flight: usize,
    /// Cap on `in_flight`: the completion queue size, so it never overflows.
    max_in_flight: usize,
    /// Every handle is gone: finish what is in flight, then stop.
    shutdown: bool,
    /// Scratch space for reaped completions: (user_data, result).
    completions: Vec<(u64, i32)>,
    /// `io_uring_enter` failures in a row (logged sparingly).
    failures: u32,
}

/// What the submitters and the reaper share.
struct Shared {
    ring: Mutex<Ring>,
    /// Registered with the ring: readable once a completion was posted.
    /// Non-blocking.
    eventfd: File,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the reaper (shutdown).
    fn wake(&self) {
        if let Err(e) = (&self.eventfd).write_all(&1u64.to_ne_bytes()) {
            // Cannot happen with a valid eventfd (the counter cannot overflow
            // at one increment per shutdown).
            tracing::error!("cannot wake the io_uring reaper through its eventfd: {e}");
        }
    }

    /// Resets the eventfd's counter (non-blocking; nothing to read is fine).
    fn clear_eventfd(&self) {
        let mut counter = [0u8; 8];
        let _ = (&self.eventfd).read(&mut counter);
    }

    /// Reaps every completion, then submits what waits; returns whether the
    /// reaper is done (every handle gone and nothing in flight) and whether
    /// SQEs are left unsubmitted (the kernel refused them for now).
    fn reap_and_submit(&self) -> Reaped {
        let mut ring = self.lock();
        ring.reap();
        ring.push_and_submit();
        Reaped { finished: ring.shutdown && ring.in_flight == 0 && ring.ops.len == 0, unsubmitted: ring.unsubmitted() }
    }
}

/// See [`Shared::reap_and_submit`].
struct Reaped {
    finished: bool,
    unsubmitted: bool,
}

impl Ring {
    /// Pushes the backlog into the submission queue, as far as the cap
    /// allows, and submits it to the kernel.
    fn push_and_submit(&mut self) {
        let mut sq = self.ring.submission();
        while self.in_flight < self.max_in_flight {
            let Some(&key) = self.backlog.front() else {
                break;
            };
            let Some(op) = self.ops.get_mut(key) else {
                self.backlog.pop_front();
                continue;
            };
            let entry = op.sqe(key as u64);
            // SAFETY: the SQE points into the heap allocation of the
            // AlignedBuf, or the storage of the Bytes, held by slab entry
            // `key` (a Vec reallocation of the slab moves the AlignedBuf or
            // Bytes struct, not the memory it points to; a Bytes' storage
            // stays put while any reference to it lives), and uses
            // the descriptor of the Arc<File> held by the same entry. The
            // entry is removed from the slab only when the completion
            // carrying `key` is reaped, and the slab outlives the ring (see
            // `Drop for Ring`), so buffer and descriptor stay valid for as
            // long as the kernel may use them.
            if unsafe { sq.push(&entry) }.is_err() {
                // The queue is full of SQEs the kernel has not taken yet
                // (it refused them below): the reaper submits them later.
                break;
            }
            self.backlog.pop_front();
            self.in_flight += 1;
            self.rw_in_flight += usize::from(matches!(op, Op::Rw { .. }));
        }
        sq.sync();
        let pending = !sq.is_empty();
        drop(sq);
        if pending {
            self.submit();
        }
    }

    /// SQEs pushed that the kernel has not taken yet.
    fn unsubmitted(&mut self) -> bool {
        let mut sq = self.ring.submission();
        sq.sync();
        !sq.is_empty()
    }

    /// Hands the submission queue to the kernel (without waiting). What it
    /// refuses stays queued: the reaper tries again (woken for it when a
    /// request's own submission failed).
    fn submit(&mut self) {
        match self.ring.submit() {
            Ok(_) => self.failures = 0,
            // Busy (completions to reap first) or short of memory: the
            // reaper submits again after its next reap.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)) => {}
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                if self.failures == 1 || self.failures.is_power_of_two() {
                    tracing::error!(failures = self.failures, "io_uring_enter failed: {e}; retrying");
                }
            }
        }
    }

    /// Reaps every available completion; resubmits what is not finished.
    fn reap(&mut self) {
        let mut cq = self.ring.completion();
        cq.sync();
        self.completions.extend(cq.map(|cqe| (cqe.user_data(), cqe.result())));
        let completions = std::mem::take(&mut self.completions);
        for &(user_data, res) in &completions {
            self.in_flight -= 1;
            let key = user_data as usize;
            let Some(op) = self.ops.remove(key) else {
                tracing::error!("io_uring completion for unknown operation {user_data}; ignored");
                continue;
            };
            if matches!(op, Op::Rw { .. }) {
                self.rw_in_flight -= 1;
            }
            if let Step::Resubmit(op) = op.complete(res) {
                let key = self.ops.insert(op);
                self.backlog.push_back(key);
            }
        }
        self.completions = completions;
        self.completions.clear();
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // Only if the reaper died: the kernel may still write into
            // these buffers, so they must never be freed.
            tracing::error!(
                in_flight = self.in_flight,
                "the io_uring engine stops with operations in flight; their buffers are leaked \
                 and their callers get EngineGone"
            );
            for op in self.ops.drain() {
                op.leak_buffer();
            }
        }
    }
}

/// Handle to the engine; dropping the last one lets the reaper finish
/// what is in flight and close the ring.
pub(crate) struct UringEngine {
    shared: Arc<Shared>,
}

impl fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringEngine").finish_non_exhaustive()
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake();
    }
}

impl UringEngine {
    /// Creates the ring and starts its reaper: a task of the current tokio
    /// runtime, or a thread when there is none. `Err` carries a reason for
    /// the admin.
    pub(crate) fn start(entries: u32) -> Result<UringEngine, String> {
        let eventfd = create_eventfd().map_err(|e| format!("cannot create an eventfd for io_uring: {e}"))?;
        let ring = setup_ring(entries, &eventfd)?;
        let max_in_flight = ring.params().cq_entries() as usize;
        let ring = Ring {
            ring,
            ops: Slab::default(),
            backlog: VecDeque::new(),
            in_flight: 0,
            rw_in_flight: 0,
            max_in_flight,
            shutdown: false,
            completions: Vec::with_capacity(max_in_flight),
            failures: 0,
        };
        let shared = Arc::new(Shared { ring: Mutex::new(ring), eventfd });
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(reap_in_reactor(ReactorReaper(Some(Arc::clone(&shared)))));
            }
            Err(_) => reap_on_thread(Arc::clone(&shared))?,
        }
        Ok(UringEngine { shared })
    }

    fn submit(&self, op: Op) {
        let mut ring = self.shared.lock();
        let key = ring.ops.insert(op);
        ring.backlog.push_back(key);
        // (`in_flight` bounds it too: should the count of reads and writes
        // ever be off, an empty ring still submits at once.)
        if ring.rw_in_flight.min(ring.in_flight) < BATCH_DEPTH {
            ring.push_and_submit();
            if ring.unsubmitted() {
                // The kernel did not take it (short of memory, say): the
                // reaper, which may be idle with nothing in flight to
                // complete, tries again.
                drop(ring);
                self.shared.wake();
            }
        }
    }
    /// Reads or writes all of `buf` at `offset`.
    pub(crate) async fn rw(
        &self,
        kind: RwKind,
        file: Arc<File>,
        buf: AlignedBuf,
        offset: u64,
    ) -> (Result<(), IoError>, AlignedBuf) {
        let len = buf.len();
        let (reply, rx) = oneshot::channel();
        self.submit(Op::Rw { file, mem: RwMemory::Owned { kind, buf, reply }, offset, done: 0 });
        match rx.await {
            Ok(done) => done,
            // The engine was dropped with the buffer (see `leak_buffer`).
            Err(_) => (Err(IoError::EngineGone), AlignedBuf::zeroed(len)),
        }
    }

    /// Writes all of `data` at `offset`, with `RWF_DSYNC` when `durable`.
    /// The engine holds a reference to `data` until the kernel is done.
    pub(crate) async fn write_shared(
        &self,
        durable: bool,
        file: Arc<File>,
        data: Bytes,
        offset: u64,
    ) -> Result<(), IoError> {
        let (reply, rx) = oneshot::channel();
        self.unit_op(Op::Rw { file, mem: RwMemory::Shared { durable, data, reply }, offset, done: 0 }, rx).await
    }

    /// `fdatasync` (`IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`).
    pub(crate) async fn fsync(&self, file: Arc<File>) -> Result<(), IoError> {
        let (reply, rx) = oneshot::channel();
        self.unit_op(Op::Fsync { file, reply }, rx).await
    }

    /// `fallocate(mode, offset, len)` (`IORING_OP_FALLOCATE`).
    pub(crate) async fn fallocate(&self, file: Arc<File>, mode: i32, offset: u64, len: u64) -> Result<(), IoError> {
        let (reply, rx) = oneshot::channel();
        let op = Op::Fallocate { file, mode, offset, len, reply };
        self.unit_op(op, rx).await
    }

    async fn unit_op(&self, op: Op, rx: oneshot::Receiver<Result<(), IoError>>) -> Result<(), IoError> {
        self.submit(op);
        rx.await.unwrap_or(Err(IoError::EngineGone))
    }

    /// For tests: a probe telling whether the reaper has exited (it holds
    /// the last other reference to the shared state).
    #[cfg(test)]
    pub(crate) fn exit_probe(&self) -> impl Fn() -> bool + Send + 'static {
        let weak = Arc::downgrade(&self.shared);
        move || weak.strong_count() == 0
    }
}

/// The reaper in the tokio reactor. Should its runtime shut down while the
/// engine still has work, a thread takes over (see `Drop`).
struct ReactorReaper(Option<Arc<Shared>>);

impl Drop for ReactorReaper {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            if let Err(e) = reap_on_thread(shared) {
                tracing::error!("the io_uring reaper cannot move to a thread: {e}");
            }
        }
    }
}

/// The eventfd, kept open by the shared state it belongs to.
struct EventFd(Arc<Shared>);

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.eventfd.as_raw_fd()
    }
}

async fn reap_in_reactor(mut reaper: ReactorReaper) {
    let Some(shared) = reaper.0.clone() else { return };
    // SAFETY: the descriptor is the eventfd owned by `Shared`, which the
    // `EventFd` keeps alive; it is never closed or replaced while `Shared`
    // lives, so it stays open and the same for the `AsyncFd`'s lifetime.
    let fd = match unsafe { AsyncFd::register_with_interest(EventFd(shared), Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            // Dropping `reaper` hands the work to a thread.
            tracing::warn!("cannot watch the io_uring eventfd in the tokio reactor ({e}); reaping on a thread");
            return;
        }
    };
    let shared = &fd.get_ref().0;
    loop {
        let reaped = shared.reap_and_submit();
        if reaped.finished {
            tracing::debug!("io_uring reaper exiting: every handle dropped, nothing in flight");
            reaper.0 = None;
            return;
        }
        let guard = if reaped.unsubmitted {
            match tokio::time::timeout(RETRY_SUBMIT, fd.readable()).await {
                Ok(ready) => ready,
                Err(_) => continue,
            }
        } else {
            fd.readable().await
        };
        let mut guard = match guard {
            Ok(guard) => guard,
            Err(e) => {
                tracing::warn!("watching the io_uring eventfd failed ({e}); reaping on a thread");
                return;
            }
        };
        // Reset the counter before the next reap: a completion posted after
        // it signals the eventfd again, so none is missed.
        shared.clear_eventfd();
        guard.clear_ready();
    }
}

/// The reaper on a thread of its own: blocks in poll(2) on the eventfd.
fn reap_on_thread(shared: Arc<Shared>) -> Result<(), String> {
    std::thread::Builder::new()
        .name(THREAD_NAME.to_owned())
        .spawn(move || loop {
            let reaped = shared.reap_and_submit();
            if reaped.finished {
                tracing::debug!("{THREAD_NAME} thread exiting: every handle dropped, nothing in flight");
                return;
            }
            let timeout = if reaped.unsubmitted {
                PollTimeout::try_from(RETRY_SUBMIT).unwrap_or(PollTimeout::ZERO)
            } else {
                PollTimeout::NONE
            };
            let mut fds = [PollFd::new(shared.eventfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => shared.clear_eventfd(),
                Err(e) => {
                    tracing::error!("poll on the io_uring eventfd failed: {e}; retrying");
                    std::thread::sleep(RETRY_SUBMIT);
                }
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start the {THREAD_NAME} thread: {e}"))
}

fn create_eventfd() -> io::Result<File> {
    // SAFETY: eventfd(2) takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd(2), is valid and owned by
    // nobody else; the File takes sole ownership and closes it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn describe_setup_error(e: &io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::ENOSYS) => {
            " (the kernel lacks io_uring, or a seccomp filter blocks it, as Docker's default profile does)"
        }
        Some(libc::EPERM) => " (io_uring is disabled: sysctl kernel.io_uring_disabled, or a security policy)",
        Some(libc::ENOMEM) => " (locked-memory limit too low for the ring: raise RLIMIT_MEMLOCK / LimitMEMLOCK=)",
        _ => "",
    };
    format!("cannot create an io_uring instance: {e}{hint}")
}

/// Creates the ring and checks that it works and supports what we use.
fn setup_ring(entries: u32, eventfd: &File) -> Result<IoUring, String> {
    // Submitted to from any thread: no SINGLE_ISSUER; completions must post
    // (and signal the eventfd) without waiting for the next submission: no
    // COOP_TASKRUN.
    let mut ring = IoUring::new(entries).map_err(|e| describe_setup_error(&e))?;
    ring.submitter()
        .register_eventfd(eventfd.as_raw_fd())
        .map_err(|e| format!("cannot register an eventfd with io_uring ({e}); Linux 5.1 or later is needed"))?;

    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("cannot probe io_uring opcodes ({e}); io_uring needs Linux 5.6 or later here"))?;
    let needed = [
        (opcode::Read::CODE, "IORING_OP_READ"),
        (opcode::Write::CODE, "IORING_OP_WRITE"),
        (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
        (opcode::Fallocate::CODE, "IORING_OP_FALLOCATE"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(format!("the kernel's io_uring lacks {name} (Linux 5.6 or later is needed)"));
        }
    }

    // A no-op round trip: io_uring_setup may be allowed while io_uring_enter
    // is not (seccomp), which would otherwise only show as hung I/O.
    let nop = opcode::Nop::new().build().user_data(0);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| "the new io_uring has no free SQE".to_owned())?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("io_uring_enter fails: {e}")),
        }
    }
    let nop_result = ring.completion().next().map(|cqe| cqe.result());
    match nop_result {
        Some(res) if res >= 0 => Ok(ring),
        Some(res) => Err(format!("io_uring NOP failed: {}", io::Error::from_raw_os_error(-res))),
        None => Err("io_uring NOP did not complete".to_owned()),
    }
}
