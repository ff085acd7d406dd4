//! A single-member etcd (Debian's `etcd-server`, 3.4) on loopback ports, for a
//! local cluster or a test. Killed (by PID) when dropped; tests can freeze it
//! with [`Etcd::pause`] (SIGSTOP: connections hang, nothing is answered) and
//! [`Etcd::resume`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::Signal;

use crate::ports::free_ports;
use crate::process::{signal, Proc};
use crate::wait::eventually;

/// The etcd program: `MERIDIAN_ETCD_BIN`, else `/usr/bin/etcd`.
pub fn etcd_program() -> PathBuf {
    std::env::var_os("MERIDIAN_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// A running etcd member.
pub struct Etcd {
    proc: Proc,
    client_url: String,
}

impl Etcd {
    /// Starts etcd with its data in `dir/etcd` and its log in `dir/logs/etcd.log`,
    /// and waits until it answers.
    pub async fn start(dir: &Path) -> anyhow::Result<Etcd> {
        let program = etcd_program();
        anyhow::ensure!(
            program.exists(),
            "{} not found: install Debian's etcd-server (integration/run-tests.sh does)",
            program.display()
        );
        let ports = free_ports(2)?;
        let client_url = format!("http://127.0.0.1:{}", ports[0]);
        let peer_url = format!("http://127.0.0.1:{}", ports[1]);
        let data = dir.join("etcd");
        let args: Vec<String> = [
            "--name",
            "etcd-1",
            "--data-dir",
            &data.to_string_lossy(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("etcd-1={peer_url}"),
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::spawn("etcd", &program, &args, &[], &dir.join("logs/etcd.log"))?;
        let etcd = Etcd { proc, client_url };
        let url = etcd.client_url.clone();
        eventually(Duration::from_secs(20), "etcd to answer", || {
            let url = url.clone();
            async move {
                let mut client = etcd_client::Client::connect([url.as_str()], None).await?;
                client.get("/meridian-probe", None).await?;
                Ok(())
            }
        })
        .await
        .with_context(|| format!("etcd log:\n{}", etcd.proc.log_tail(20)))?;
        Ok(etcd)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// `127.0.0.1:PORT`.
    pub fn client_addr(&self) -> &str {
        self.client_url.trim_start_matches("http://")
    }

    /// The client endpoints, as a list for `etcd_client::Client::connect`.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url.clone()]
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The last `lines` lines of etcd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    /// Freezes the process (SIGSTOP): connections hang, nothing is answered.
    pub fn pause(&self) {
        signal(self.proc.pid(), Signal::SIGSTOP);
    }

    /// Continues a paused process (SIGCONT).
    pub fn resume(&self) {
        signal(self.proc.pid(), Signal::SIGCONT);
    }

    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.client_url.as_str()], None).await?)
    }

    pub async fn stop(&mut self) {
        self.proc.terminate(Duration::from_secs(5)).await;
    }
}
