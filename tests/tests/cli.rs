//! The command line as an admin (or a script) uses it: exit codes (0 done,
//! 1 failed, 2 usage/config, 3 refused), messages that name the file and the
//! key, the `status --json` schema, pair create/delete, cert init.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use replicator_tests::{describe_output, run_with_timeout, Cluster, ClusterOpts, GroupSpec, Mode, Site};

const MIB: u64 = 1 << 20;

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cluster(start: bool) -> Cluster {
    let mut o = ClusterOpts::group(GroupSpec::new("cli", Mode::Sync).volume("cli-vol", 16 * MIB));
    o.start = start;
    Cluster::new(o)
}

fn config_check(c: &Cluster, path: &Path) -> Output {
    run_with_timeout(
        Command::new(c.bin()).arg("--config").arg(path).args(["config", "check"]).env_remove("REPLICATOR_CONFIG"),
        Duration::from_secs(30),
    )
}

#[test]
fn config_check_good_and_broken() {
    let c = cluster(false);
    let good_path = c.config_path(Site::A).to_path_buf();
    let out = config_check(&c, &good_path);
    assert_eq!(code(&out), 0, "config check on a good config\n{}", describe_output(&out));
    assert!(stdout(&out).contains("OK"), "config check should say OK\n{}", describe_output(&out));

    let good = std::fs::read_to_string(&good_path).expect("read config");
    // (what to break, replacement, what stderr must name besides the file)
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("bad mode", good.replace("mode = \"sync\"", "mode = \"fast\""), vec!["group[cli].mode", "\"fast\""]),
        ("unknown key", good.replace("[node]\n", "[node]\nbogus_key = 1\n"), vec!["bogus_key"]),
        (
            "bad size",
            good.replace(&format!("size = \"{}\"", 16 * MIB), "size = \"20 parsecs\""),
            vec!["volume[cli-vol].size"],
        ),
        (
            "journal too small",
            good.replace(&format!("journal_size = \"{}\"", 64 * MIB), "journal_size = \"1MiB\""),
            vec!["group[cli].journal_size"],
        ),
        (
            "bad duration",
            good.replace("link_timeout = \"5000ms\"", "link_timeout = \"5 fortnights\""),
            vec!["group[cli].link_timeout"],
        ),
        ("bad address", good.replace("listen = \"127.0.0.1:", "listen = \"localhost-ish:"), vec!["node.listen"]),
        ("unknown peer", good.replace("peer = \"site-b\"", "peer = \"site-z\""), vec!["group[cli].peer", "site-z"]),
    ];
    for (what, text, needles) in cases {
        assert_ne!(text, good, "{what}: the replacement did not apply to\n{good}");
        let path = c.root().join(format!("broken-{}.toml", what.replace(' ', "-")));
        std::fs::write(&path, &text).expect("write broken config");
        let out = config_check(&c, &path);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "config check with {what} must exit 2\n{}", describe_output(&out));
        assert!(
            err.contains(&path.display().to_string()),
            "{what}: stderr must name the file {}\n{err}",
            path.display()
        );
        for n in needles {
            assert!(err.contains(n), "{what}: stderr must name {n:?}\n{err}");
        }
    }

    let missing = c.root().join("no-such-config.toml");
    let out = config_check(&c, &missing);
    assert_eq!(code(&out), 2, "missing config\n{}", describe_output(&out));
    assert!(stderr(&out).contains("no-such-config.toml"), "{}", describe_output(&out));

    // A certificate that is not issued for node.name.
    let wrong_cert = good.replace("site-a.pem", "site-b.pem").replace("site-a.key", "site-b.key");
    let path = c.root().join("broken-cert.toml");
    std::fs::write(&path, wrong_cert).expect("write");
    let out = config_check(&c, &path);
    assert_eq!(code(&out), 2, "certificate for another node\n{}", describe_output(&out));
    assert!(stderr(&out).contains("site-b.pem"), "{}", describe_output(&out));
}

#[test]
fn status_json_schema_and_pair_lifecycle() {
    let c = cluster(true);

    // status --json before pairing: documented fields, SIMPLEX.
    let out = c.cli(Site::A, &["status", "--json"]);
    assert_eq!(code(&out), 0, "{}", describe_output(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON: {e}\n{}", describe_output(&out)));
    let groups = v.as_array().unwrap_or_else(|| panic!("status --json must be an array: {v}"));
    assert_eq!(groups.len(), 1, "{v}");
    let g = &groups[0];
    type FieldCheck = (&'static str, fn(&serde_json::Value) -> bool);
    let fields: [FieldCheck; 44] = [
        ("group", serde_json::Value::is_string),
        ("health", serde_json::Value::is_string),
        ("activity_log_bytes", serde_json::Value::is_u64),
        ("disconnected_since_unix", |x| x.is_null() || x.is_u64()),
        ("peer_state", |x| x.is_null() || x.is_string()),
        ("peer_contact_unix", |x| x.is_null() || x.is_u64()),
        ("rpo_zero", |x| x.is_null() || x.is_boolean()),
        ("rpo_zero_lost_since_unix", |x| x.is_null() || x.is_u64()),
        ("writable", serde_json::Value::is_boolean),
        ("needs_rebase", serde_json::Value::is_boolean),
        ("epoch", serde_json::Value::is_u64),
        ("superseded_by", serde_json::Value::is_u64),
        ("data_as_of_unix", |x| x.is_null() || x.is_f64()),
        ("refusal", |x| x.is_null() || x.is_string()),
        ("role", serde_json::Value::is_string),
        ("state", serde_json::Value::is_string),
        ("reason", |x| x.is_null() || x.is_string()),
        ("mode", serde_json::Value::is_string),
        ("peer", serde_json::Value::is_string),
        ("connected", serde_json::Value::is_boolean),
        ("generation", serde_json::Value::is_u64),
        ("last_seq", serde_json::Value::is_u64),
        ("applied_seq", serde_json::Value::is_u64),
        ("durable_seq", serde_json::Value::is_u64),
        ("lag_records", serde_json::Value::is_u64),
        ("lag_bytes", serde_json::Value::is_u64),
        ("lag_seconds", serde_json::Value::is_number),
        ("journal_used_bytes", serde_json::Value::is_u64),
        ("journal_capacity_bytes", serde_json::Value::is_u64),
        ("dirty_bytes", serde_json::Value::is_u64),
        ("copy_total_bytes", serde_json::Value::is_u64),
        ("copy_done_bytes", serde_json::Value::is_u64),
        ("consistent", serde_json::Value::is_boolean),
        ("writes_wait_for_secondary", serde_json::Value::is_boolean),
        ("io_backend", serde_json::Value::is_string),
        ("direct_io", serde_json::Value::is_boolean),
        ("last_error", |x| x.is_null() || x.is_string()),
        ("volumes", serde_json::Value::is_array),
        ("uptime_seconds", serde_json::Value::is_u64),
        ("link_rtt_seconds", |x| x.is_null() || x.is_f64()),
        ("shipped_bytes", serde_json::Value::is_u64),
        ("writes", serde_json::Value::is_u64),
        ("write_latency_mean_seconds", |x| x.is_null() || x.is_f64()),
        ("write_latency_p99_at_most_seconds", |x| x.is_null() || x.is_f64()),
    ];
    for (name, ok) in fields {
        let f = g.get(name).unwrap_or_else(|| panic!("status --json lacks the documented field {name:?}: {g}"));
        assert!(ok(f), "status --json field {name:?} has the wrong type: {f}");
    }
    assert_eq!(g["group"], "cli");
    assert_eq!(g["role"], "none");
    assert_eq!(g["state"], "SIMPLEX");
    assert_eq!(g["health"], "ok");
    assert_eq!(g["mode"], "sync");
    assert_eq!(g["peer"], "site-b");
    let io = g["io_backend"].as_str().unwrap_or_default();
    assert!(io == "io_uring" || io == "threads", "io_backend {io:?}");
    let vol = &g["volumes"][0];
    assert_eq!(vol["name"], "cli-vol");
    assert_eq!(vol["size"], 16 * MIB);
    assert_eq!(vol["path"], c.volume_path(Site::A, "cli-vol").display().to_string());

    // Human status and an unknown group.
    let out = c.cli(Site::A, &["status"]);
    assert_eq!(code(&out), 0, "{}", describe_output(&out));
    assert!(stdout(&out).contains("group cli") && stdout(&out).contains("SIMPLEX"), "{}", describe_output(&out));
    let out = c.cli(Site::A, &["status", "nosuchgroup", "--json"]);
    assert_eq!(code(&out), 2, "status of an unknown group\n{}", describe_output(&out));
    assert!(stderr(&out).contains("nosuchgroup"), "{}", describe_output(&out));

    // pair create --wait: exit 0 once PAIR.
    let out = c.cli(Site::A, &["pair", "create", "cli", "--wait"]);
    assert_eq!(code(&out), 0, "pair create --wait\n{}\n{}", describe_output(&out), c.diagnostics());
    assert!(stdout(&out).contains("PAIR"), "pair create --wait should end saying PAIR\n{}", describe_output(&out));
    let a = c.status(Site::A, "cli");
    assert_eq!((a.role.as_str(), a.state.as_str()), ("primary", "PAIR"), "{a:?}");
    c.wait_state(Site::B, "cli", "PAIR", Duration::from_secs(30));
    let out = c.cli(Site::B, &["status", "cli", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["role"], "secondary", "{v}");
    assert_eq!(v[0]["consistent"], true, "{v}");
    // What the metrics show, at a glance: the link's round trip while
    // connected, and the writes the primary took and shipped.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client =
            replicator::nbd_client::NbdClient::connect_unix(&c.nbd_socket(Site::A), "cli-vol").await.expect("connect");
        for i in 0..8u64 {
            client.write(i * 4096, &[0x42; 4096], false).await.expect("write");
        }
        client.flush().await.expect("flush");
    });
    let out = c.cli(Site::A, &["status", "cli", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v[0]["link_rtt_seconds"].as_f64().is_some_and(|r| r > 0.0), "{v}");
    assert_eq!(v[0]["writes"], 8, "{v}");
    assert_eq!(v[0]["shipped_bytes"], 8 * 4096, "{v}");
    assert!(v[0]["write_latency_mean_seconds"].as_f64().is_some_and(|m| m > 0.0), "{v}");
    let out = c.cli(Site::A, &["status", "cli"]);
    assert!(
        stdout(&out).contains("link rtt ") && stdout(&out).contains("writes 8 (latency mean"),
        "{}",
        describe_output(&out)
    );

    // A second pair create is refused (exit 3) and says why.
    let out = c.cli(Site::A, &["pair", "create", "cli"]);
    assert_eq!(code(&out), 3, "second pair create must be refused with exit 3\n{}", describe_output(&out));
    let err = stderr(&out);
    assert!(
        err.contains("already paired") && err.contains("pair delete"),
        "refusal must say why and what to do:\n{err}"
    );
    // ... also on the secondary.
    let out = c.cli(Site::B, &["pair", "create", "cli"]);
    assert_eq!(code(&out), 3, "pair create on the secondary must be refused\n{}", describe_output(&out));
    let a = c.status(Site::A, "cli");
    assert_eq!(a.state, "PAIR", "a refused pair create must not disturb the pair: {a:?}");

    // pair delete: both sides SIMPLEX.
    let out = c.cli(Site::A, &["pair", "delete", "cli"]);
    assert_eq!(code(&out), 0, "pair delete\n{}", describe_output(&out));
    assert!(stdout(&out).contains("SIMPLEX"), "{}", describe_output(&out));
    let a = c.status(Site::A, "cli");
    assert_eq!((a.role.as_str(), a.state.as_str()), ("none", "SIMPLEX"), "{a:?}");
    let b = c.wait_state(Site::B, "cli", "SIMPLEX", Duration::from_secs(30));
    assert_eq!(b.role, "none", "{b:?}");
    // Nothing left to delete: said so, exit 0 (a runbook deleting on both
    // sites, the first delete having ended both).
    let out = c.cli(Site::A, &["pair", "delete", "cli"]);
    assert_eq!(code(&out), 0, "pair delete of a SIMPLEX group\n{}", describe_output(&out));
    assert!(stdout(&out).contains("nothing to delete"), "{}", describe_output(&out));
    // After a delete, a new pair can be created.
    let out = c.cli(Site::A, &["pair", "create", "cli", "--nocopy", "--wait"]);
    assert_eq!(code(&out), 0, "pair create after delete\n{}\n{}", describe_output(&out), c.diagnostics());
    c.wait_pair("cli", Duration::from_secs(30));

    // The daemon is needed for status: without it, exit 1 and a clear message.
    let mut c = c;
    c.stop(Site::A);
    let out = c.cli(Site::A, &["status"]);
    assert_eq!(code(&out), 1, "status without a daemon\n{}", describe_output(&out));
    assert!(stderr(&out).contains("control.sock"), "{}", describe_output(&out));
}

#[test]
fn cert_init_and_issue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let bin = replicator_tests::replicator_bin();
    let run = |args: &[&str]| run_with_timeout(Command::new(&bin).args(args), Duration::from_secs(30));
    let ca_s = ca.display().to_string();
    let out = run(&["cert", "init", "--dir", &ca_s]);
    assert_eq!(code(&out), 0, "{}", describe_output(&out));
    let ca_pem = std::fs::read(ca.join("ca.pem")).expect("ca.pem");
    let ca_key = std::fs::read(ca.join("ca.key")).expect("ca.key");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ca.join("ca.key")).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "ca.key must be private");
    }

    // A second init refuses to overwrite (exit 3: the key would be lost)
    // and leaves the CA alone.
    let out = run(&["cert", "init", "--dir", &ca_s]);
    assert_eq!(code(&out), 3, "cert init over an existing CA must be refused\n{}", describe_output(&out));
    assert!(stderr(&out).contains("already exists"), "{}", describe_output(&out));
    assert_eq!(std::fs::read(ca.join("ca.pem")).expect("ca.pem"), ca_pem, "ca.pem was overwritten");
    assert_eq!(std::fs::read(ca.join("ca.key")).expect("ca.key"), ca_key, "ca.key was overwritten");

    let out_dir = dir.path().join("nodes").display().to_string();
    let out = run(&["cert", "issue", "--ca-dir", &ca_s, "--name", "site-x", "--out", &out_dir, "--days", "30"]);
    assert_eq!(code(&out), 0, "{}", describe_output(&out));
    assert!(Path::new(&out_dir).join("site-x.pem").is_file() && Path::new(&out_dir).join("site-x.key").is_file());
    let out = run(&["cert", "issue", "--ca-dir", &ca_s, "--name", "site-x", "--out", &out_dir]);
    assert_eq!(code(&out), 3, "re-issuing over an existing certificate must be refused\n{}", describe_output(&out));
    for bad in ["bad/name", "bad name"] {
        let out = run(&["cert", "issue", "--ca-dir", &ca_s, "--name", bad, "--out", &out_dir]);
        assert_eq!(code(&out), 2, "{bad:?} is not a valid node name: a usage error\n{}", describe_output(&out));
        assert!(stderr(&out).contains("not a valid node name"), "{}", describe_output(&out));
    }
    // Usage errors exit 2.
    let out = run(&["cert", "issue", "--ca-dir", &ca_s]);
    assert_eq!(code(&out), 2, "missing arguments\n{}", describe_output(&out));
    let out = run(&["no-such-command"]);
    assert_eq!(code(&out), 2, "unknown command\n{}", describe_output(&out));
}

/// Resident memory of a process, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// The control socket bounds what a local client can consume: a request
/// line of at most 64 KiB (a 300 MiB line is answered with an error, and
/// memory does not grow with it) and 10 s to send it (idle connections do
/// not lock the admin out), and 10 s to take each line of the response.
#[test]
fn control_socket_bounds_request_size_and_time() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let c = cluster(true);
    let pid = c.pid(Site::A).expect("running");
    let before = rss(pid);
    let mut s = UnixStream::connect(c.control_socket(Site::A)).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let chunk = vec![b'x'; MIB as usize];
    let mut sent = 0u64;
    for _ in 0..300 {
        if s.write_all(&chunk).is_err() {
            break;
        }
        sent += MIB;
    }
    let mut resp = String::new();
    let _ = BufReader::new(&s).read_line(&mut resp);
    assert!(resp.contains("longer than"), "an oversized request must be answered with an error, got {resp:?}");
    assert!(sent < 300 * MIB, "the daemon must stop reading an oversized request (it took {sent} bytes)");
    let after = rss(pid);
    assert!(after < before + 32 * MIB, "RSS grew from {before} to {after} bytes");

    let idle: Vec<UnixStream> =
        (0..40).map(|_| UnixStream::connect(c.control_socket(Site::A)).expect("connect")).collect();
    let started = std::time::Instant::now();
    let out = c.cli(Site::A, &["status"]);
    assert_eq!(code(&out), 0, "{}", describe_output(&out));
    assert!(started.elapsed() < Duration::from_secs(25), "status took {:?} behind idle connections", started.elapsed());
    drop(idle);

    // Clients that send a request and never read the response (about
    // 270 KiB here, more than a Unix socket buffers: the unknown group's
    // name is echoed back escaped) give their slots back within the reply
    // timeout instead of holding them for good.
    let name: String = std::iter::repeat_n('\u{300}', 30_000).collect();
    let line = format!("{}\n", serde_json::json!({ "cmd": "status", "group": name }));
    let stalled: Vec<UnixStream> = (0..32)
        .map(|_| {
            let mut s = UnixStream::connect(c.control_socket(Site::A)).expect("connect");
            s.write_all(line.as_bytes()).expect("request");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let started = std::time::Instant::now();
    let out = c.cli(Site::A, &["status"]);
    assert_eq!(code(&out), 0, "{}", describe_output(&out));
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "status took {:?} behind clients that do not read their responses",
        started.elapsed()
    );
    drop(stalled);
}

/// Writes `text` as a config next to the cluster's and runs `config check`
/// on it: exit 2, stderr names the file and each of `needles`.
fn assert_check_fails(c: &Cluster, what: &str, text: &str, needles: &[&str]) -> String {
    let path = c.root().join(format!("bad-{}.toml", what.replace(' ', "-")));
    std::fs::write(&path, text).expect("write config");
    let out = config_check(c, &path);
    let err = stderr(&out);
    assert_eq!(code(&out), 2, "config check with {what} must exit 2\n{}", describe_output(&out));
    assert!(err.contains(&path.display().to_string()), "{what}: stderr must name the file {}\n{err}", path.display());
    for n in needles {
        assert!(err.contains(n), "{what}: stderr must name {n:?}\n{err}");
    }
    err
}

/// `config check --startup` (the unit's ExecStartPre) on `text`: exits 0
/// and warns naming `needles`.
fn assert_startup_check_warns(c: &Cluster, what: &str, text: &str, needles: &[&str]) {
    let path = c.root().join(format!("startup-{}.toml", what.replace(' ', "-")));
    std::fs::write(&path, text).expect("write config");
    let out = run_with_timeout(
        Command::new(c.bin()).arg("--config").arg(&path).args(["config", "check", "--startup"]),
        Duration::from_secs(30),
    );
    let err = stderr(&out);
    assert_eq!(
        code(&out),
        0,
        "config check --startup with {what} must let the daemon start\n{}",
        describe_output(&out)
    );
    assert!(err.contains("warning:"), "{what}: no warning\n{err}");
    for n in needles {
        assert!(err.contains(n), "{what}: the warning must name {n:?}\n{err}");
    }
}

fn assert_check_passes(c: &Cluster, what: &str, text: &str) {
    let path = c.root().join(format!("ok-{}.toml", what.replace(' ', "-")));
    std::fs::write(&path, text).expect("write config");
    let out = config_check(c, &path);
    assert_eq!(code(&out), 0, "config check with {what} must pass\n{}", describe_output(&out));
    assert!(stdout(&out).contains("OK"), "{what}\n{}", describe_output(&out));
}

/// Items of issue 12.6: what `run` would fail on, `config check` now reports
/// (exit 2, file and key named).
#[test]
fn config_check_catches_what_run_would_fail_on() {
    let c = cluster(false);
    let good_path = c.config_path(Site::A).to_path_buf();
    let good = std::fs::read_to_string(&good_path).expect("read config");
    let vol = c.volume_path(Site::A, "cli-vol");
    assert!(good.contains("create = true"), "the harness must ask for volume creation explicitly\n{good}");
    assert_check_passes(&c, "good with create", &good);
    assert!(!vol.exists(), "config check must not create the volume");

    // 1. The key of another certificate.
    assert_check_fails(
        &c,
        "key mismatch",
        &good.replace("site-a.key", "site-b.key"),
        &["tls.key", "site-b.key", "does not belong to the certificate", "site-a.pem"],
    );

    // 2. A certificate from another CA (and an expired one).
    let foreign = c.root().join("foreign-ca");
    replicator::certs::init_ca(&foreign).expect("foreign CA");
    let out = c.root().join("foreign-issued");
    let (cert, key) =
        replicator::certs::issue(&foreign, "site-a", &out, replicator::certs::Validity::days(2)).expect("issue");
    let certs = c.root().join("certs");
    let with_cert = |cert: &Path, key: &Path| {
        good.replace(&certs.join("site-a.pem").display().to_string(), &cert.display().to_string())
            .replace(&certs.join("site-a.key").display().to_string(), &key.display().to_string())
    };
    let ca = c.root().join("ca").join("ca.pem").display().to_string();
    assert_check_fails(&c, "foreign CA", &with_cert(&cert, &key), &["tls.cert", "is not issued by", &ca, "tls.ca"]);
    let now = time::OffsetDateTime::now_utc();
    let past = replicator::certs::Validity {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
    };
    let out = c.root().join("expired-issued");
    let (cert, key) = replicator::certs::issue(&c.root().join("ca"), "site-a", &out, past).expect("issue expired");
    assert_check_fails(&c, "expired cert", &with_cert(&cert, &key), &["tls.cert", "expired"]);
    // The daemon starts with it (serving its volumes, not replicating): so
    // does the unit's start check.
    assert_startup_check_warns(&c, "expired cert", &with_cert(&cert, &key), &["tls.cert", "expired"]);

    // 3. Missing directories: of a volume, of state_dir, of run_dir.
    let data = vol.parent().expect("data dir").display().to_string();
    let vol_s = vol.display().to_string();
    assert_check_fails(
        &c,
        "volume dir missing",
        &good.replace(&vol_s, &format!("{data}/no-such-dir/cli-vol.img")),
        &["group[cli].volume[cli-vol].path", "no-such-dir", "does not exist"],
    );
    assert_check_fails(
        &c,
        "state dir parent missing",
        &good.replace(&format!("state_dir = \"{data}/state\""), &format!("state_dir = \"{data}/typo/state\"")),
        &["node.state_dir", "typo", "does not exist"],
    );
    let run_dir = c.root().join("site-a").join("run").display().to_string();
    assert_check_fails(
        &c,
        "run dir parent missing",
        &good.replace(&format!("run_dir = \"{run_dir}\""), &format!("run_dir = \"{data}/typo2/run\"")),
        &["node.run_dir", "typo2"],
    );

    // 4. An existing volume smaller or larger than `size`.
    for (what, len) in [("smaller", 8 * MIB), ("larger", 32 * MIB)] {
        std::fs::File::create(&vol).and_then(|f| f.set_len(len)).expect("volume file");
        assert_check_fails(
            &c,
            &format!("volume {what}"),
            &good,
            &["group[cli].volume[cli-vol].size", &len.to_string(), &(16 * MIB).to_string()],
        );
        std::fs::remove_file(&vol).expect("remove");
    }

    // 4b. A volume inside state_dir (where journals live), or one file
    // under two volume paths (`..`, a link).
    let state = format!("{data}/state");
    std::fs::create_dir_all(&state).expect("state dir");
    let inside = format!("{state}/cli-vol.img");
    std::fs::File::create(&inside).and_then(|f| f.set_len(16 * MIB)).expect("volume file");
    assert_check_fails(
        &c,
        "volume in state_dir",
        &good.replace(&vol_s, &inside),
        &["group[cli].volume[cli-vol].path", "inside node.state_dir"],
    );
    std::fs::remove_file(&inside).expect("remove");
    std::fs::File::create(&vol).and_then(|f| f.set_len(16 * MIB)).expect("volume file");
    let twin =
        format!("{data}/../{}/cli-vol.img", vol.parent().and_then(Path::file_name).expect("dir").to_string_lossy());
    let second = format!("\n[[group.volume]]\nname = \"cli-twin\"\npath = \"{twin}\"\nsize = \"{}\"\n", 16 * MIB);
    let group_start = good.find("[[group]]").expect("a group");
    let end = good[group_start..].find("\n[[peer]]").map_or(good.len(), |i| group_start + i);
    let two = format!("{}{second}{}", &good[..end], &good[end..]);
    assert_check_fails(
        &c,
        "one file, two volumes",
        &two,
        &["group[cli].volume[cli-twin].path", "same file as volume cli-vol"],
    );
    std::fs::remove_file(&vol).expect("remove");

    // 5. A missing volume without `create = true`: check and run refuse, nothing is created.
    let no_create = good.replace("\ncreate = true\n", "\n");
    assert!(!no_create.contains("\ncreate = true"), "{no_create}");
    let err = assert_check_fails(
        &c,
        "missing volume",
        &no_create,
        &["group[cli].volume[cli-vol].path", &vol_s, "does not exist", "create = true"],
    );
    assert!(!err.contains("OK"), "{err}");
    let path = c.root().join("run-no-create.toml");
    std::fs::write(&path, &no_create).expect("write");
    let out = run_with_timeout(
        Command::new(c.bin()).arg("--config").arg(&path).arg("run").env_remove("REPLICATOR_CONFIG"),
        Duration::from_secs(60),
    );
    assert_eq!(code(&out), 1, "run with a missing volume must fail\n{}", describe_output(&out));
    assert!(stderr(&out).contains("create = true") && stderr(&out).contains(&vol_s), "{}", describe_output(&out));
    assert!(!vol.exists(), "run must not create a volume without create = true");
    // With the file there (right size), no `create` is needed.
    std::fs::File::create(&vol).and_then(|f| f.set_len(16 * MIB)).expect("volume file");
    assert_check_passes(&c, "existing volume", &no_create);
    std::fs::remove_file(&vol).expect("remove");

    // 6. Sizes: SI units are powers of 1000, IEC and bare K/M/G/T powers of 1024.
    let size_line = format!("size = \"{}\"", 16 * MIB);
    assert!(good.contains(&size_line), "{good}");
    for ok in ["16MiB", "16M", "16384KiB", "16384k", "0.015625GiB", "16777216B"] {
        assert_check_passes(&c, &format!("size {ok}"), &good.replace(&size_line, &format!("size = \"{ok}\"")));
    }
    assert_check_fails(
        &c,
        "size 16MB",
        &good.replace(&size_line, "size = \"16MB\""),
        &["group[cli].volume[cli-vol].size", "4KiB"],
    );
    assert_check_passes(
        &c,
        "journal 64MB",
        &good.replace(&format!("journal_size = \"{}\"", 64 * MIB), "journal_size = \"64MB\""),
    );
    assert_check_fails(&c, "size 16 furlongs", &good.replace(&size_line, "size = \"16 furlongs\""), &["KiB", "MB"]);

    // 7. TOML syntax: line, column and a caret under the column.
    let err =
        assert_check_fails(&c, "toml syntax", &good.replace("mode = \"sync\"", "mode = sync"), &["line ", "column "]);
    let lines: Vec<&str> = err.lines().collect();
    let at = lines.iter().position(|l| l.contains("mode = sync")).unwrap_or_else(|| panic!("no source line\n{err}"));
    assert!(lines.get(at + 1).is_some_and(|l| l.contains('^')), "no caret under the line\n{err}");

    // 8. Peer addresses: a DNS name that resolves passes, one that does not fails.
    assert_check_passes(&c, "peer localhost", &good.replace("address = \"127.0.0.1:", "address = \"localhost:"));
    assert_check_fails(
        &c,
        "peer unresolvable",
        &good.replace("address = \"127.0.0.1:", "address = \"no-such-peer.invalid:"),
        &["peer[site-b].address", "no-such-peer.invalid", "cannot resolve"],
    );
    // After a disaster the peer's DNS may be gone with its site: the node
    // that takes over must still start.
    let unresolvable = good.replace("address = \"127.0.0.1:", "address = \"no-such-peer.invalid:");
    assert_startup_check_warns(&c, "peer unresolvable", &unresolvable, &["no-such-peer.invalid", "cannot resolve"]);
    // What keeps `run` from starting still fails it.
    let path = c.root().join("startup-fatal.toml");
    std::fs::write(&path, unresolvable.replace(&c.root().display().to_string(), "/nonexistent-replicator-root"))
        .expect("write config");
    let out = run_with_timeout(
        Command::new(c.bin()).arg("--config").arg(&path).args(["config", "check", "--startup"]),
        Duration::from_secs(30),
    );
    assert_eq!(code(&out), 2, "config check --startup with missing directories\n{}", describe_output(&out));
}

/// A peer given by DNS name is resolved when dialed: the pair comes up.
#[test]
fn peer_address_may_be_a_dns_name() {
    let mut c = cluster(false);
    for site in [Site::A, Site::B] {
        let path = c.config_path(site).to_path_buf();
        let text = std::fs::read_to_string(&path).expect("read config");
        let named = text.replace("address = \"127.0.0.1:", "address = \"localhost:");
        assert_ne!(named, text);
        std::fs::write(&path, named).expect("write config");
        let out = config_check(&c, &path);
        assert_eq!(code(&out), 0, "{}", describe_output(&out));
    }
    c.start(Site::A);
    c.start(Site::B);
    c.pair_create("cli");
    c.wait_pair("cli", Duration::from_secs(60));
}

/// SIGHUP (`systemctl reload`, a log-rotation habit, a terminal closing)
/// never kills the daemon: it reloads what can change in place, says so in
/// one line, and names changed settings that need a restart.
#[test]
fn sighup_reloads_and_names_what_needs_a_restart() {
    let c = cluster(true);
    let wait = |needle: &str, count: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = c.log(Site::A);
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            if lines.len() >= count {
                return lines[count - 1].to_string();
            }
            assert!(std::time::Instant::now() < deadline, "no {needle:?} line #{count} in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    c.signal(Site::A, nix::sys::signal::Signal::SIGHUP);
    let line = wait("SIGHUP: reloaded", 1);
    assert!(line.contains("log filter") && line.contains("TLS certificate"), "{line}");
    assert!(!line.contains("applied only at restart"), "nothing changed, yet: {line}");
    assert_eq!(c.status(Site::A, "cli").state, "SIMPLEX", "the daemon still answers");

    // A setting only a restart applies is named, and not applied.
    let port = replicator_tests::free_tcp_port();
    c.add_node_keys(Site::A, &format!("nbd_listen = \"127.0.0.1:{port}\""));
    c.signal(Site::A, nix::sys::signal::Signal::SIGHUP);
    let line = wait("SIGHUP: reloaded", 2);
    assert!(line.contains("Changed but applied only at restart: node.nbd_listen"), "{line}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "nbd_listen was applied without a restart");
    assert_eq!(c.status(Site::A, "cli").state, "SIMPLEX", "the daemon still answers");
    // A group's setting: the group and the key are named.
    let path = c.config_path(Site::A).to_path_buf();
    let text = std::fs::read_to_string(&path).expect("read config");
    let edited: String = text
        .lines()
        .map(|l| if l.starts_with("link_timeout = ") { "link_timeout = \"1234ms\"".to_string() } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(edited, text, "no link_timeout line in\n{text}");
    std::fs::write(&path, edited).expect("write config");
    c.signal(Site::A, nix::sys::signal::Signal::SIGHUP);
    let line = wait("SIGHUP: reloaded", 3);
    assert!(line.contains("applied only at restart: node.nbd_listen, group cli (link_timeout)"), "{line}");

    // A file that no longer validates (an edit in progress) changes
    // nothing, and does not lock the admin out of the running daemon.
    let text = std::fs::read_to_string(&path).expect("read config");
    std::fs::write(&path, format!("{text}\n[[group]]\nname = \"half-done\"\npeer = \"site-c\"\n"))
        .expect("write config");
    c.signal(Site::A, nix::sys::signal::Signal::SIGHUP);
    wait("SIGHUP: nothing reloaded: the configuration does not load", 1);
    let out = c.cli(Site::A, &["status", "cli"]);
    assert_eq!(code(&out), 0, "{}", describe_output(&out));
    assert!(stdout(&out).contains("group cli"), "{}", describe_output(&out));
    assert!(
        stderr(&out).contains("missing field `mode`") && stderr(&out).contains("asking the running daemon anyway"),
        "the command says what is wrong: {}",
        describe_output(&out)
    );
    // Nor does one that does not even parse.
    std::fs::write(&path, format!("{text}\ngarbage = [\n")).expect("write config");
    let out = c.cli(Site::A, &["status", "cli"]);
    assert_eq!(code(&out), 0, "{}", describe_output(&out));
    assert!(stdout(&out).contains("group cli"), "{}", describe_output(&out));
    assert!(stderr(&out).contains("asking the running daemon anyway"), "{}", describe_output(&out));
}

/// A command whose output is closed early (`| head -1`) ends by SIGPIPE,
/// as other tools do, not with a panic and a backtrace.
#[test]
fn a_command_whose_output_is_closed_ends_quietly() {
    let c = cluster(true);
    let script = r#"set -o pipefail; "$0" --config "$1" status --watch 2>"$2" | head -1 >/dev/null"#;
    let err = c.root().join("watch.err");
    let out = run_with_timeout(
        Command::new("bash").args(["-c", script]).arg(c.bin()).arg(c.config_path(Site::A)).arg(&err),
        Duration::from_secs(60),
    );
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(code(&out), 128 + 13, "killed by SIGPIPE: {}\n{stderr}", describe_output(&out));
}

/// A daemon that does not answer (here: stopped with SIGSTOP) makes
/// `status` fail with a message after its timeout, not hang a monitoring
/// script or an admin's shell.
#[test]
fn status_of_a_daemon_that_does_not_answer_fails_after_its_timeout() {
    let c = cluster(true);
    c.signal(Site::A, nix::sys::signal::Signal::SIGSTOP);
    let started = std::time::Instant::now();
    let out = c.cli(Site::A, &["status"]);
    let took = started.elapsed();
    c.signal(Site::A, nix::sys::signal::Signal::SIGCONT);
    assert_eq!(code(&out), 1, "{}", describe_output(&out));
    assert!(stderr(&out).contains("did not answer within 30s"), "{}", describe_output(&out));
    assert!(stderr(&out).contains("still waiting for the daemon's answer"), "{}", describe_output(&out));
    assert!(took < Duration::from_secs(60), "status took {took:?}");
    let out = c.cli(Site::A, &["status"]);
    assert!(stdout(&out).contains("group cli"), "the daemon answers again: {}", describe_output(&out));
}
