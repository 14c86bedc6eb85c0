//! The io_uring backend: one ring, owned by one dedicated thread.
//!
//! # Design
//!
//! * Callers (any tokio task) push an [`Op`] onto a mutex-protected queue and
//!   wake the engine thread by writing to an eventfd, then await a
//!   `tokio::sync::oneshot` for the result. Only the first submitter after a
//!   wake-up writes the eventfd (`wake_pending`), so a burst of requests costs
//!   one `write(2)`.
//! * The engine thread keeps a read of that eventfd always in flight in the
//!   ring, so it can sleep in `io_uring_enter` waiting for *either* an I/O
//!   completion or new work. Each loop: drain the whole queue into the
//!   submission queue, submit once (and wait for at least one completion),
//!   reap every completion.
//! * Ownership (as in firecracker's io_uring wrapper): from submission until
//!   its completion is reaped, an operation, its buffer and its `Arc<File>`
//!   live in a slab owned by the engine thread, keyed by the SQE's
//!   `user_data`. If the awaiting future is dropped, nothing changes for the
//!   kernel: the completion is reaped as usual, the `oneshot` send fails and
//!   the buffer is dropped then.
//! * Short reads and writes resubmit the remainder; `-EAGAIN`/`-EINTR`
//!   resubmit; a full submission queue is submitted and refilled. At most as
//!   many SQEs are in flight as the completion queue holds, so completions
//!   never overflow.
//! * When the last handle is dropped, the thread finishes what is in flight
//!   (including the eventfd read, which it completes by writing the eventfd
//!   itself) and exits.
//!
//! Kernel requirements: `IORING_OP_READ`/`WRITE`/`FALLOCATE` need Linux 5.6,
//! `IORING_OP_FSYNC` 5.1, the opcode probe 5.6. `COOP_TASKRUN` and
//! `SINGLE_ISSUER` (5.19/6.0) are used when the kernel accepts them.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::oneshot;

use super::{AlignedBuf, IoError, RwKind};

/// Submission queue size (the completion queue is twice as large).
pub(crate) const RING_ENTRIES: u32 = 256;

/// `user_data` of the eventfd read; slab keys are far below it.
const EVENTFD_KEY: u64 = u64::MAX;

/// Largest single read or write SQE (longer buffers are done in pieces, as
/// short transfers would be). A multiple of `IO_ALIGN`.
const MAX_CHUNK: usize = 1 << 30;

const THREAD_NAME: &str = "replicator-io-uring";

type RwReply = oneshot::Sender<(Result<(), IoError>, AlignedBuf)>;
type UnitReply = oneshot::Sender<Result<(), IoError>>;

/// One operation, from submission until its result is sent back.
enum Op {
    Rw {
        kind: RwKind,
        file: Arc<File>,
        buf: AlignedBuf,
        offset: u64,
        /// Bytes already transferred (short transfers are continued).
        done: usize,
        reply: RwReply,
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

/// What to do with an operation after one of its completions.
enum Step {
    Resubmit(Op),
    Finished,
}

impl Op {
    /// The SQE for the (remaining part of the) operation.
    fn sqe(&mut self, user_data: u64) -> squeue::Entry {
        let entry = match self {
            Op::Rw { kind, file, buf, offset, done, .. } => {
                let fd = types::Fd(file.as_raw_fd());
                let at = *offset + *done as u64;
                let rest = &mut buf[*done..];
                let len = rest.len().min(MAX_CHUNK) as u32;
                match kind {
                    RwKind::Read => opcode::Read::new(fd, rest.as_mut_ptr(), len).offset(at).build(),
                    RwKind::Write => opcode::Write::new(fd, rest.as_ptr(), len).offset(at).build(),
                    RwKind::WriteDurable => {
                        opcode::Write::new(fd, rest.as_ptr(), len).offset(at).rw_flags(libc::RWF_DSYNC).build()
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
            Op::Rw { kind, file, buf, offset, mut done, reply } => {
                let at = offset + done as u64;
                let result = if res < 0 {
                    Err(IoError::io(kind.name(), at, io::Error::from_raw_os_error(-res)))
                } else if res == 0 {
                    match kind {
                        RwKind::Read => Err(IoError::ShortRead { offset, wanted: buf.len(), got: done }),
                        RwKind::Write | RwKind::WriteDurable => Err(IoError::io(
                            kind.name(),
                            at,
                            io::Error::new(io::ErrorKind::WriteZero, "the kernel accepted 0 bytes"),
                        )),
                    }
                } else {
                    done += res as usize;
                    if done < buf.len() {
                        return Step::Resubmit(Op::Rw { kind, file, buf, offset, done, reply });
                    }
                    Ok(())
                };
                // The awaiting future may be gone: then the buffer is simply
                // dropped here, after the kernel is done with it.
                let _ = reply.send((result, buf));
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

    /// Answers `EngineGone` without having submitted anything.
    fn fail(self) {
        match self {
            Op::Rw { buf, reply, .. } => {
                let _ = reply.send((Err(IoError::EngineGone), buf));
            }
            Op::Fsync { reply, .. } | Op::Fallocate { reply, .. } => {
                let _ = reply.send(Err(IoError::EngineGone));
            }
        }
    }

    /// The buffer of a rejected read or write.
    fn into_buf(self) -> Option<AlignedBuf> {
        match self {
            Op::Rw { buf, .. } => Some(buf),
            Op::Fsync { .. } | Op::Fallocate { .. } => None,
        }
    }

    /// For an operation the kernel may still be using when the engine dies
    /// abnormally: never free its buffer (the kernel could still write into
    /// it); the awaiting future sees `EngineGone`.
    fn leak_buffer(self) {
        if let Op::Rw { buf, .. } = self {
            std::mem::forget(buf);
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

/// State shared by the submitters and the engine thread.
struct Shared {
    state: Mutex<State>,
    /// Written (8 bytes, value 1) to wake the engine thread.
    eventfd: File,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Op>,
    /// An eventfd write is pending that the engine thread has not seen yet.
    wake_pending: bool,
    /// Every handle is gone: finish what is in flight and exit.
    shutdown: bool,
    /// The engine thread has exited: no submission will ever be served.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        if let Err(e) = (&self.eventfd).write_all(&1u64.to_ne_bytes()) {
            // Cannot happen with a valid eventfd (the counter cannot overflow
            // at one increment per request).
            tracing::error!("cannot wake the io_uring thread through its eventfd: {e}");
        }
    }
}

/// Handle to the engine thread; dropping it shuts the thread down once the
/// operations in flight have completed.
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
    /// Creates the ring (in the engine thread, so that `SINGLE_ISSUER`
    /// holds) and starts the thread. `Err` carries a reason for the admin.
    pub(crate) fn start(entries: u32) -> Result<UringEngine, String> {
        let eventfd = create_eventfd().map_err(|e| format!("cannot create an eventfd for the io_uring thread: {e}"))?;
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), eventfd });
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || match setup_ring(entries) {
                Ok(ring) => {
                    let _ = ready_tx.send(Ok(()));
                    EngineThread::new(ring, thread_shared).run();
                }
                Err(reason) => {
                    let _ = ready_tx.send(Err(reason));
                }
            })
            .map_err(|e| format!("cannot start the {THREAD_NAME} thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(UringEngine { shared }),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err(format!("the {THREAD_NAME} thread died while setting up the ring")),
        }
    }

    fn submit(&self, op: Op) -> Result<(), Op> {
        let wake = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(op);
            }
            state.queue.push_back(op);
            !std::mem::replace(&mut state.wake_pending, true)
        };
        if wake {
            self.shared.wake();
        }
        Ok(())
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
        let op = Op::Rw { kind, file, buf, offset, done: 0, reply };
        if let Err(op) = self.submit(op) {
            let buf = op.into_buf().unwrap_or_else(|| AlignedBuf::zeroed(len));
            return (Err(IoError::EngineGone), buf);
        }
        match rx.await {
            Ok(done) => done,
            // The engine thread died with the buffer (see `leak_buffer`).
            Err(_) => (Err(IoError::EngineGone), AlignedBuf::zeroed(len)),
        }
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
        if self.submit(op).is_err() {
            return Err(IoError::EngineGone);
        }
        rx.await.unwrap_or(Err(IoError::EngineGone))
    }

    /// For tests: a probe telling whether the engine thread has exited
    /// (it holds the last other reference to the shared state).
    #[cfg(test)]
    pub(crate) fn exit_probe(&self) -> impl Fn() -> bool + Send + 'static {
        let weak = Arc::downgrade(&self.shared);
        move || weak.strong_count() == 0
    }
}

fn create_eventfd() -> io::Result<File> {
    // Blocking (no EFD_NONBLOCK) on purpose: io_uring then waits for a value
    // instead of completing the read with -EAGAIN.
    // SAFETY: eventfd(2) takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
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
fn setup_ring(entries: u32) -> Result<IoUring, String> {
    let mut ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(entries)
        // Kernels before 6.0 refuse these optimisation flags with EINVAL.
        .or_else(|_| IoUring::new(entries))
        .map_err(|e| describe_setup_error(&e))?;

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

/// The state of the engine thread.
struct EngineThread {
    ring: IoUring,
    shared: Arc<Shared>,
    ops: Slab,
    /// Slab keys whose next SQE has not been pushed yet, in order.
    backlog: VecDeque<usize>,
    /// SQEs pushed whose completion has not been reaped (eventfd read included).
    in_flight: usize,
    /// Cap on `in_flight`: the completion queue size, so it never overflows.
    max_in_flight: usize,
    /// Target of the eventfd read. Boxed: its address must not change while
    /// the read is in flight.
    eventfd_buf: Box<u64>,
    eventfd_armed: bool,
    /// The eventfd read completed since `wake_pending` was last cleared.
    eventfd_fired: bool,
    shutting_down: bool,
    /// Scratch space for reaped completions: (user_data, result).
    completions: Vec<(u64, i32)>,
}

impl EngineThread {
    fn new(ring: IoUring, shared: Arc<Shared>) -> EngineThread {
        let max_in_flight = ring.params().cq_entries() as usize;
        EngineThread {
            ring,
            shared,
            ops: Slab::default(),
            backlog: VecDeque::new(),
            in_flight: 0,
            max_in_flight,
            eventfd_buf: Box::new(0),
            eventfd_armed: false,
            eventfd_fired: false,
            shutting_down: false,
            completions: Vec::with_capacity(max_in_flight),
        }
    }

    fn run(mut self) {
        let mut failures = 0u32;
        loop {
            self.intake();
            if self.shutting_down && self.in_flight == 0 && self.ops.len == 0 {
                break;
            }
            self.push_sqes();
            if self.in_flight == 0 {
                // Nothing can complete (every push failed): do not sleep in
                // the kernel forever; retry shortly.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => failures = 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    // Kernel short of memory, or completions to reap first.
                    if self.reap() == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    continue;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::error!("io_uring_enter failed ({failures} times in a row): {e}; retrying");
                    }
                    std::thread::sleep(Duration::from_millis(u64::from(failures.min(100))));
                }
            }
            self.reap();
        }
        tracing::debug!("{THREAD_NAME} thread exiting: every handle dropped, nothing in flight");
    }

    /// Moves queued requests into the slab and the backlog; notices shutdown.
    fn intake(&mut self) {
        let mut state = self.shared.lock();
        if self.eventfd_fired {
            // Clear only after the eventfd read completed: a submitter that
            // sees `wake_pending` set relies on a wake-up still to come.
            state.wake_pending = false;
            self.eventfd_fired = false;
        }
        for op in state.queue.drain(..) {
            let key = self.ops.insert(op);
            self.backlog.push_back(key);
        }
        if state.shutdown && !self.shutting_down {
            self.shutting_down = true;
            drop(state);
            if self.eventfd_armed {
                // The pending eventfd read must complete before the thread
                // can exit and free its buffer: satisfy it ourselves.
                self.shared.wake();
            }
        }
    }

    /// Pushes the eventfd read (if not armed) and the backlog into the
    /// submission queue, submitting whenever it is full.
    fn push_sqes(&mut self) {
        let (submitter, mut sq, _) = self.ring.split();
        if !self.eventfd_armed && !self.shutting_down {
            let read = opcode::Read::new(
                types::Fd(self.shared.eventfd.as_raw_fd()),
                std::ptr::from_mut::<u64>(&mut self.eventfd_buf).cast::<u8>(),
                8,
            )
            .build()
            .user_data(EVENTFD_KEY);
            // SAFETY: the read targets the 8-byte heap allocation of
            // `eventfd_buf`, which is neither freed nor moved while
            // `eventfd_armed` is set (it is cleared only when this read's
            // completion is reaped; `Drop` leaks the box otherwise); the
            // eventfd is owned by `shared`, which this thread keeps alive.
            if unsafe { sq.push(&read) }.is_ok() {
                self.eventfd_armed = true;
                self.in_flight += 1;
            }
        }
        while self.in_flight < self.max_in_flight {
            let Some(key) = self.backlog.pop_front() else {
                break;
            };
            let Some(op) = self.ops.get_mut(key) else {
                continue;
            };
            let entry = op.sqe(key as u64);
            // SAFETY: the SQE points into the heap allocation of the
            // AlignedBuf held by slab entry `key` (a Vec reallocation of the
            // slab moves the AlignedBuf struct, not its allocation), and uses
            // the descriptor of the Arc<File> held by the same entry. The
            // entry is removed from the slab only when the completion
            // carrying `key` is reaped, so buffer and descriptor stay valid
            // for as long as the kernel may use them.
            let mut pushed = unsafe { sq.push(&entry) }.is_ok();
            if !pushed {
                // Full: hand the queue to the kernel and try once more.
                sq.sync();
                let _ = submitter.submit();
                sq.sync();
                // SAFETY: as above; same entry, same slab entry.
                pushed = unsafe { sq.push(&entry) }.is_ok();
            }
            if !pushed {
                self.backlog.push_front(key);
                break;
            }
            self.in_flight += 1;
        }
        sq.sync();
    }

    /// Reaps every available completion; returns how many.
    fn reap(&mut self) -> usize {
        let mut cq = self.ring.completion();
        cq.sync();
        self.completions.extend(cq.map(|cqe| (cqe.user_data(), cqe.result())));
        let count = self.completions.len();
        for i in 0..count {
            let (user_data, res) = self.completions[i];
            self.in_flight -= 1;
            if user_data == EVENTFD_KEY {
                self.eventfd_armed = false;
                self.eventfd_fired = true;
                if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
                    tracing::warn!(
                        "reading the io_uring wake-up eventfd failed: {}",
                        io::Error::from_raw_os_error(-res)
                    );
                }
                continue;
            }
            let key = user_data as usize;
            let Some(op) = self.ops.remove(key) else {
                tracing::error!("io_uring completion for unknown operation {user_data}; ignored");
                continue;
            };
            if let Step::Resubmit(op) = op.complete(res) {
                let key = self.ops.insert(op);
                self.backlog.push_back(key);
            }
        }
        self.completions.clear();
        count
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        let queued: Vec<Op> = {
            let mut state = self.shared.lock();
            state.closed = true;
            state.queue.drain(..).collect()
        };
        for op in queued {
            op.fail();
        }
        if self.in_flight > 0 {
            // Only on a panic of the engine thread: the kernel may still
            // write into these buffers, so they must never be freed.
            tracing::error!(
                in_flight = self.in_flight,
                "the io_uring thread stops with operations in flight; their buffers are leaked \
                 and their callers get EngineGone"
            );
            for op in self.ops.drain() {
                op.leak_buffer();
            }
            if self.eventfd_armed {
                std::mem::forget(std::mem::replace(&mut self.eventfd_buf, Box::new(0)));
            }
        }
    }
}
