//! A real PostgreSQL primary with streaming replicas on loopback, for tests.
//!
//! `PgCluster::builder().replicas(1).start().await?` runs `initdb` for the
//! primary, clones each replica with `pg_basebackup` through its own physical
//! slot, starts everything on fresh ports in a fresh temp dir and waits until
//! every node answers `SELECT 1` (a primary and one replica take a few seconds:
//! `fsync` is off by default). Nodes are [`PgNode`]s from the agent, so tests
//! can kill, stop, restart and promote them.
//!
//! On drop every postmaster is killed (SIGKILL, with its children, by pid) and
//! the temp dir removed. When the drop happens during a panic (a failing test)
//! the tail of each node's log is printed first; with `MERIDIAN_KEEP_TEST_DIRS=1`
//! the directory is kept as well. `MERIDIAN_PG_BIN_DIR` overrides where the
//! server programs are found. Limits: one host, TCP on 127.0.0.1 only, trust
//! authentication from loopback plus whatever HBA lines the test adds.
//!
//! `.tls(cert, key)` turns on `ssl` on every node with that PEM pair (copied
//! into the cluster's dir, owned by the server's OS user, key mode 0600); the
//! default trust lines stay `host` lines, so clients may still connect in
//! plaintext unless the test adds `hostnossl ... reject` lines with `.hba`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_agent::postgres::config::trust_loopback_hba;
use meridian_agent::postgres::{
    basebackup, wait_replay, Conninfo, Lsn, OsUser, PgBinaries, PgError, PgNode, PgNodeSpec,
};

use crate::ports::free_port;

/// How often a start that lost its port to another process is retried.
const PORT_ATTEMPTS: usize = 4;

/// Settings for [`PgCluster`]; see [`PgCluster::builder`].
#[derive(Clone, Debug)]
pub struct PgClusterBuilder {
    replicas: usize,
    fsync: bool,
    hba: Vec<String>,
    settings: Vec<(String, String)>,
    slots: bool,
    bin_dir: Option<PathBuf>,
    os_user: String,
    ready_timeout: Duration,
    tls: Option<(PathBuf, PathBuf)>,
}

impl Default for PgClusterBuilder {
    fn default() -> Self {
        PgClusterBuilder {
            replicas: 1,
            fsync: false,
            hba: Vec::new(),
            settings: Vec::new(),
            slots: true,
            bin_dir: std::env::var_os("MERIDIAN_PG_BIN_DIR").map(PathBuf::from),
            os_user: "postgres".into(),
            ready_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

impl PgClusterBuilder {
    /// Number of streaming replicas (default 1).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// `fsync` on every node (default off: fast, and still safe against a
    /// crash of PostgreSQL itself).
    pub fn fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    /// `pg_hba.conf` lines placed before the default loopback trust lines,
    /// e.g. `host all app 127.0.0.1/32 scram-sha-256` to make user `app`
    /// authenticate with a password.
    pub fn hba<I, S>(mut self, extra_lines: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.hba.extend(extra_lines.into_iter().map(Into::into));
        self
    }

    /// A further `postgresql.conf` setting on every node.
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Whether each replica streams through a physical slot (default true).
    pub fn slots(mut self, on: bool) -> Self {
        self.slots = on;
        self
    }

    /// The directory of the PostgreSQL server programs (default: discovered).
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// The OS user PostgreSQL runs as when we are root (default `postgres`,
    /// created if missing).
    pub fn os_user(mut self, name: &str) -> Self {
        self.os_user = name.into();
        self
    }

    /// How long each node may take to accept connections (default 60 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// `ssl = on` on every node, serving the PEM certificate (chain) `cert`
    /// with the private key `key` (default: no TLS).
    pub fn tls(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls = Some((cert.into(), key.into()));
        self
    }

    /// Copies the TLS files into `dir` where the server's OS user can read
    /// them (PostgreSQL refuses a key readable by others) and adds the settings.
    fn install_tls(&mut self, dir: &Path, user: &OsUser) -> anyhow::Result<()> {
        let Some((cert, key)) = self.tls.clone() else {
            return Ok(());
        };
        let cert_to = dir.join("server.crt");
        let key_to = dir.join("server.key");
        std::fs::copy(&cert, &cert_to)
            .with_context(|| format!("copying {} into the cluster", cert.display()))?;
        std::fs::copy(&key, &key_to)
            .with_context(|| format!("copying {} into the cluster", key.display()))?;
        std::fs::set_permissions(&key_to, std::fs::Permissions::from_mode(0o600))
            .context("chmod 0600 on the server key")?;
        for f in [&cert_to, &key_to] {
            user.chown(f)?;
        }
        self.settings.push(("ssl".into(), "on".into()));
        self.settings
            .push(("ssl_cert_file".into(), cert_to.display().to_string()));
        self.settings
            .push(("ssl_key_file".into(), key_to.display().to_string()));
        Ok(())
    }

    fn spec(&self, dir: &Path, name: &str) -> anyhow::Result<PgNodeSpec> {
        let mut spec = PgNodeSpec::new(name, dir.join(name), free_port()?);
        spec.settings.fsync = self.fsync;
        spec.settings.extra = self.settings.clone();
        spec.hba = self
            .hba
            .iter()
            .cloned()
            .chain(trust_loopback_hba())
            .collect();
        Ok(spec)
    }

    /// Creates, starts and waits for the primary and the replicas.
    pub async fn start(mut self) -> anyhow::Result<PgCluster> {
        let started = Instant::now();
        let bins = PgBinaries::discover(self.bin_dir.clone())?;
        let user = OsUser::ensure(&self.os_user).await?;
        let dir = tempfile::Builder::new()
            .prefix("meridian-pg-")
            .tempdir()
            .context("creating the cluster's temp dir")?;
        // The OS user PostgreSQL runs as must reach the data dirs inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .context("chmod 0755 on the cluster's temp dir")?;
        self.install_tls(dir.path(), &user)?;

        let primary = PgNode::new(bins.clone(), user.clone(), self.spec(dir.path(), "node0")?);
        let mut cluster = PgCluster {
            builder: self,
            primary,
            replicas: Vec::new(),
            bins,
            user,
            dir: Some(dir),
        };
        cluster
            .primary
            .initdb()
            .await
            .context("initdb of the primary")?;
        start_on_a_free_port(&cluster.primary, cluster.builder.ready_timeout)
            .await
            .context("starting the primary")?;
        for _ in 0..cluster.builder.replicas {
            cluster.clone_replica().await?;
        }
        let timeout = cluster.builder.ready_timeout;
        futures::future::try_join_all(
            cluster
                .replicas
                .iter()
                .map(|r| start_on_a_free_port(r, timeout)),
        )
        .await
        .context("starting the replicas")?;
        tracing::info!(
            replicas = cluster.replicas.len(),
            dir = %cluster.dir().display(),
            elapsed = ?started.elapsed(),
            "PostgreSQL cluster up"
        );
        Ok(cluster)
    }
}

/// Starts `node` and waits until it is ready; when the postmaster exits because
/// its port was taken meanwhile, retries on a fresh port.
async fn start_on_a_free_port(node: &PgNode, timeout: Duration) -> anyhow::Result<()> {
    for attempt in 1..=PORT_ATTEMPTS {
        node.start().await?;
        match node.wait_ready(timeout).await {
            Ok(()) => return Ok(()),
            Err(PgError::Exited { ref log_tail, .. })
                if attempt < PORT_ATTEMPTS
                    && (log_tail.contains("could not bind")
                        || log_tail.contains("Address already in use")) =>
            {
                let port = free_port()?;
                tracing::warn!(node = node.name(), port, "port taken; retrying on another");
                node.update_settings(|s| s.port = port).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("node {} found no free port", node.name())
}

/// A running primary and its streaming replicas; everything is killed and
/// removed on drop.
#[derive(Debug)]
pub struct PgCluster {
    builder: PgClusterBuilder,
    primary: PgNode,
    replicas: Vec<PgNode>,
    bins: PgBinaries,
    user: OsUser,
    /// `None` only once kept for post-mortem (see the module docs).
    dir: Option<tempfile::TempDir>,
}

impl PgCluster {
    /// A builder: one replica, fsync off, loopback trust, slots on.
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    /// The primary (`node0`).
    pub fn primary(&self) -> &PgNode {
        &self.primary
    }

    /// The replicas (`node1`, `node2`, ...), in creation order.
    pub fn replicas(&self) -> &[PgNode] {
        &self.replicas
    }

    /// The primary, then the replicas.
    pub fn nodes(&self) -> impl Iterator<Item = &PgNode> {
        std::iter::once(&self.primary).chain(self.replicas.iter())
    }

    /// The cluster's directory (data dirs and logs).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }

    /// The server programs in use (e.g. for `pgbench`: `binaries().path("pgbench")`).
    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }

    /// The OS user PostgreSQL runs as.
    pub fn os_user(&self) -> &OsUser {
        &self.user
    }

    async fn clone_replica(&mut self) -> anyhow::Result<()> {
        let name = format!("node{}", self.replicas.len() + 1);
        let replica = PgNode::new(
            self.bins.clone(),
            self.user.clone(),
            self.builder.spec(self.dir(), &name)?,
        );
        let from = Conninfo::new(&self.primary.host(), self.primary.port(), "postgres", None);
        let slot = self.builder.slots.then_some(name.as_str());
        basebackup(&from, slot, &replica)
            .await
            .with_context(|| format!("cloning {name} from the primary"))?;
        self.replicas.push(replica);
        Ok(())
    }

    /// Clones, starts and returns one more replica of the primary.
    pub async fn add_replica(&mut self) -> anyhow::Result<&PgNode> {
        self.clone_replica().await?;
        let timeout = self.builder.ready_timeout;
        let replica = self
            .replicas
            .last()
            .context("the replica just cloned is missing")?;
        start_on_a_free_port(replica, timeout).await?;
        Ok(replica)
    }

    /// Waits until every running replica has replayed everything committed on
    /// the primary so far; returns that position.
    pub async fn wait_replicas_caught_up(&self, timeout: Duration) -> anyhow::Result<Lsn> {
        let target = self.primary.current_wal_insert_lsn().await?;
        for r in self.replicas.iter().filter(|r| r.is_running()) {
            wait_replay(r, target, timeout).await?;
        }
        Ok(target)
    }

    /// The last `lines` lines of every node's log, each under a header.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for node in self.nodes() {
            let text = std::fs::read_to_string(node.log_file()).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "----- {} (port {}, {}) -----\n",
                node.name(),
                node.port(),
                node.log_file().display()
            ));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "PostgreSQL cluster in {} at the failure:\n{}",
                self.dir().display(),
                self.log_tails(40)
            );
            if std::env::var_os("MERIDIAN_KEEP_TEST_DIRS").is_some() {
                if let Some(dir) = self.dir.take() {
                    eprintln!("kept {}", dir.keep().display());
                }
            }
        }
        // The nodes (dropped right after this) kill their postmasters before
        // the temp dir is removed: fields drop in declaration order.
    }
}
