//! A userspace WAN emulator (this kernel has no netem): a UDP proxy between
//! the two replicator daemons (QUIC), and a TCP proxy in front of the QEMU
//! mirror's NBD target, both delaying traffic by half the round-trip time in
//! each direction, with optional jitter, bandwidth (a serialising link with
//! a drop-tail queue) and random loss.
//!
//! Each direction is two threads: a receiver that stamps every datagram (or
//! TCP chunk) with its departure time ([`LinkScheduler`]) and queues it, and
//! a sender that sleeps until that time and forwards it. Departures are
//! FIFO: jitter delays packets but never reorders them (like netem with a
//! rate limit). The threads ask for a 1 ns timer slack, so a 500 µs delay
//! is 500 µs plus the wake-up latency of the kernel, which
//! [`calibrate_udp`] measures and the results report.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::workload::Rng;

/// Conditions of an emulated link (applied in each direction).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkSpec {
    /// Round-trip time; each direction is delayed by half of it.
    pub rtt: Duration,
    /// Each packet's one-way delay varies uniformly by ± this.
    pub jitter: Duration,
    /// Bytes per second in each direction; None = unlimited.
    pub bandwidth: Option<u64>,
    /// Probability of dropping a datagram (UDP only).
    pub loss: f64,
}

impl LinkSpec {
    /// A link with only a round-trip time.
    pub fn rtt(rtt: Duration) -> LinkSpec {
        LinkSpec { rtt, jitter: Duration::ZERO, bandwidth: None, loss: 0.0 }
    }

    /// True when the link changes nothing (then no proxy is used at all).
    pub fn is_direct(&self) -> bool {
        self.rtt.is_zero() && self.jitter.is_zero() && self.bandwidth.is_none() && self.loss == 0.0
    }

    /// Drop-tail queue limit of the bottleneck: 20 ms worth of bytes, at
    /// least 256 KiB.
    pub fn queue_limit(&self) -> u64 {
        self.bandwidth.map(|b| (b / 50).max(256 << 10)).unwrap_or(u64::MAX)
    }

    /// Human description, e.g. `rtt 5ms, 200 Mbit/s`.
    pub fn describe(&self) -> String {
        let mut s = format!("RTT {}", fmt_ms(self.rtt));
        if !self.jitter.is_zero() {
            s += &format!(" ±{}", fmt_ms(self.jitter));
        }
        if let Some(b) = self.bandwidth {
            s += &format!(", {:.0} Mbit/s", b as f64 * 8.0 / 1e6);
        }
        if self.loss > 0.0 {
            s += &format!(", {:.2}% loss", self.loss * 100.0);
        }
        s
    }
}

/// `5ms`, `0.5ms`, `0ms`.
pub fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if (ms - ms.round()).abs() < 1e-9 {
        format!("{ms:.0}ms")
    } else {
        format!("{ms}ms")
    }
}

/// Departure-time computation of one direction of a link (pure; the proxy
/// threads feed it the arrival time of each packet).
#[derive(Debug)]
pub struct LinkScheduler {
    one_way: Duration,
    jitter: Duration,
    bandwidth: Option<u64>,
    loss: f64,
    queue_limit: u64,
    drop_when_full: bool,
    rng: Rng,
    /// When the serialising link finishes sending what is queued.
    link_free_at: Option<Instant>,
    last_departure: Option<Instant>,
}

impl LinkScheduler {
    /// One direction of `spec`; `drop_when_full` for datagrams (a TCP proxy
    /// applies back-pressure instead, and never loses bytes).
    pub fn new(spec: &LinkSpec, drop_when_full: bool, seed: u64) -> LinkScheduler {
        LinkScheduler {
            one_way: spec.rtt / 2,
            jitter: spec.jitter,
            bandwidth: spec.bandwidth,
            loss: if drop_when_full { spec.loss } else { 0.0 },
            queue_limit: spec.queue_limit(),
            drop_when_full,
            rng: Rng::new(seed),
            link_free_at: None,
            last_departure: None,
        }
    }

    /// Bytes waiting for the serialising link at `now`.
    pub fn backlog(&self, now: Instant) -> u64 {
        match (self.bandwidth, self.link_free_at) {
            (Some(bw), Some(free)) if free > now => (free.duration_since(now).as_secs_f64() * bw as f64) as u64,
            _ => 0,
        }
    }

    /// When a packet of `len` bytes arriving at `now` leaves the far end;
    /// None if it is lost (random loss, or the queue is full).
    pub fn schedule(&mut self, now: Instant, len: usize) -> Option<Instant> {
        if self.loss > 0.0 && self.rng.unit() < self.loss {
            return None;
        }
        let mut ready = now;
        if let Some(bw) = self.bandwidth {
            if self.drop_when_full && self.backlog(now) + len as u64 > self.queue_limit {
                return None;
            }
            let start = self.link_free_at.map_or(now, |f| f.max(now));
            let done = start + Duration::from_secs_f64(len as f64 / bw as f64);
            self.link_free_at = Some(done);
            ready = done;
        }
        let mut delay = self.one_way;
        if !self.jitter.is_zero() {
            let j = self.jitter.as_secs_f64();
            let d = self.one_way.as_secs_f64() + (self.rng.unit() * 2.0 - 1.0) * j;
            delay = Duration::from_secs_f64(d.max(0.0));
        }
        let mut departure = ready + delay;
        if let Some(last) = self.last_departure {
            departure = departure.max(last);
        }
        self.last_departure = Some(departure);
        Some(departure)
    }
}

/// Asks the kernel for precise sleeps on this thread.
fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and affects only the
    // calling thread; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Packets with their departure times, and the bytes they hold.
type Queued = (VecDeque<(Instant, Vec<u8>)>, u64);

/// A queue of packets with departure times, between a receiver and a sender.
#[derive(Debug, Default)]
struct DelayQueue {
    q: Mutex<Queued>,
    cv: Condvar,
}

impl DelayQueue {
    /// Queues `data` to leave at `at` (no earlier than every packet queued
    /// before it). Wakes the sender only when the queue was empty: otherwise
    /// it is already asleep until an earlier departure, and waking it would
    /// only put it back to sleep, a wake-up per packet for nothing on the
    /// CPUs the daemons run on.
    fn push(&self, at: Instant, data: Vec<u8>) {
        let mut g = self.q.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let was_empty = g.0.is_empty();
        g.1 += data.len() as u64;
        g.0.push_back((at, data));
        drop(g);
        if was_empty {
            self.cv.notify_one();
        }
    }

    /// Blocks while more than `limit` bytes are queued (TCP back-pressure).
    fn wait_below(&self, limit: u64, stop: &AtomicBool) {
        let mut g = self.q.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while g.1 > limit && !stop.load(Ordering::Relaxed) {
            g = self.cv.wait_timeout(g, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The next packet once its time has come; None when stopping.
    fn pop_due(&self, stop: &AtomicBool) -> Option<Vec<u8>> {
        let mut g = self.q.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let now = Instant::now();
            let wait = match g.0.front() {
                Some((at, _)) if *at <= now => {
                    let (_, d) = g.0.pop_front()?;
                    g.1 -= d.len() as u64;
                    drop(g);
                    self.cv.notify_all();
                    return Some(d);
                }
                Some((at, _)) => at.duration_since(now),
                None => Duration::from_millis(50),
            };
            g = self.cv.wait_timeout(g, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// Counters of one proxy.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    /// Packets (or chunks) forwarded.
    pub forwarded: AtomicU64,
    /// Datagrams dropped (loss or full queue).
    pub dropped: AtomicU64,
}

/// A running UDP proxy: the primary sends to [`UdpProxy::addr`], the proxy
/// forwards to the secondary and relays the answers back.
#[derive(Debug)]
pub struct UdpProxy {
    addr: SocketAddr,
    back_port: u16,
    stop: Arc<AtomicBool>,
    /// Counters.
    pub counters: Arc<ProxyCounters>,
    threads: Vec<JoinHandle<()>>,
}

fn bigger_buffers(s: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt reads sizeof(c_int) bytes from a valid pointer to
        // a live c_int; the fd is owned by `s` for the duration of the call.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

impl UdpProxy {
    /// Starts a proxy on 127.0.0.1 (ephemeral port) forwarding to `target`.
    pub fn start(target: SocketAddr, spec: LinkSpec) -> io::Result<UdpProxy> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        let back = UdpSocket::bind("127.0.0.1:0")?;
        back.connect(target)?;
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            bigger_buffers(s);
        }
        let addr = front.local_addr()?;
        let back_port = back.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(ProxyCounters::default());
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();
        for dir in 0..2u64 {
            let q = Arc::new(DelayQueue::default());
            let (rx, tx) = if dir == 0 {
                (front.try_clone()?, back.try_clone()?)
            } else {
                (back.try_clone()?, front.try_clone()?)
            };
            let (stop1, stop2) = (stop.clone(), stop.clone());
            let (q1, q2) = (q.clone(), q);
            let (client1, client2) = (client.clone(), client.clone());
            let (c1, c2) = (counters.clone(), counters.clone());
            threads.push(std::thread::Builder::new().name(format!("udp-proxy-rx{dir}")).spawn(move || {
                let mut sched = LinkScheduler::new(&spec, true, 0x1234 + dir);
                let mut buf = vec![0u8; 65536];
                while !stop1.load(Ordering::Relaxed) {
                    let (n, from) = match rx.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(_) => continue,
                    };
                    if dir == 0 {
                        *client1.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(from);
                    }
                    match sched.schedule(Instant::now(), n) {
                        Some(at) => q1.push(at, buf[..n].to_vec()),
                        None => {
                            c1.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })?);
            threads.push(std::thread::Builder::new().name(format!("udp-proxy-tx{dir}")).spawn(move || {
                precise_timers();
                while let Some(d) = q2.pop_due(&stop2) {
                    let _ = if dir == 0 {
                        tx.send(&d)
                    } else {
                        let to = *client2.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        match to {
                            Some(a) => tx.send_to(&d, a),
                            None => continue,
                        }
                    };
                    c2.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            })?);
        }
        Ok(UdpProxy { addr, back_port, stop, counters, threads })
    }

    /// The address the primary must send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Local UDP ports of the proxy's two sockets.
    pub fn ports(&self) -> [u16; 2] {
        [self.addr.port(), self.back_port]
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A running TCP proxy: connections to [`TcpProxy::addr`] are relayed to
/// `target`, each direction delayed (and rate limited) like a WAN.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy on 127.0.0.1 (ephemeral port) forwarding to `target`.
    pub fn start(target: SocketAddr, spec: LinkSpec) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_a = stop.clone();
        let accept = std::thread::Builder::new().name("tcp-proxy-accept".into()).spawn(move || {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            let mut seed = 1;
            while !stop_a.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(target) else { continue };
                        for (from, to) in [(&client, &server), (&server, &client)] {
                            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else { continue };
                            seed += 1;
                            conns.extend(relay(from, to, spec, seed, stop_a.clone()));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        })?;
        Ok(TcpProxy { addr, stop, accept: Some(accept) })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// One direction of a TCP connection: reader thread + delayed writer thread.
fn relay(
    mut from: TcpStream,
    mut to: TcpStream,
    spec: LinkSpec,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let _ = from.set_nodelay(true);
    let _ = to.set_nodelay(true);
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let q = Arc::new(DelayQueue::default());
    let (q1, q2) = (q.clone(), q);
    let (stop1, stop2) = (stop.clone(), stop);
    let limit = spec.queue_limit().min(64 << 20);
    let mut out = Vec::new();
    if let Ok(h) = std::thread::Builder::new().name("tcp-proxy-rx".into()).spawn(move || {
        let mut sched = LinkScheduler::new(&spec, false, seed);
        let mut buf = vec![0u8; 256 << 10];
        while !stop1.load(Ordering::Relaxed) {
            q1.wait_below(limit, &stop1);
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(at) = sched.schedule(Instant::now(), n) {
                        q1.push(at, buf[..n].to_vec());
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        // Let the writer drain what is queued, then end it.
        q1.push(Instant::now(), Vec::new());
    }) {
        out.push(h);
    }
    if let Ok(h) = std::thread::Builder::new().name("tcp-proxy-tx".into()).spawn(move || {
        precise_timers();
        while let Some(d) = q2.pop_due(&stop2) {
            if d.is_empty() || to.write_all(&d).is_err() {
                let _ = to.shutdown(std::net::Shutdown::Write);
                break;
            }
        }
    }) {
        out.push(h);
    }
    out
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Measured round trips through a UDP proxy with `spec` (to an echo socket):
/// (p50, p99) in microseconds, over `count` pings.
pub fn calibrate_udp(spec: LinkSpec, count: usize) -> io::Result<(f64, f64)> {
    let echo = UdpSocket::bind("127.0.0.1:0")?;
    echo.set_read_timeout(Some(Duration::from_millis(50)))?;
    let echo_addr = echo.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_e = stop.clone();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 1500];
        while !stop_e.load(Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut b) {
                let _ = echo.send_to(&b[..n], from);
            }
        }
    });
    let proxy = UdpProxy::start(echo_addr, spec)?;
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut lat = Vec::with_capacity(count);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut b = [0u8; 1500];
    for i in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let t0 = Instant::now();
        s.send_to(&(i as u64).to_le_bytes(), proxy.addr())?;
        if s.recv_from(&mut b).is_ok() {
            lat.push(t0.elapsed().as_nanos() as u64);
        }
    }
    drop(proxy);
    stop.store(true, Ordering::Relaxed);
    let _ = t.join();
    lat.sort_unstable();
    Ok((crate::stats::percentile(&lat, 0.5) as f64 / 1e3, crate::stats::percentile(&lat, 0.99) as f64 / 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: f64) -> Duration {
        Duration::from_secs_f64(x / 1e3)
    }

    #[test]
    fn delay_only_is_half_the_rtt() {
        let t0 = Instant::now();
        let mut s = LinkScheduler::new(&LinkSpec::rtt(ms(5.0)), true, 1);
        assert_eq!(s.schedule(t0, 1500), Some(t0 + ms(2.5)));
        assert_eq!(s.schedule(t0 + ms(1.0), 1500), Some(t0 + ms(3.5)));
        assert!(LinkSpec::rtt(Duration::ZERO).is_direct());
        assert!(!LinkSpec::rtt(ms(1.0)).is_direct());
    }

    #[test]
    fn bandwidth_serialises_and_queue_drops() {
        let t0 = Instant::now();
        // 1 MB/s: 1000 bytes take 1 ms on the wire; queue limit 256 KiB.
        let spec = LinkSpec { rtt: ms(2.0), jitter: Duration::ZERO, bandwidth: Some(1_000_000), loss: 0.0 };
        let mut s = LinkScheduler::new(&spec, true, 1);
        let a = s.schedule(t0, 1000).map(|d| d - t0);
        let b = s.schedule(t0, 1000).map(|d| d - t0);
        assert_eq!(a, Some(ms(2.0))); // 1 ms on the wire + 1 ms one way
        assert_eq!(b, Some(ms(3.0))); // queued behind the first
        assert_eq!(s.backlog(t0), 2000);
        // Fill the queue: datagrams beyond 256 KiB of backlog are dropped.
        let mut dropped = 0;
        for _ in 0..400 {
            if s.schedule(t0, 1000).is_none() {
                dropped += 1;
            }
        }
        assert!(dropped > 100 && dropped < 200, "{dropped}");
        // A TCP link never drops: it queues (the proxy applies back-pressure).
        let mut t = LinkScheduler::new(&spec, false, 1);
        assert!((0..400).all(|_| t.schedule(t0, 1000).is_some()));
        // After the link drains, packets go out with the delay only again.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(s.schedule(later, 1000).map(|d| d - later), Some(ms(2.0)));
    }

    #[test]
    fn jitter_stays_in_bounds_and_fifo() {
        let t0 = Instant::now();
        let spec = LinkSpec { rtt: ms(10.0), jitter: ms(1.0), bandwidth: None, loss: 0.0 };
        let mut s = LinkScheduler::new(&spec, true, 7);
        let mut last = t0;
        for i in 0..1000 {
            let now = t0 + Duration::from_micros(i * 10);
            let d = s.schedule(now, 100).unwrap_or(now);
            assert!(d >= last, "reordered");
            assert!(d - now <= ms(6.0) + Duration::from_micros(10) && d - now >= ms(4.0), "{:?}", d - now);
            last = d;
        }
    }

    #[test]
    fn loss_rate_is_roughly_right() {
        let spec = LinkSpec { rtt: Duration::ZERO, jitter: Duration::ZERO, bandwidth: None, loss: 0.1 };
        let mut s = LinkScheduler::new(&spec, true, 3);
        let t0 = Instant::now();
        let lost = (0..10_000).filter(|_| s.schedule(t0, 100).is_none()).count();
        assert!((800..1200).contains(&lost), "{lost}");
        assert_eq!(LinkSpec::rtt(ms(5.0)).describe(), "RTT 5ms");
        assert_eq!(fmt_ms(ms(0.5)), "0.5ms");
    }
}
