//! `replicator demo`, the tour the README's first command runs, end to end:
//! it must exit 0 and show each step's key line — the initial copy, both
//! byte-for-byte comparisons, the switchover (both ways), the failover's
//! recovery point, the fenced old primary, and the failback's report of
//! what it discarded and its switch back.

use std::process::Command;
use std::time::Duration;

use replicator_tests::{describe_output, replicator_bin, run_with_timeout};

#[test]
fn the_demo_tour_runs_to_the_end() {
    let out = run_with_timeout(
        Command::new(replicator_bin()).arg("demo").env_remove("REPLICATOR_CONFIG"),
        Duration::from_secs(600),
    );
    let text = describe_output(&out);
    assert!(out.status.success(), "replicator demo failed:\n{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "bank: PAIR",
        "archive: PAIR",
        "write latency (4 KiB, QD1)",
        "site-a$ replicator switchover bank",
        "switchover done in",
        "site-b is now the primary (generation 2)",
        "this node is now the primary (generation 3)",
        "site-b$ replicator failover bank",
        "Recovery point: sequence ",
        "Sync mode",
        "refused by the peer: superseded",
        "site-a$ replicator failback bank",
        "Discarded here: 0 region(s)",
        "group bank: PAIR (sync mode, secondary consistent)",
        "this node is now the primary (generation 5)",
        "holds every write site-b took while it was the primary",
        "demo complete: both sites hold identical bytes, after a switchover, a failover and a failback.",
    ] {
        assert!(stdout.contains(line), "the demo's output lacks {line:?}:\n{text}");
    }
    assert_eq!(
        stdout.matches("identical on both sites").count(),
        6,
        "three volumes compared twice (after the tour and after the failback):\n{text}"
    );
    assert!(!stdout.contains("DIFFERENT"), "{text}");
}
