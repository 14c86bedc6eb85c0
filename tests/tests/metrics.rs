//! The Prometheus endpoint of a running pair, scraped over HTTP and parsed
//! strictly (`replicator_tests::exposition`): counters grow with writes
//! made through NBD (qemu-io) and with a resync, gauges agree with
//! `status`, role and state keep the same series across a switchover,
//! `/healthz` answers; and the alert rules in ops/ pass promtool's checks
//! and unit tests.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use replicator_tests::exposition::{self, Exposition};
use replicator_tests::{describe_output, require, run_with_timeout, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const MINUTE: Duration = Duration::from_secs(60);

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn scrape(c: &Cluster, site: Site) -> Exposition {
    let (code, content_type, body) = c.scrape(site, "/metrics").unwrap_or_else(|e| panic!("{site}: {e}"));
    assert_eq!(code, 200, "{site}: /metrics answered {code}:\n{body}");
    assert!(content_type.starts_with("application/openmetrics-text"), "{site}: Content-Type {content_type:?}");
    exposition::parse(&body).unwrap_or_else(|e| panic!("{site}: unparsable exposition: {e}\n{body}"))
}

fn value(e: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    e.value(name, labels).unwrap_or_else(|err| panic!("{err}"))
}

fn qemu_io(c: &Cluster, site: Site, export: &str, cmds: &[String]) {
    let mut cmd = Command::new(require("qemu-io"));
    cmd.args(["-f", "raw"]).arg(c.nbd_uri(site, export));
    for x in cmds {
        cmd.arg("-c").arg(x);
    }
    let out = run_with_timeout(&mut cmd, Duration::from_secs(120));
    let text = describe_output(&out);
    assert!(
        out.status.success() && out.stderr.is_empty() && !text.contains("failed"),
        "qemu-io on {export}: {text}\n{}",
        c.diagnostics()
    );
}

fn cli_ok(c: &Cluster, site: Site, args: &[&str]) -> String {
    let out = c.cli(site, args);
    assert!(
        out.status.success(),
        "{site}: replicator {}:\n{}\n{}",
        args.join(" "),
        describe_output(&out),
        c.diagnostics()
    );
    describe_output(&out)
}

/// 32 writes of 64 KiB and one 1 MiB write-zeroes from `base`.
fn writes(base: u64, pattern: u8) -> Vec<String> {
    let mut cmds: Vec<String> = (0..32).map(|i| format!("write -P {pattern} {} 64k", base + i * 64 * KIB)).collect();
    cmds.push(format!("write -z {} 1M", base + 4 * MIB));
    cmds
}

/// Checks the per-group gauges against `status` on `site`.
fn agrees_with_status(c: &Cluster, site: Site, e: &Exposition, group: &str) {
    let s = c.status(site, group);
    let g = [("group", group)];
    assert_eq!(value(e, "replicator_journal_capacity_bytes", &g), s.journal_capacity_bytes as f64, "{site} {group}");
    assert_eq!(value(e, "replicator_generation", &g), s.generation as f64, "{site} {group}");
    for role in ["none", "primary", "secondary"] {
        let want = f64::from(u8::from(s.role == role));
        assert_eq!(value(e, "replicator_role", &[("group", group), ("role", role)]), want, "{site} {group} {role}");
    }
    for state in ["SIMPLEX", "COPY", "PAIR", "SUSPENDED", "SPLIT-BRAIN"] {
        let want = f64::from(u8::from(s.state == state));
        assert_eq!(value(e, "replicator_state", &[("group", group), ("state", state)]), want, "{site} {group} {state}");
    }
}

/// Series whose presence follows the link, not the group: left out when
/// comparing series sets.
fn stable_series(e: &Exposition) -> BTreeSet<String> {
    e.series().into_iter().filter(|s| !s.starts_with("replicator_link_rtt_seconds")).collect()
}

#[test]
fn metrics_follow_writes_resync_and_switchover() {
    let groups = vec![
        GroupSpec::new("m", Mode::Sync).volume("m-vol", 32 * MIB),
        GroupSpec::new("ma", Mode::Async).volume("ma-vol", 32 * MIB),
    ];
    let c = Cluster::new(ClusterOpts::new(groups).with_metrics());
    // Data on the primary before the pair exists: the initial copy sends it.
    qemu_io(&c, Site::A, "m-vol", &["write -P 0x11 8M 1M".to_string()]);
    c.pair_create("m");
    c.pair_create("ma");
    c.wait_pair("m", MINUTE);
    c.wait_pair("ma", MINUTE);

    let a0 = scrape(&c, Site::A);
    let b0 = scrape(&c, Site::B);
    for (site, e) in [(Site::A, &a0), (Site::B, &b0)] {
        assert_eq!(e.types.get("replicator_build").map(String::as_str), Some("info"), "{site}");
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(value(e, "replicator_build_info", &[("version", version)]), 1.0, "{site}");
        // The test certificates are valid for 2 days, the CA for 20 years.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
        let node = value(e, "replicator_certificate_expiry_timestamp_seconds", &[("certificate", "node")]);
        assert!((node - now - 2.0 * 86400.0).abs() < 3600.0, "{site}: node certificate expires at {node}, now {now}");
        let ca = value(e, "replicator_certificate_expiry_timestamp_seconds", &[("certificate", "ca")]);
        assert!(ca > now + 19.0 * 365.0 * 86400.0, "{site}: CA expires at {ca}");
        for group in ["m", "ma"] {
            agrees_with_status(&c, site, e, group);
            for kind in ["session", "apply", "client_io", "client_refused"] {
                value(e, "replicator_errors_total", &[("group", group), ("kind", kind)]);
            }
            assert_eq!(value(e, "replicator_health", &[("group", group)]), 0.0, "{site} {group}");
        }
        // RPO 0 is a sync-mode figure: present for the sync group on both
        // sites (1 only on its primary), absent for the async group.
        let want = if site == Site::A { 1.0 } else { 0.0 };
        assert_eq!(value(e, "replicator_rpo_zero", &[("group", "m")]), want, "{site}");
        assert_eq!(e.find("replicator_rpo_zero", &[("group", "ma")]).count(), 0, "{site}");
        assert_eq!(value(e, "replicator_group_info", &[("group", "ma"), ("mode", "async")]), 1.0, "{site}");
        // Two groups: never more than 4 busy, nothing stretched.
        assert_eq!(value(e, "replicator_secondary_delay_stretch", &[]), 1.0, "{site}");
    }
    let m = [("group", "m")];
    assert!(value(&a0, "replicator_resynced_bytes_total", &m) >= MIB as f64, "the initial copy sent the 1 MiB as data");
    assert!(value(&a0, "replicator_resynced_records_total", &m) > 0.0);
    assert_eq!(value(&a0, "replicator_resynced_bytes_total", &[("group", "ma")]), 0.0, "all zeroes on both sites");
    assert_eq!(value(&a0, "replicator_copy_progress_ratio", &m), 1.0);
    let rtt = value(&a0, "replicator_link_rtt_seconds", &[("peer", "site-b")]);
    assert!(rtt > 0.0 && rtt < 1.0, "loopback RTT {rtt}");

    // Writes through NBD: shipped on A, applied on B, latency observed.
    qemu_io(&c, Site::A, "m-vol", &writes(0, 0x5a));
    qemu_io(&c, Site::A, "ma-vol", &writes(0, 0x6b));
    c.wait_drained("m");
    c.wait_drained("ma");
    // The secondary reports applies in its acks: drained means counted.
    let a1 = scrape(&c, Site::A);
    let b1 = scrape(&c, Site::B);
    for group in ["m", "ma"] {
        let g = [("group", group)];
        let grew =
            |before: &Exposition, after: &Exposition, name: &str| value(after, name, &g) - value(before, name, &g);
        assert!(grew(&a0, &a1, "replicator_shipped_records_total") >= 33.0, "{group}: shipped records");
        assert!(grew(&a0, &a1, "replicator_shipped_bytes_total") >= (32 * 64 * KIB + MIB) as f64, "{group}");
        assert!(grew(&b0, &b1, "replicator_applied_records_total") >= 33.0, "{group}: applied records");
        assert!(grew(&b0, &b1, "replicator_applied_bytes_total") >= (32 * 64 * KIB + MIB) as f64, "{group}");
        assert!(grew(&a0, &a1, "replicator_write_latency_seconds_count") >= 33.0, "{group}: latency count");
        let inf = value(&a1, "replicator_write_latency_seconds_bucket", &[("group", group), ("le", "+Inf")]);
        assert_eq!(inf, value(&a1, "replicator_write_latency_seconds_count", &g), "{group}");
        // Nothing ships on the secondary, nothing applies on the primary.
        assert_eq!(value(&b1, "replicator_shipped_records_total", &g), 0.0, "{group}");
        assert_eq!(value(&a1, "replicator_applied_records_total", &g), 0.0, "{group}");
        let s = c.status(Site::A, group);
        assert_eq!(value(&a1, "replicator_last_seq", &g), s.last_seq as f64, "{group}");
        assert!(s.last_seq >= 33, "{s:?}");
        assert_eq!(value(&a1, "replicator_applied_seq", &g), s.last_seq as f64, "{group}: drained");
        assert_eq!(value(&a1, "replicator_lag_records", &g), 0.0, "{group}");
        for kind in ["session", "apply", "client_io"] {
            let k = [("group", group), ("kind", kind)];
            assert_eq!(value(&a1, "replicator_errors_total", &k), 0.0, "A {group} {kind}");
            assert_eq!(value(&b1, "replicator_errors_total", &k), 0.0, "B {group} {kind}");
        }
    }

    // Split: SUSPENDED(split), RPO 0 lost; the resync sends what changed
    // (from the journal, or copied from the dirty bitmap).
    cli_ok(&c, Site::A, &["pair", "split", "m"]);
    c.wait_until(Site::B, "m", "split", MINUTE, |s| s.reason.as_deref() == Some("split"));
    let a2 = scrape(&c, Site::A);
    agrees_with_status(&c, Site::A, &a2, "m");
    assert_eq!(value(&a2, "replicator_state", &[("group", "m"), ("state", "SUSPENDED")]), 1.0);
    assert_eq!(value(&a2, "replicator_suspend_reason", &[("group", "m"), ("reason", "split")]), 1.0);
    assert_eq!(value(&a2, "replicator_suspend_reason", &[("group", "m"), ("reason", "link")]), 0.0);
    assert_eq!(value(&a2, "replicator_rpo_zero", &[("group", "m")]), 0.0);
    assert_eq!(value(&a2, "replicator_health", &[("group", "m")]), 1.0);
    qemu_io(&c, Site::A, "m-vol", &["write -P 0x77 8M 1M".to_string()]);
    cli_ok(&c, Site::A, &["pair", "resync", "m", "--wait", "--timeout", "60s"]);
    c.wait_drained("m");
    let a3 = scrape(&c, Site::A);
    let g = [("group", "m")];
    let sent = |e: &Exposition| {
        value(e, "replicator_resynced_bytes_total", &g) + value(e, "replicator_shipped_bytes_total", &g)
    };
    assert!(sent(&a3) - sent(&a2) >= MIB as f64, "the resync sent the 1 MiB written while split");
    assert_eq!(value(&a3, "replicator_copy_progress_ratio", &g), 1.0);
    assert_eq!(value(&a3, "replicator_rpo_zero", &g), 1.0);
    assert_eq!(value(&a3, "replicator_state", &[("group", "m"), ("state", "PAIR")]), 1.0);

    // Switchover: values change, the set of series does not.
    let before = [stable_series(&a3), stable_series(&scrape(&c, Site::B))];
    let out = cli_ok(&c, Site::A, &["switchover", "m"]);
    assert!(out.contains("switchover done"), "{out}");
    c.wait_until(Site::B, "m", "primary in PAIR", MINUTE, |s| s.role == "primary" && s.state == "PAIR" && s.connected);
    c.wait_until(Site::A, "m", "secondary in PAIR", MINUTE, |s| s.role == "secondary" && s.state == "PAIR");
    let a4 = scrape(&c, Site::A);
    let b4 = scrape(&c, Site::B);
    for (site, e, was) in [(Site::A, &a4, &before[0]), (Site::B, &b4, &before[1])] {
        let now = stable_series(e);
        assert_eq!(
            &now,
            was,
            "{site}: series changed across the switchover: gone {:?}, new {:?}",
            was.difference(&now).collect::<Vec<_>>(),
            now.difference(was).collect::<Vec<_>>()
        );
        agrees_with_status(&c, site, e, "m");
        assert_eq!(value(e, "replicator_generation", &g), 2.0, "{site}");
    }
    assert_eq!(value(&a4, "replicator_role", &[("group", "m"), ("role", "secondary")]), 1.0);
    assert_eq!(value(&a4, "replicator_role", &[("group", "m"), ("role", "primary")]), 0.0);
    assert_eq!(value(&b4, "replicator_role", &[("group", "m"), ("role", "primary")]), 1.0);
    assert_eq!(value(&b4, "replicator_rpo_zero", &g), 1.0);
    assert_eq!(value(&a4, "replicator_rpo_zero", &g), 0.0);
    // Writes on the new primary ship from B now.
    let shipped_b = value(&b4, "replicator_shipped_records_total", &g);
    qemu_io(&c, Site::B, "m-vol", &writes(16 * MIB, 0x3c));
    c.wait_until(Site::B, "m", "drained", MINUTE, |s| s.lag_records == 0 && s.applied_seq >= s.last_seq);
    assert!(value(&scrape(&c, Site::B), "replicator_shipped_records_total", &g) - shipped_b >= 33.0);

    // /healthz, and anything else is 404.
    for site in [Site::A, Site::B] {
        let (code, _, body) = c.scrape(site, "/healthz").unwrap_or_else(|e| panic!("{site}: {e}"));
        assert_eq!(code, 200, "{site}: {body}");
        assert!(body.starts_with("ok\n") && body.contains("\nm ok ") && body.contains("\nma ok "), "{site}: {body}");
        let (code, _, _) = c.scrape(site, "/nope").unwrap_or_else(|e| panic!("{site}: {e}"));
        assert_eq!(code, 404, "{site}");
    }
    // A request line that arrives in pieces is read whole.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(c.metrics_addr(Site::A)).expect("connect");
        s.set_read_timeout(Some(MINUTE)).expect("timeout");
        s.write_all(b"GET /hea").expect("first piece");
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(b"lthz HTTP/1.1\r\n\r\n").expect("second piece");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("response");
        assert!(resp.starts_with("HTTP/1.1 200 OK") && resp.contains("\r\n\r\nok\n"), "{resp}");
    }

    // Every metric the dashboard and the alert rules use is exported.
    let mut exported = a4.names();
    exported.extend(b4.names());
    exported.extend(a0.names());
    for file in ["ops/grafana/replicator.json", "ops/prometheus/replicator-alerts.yml"] {
        let text = std::fs::read_to_string(repo_file(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file} uses no metric");
        let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(missing.is_empty(), "{file} uses metrics the daemon does not export: {missing:?}");
    }
}

/// Every `replicator_...` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("replicator_") {
        let tail = &rest[i..];
        let end = tail.find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')).unwrap_or(tail.len());
        let before = rest[..i].chars().next_back();
        if !before.is_some_and(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-' || ch == '/' || ch == '.') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_dashboard_is_valid_json() {
    let path = repo_file("ops/grafana/replicator.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let panels = v["panels"].as_array().map_or(0, Vec::len);
    assert!(panels >= 8, "{panels} panels");
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    // run-all.sh installs Debian's prometheus package: a missing promtool
    // fails here rather than skipping.
    let promtool = require("promtool");
    let rules = repo_file("ops/prometheus/replicator-alerts.yml");
    let tests = repo_file("ops/prometheus/replicator-alerts.test.yml");
    let out = run_with_timeout(Command::new(&promtool).arg("check").arg("rules").arg(&rules), MINUTE);
    assert!(out.status.success(), "promtool check rules: {}", describe_output(&out));
    let out = run_with_timeout(Command::new(&promtool).args(["test", "rules"]).arg(&tests), MINUTE);
    assert!(out.status.success(), "promtool test rules: {}", describe_output(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{text}");
    // Every alert in the rules has at least one unit test that expects it.
    let rules_text = std::fs::read_to_string(&rules).expect("rules");
    let tests_text = std::fs::read_to_string(&tests).expect("tests");
    let alerts: Vec<&str> = rules_text.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests_text
                .lines()
                .any(|l| l.trim() == format!("- alertname: {alert}") || l.trim() == format!("alertname: {alert}")),
            "no promtool unit test for alert {alert}"
        );
    }
}
