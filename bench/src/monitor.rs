//! How busy the machine is with work that is not ours. On a shared machine
//! a compile or a test suite running next to the benchmark shows up as
//! millisecond tails everywhere; this sampler measures the CPU time used by
//! processes outside the benchmark's own process tree (the benchmark, the
//! daemons, QEMU, nbdkit, fio) so each cell can say how disturbed it was.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Clock ticks per second of /proc accounting (USER_HZ, 100 on Linux).
const HZ: f64 = 100.0;

/// Busy ticks of all CPUs (user + nice + system + irq + softirq + steal).
fn total_busy() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = s.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    Some(v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| *x).sum())
}

/// (ppid, utime + stime) of a process: the CPU of all its threads, those
/// that have exited included.
fn stat_ticks(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may contain spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] = state, f[1] = ppid, f[11] = utime, f[12] = stime
    let ppid = f.get(1)?.parse().unwrap_or(0);
    let t = f.get(11)?.parse::<u64>().unwrap_or(0) + f.get(12)?.parse::<u64>().unwrap_or(0);
    Some((ppid, t))
}

/// (ppid, utime + stime) of every process.
fn processes() -> HashMap<u32, (u32, u64)> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Some(v) = stat_ticks(pid) {
            out.insert(pid, v);
        }
    }
    out
}

/// What one process has used so far: what `perf stat -p PID` counts as
/// task-clock and context-switches, read from /proc.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// CPU time of all its threads (user + system), seconds, in clock
    /// ticks (10 ms).
    pub cpu_secs: f64,
    /// Voluntary and involuntary context switches of its threads alive
    /// now (those of a thread that exited are no longer counted).
    pub switches: u64,
}

/// The usage of process `pid` so far, if it is alive.
pub fn usage(pid: u32) -> Option<Usage> {
    let (_, ticks) = stat_ticks(pid)?;
    let mut switches = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("status")) else { continue };
        for line in s.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Some(Usage { cpu_secs: ticks as f64 / HZ, switches })
}

/// CPU ticks used so far by `root` and its descendants that are alive.
fn tree_ticks(procs: &HashMap<u32, (u32, u64)>, root: u32) -> HashMap<u32, u64> {
    let mut ours = HashMap::new();
    for (&pid, _) in procs.iter() {
        let mut p = pid;
        for _ in 0..64 {
            if p == root {
                ours.insert(pid, procs[&pid].1);
                break;
            }
            match procs.get(&p) {
                Some(&(pp, _)) if pp != 0 && pp != p => p = pp,
                _ => break,
            }
        }
    }
    ours
}

/// Samples of foreign CPU use: (seconds since start, cores busy with others).
#[derive(Debug)]
pub struct Monitor {
    start: Instant,
    samples: Arc<Mutex<Vec<(f64, f64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Starts sampling every 250 ms.
    pub fn start() -> Monitor {
        let start = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (samples.clone(), stop.clone());
        let root = std::process::id();
        let thread = std::thread::Builder::new()
            .name("cpu-monitor".into())
            .spawn(move || {
                let mut last_t = Instant::now();
                let mut last_busy = total_busy().unwrap_or(0);
                let mut last_ours = tree_ticks(&processes(), root);
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    let now = Instant::now();
                    let busy = total_busy().unwrap_or(last_busy);
                    let ours = tree_ticks(&processes(), root);
                    // Ticks of our processes in this interval (new ones count from 0).
                    let d_ours: u64 =
                        ours.iter().map(|(pid, t)| t.saturating_sub(*last_ours.get(pid).unwrap_or(&0))).sum();
                    let dt = now.duration_since(last_t).as_secs_f64();
                    let foreign = (busy.saturating_sub(last_busy).saturating_sub(d_ours)) as f64 / HZ / dt.max(1e-3);
                    s2.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((now.duration_since(start).as_secs_f64(), foreign));
                    (last_t, last_busy, last_ours) = (now, busy, ours);
                }
            })
            .ok();
        Monitor { start, samples, stop, thread }
    }

    /// Seconds since the monitor started.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Mean foreign CPU use (cores) between two instants of [`Monitor::now`].
    pub fn foreign_between(&self, from: f64, to: f64) -> Option<f64> {
        let s = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let v: Vec<f64> = s.iter().filter(|(t, _)| *t > from && *t <= to + 0.25).map(|(_, f)| *f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// Waits (at most `max`) until other processes have used less than
    /// `cores` for a whole second; returns the seconds waited, or None if
    /// the machine never became quiet enough.
    pub fn wait_quiet(&self, cores: f64, max: Duration) -> Option<f64> {
        let t0 = Instant::now();
        loop {
            let now = self.now();
            if now > 1.2 {
                if let Some(f) = self.foreign_between(now - 1.0, now) {
                    if f < cores {
                        return Some(t0.elapsed().as_secs_f64());
                    }
                }
            }
            if t0.elapsed() >= max {
                return None;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Mean foreign CPU use over the whole run.
    pub fn foreign_overall(&self) -> Option<f64> {
        self.foreign_between(0.0, f64::MAX)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
