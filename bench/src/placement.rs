//! Where the two sites run. By default everything shares the machine: both
//! daemons, the client, the delay emulator and QEMU compete for the same
//! CPUs and write to the same disk. `--pin` and `--site-b-dir` separate site
//! B (the secondary daemon, and the target of QEMU's mirror) from site A
//! (the primary or the unpaired export, the client, the emulator, QEMU's
//! source), to show what of a replicated row is the cost of sharing one
//! machine rather than of the daemon.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The two sites' places, fixed once at start.
#[derive(Debug, Default)]
struct Placement {
    /// Site A on CPU 0 (this process and what it starts), site B on CPU 1.
    pin: bool,
    /// Site B's files (volumes, journals, state) under this directory.
    site_b_root: Option<PathBuf>,
}

static PLACEMENT: OnceLock<Placement> = OnceLock::new();

fn placement() -> &'static Placement {
    PLACEMENT.get_or_init(Placement::default)
}

/// Fixes the placement. With `pin`, this process (and so every thread and
/// process it starts afterwards) moves to CPU 0; site B's processes go to
/// CPU 1. With `site_b_dir`, site B's files go to a fresh directory in it.
pub fn init(pin: bool, site_b_dir: Option<&Path>) -> Result<(), String> {
    if pin {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if cpus < 2 {
            return Err(format!("--pin needs two CPUs, this machine offers {cpus}"));
        }
        let mut set = nix::sched::CpuSet::new();
        set.set(0).map_err(|e| format!("--pin: {e}"))?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .map_err(|e| format!("--pin: cannot move to CPU 0: {e}"))?;
    }
    let site_b_root = match site_b_dir {
        Some(d) => {
            let root = d.join(format!("replicator-bench-site-b-{}", std::process::id()));
            std::fs::create_dir_all(&root).map_err(|e| format!("--site-b-dir {}: {e}", root.display()))?;
            Some(root)
        }
        None => None,
    };
    PLACEMENT.set(Placement { pin, site_b_root }).map_err(|_| "placement fixed twice".to_string())
}

/// One line for the report's machine table ("shared" by default).
pub fn describe() -> String {
    let p = placement();
    let cpus = if p.pin {
        "site A (client, emulator, primary or unpaired export, QEMU's source) on CPU 0, site B (secondary, QEMU's mirror target) on CPU 1"
    } else {
        "both sites, the client and the emulator share every CPU"
    };
    match &p.site_b_root {
        Some(d) => format!("{cpus}; site B's files in {}", d.display()),
        None => format!("{cpus}; both sites' files on the test directory"),
    }
}

/// The directory of site `site` ("site-a", "site-b") of a configuration
/// whose files live in `dir`.
pub fn site_dir(dir: &Path, site: &str) -> PathBuf {
    match (&placement().site_b_root, site, dir.file_name()) {
        (Some(root), "site-b", Some(name)) => root.join(name).join(site),
        _ => dir.join(site),
    }
}

/// A file of site B (QEMU's mirror target) for a configuration in `dir`.
pub fn site_b_file(dir: &Path, name: &str) -> PathBuf {
    let d = site_dir(dir, "site-b");
    let _ = std::fs::create_dir_all(&d);
    d.join(name)
}

/// A command that runs `program` as part of site `site`.
pub fn command(site: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    if placement().pin && site == "site-b" {
        let mut c = Command::new("taskset");
        c.args(["--cpu-list", "1"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Removes site B's directory (end of the run).
pub fn cleanup() {
    if let Some(root) = &placement().site_b_root {
        let _ = std::fs::remove_dir_all(root);
    }
}
