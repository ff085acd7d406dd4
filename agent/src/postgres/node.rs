//! One PostgreSQL data directory and the postmaster this process spawns on it.
//!
//! [`PgNode`] runs `initdb`, writes Meridian's configuration files (rendered by
//! [`super::config`]), spawns `postgres -D <dir>` as a tracked child with output
//! appended to `<parent>/<dir name>.log`, probes
//! readiness over TCP, stops it with the PostgreSQL shutdown signals, kills it,
//! and runs the few SQL functions the agent needs (promotion, LSNs, slots).
//!
//! Limits: a postmaster this node did not spawn is seen only through its
//! `postmaster.pid` (it can be stopped, not awaited). SQL goes over short-lived
//! TCP connections as the superuser; the generated `pg_hba.conf` must trust
//! loopback for that user. Dropping a node with a running child kills the
//! postmaster and its children with SIGKILL, each by pid. The postmaster stays
//! in our process group, so a terminal's Ctrl-C or a test runner killing the
//! group stops it too.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use meridian_shared::lsn::Lsn;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};
use tracing::Instrument;

use super::config::{self, Conninfo, PgSettings, StandbyOf, SUPERUSER};
use super::controldata::{ControlData, PostmasterPidFile};
use super::{OsUser, PgBinaries, PgError};

/// How long [`PgNode::stop`] waits before it escalates to SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a promotion may take before it counts as failed.
pub const PROMOTE_WAIT: Duration = Duration::from_secs(60);
/// How often a promotion's end is checked.
pub const PROMOTE_POLL: Duration = Duration::from_millis(5);

/// PostgreSQL's shutdown modes (the signals `pg_ctl stop -m` sends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM: wait for clients to disconnect.
    Smart,
    /// SIGINT: roll back and disconnect clients, then a shutdown checkpoint.
    Fast,
    /// SIGQUIT: exit at once; crash recovery at the next start.
    Immediate,
}

impl StopMode {
    fn signal(self) -> Signal {
        match self {
            StopMode::Smart => Signal::SIGTERM,
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        }
    }
}

/// What a node is: its name, data directory, settings and HBA lines.
#[derive(Clone, Debug)]
pub struct PgNodeSpec {
    /// A short name for logs, `application_name` and slot names.
    pub name: String,
    /// The data directory (made absolute by [`PgNode::new`]).
    pub data_dir: PathBuf,
    /// Settings written to `meridian.conf`.
    pub settings: PgSettings,
    /// `pg_hba.conf` lines, in order. Default: trust from loopback only.
    pub hba: Vec<String>,
}

impl PgNodeSpec {
    /// A node on `127.0.0.1:port` with default settings and loopback trust.
    pub fn new(name: &str, data_dir: impl Into<PathBuf>, port: u16) -> PgNodeSpec {
        PgNodeSpec {
            name: name.to_owned(),
            data_dir: data_dir.into(),
            settings: PgSettings {
                port,
                ..PgSettings::default()
            },
            hba: config::trust_loopback_hba(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let context = context.into();
    move |source| PgError::Io { context, source }
}

/// The last `lines` lines of a text.
pub fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn signal_name(sig: Signal) -> &'static str {
    sig.as_str()
}

/// Whether `pid` runs: it exists and is not a zombie (a postmaster that died
/// while its parent, not us, has not reaped it yet is not running).
fn pid_alive(pid: u32) -> bool {
    let exists = i32::try_from(pid)
        .map(|p| kill(Pid::from_raw(p), None).is_ok())
        .unwrap_or(false);
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| parse_stat_state(&stat) != Some('Z'))
            .unwrap_or(true)
}

/// The state letter in the text of `/proc/<pid>/stat` (`R`, `S`, `Z`...).
pub fn parse_stat_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

/// The parent pid in the text of `/proc/<pid>/stat` (`pid (comm) state ppid ...`;
/// `comm` may contain spaces and parentheses, so fields count from the last `)`).
pub fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// The pids whose parent is `parent` (Linux `/proc`; empty elsewhere).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_stat_ppid(&s))
                == Some(parent)
        })
        .collect()
}

/// One PostgreSQL data directory and (once started) its postmaster.
#[derive(Debug)]
pub struct PgNode {
    name: String,
    bins: PgBinaries,
    user: OsUser,
    data_dir: PathBuf,
    log_file: PathBuf,
    settings: Mutex<PgSettings>,
    hba: Mutex<Vec<String>>,
    child: Mutex<Option<Child>>,
}

impl PgNode {
    /// A node handle; touches nothing on disk.
    pub fn new(bins: PgBinaries, user: OsUser, spec: PgNodeSpec) -> PgNode {
        let data_dir = if spec.data_dir.is_absolute() {
            spec.data_dir
        } else {
            std::env::current_dir()
                .map(|d| d.join(&spec.data_dir))
                .unwrap_or(spec.data_dir)
        };
        let file_name = data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.name.clone());
        let log_file = data_dir
            .parent()
            .unwrap_or(Path::new("/"))
            .join(format!("{file_name}.log"));
        PgNode {
            name: spec.name,
            bins,
            user,
            data_dir,
            log_file,
            settings: Mutex::new(spec.settings),
            hba: Mutex::new(spec.hba),
            child: Mutex::new(None),
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The postmaster's log (stdout and stderr), next to the data directory.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The configured port.
    pub fn port(&self) -> u16 {
        lock(&self.settings).port
    }

    /// The OS user the programs run as.
    pub fn os_user(&self) -> &OsUser {
        &self.user
    }

    /// The server programs.
    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }

    /// A copy of the current settings.
    pub fn settings(&self) -> PgSettings {
        lock(&self.settings).clone()
    }

    /// The address clients connect to: the first `listen_addresses` entry, with
    /// wildcards mapped to loopback.
    pub fn host(&self) -> String {
        let listen = lock(&self.settings).listen_addresses.clone();
        let first = listen.split(',').next().unwrap_or("").trim();
        match first {
            "" | "*" | "0.0.0.0" => "127.0.0.1".into(),
            "::" => "::1".into(),
            other => other.to_owned(),
        }
    }

    /// A conninfo for `user` on database `db` of this node.
    pub fn conninfo(&self, user: &str, db: &str) -> Conninfo {
        Conninfo::new(&self.host(), self.port(), user, Some(db))
    }

    /// `host=.. port=.. user=.. dbname=..` for this node.
    pub fn dsn(&self, user: &str, db: &str) -> String {
        self.conninfo(user, db).to_string()
    }

    fn sql_err(&self) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
        move |source| PgError::Sql {
            node: self.name.clone(),
            source,
        }
    }

    /// Connects as `user` to `db` over TCP and spawns the connection task.
    pub async fn connect(&self, user: &str, db: &str) -> Result<Client, PgError> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(self.host())
            .port(self.port())
            .user(user)
            .dbname(db)
            .application_name("meridian")
            .connect_timeout(Duration::from_secs(5));
        let (client, connection) = cfg.connect(NoTls).await.map_err(self.sql_err())?;
        let span = tracing::debug_span!("pg_connection", node = %self.name);
        tokio::spawn(
            async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "connection closed with an error");
                }
            }
            .instrument(span),
        );
        Ok(client)
    }

    /// Connects as the superuser to database `postgres`.
    pub async fn client(&self) -> Result<Client, PgError> {
        self.connect(SUPERUSER, "postgres").await
    }

    /// A command for one of the server programs, run as the node's OS user
    /// with a minimal C-locale environment.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bins.path(program));
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .current_dir("/")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        self.user.apply(&mut cmd);
        cmd
    }

    /// Runs a prepared command to completion; its stdout on success.
    pub async fn run(&self, program: &str, mut cmd: Command) -> Result<String, PgError> {
        let out = cmd
            .output()
            .await
            .map_err(io_err(format!("running {program}")))?;
        if !out.status.success() {
            return Err(PgError::CommandFailed {
                program: program.to_owned(),
                status: out.status.to_string(),
                stderr: tail_lines(&String::from_utf8_lossy(&out.stderr), 20),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates the (empty) data directory owned by the OS user, mode 0700,
    /// and its parent if missing.
    pub async fn create_data_dir(&self) -> Result<(), PgError> {
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::create_dir_all(&self.data_dir)
            .await
            .map_err(io_err(format!("creating {}", self.data_dir.display())))?;
        self.user.chown(&self.data_dir)?;
        tokio::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(io_err(format!("chmod 0700 {}", self.data_dir.display())))?;
        Ok(())
    }

    /// `initdb` (superuser `postgres`, data checksums, UTF8, C locale; no sync
    /// when `fsync` is off), then [`PgNode::write_config`].
    pub async fn initdb(&self) -> Result<(), PgError> {
        self.create_data_dir().await?;
        let fsync = lock(&self.settings).fsync;
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-U", SUPERUSER, "--auth-local=trust", "--auth-host=trust"])
            .args(["-E", "UTF8", "--locale=C", "--data-checksums"]);
        if !fsync {
            cmd.arg("--no-sync");
        }
        self.run("initdb", cmd).await?;
        self.write_config().await
    }

    async fn write_owned(&self, path: PathBuf, content: String) -> Result<(), PgError> {
        tokio::fs::write(&path, content)
            .await
            .map_err(io_err(format!("writing {}", path.display())))?;
        self.user.chown(&path)
    }

    /// Writes `meridian.conf` and `pg_hba.conf`, and makes `postgresql.conf`
    /// include `meridian.conf`. A running postmaster needs a reload (or a
    /// restart, for `port` and the like) to see the change.
    pub async fn write_config(&self) -> Result<(), PgError> {
        let rendered = lock(&self.settings).render();
        self.write_owned(self.data_dir.join(config::INCLUDE_FILE), rendered)
            .await?;
        let hba = config::render_hba(&lock(&self.hba));
        self.write_owned(self.data_dir.join("pg_hba.conf"), hba)
            .await?;
        let main = self.data_dir.join("postgresql.conf");
        let text = tokio::fs::read_to_string(&main)
            .await
            .map_err(io_err(format!("reading {}", main.display())))?;
        if let Some(with_include) = config::with_include_line(&text) {
            self.write_owned(main, with_include).await?;
        }
        Ok(())
    }

    /// Changes the settings and rewrites the configuration files.
    pub async fn update_settings(&self, f: impl FnOnce(&mut PgSettings)) -> Result<(), PgError> {
        f(&mut lock(&self.settings));
        self.write_config().await
    }

    /// Replaces the `pg_hba.conf` lines and rewrites the configuration files.
    pub async fn set_hba(&self, lines: Vec<String>) -> Result<(), PgError> {
        *lock(&self.hba) = lines;
        self.write_config().await
    }

    /// Makes the data directory a standby of `of` at its next start (settings
    /// plus `standby.signal`). On a running standby, `primary_conninfo` takes
    /// effect with [`PgNode::reload`].
    pub async fn make_standby(&self, of: StandbyOf) -> Result<(), PgError> {
        self.update_settings(|s| s.standby = Some(of)).await?;
        self.write_owned(self.data_dir.join("standby.signal"), String::new())
            .await
    }

    /// Whether the postmaster this node spawned is still running.
    pub fn is_running(&self) -> bool {
        let mut child = lock(&self.child);
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_)) | Err(_)) | None => false,
        }
    }

    /// The running postmaster recorded in `postmaster.pid`, if its pid is alive.
    pub async fn pid_file(&self) -> Result<Option<PostmasterPidFile>, PgError> {
        let path = self.data_dir.join("postmaster.pid");
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => {
                let parsed = PostmasterPidFile::parse(&text)?;
                Ok(pid_alive(parsed.pid).then_some(parsed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
        }
    }

    /// Spawns `postgres -D <data dir>` (output appended to
    /// [`PgNode::log_file`]). Returns once spawned; see
    /// [`PgNode::wait_ready`].
    pub async fn start(&self) -> Result<(), PgError> {
        if self.is_running() {
            let pid = self.postmaster_pid().await?;
            return Err(PgError::AlreadyRunning {
                node: self.name.clone(),
                pid,
            });
        }
        if let Some(running) = self.pid_file().await? {
            return Err(PgError::AlreadyRunning {
                node: self.name.clone(),
                pid: running.pid,
            });
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(io_err(format!("opening {}", self.log_file.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io_err("duplicating the log file handle"))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd.spawn().map_err(io_err("spawning postgres"))?;
        tracing::info!(node = %self.name, pid = child.id(), port = self.port(), "postmaster started");
        *lock(&self.child) = Some(child);
        Ok(())
    }

    /// The last `lines` lines of the node's log (empty if there is none).
    pub async fn log_tail(&self, lines: usize) -> String {
        tokio::fs::read_to_string(&self.log_file)
            .await
            .map(|t| tail_lines(&t, lines))
            .unwrap_or_default()
    }

    /// If the spawned postmaster has exited, forgets it and returns why.
    async fn exited(&self) -> Option<PgError> {
        let status = {
            let mut guard = lock(&self.child);
            let status = match guard.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => status.to_string(),
                Some(Err(e)) => e.to_string(),
                Some(Ok(None)) | None => return None,
            };
            *guard = None;
            status
        };
        Some(PgError::Exited {
            node: self.name.clone(),
            status,
            log_tail: self.log_tail(30).await,
        })
    }

    /// Waits until the node accepts a connection and answers `SELECT 1`, up
    /// to `timeout`. Fails early, with the log's tail, if the postmaster exits.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), PgError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        let mut last = String::from("no attempt yet");
        loop {
            if let Some(err) = self.exited().await {
                return Err(err);
            }
            let attempt = async {
                let client = self.client().await?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(self.sql_err())?;
                Ok::<(), PgError>(())
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => {}
            }
            if Instant::now() + pause >= deadline {
                return Err(PgError::Timeout {
                    what: format!("node {} to accept connections", self.name),
                    after: timeout,
                    last,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// The postmaster's pid: the spawned child's, else the one in
    /// `postmaster.pid` if alive.
    pub async fn postmaster_pid(&self) -> Result<u32, PgError> {
        let spawned = lock(&self.child).as_ref().and_then(Child::id);
        if let Some(pid) = spawned {
            return Ok(pid);
        }
        self.pid_file()
            .await?
            .map(|p| p.pid)
            .ok_or_else(|| PgError::NotRunning {
                node: self.name.clone(),
            })
    }

    fn send(pid: u32, sig: Signal) -> Result<(), PgError> {
        let raw = i32::try_from(pid).map_err(|_| PgError::Signal {
            signal: signal_name(sig),
            pid: -1,
            source: nix::errno::Errno::EINVAL,
        })?;
        match kill(Pid::from_raw(raw), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(source) => Err(PgError::Signal {
                signal: signal_name(sig),
                pid: raw,
                source,
            }),
        }
    }

    /// Stops the postmaster with `mode`'s signal and waits for it to exit
    /// (up to [`STOP_TIMEOUT`], then SIGKILL and a [`PgError::Timeout`]).
    pub async fn stop(&self, mode: StopMode) -> Result<(), PgError> {
        let child = lock(&self.child).take();
        let what = format!("node {} to stop ({mode:?})", self.name);
        match child {
            Some(mut child) => {
                let Some(pid) = child.id() else {
                    return Ok(()); // already reaped
                };
                Self::send(pid, mode.signal())?;
                match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
                    Ok(Ok(status)) => {
                        tracing::info!(node = %self.name, %status, "postmaster stopped");
                        Ok(())
                    }
                    Ok(Err(e)) => Err(io_err(format!("waiting for pid {pid}"))(e)),
                    Err(_) => {
                        Self::kill_tree(pid);
                        let _ = child.wait().await;
                        Err(PgError::Timeout {
                            what,
                            after: STOP_TIMEOUT,
                            last: "killed with SIGKILL".into(),
                        })
                    }
                }
            }
            None => {
                let Some(running) = self.pid_file().await? else {
                    return Err(PgError::NotRunning {
                        node: self.name.clone(),
                    });
                };
                Self::send(running.pid, mode.signal())?;
                let deadline = Instant::now() + STOP_TIMEOUT;
                while pid_alive(running.pid) {
                    if Instant::now() >= deadline {
                        Self::kill_tree(running.pid);
                        return Err(PgError::Timeout {
                            what,
                            after: STOP_TIMEOUT,
                            last: "killed with SIGKILL".into(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(())
            }
        }
    }

    /// SIGKILL to the postmaster and, by pid, to every process it forked
    /// (backends, walsender/walreceiver, checkpointer...): the postmaster is
    /// stopped first so it cannot fork while its children are listed. The
    /// children would exit by themselves on postmaster death, but only after a
    /// while; killing them makes the port, the shared memory and the data dir
    /// free at once.
    fn kill_tree(pid: u32) {
        let Ok(raw) = i32::try_from(pid) else {
            return;
        };
        let _ = kill(Pid::from_raw(raw), Signal::SIGSTOP);
        let children = children_of(pid);
        let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
        for child in children {
            if let Ok(c) = i32::try_from(child) {
                let _ = kill(Pid::from_raw(c), Signal::SIGKILL);
            }
        }
    }

    /// SIGKILL to the postmaster and its children (a crash: no shutdown
    /// checkpoint, clients cut off, the port refuses connections once this
    /// returns). A postmaster this node did not spawn is killed the same way,
    /// found through `postmaster.pid`.
    pub async fn kill9(&self) -> Result<(), PgError> {
        let shmem_id = self
            .pid_file()
            .await
            .ok()
            .flatten()
            .and_then(|p| p.shmem_id);
        let result = self.kill9_processes().await;
        if let Some(id) = shmem_id {
            // Killed children detach from the shared memory as they exit, a moment after the
            // postmaster: a restart before that is refused, so wait for it (bounded).
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let table = tokio::fs::read_to_string("/proc/sysvipc/shm")
                    .await
                    .unwrap_or_default();
                if super::controldata::shm_attachments(&table, id).unwrap_or(0) == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        result
    }

    async fn kill9_processes(&self) -> Result<(), PgError> {
        let child = lock(&self.child).take();
        match child {
            Some(mut child) => {
                if let Some(pid) = child.id() {
                    Self::kill_tree(pid);
                }
                child
                    .wait()
                    .await
                    .map_err(io_err("waiting for the killed postmaster"))?;
                tracing::info!(node = %self.name, "postmaster killed");
                Ok(())
            }
            None => {
                let Some(running) = self.pid_file().await? else {
                    return Err(PgError::NotRunning {
                        node: self.name.clone(),
                    });
                };
                Self::kill_tree(running.pid);
                let deadline = Instant::now() + Duration::from_secs(10);
                while pid_alive(running.pid) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(())
            }
        }
    }

    /// Reloads the configuration (`pg_reload_conf()`).
    pub async fn reload(&self) -> Result<(), PgError> {
        let c = self.client().await?;
        c.simple_query("SELECT pg_reload_conf()")
            .await
            .map_err(self.sql_err())?;
        Ok(())
    }

    /// Promotes a standby and drops the standby settings from `meridian.conf`
    /// so the node stays a primary on restart. Signals the promotion with
    /// `pg_promote(false)` and polls `pg_is_in_recovery()` every
    /// [`PROMOTE_POLL`] for up to [`PROMOTE_WAIT`]: `pg_promote`'s own wait
    /// checks only every 100 ms, which a failover would pay on its critical path.
    pub async fn promote(&self) -> Result<(), PgError> {
        let c = self.client().await?;
        let signalled: bool = c
            .query_one("SELECT pg_promote(false)", &[])
            .await
            .map_err(self.sql_err())?
            .get(0);
        let failed = || PgError::PromoteFailed {
            node: self.name.clone(),
        };
        if !signalled {
            return Err(failed());
        }
        let deadline = Instant::now() + PROMOTE_WAIT;
        loop {
            let in_recovery: bool = c
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(self.sql_err())?
                .get(0);
            if !in_recovery {
                break;
            }
            if Instant::now() >= deadline {
                return Err(failed());
            }
            tokio::time::sleep(PROMOTE_POLL).await;
        }
        self.update_settings(|s| s.standby = None).await
    }

    /// `pg_is_in_recovery()`: true on a standby.
    pub async fn is_in_recovery(&self) -> Result<bool, PgError> {
        let c = self.client().await?;
        Ok(c.query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(self.sql_err())?
            .get(0))
    }

    async fn lsn_query(&self, sql: &str) -> Result<Option<Lsn>, PgError> {
        let c = self.client().await?;
        let text: Option<String> = c.query_one(sql, &[]).await.map_err(self.sql_err())?.get(0);
        Ok(text.map(|t| t.parse()).transpose()?)
    }

    /// `pg_current_wal_lsn()`: WAL written out so far (a primary only; a
    /// standby gives an error).
    pub async fn current_wal_lsn(&self) -> Result<Lsn, PgError> {
        self.lsn_query("SELECT pg_current_wal_lsn()::text")
            .await?
            .ok_or_else(|| PgError::Parse {
                what: "pg_current_wal_lsn()",
                detail: "NULL".into(),
            })
    }

    /// `pg_current_wal_insert_lsn()`: the end of all WAL inserted so far, which
    /// includes commits not yet written out (asynchronous commit). Wait for a
    /// replica to replay this, not [`PgNode::current_wal_lsn`], to see every
    /// committed row. A primary only.
    pub async fn current_wal_insert_lsn(&self) -> Result<Lsn, PgError> {
        self.lsn_query("SELECT pg_current_wal_insert_lsn()::text")
            .await?
            .ok_or_else(|| PgError::Parse {
                what: "pg_current_wal_insert_lsn()",
                detail: "NULL".into(),
            })
    }

    /// `pg_last_wal_replay_lsn()`: `None` on a node that never was in recovery.
    pub async fn replay_lsn(&self) -> Result<Option<Lsn>, PgError> {
        self.lsn_query("SELECT pg_last_wal_replay_lsn()::text")
            .await
    }

    /// `pg_last_wal_receive_lsn()`: `None` when no WAL was streamed.
    pub async fn receive_lsn(&self) -> Result<Option<Lsn>, PgError> {
        self.lsn_query("SELECT pg_last_wal_receive_lsn()::text")
            .await
    }

    /// Creates a physical replication slot that reserves WAL at once.
    pub async fn create_physical_slot(&self, name: &str) -> Result<Lsn, PgError> {
        let c = self.client().await?;
        let lsn: Option<String> = c
            .query_one(
                "SELECT lsn::text FROM pg_create_physical_replication_slot($1, true)",
                &[&name],
            )
            .await
            .map_err(self.sql_err())?
            .get(0);
        Ok(lsn.map(|l| l.parse()).transpose()?.unwrap_or(Lsn::ZERO))
    }

    /// Drops a replication slot; returns false when it did not exist.
    pub async fn drop_slot(&self, name: &str) -> Result<bool, PgError> {
        let c = self.client().await?;
        let n = c
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&name],
            )
            .await
            .map_err(self.sql_err())?;
        Ok(n > 0)
    }

    /// Runs `pg_controldata` on the data directory and parses it.
    pub async fn controldata(&self) -> Result<ControlData, PgError> {
        let mut cmd = self.command("pg_controldata");
        cmd.arg("-D").arg(&self.data_dir);
        ControlData::parse(&self.run("pg_controldata", cmd).await?)
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(child) = child {
            if let Some(pid) = child.id() {
                tracing::debug!(node = %self.name, pid, "killing postmaster on drop");
                Self::kill_tree(pid);
            }
            // tokio reaps the killed child in the background.
            drop(child);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(dir: &str) -> PgNode {
        let bins = PgBinaries::at(PathBuf::from("/nonexistent"));
        PgNode::new(bins, OsUser::current(), PgNodeSpec::new("n1", dir, 6000))
    }

    #[test]
    fn ppid_is_read_after_the_command_name() {
        assert_eq!(parse_stat_ppid("42 (postgres) S 17 42 42 0 -1"), Some(17));
        assert_eq!(
            parse_stat_ppid("43 (postgres: walsender (x) ) S 42 42 42 0"),
            Some(42)
        );
        assert_eq!(parse_stat_ppid("44 (a b) R"), None);
        assert_eq!(parse_stat_ppid("garbage"), None);
    }

    #[test]
    fn stat_state_is_read_after_the_command_name() {
        assert_eq!(parse_stat_state("42 (postgres) Z 17 42"), Some('Z'));
        assert_eq!(parse_stat_state("43 (a) b) S 1"), Some('S'));
        assert_eq!(parse_stat_state("garbage"), None);
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Wait until it has exited but is not reaped yet.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat_state(&s))
            != Some('Z')
        {
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!pid_alive(pid));
        child.wait().unwrap();
        assert!(pid_alive(std::process::id()));
    }

    #[test]
    fn the_children_of_this_process_include_a_spawned_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let kids = children_of(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(kids.contains(&child.id()), "{kids:?}");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(tail_lines("", 5), "");
    }

    #[test]
    fn stop_modes_map_to_postgres_signals() {
        assert_eq!(StopMode::Smart.signal(), Signal::SIGTERM);
        assert_eq!(StopMode::Fast.signal(), Signal::SIGINT);
        assert_eq!(StopMode::Immediate.signal(), Signal::SIGQUIT);
    }

    #[test]
    fn log_file_sits_next_to_the_data_dir() {
        let n = node("/tmp/cluster/node1");
        assert_eq!(n.log_file(), Path::new("/tmp/cluster/node1.log"));
        assert_eq!(n.port(), 6000);
        assert_eq!(n.host(), "127.0.0.1");
        assert_eq!(
            n.dsn("app", "appdb"),
            "host=127.0.0.1 port=6000 user=app dbname=appdb"
        );
        let rel = node("rel/node2");
        assert!(rel.data_dir().is_absolute());
        assert!(rel.data_dir().ends_with("rel/node2"));
    }

    #[tokio::test]
    async fn host_maps_wildcards_to_loopback() {
        let n = node("/tmp/c/n");
        for (listen, host) in [
            ("*", "127.0.0.1"),
            ("0.0.0.0", "127.0.0.1"),
            ("::", "::1"),
            ("10.0.0.5, 127.0.0.1", "10.0.0.5"),
        ] {
            n.update_settings(|s| s.listen_addresses = listen.into())
                .await
                .ok();
            assert_eq!(n.host(), host, "{listen}");
        }
    }

    #[tokio::test]
    async fn a_node_that_never_started_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path().join("data").to_str().unwrap());
        assert!(!n.is_running());
        assert!(matches!(
            n.postmaster_pid().await,
            Err(PgError::NotRunning { .. })
        ));
        assert!(matches!(n.kill9().await, Err(PgError::NotRunning { .. })));
        assert!(matches!(
            n.stop(StopMode::Fast).await,
            Err(PgError::NotRunning { .. })
        ));
        assert_eq!(n.log_tail(10).await, "");
    }
}
