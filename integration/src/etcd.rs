//! A throwaway single-member etcd for tests.
//!
//! `EtcdServer::start().await?` runs `/usr/bin/etcd` (or `MERIDIAN_ETCD_BIN`)
//! with a fresh temp data dir and free loopback ports, and returns once a real
//! client request (a `get`) succeeds, within a deadline. The process is killed
//! by its PID (SIGKILL) and the directory removed on drop; when the drop
//! happens during a panic, the tail of etcd's log is printed first.
//! [`pause`](EtcdServer::pause)/[`resume`](EtcdServer::resume) (SIGSTOP/SIGCONT)
//! and [`kill`](EtcdServer::kill) inject failures. The client type is
//! `meridian_pgproxy::etcd_client`, the same crate the proxy uses.
//!
//! Limits: one member, plain HTTP, loopback only.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use meridian_pgproxy::etcd_client::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{eventually, free_ports};

/// How long etcd may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running etcd on loopback; killed and removed on drop.
pub struct EtcdServer {
    child: Option<Child>,
    client_url: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> anyhow::Result<EtcdServer> {
        let program = std::env::var_os("MERIDIAN_ETCD_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
        anyhow::ensure!(
            program.exists(),
            "{} not found (install Debian's etcd-server or set MERIDIAN_ETCD_BIN)",
            program.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("meridian-etcd-")
            .tempdir()
            .context("creating etcd's temp dir")?;
        let ports = free_ports(2)?;
        let client_url = format!("http://127.0.0.1:{}", ports[0]);
        let peer_url = format!("http://127.0.0.1:{}", ports[1]);
        let log = dir.path().join("etcd.log");
        let log_file = std::fs::File::create(&log).context("creating etcd.log")?;
        let child = Command::new(&program)
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("etcd.log")?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawning {}", program.display()))?;
        let server = EtcdServer {
            child: Some(child),
            client_url,
            log,
            dir,
        };
        let url = server.client_url.clone();
        eventually(READY_TIMEOUT, "etcd to answer a get", || {
            let url = url.clone();
            async move {
                let mut c = Client::connect([url.as_str()], None).await?;
                c.get("/meridian-probe", None).await?;
                Ok(())
            }
        })
        .await
        .with_context(|| format!("etcd log:\n{}", server.log_tail(20)))?;
        Ok(server)
    }

    /// The client endpoints (`http://127.0.0.1:PORT`).
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url.clone()]
    }

    /// The process id (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A new client connected to this server.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect([self.client_url.as_str()], None).await?)
    }

    /// Stops the process (SIGSTOP): connections hang, nothing is answered.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// Continues a paused process (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Kills the process (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// The last `lines` lines of etcd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = i32::try_from(self.pid()).context("etcd pid")?;
        anyhow::ensure!(pid > 0, "etcd is not running");
        kill(Pid::from_raw(pid), sig).with_context(|| format!("sending {sig} to etcd"))?;
        Ok(())
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "etcd in {} at the failure:\n{}",
                self.dir.path().display(),
                self.log_tail(30)
            );
        }
        self.kill();
    }
}
