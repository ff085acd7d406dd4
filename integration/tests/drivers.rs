#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real drivers through meridian-pgproxy, compared with the same drivers
//! directly against PostgreSQL (issue 12, "drop-in for real drivers").
//!
//! Each test is one class of driver behaviour: it starts a [`PgCluster`]
//! (`max_prepared_transactions = 10`, a streaming replica where the class needs
//! one), runs a check program of `integration/drivers/` directly against the
//! primary, then through an in-process proxy in each configuration the class is
//! about, and asserts that every check passes everywhere except the documented
//! differences of sessions that share backends ([`INHERENT`]). The programs print
//! `ok NAME` or `FAIL NAME: reason` per check; the test prints a table of every
//! check on every target and the reasons of the failures.
//!
//! - psycopg 3.3.4 and asyncpg (pinned in `drivers/python/requirements.txt`)
//!   run from a venv created on first use with `python3 -m venv` and pip, in
//!   `~/.cache/meridian-drivers/venv` (`MERIDIAN_DRIVERS_VENV` moves it); it is
//!   recreated when the requirements change.
//! - pgjdbc is Debian's `libpostgresql-jdbc-java` (`MERIDIAN_PGJDBC_JAR`
//!   overrides the jar); `JdbcChecks.java` is compiled with `javac` into a temp
//!   dir per test. `integration/install-deps.sh` installs both packages.
//! - `MERIDIAN_DRIVERS_TARGETS=session,transaction,replica` runs every class
//!   through those proxy configurations instead of its own (for the matrix in
//!   `docs/compatibility.md`).
//!
//! Limits: one host, loopback only; the venv is created without a lock (the
//! end-to-end tests run one at a time, see `integration/nextest.toml`). The
//! programs get `MERIDIAN_NODE_DSNS` (every node, direct) to observe the
//! servers (is the sleep still running?), never to act on them.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use common::{trust_config, Proxy};
use meridian_integration::PgCluster;
use meridian_shared::config::PoolMode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

/// The longest a check program may run against one target (its checks are
/// bounded one by one; this catches a program that hangs as a whole).
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(300);

/// Where a check program connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The primary itself, no proxy.
    Direct,
    /// The proxy in session mode with the primary only (`--primary`).
    Session,
    /// The proxy in transaction mode with the primary only.
    Transaction,
    /// The proxy in session mode with the primary and a streaming replica.
    Replica,
    /// The proxy in transaction mode with one primary backend for everyone
    /// (`pool.max_size = 1`).
    OneBackend,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Session => "session",
            Target::Transaction => "transaction",
            Target::Replica => "session+replica",
            Target::OneBackend => "transaction,1-backend",
        }
    }

    fn parse(name: &str) -> Target {
        match name.trim() {
            "session" => Target::Session,
            "transaction" => Target::Transaction,
            "replica" => Target::Replica,
            "one-backend" => Target::OneBackend,
            other => panic!(
                "MERIDIAN_DRIVERS_TARGETS: unknown target {other:?} \
                 (session, transaction, replica, one-backend)"
            ),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Driver {
    Psycopg,
    Asyncpg,
    Jdbc,
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers")
}

/// The venv's Python with the pinned packages, created or refreshed when needed.
async fn python() -> anyhow::Result<PathBuf> {
    let requirements = drivers_dir().join("python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).context("reading requirements.txt")?;
    let dir = match std::env::var_os("MERIDIAN_DRIVERS_VENV") {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            Path::new(&home).join(".cache/meridian-drivers/venv")
        }
    };
    let python = dir.join("bin/python");
    let stamp = dir.join("meridian-requirements.txt");
    if python.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return Ok(python);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.parent().unwrap_or(Path::new("/")))?;
    eprintln!("creating the drivers' venv in {}", dir.display());
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .output()
        .await
        .context("running python3 -m venv")?;
    anyhow::ensure!(
        out.status.success(),
        "python3 -m venv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-r",
        ])
        .arg(&requirements)
        .output()
        .await
        .context("running pip")?;
    anyhow::ensure!(
        out.status.success(),
        "pip install -r {}: {}",
        requirements.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // Written last: a venv without it is incomplete and made anew next time.
    std::fs::write(&stamp, &wanted)?;
    Ok(python)
}

fn pgjdbc_jar() -> PathBuf {
    std::env::var_os("MERIDIAN_PGJDBC_JAR").map_or_else(
        || PathBuf::from("/usr/share/java/postgresql.jar"),
        PathBuf::from,
    )
}

/// A check program ready to run: the command line before the target and groups.
struct Program {
    driver: Driver,
    argv: Vec<std::ffi::OsString>,
    /// Holds the compiled Java classes.
    _classes: Option<tempfile::TempDir>,
}

impl Program {
    async fn prepare(driver: Driver) -> anyhow::Result<Program> {
        let (argv, classes) = match driver {
            Driver::Psycopg | Driver::Asyncpg => {
                let script = match driver {
                    Driver::Psycopg => "python/psycopg_checks.py",
                    _ => "python/asyncpg_checks.py",
                };
                let python = python().await?;
                (
                    vec![
                        python.into(),
                        "-u".into(),
                        drivers_dir().join(script).into(),
                    ],
                    None,
                )
            }
            Driver::Jdbc => {
                let jar = pgjdbc_jar();
                anyhow::ensure!(
                    jar.is_file(),
                    "{} is missing: integration/install-deps.sh installs libpostgresql-jdbc-java",
                    jar.display()
                );
                let classes = tempfile::Builder::new()
                    .prefix("meridian-jdbc-")
                    .tempdir()?;
                let out = Command::new("javac")
                    .args(["-encoding", "UTF-8", "-cp"])
                    .arg(&jar)
                    .arg("-d")
                    .arg(classes.path())
                    .arg(drivers_dir().join("java/JdbcChecks.java"))
                    .output()
                    .await
                    .context("running javac (default-jdk-headless)")?;
                anyhow::ensure!(
                    out.status.success(),
                    "javac: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let cp = format!("{}:{}", classes.path().display(), jar.display());
                (
                    vec!["java".into(), "-cp".into(), cp.into(), "JdbcChecks".into()],
                    Some(classes),
                )
            }
        };
        Ok(Program {
            driver,
            argv,
            _classes: classes,
        })
    }

    /// The connection argument for a server on `port`.
    fn endpoint(&self, port: u16) -> String {
        match self.driver {
            Driver::Psycopg | Driver::Asyncpg => {
                format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
            }
            Driver::Jdbc => format!("jdbc:postgresql://127.0.0.1:{port}/postgres?user=postgres"),
        }
    }

    async fn run(&self, port: u16, group: &str, node_dsns: &str) -> Run {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .arg(self.endpoint(port))
            .arg(group)
            .env("MERIDIAN_NODE_DSNS", node_dsns)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Run::broken(format!("could not run {:?}: {e}", self.argv[0])),
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        // Line by line, so that the checks printed before a hang are kept.
        let mut lines = BufReader::new(stdout).lines();
        let deadline = tokio::time::Instant::now() + PROGRAM_TIMEOUT;
        let mut checks = Vec::new();
        let mut problem = None;
        loop {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    if let Some(name) = line.strip_prefix("ok ") {
                        checks.push((name.trim().to_string(), None));
                    } else if let Some(rest) = line.strip_prefix("FAIL ") {
                        let (name, reason) = rest.split_once(": ").unwrap_or((rest, ""));
                        checks.push((name.to_string(), Some(reason.to_string())));
                    }
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    problem = Some(format!("reading its output: {e}"));
                    break;
                }
                Err(_) => {
                    problem = Some(format!("killed after {PROGRAM_TIMEOUT:?}"));
                    let _ = child.start_kill();
                    break;
                }
            }
        }
        let status = match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(s)) => s.code(),
            _ => {
                let _ = child.start_kill();
                None
            }
        };
        let stderr = tokio::time::timeout(Duration::from_secs(5), stderr)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        Run {
            checks,
            status,
            problem,
            stderr_tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        }
    }
}

/// What one run of a check program against one target printed.
struct Run {
    /// Each check in order: its name and, if it failed, why.
    checks: Vec<(String, Option<String>)>,
    status: Option<i32>,
    /// The program could not run or was killed.
    problem: Option<String>,
    stderr_tail: String,
}

impl Run {
    fn broken(problem: String) -> Run {
        Run {
            checks: Vec::new(),
            status: None,
            problem: Some(problem),
            stderr_tail: String::new(),
        }
    }

    fn outcome(&self, name: &str) -> &'static str {
        match self.checks.iter().find(|(n, _)| n == name) {
            Some((_, None)) => "ok",
            Some((_, Some(_))) => "FAIL",
            None => "missing",
        }
    }

    /// Why this run does not count as all-passed against the reference names.
    fn problems(&self, names: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.problem {
            out.push(p.clone());
        }
        if self.checks.is_empty() {
            out.push("no check ran".into());
        }
        for (name, reason) in &self.checks {
            if let Some(r) = reason {
                out.push(format!("FAIL {name}: {r}"));
            }
        }
        for name in names {
            if !self.checks.iter().any(|(n, _)| n == name) {
                out.push(format!("missing {name} (the program stopped before it)"));
            }
        }
        let failed = self.checks.iter().any(|(_, r)| r.is_some());
        if self.problem.is_none() && (self.status != Some(0)) != failed {
            out.push(format!("exit status {:?}", self.status));
        }
        if !out.is_empty() && !self.stderr_tail.is_empty() {
            out.push(format!("stderr:\n{}", self.stderr_tail));
        }
        out
    }
}

/// The proxy configuration of `target` in front of `cluster`.
fn proxy_config(cluster: &PgCluster, target: Target) -> meridian_shared::config::ProxyConfig {
    let mut cfg = trust_config(cluster);
    if target != Target::Replica {
        cfg.backends.replicas.clear();
    }
    match target {
        Target::Transaction => cfg.pool.mode = PoolMode::Transaction,
        Target::OneBackend => {
            cfg.pool.mode = PoolMode::Transaction;
            cfg.pool.max_size = 1;
        }
        Target::Direct | Target::Session | Target::Replica => cfg.pool.mode = PoolMode::Session,
    }
    cfg
}

/// A difference from PostgreSQL that is inherent to a kind of session, not a bug
/// (`docs/compatibility.md` explains each): the check must fail on those targets with a
/// reason containing `because` — a check that starts to pass there fails the test, so
/// the list stays true.
struct Inherent {
    check: &'static str,
    targets: &'static [Target],
    because: &'static str,
}

/// The sessions that share backends: transaction pooling and read/write splitting.
const VIRTUAL: &[Target] = &[Target::Transaction, Target::Replica];

/// The documented differences of virtual sessions (`docs/pgproxy.md`, "Sessions").
const INHERENT: &[Inherent] = &[
    // A virtual session's pid is the proxy's own; the server's pids are its backends'.
    Inherent {
        check: "session_backend_pid_matches",
        targets: VIRTUAL,
        because: "pg_backend_pid()",
    },
    Inherent {
        check: "session_notify_from_other_carries_its_pid",
        targets: VIRTUAL,
        because: "notifier",
    },
    Inherent {
        check: "session_terminate_backend_from_other",
        targets: VIRTUAL,
        because: "returned False",
    },
    Inherent {
        check: "session_terminate_own_backend",
        targets: VIRTUAL,
        because: "nothing was raised",
    },
    Inherent {
        check: "listen_notifier_pid",
        targets: VIRTUAL,
        because: "notifier",
    },
    // Protocol-level statements of virtual sessions are prepared under the proxy's
    // names and shared by the clients of a pooled connection (as PgBouncer's and
    // PgDog's caches): pg_prepared_statements shows that cache, not one client's names.
    Inherent {
        check: "pipeline_auto_prepare",
        targets: VIRTUAL,
        because: "pg_prepared_statements",
    },
    Inherent {
        check: "pipeline_auto_prepare_after_another_client",
        targets: VIRTUAL,
        because: "pg_prepared_statements",
    },
    Inherent {
        check: "prepared_evict_lru_deallocate",
        targets: VIRTUAL,
        because: "pg_prepared_statements",
    },
    Inherent {
        check: "prepared_none_left_by_a_previous_client",
        targets: VIRTUAL,
        because: "earlier client",
    },
    // Two clients on one backend share its session state, by construction.
    Inherent {
        check: "iso_protocol_prepared_statement",
        targets: &[Target::OneBackend],
        because: "sees a's state",
    },
];

/// Differences that show only when two clients happen to get the same backend of a
/// larger pool: allowed there with their reason, not required.
const MAY_DIFFER: &[Inherent] = &[Inherent {
    check: "iso_protocol_prepared_statement",
    targets: VIRTUAL,
    because: "sees a's state",
}];

fn find(list: &'static [Inherent], check: &str, target: Target) -> Option<&'static Inherent> {
    list.iter()
        .find(|i| i.check == check && i.targets.contains(&target))
}

fn inherent(check: &str, target: Target) -> Option<&'static Inherent> {
    find(INHERENT, check, target)
}

/// Runs `group` of `driver` directly and through the proxy in each of
/// `targets` (or `MERIDIAN_DRIVERS_TARGETS`), prints the table, and asserts
/// that every check passed everywhere, except the [`INHERENT`] differences, which
/// must fail as documented, and the [`MAY_DIFFER`] ones, which may.
async fn check_group(driver: Driver, group: &str, targets: &[Target]) {
    let targets: Vec<Target> = match std::env::var("MERIDIAN_DRIVERS_TARGETS") {
        Ok(list) if !list.trim().is_empty() => list.split(',').map(Target::parse).collect(),
        _ => targets.to_vec(),
    };
    let replicas = usize::from(targets.contains(&Target::Replica));
    let cluster = PgCluster::builder()
        .replicas(replicas)
        .setting("max_prepared_transactions", "10")
        .start()
        .await
        .unwrap();
    let node_dsns: Vec<String> = cluster
        .nodes()
        .map(|n| {
            format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                n.port()
            )
        })
        .collect();
    let node_dsns = node_dsns.join(";");
    let program = Program::prepare(driver).await.unwrap();

    let mut runs = vec![(
        Target::Direct,
        program
            .run(cluster.primary().port(), group, &node_dsns)
            .await,
    )];
    for &target in &targets {
        let proxy = Proxy::start(proxy_config(&cluster, target)).await;
        if replicas > 0 {
            // The checks' own tables must not race the replica's first replay.
            cluster
                .wait_replicas_caught_up(Duration::from_secs(30))
                .await
                .unwrap();
        }
        let run = program.run(proxy.port, group, &node_dsns).await;
        proxy.stop().await;
        runs.push((target, run));
    }

    let names: Vec<String> = runs[0].1.checks.iter().map(|(n, _)| n.clone()).collect();
    let mut table = format!("{driver:?} group {group}\n{:<48}", "check");
    for (t, _) in &runs {
        let _ = write!(table, " {:<22}", t.label());
    }
    table.push('\n');
    for name in &names {
        let _ = write!(table, "{name:<48}");
        for (_, run) in &runs {
            let _ = write!(table, " {:<22}", run.outcome(name));
        }
        table.push('\n');
    }
    let mut failures = String::new();
    for (t, run) in &runs {
        let mut problems = run.problems(&names);
        let all = problems.len();
        // The documented differences: they must show, and only they are allowed.
        problems.retain(|p| {
            let Some(rest) = p.strip_prefix("FAIL ") else {
                return true;
            };
            let name = rest.split(':').next().unwrap_or("");
            !inherent(name, *t)
                .or_else(|| find(MAY_DIFFER, name, *t))
                .is_some_and(|i| p.contains(i.because))
        });
        // The program's failing exit status and its stderr are explained when the only
        // failures were documented ones.
        let excused = problems.len() < all;
        if excused
            && problems
                .iter()
                .all(|p| p.starts_with("exit status") || p.starts_with("stderr:"))
        {
            problems.clear();
        }
        for name in &names {
            if let Some(i) = inherent(name, *t) {
                if run.outcome(name) == "ok" {
                    problems.push(format!(
                        "{name} passes now: remove it from INHERENT and docs/compatibility.md ({})",
                        i.because
                    ));
                }
            }
        }
        if !problems.is_empty() {
            let _ = writeln!(failures, "--- {} ---\n{}", t.label(), problems.join("\n"));
        }
    }
    println!("{table}{failures}");
    assert!(!names.is_empty(), "no check ran directly:\n{failures}");
    assert!(
        failures.is_empty(),
        "{driver:?} {group}: not every check passes on every target\n{table}{failures}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_pipeline_mode() {
    check_group(
        Driver::Psycopg,
        "pipeline",
        &[Target::Session, Target::Transaction, Target::Replica],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepared_statements() {
    check_group(
        Driver::Psycopg,
        "prepared",
        &[Target::Session, Target::Transaction, Target::Replica],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_client_encodings() {
    check_group(
        Driver::Psycopg,
        "encoding",
        &[Target::Session, Target::Transaction, Target::Replica],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_server_side_session_ends() {
    check_group(
        Driver::Psycopg,
        "session_end",
        &[Target::Session, Target::Transaction],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_target_session_attrs_with_a_replica() {
    check_group(Driver::Psycopg, "target_session_attrs", &[Target::Replica]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_two_phase_commit_with_a_replica() {
    check_group(Driver::Psycopg, "two_phase", &[Target::Replica]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_temp_and_unlogged_reads_with_a_replica() {
    check_group(Driver::Psycopg, "temp_unlogged", &[Target::Replica]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_session_state_isolation_on_one_shared_backend() {
    check_group(Driver::Psycopg, "pool_isolation", &[Target::OneBackend]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_cache_copy_executemany_listen_timeout() {
    check_group(
        Driver::Asyncpg,
        "asyncpg",
        &[Target::Session, Target::Transaction, Target::Replica],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_prepare_threshold_batch_fetch_size_copy() {
    check_group(
        Driver::Jdbc,
        "jdbc",
        &[Target::Session, Target::Transaction, Target::Replica],
    )
    .await;
}
