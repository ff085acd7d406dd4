//! etcd (Debian's `etcd-server`, 3.4) on loopback ports for a local cluster or a
//! test: one member, or several forming one cluster, as production runs (three).
//! Killed (by PID) when dropped.
//!
//! Faults: [`Etcd::pause`] freezes every member (SIGSTOP: connections hang, nothing
//! is answered, quorum is gone) and [`Etcd::resume`] thaws them; with several
//! members, [`Etcd::kill_member`] kills one (`kill -9`) and [`Etcd::restart_member`]
//! starts it again on its ports and data, where it rejoins the others.

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

/// One member: how to start it, and its process while it runs.
struct Member {
    name: String,
    client_url: String,
    args: Vec<String>,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Member {
    fn spawn(&mut self) -> anyhow::Result<()> {
        self.proc = Some(Proc::spawn(
            &self.name,
            &etcd_program(),
            &self.args,
            &[],
            &self.log,
        )?);
        Ok(())
    }
}

/// A running etcd cluster of one or more members.
pub struct Etcd {
    members: Vec<Member>,
}

impl Etcd {
    /// Starts a single member with its data in `dir/etcd` and its log in
    /// `dir/logs/etcd.log`, and waits until it answers.
    pub async fn start(dir: &Path) -> anyhow::Result<Etcd> {
        Etcd::start_members(dir, 1).await
    }

    /// Starts `n` members forming one cluster (data in `dir/etcd` for one member,
    /// `dir/etcd-<i>` for several; logs in `dir/logs/`), and waits until a write
    /// through every member's client URL succeeds.
    pub async fn start_members(dir: &Path, n: usize) -> anyhow::Result<Etcd> {
        anyhow::ensure!(n >= 1, "an etcd cluster needs a member");
        let program = etcd_program();
        anyhow::ensure!(
            program.exists(),
            "{} not found: install Debian's etcd-server (integration/run-tests.sh does)",
            program.display()
        );
        let ports = free_ports(2 * n)?;
        let name = |i: usize| format!("etcd-{}", i + 1);
        let peer_url = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let initial_cluster: Vec<String> = (0..n)
            .map(|i| format!("{}={}", name(i), peer_url(i)))
            .collect();
        let mut members = Vec::new();
        for i in 0..n {
            let client_url = format!("http://127.0.0.1:{}", ports[2 * i]);
            let (data, log) = if n == 1 {
                (dir.join("etcd"), dir.join("logs/etcd.log"))
            } else {
                (
                    dir.join(format!("etcd-{}", i + 1)),
                    dir.join(format!("logs/etcd-{}.log", i + 1)),
                )
            };
            let args: Vec<String> = [
                "--name",
                &name(i),
                "--data-dir",
                &data.to_string_lossy(),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url(i),
                "--initial-advertise-peer-urls",
                &peer_url(i),
                "--initial-cluster",
                &initial_cluster.join(","),
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut member = Member {
                name: name(i),
                client_url,
                args,
                log,
                proc: None,
            };
            member.spawn()?;
            members.push(member);
        }
        let etcd = Etcd { members };
        for i in 0..n {
            etcd.wait_member(i, Duration::from_secs(30)).await?;
        }
        Ok(etcd)
    }

    /// Waits until a write through member `i` succeeds (it is up and the cluster
    /// has a quorum).
    pub async fn wait_member(&self, i: usize, within: Duration) -> anyhow::Result<()> {
        let m = self.member(i)?;
        let url = m.client_url.clone();
        eventually(within, &format!("{} to answer", m.name), || {
            let url = url.clone();
            async move {
                let mut client = etcd_client::Client::connect([url.as_str()], None).await?;
                client.put("/meridian-probe", "", None).await?;
                Ok(())
            }
        })
        .await
        .with_context(|| format!("{} log:\n{}", m.name, self.member_log_tail(i, 20)))
    }

    fn member(&self, i: usize) -> anyhow::Result<&Member> {
        self.members
            .get(i)
            .with_context(|| format!("etcd has {} members, not {}", self.members.len(), i + 1))
    }

    /// How many members the cluster has.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// The first member's `http://127.0.0.1:PORT`.
    pub fn client_url(&self) -> &str {
        &self.members[0].client_url
    }

    /// Every member's client URL, comma-separated (the programs' `--etcd`).
    pub fn client_urls(&self) -> String {
        self.endpoints().join(",")
    }

    /// The first member's `127.0.0.1:PORT`.
    pub fn client_addr(&self) -> &str {
        self.client_url().trim_start_matches("http://")
    }

    /// Every member's `127.0.0.1:PORT`, in member order.
    pub fn client_addrs(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.client_url.trim_start_matches("http://").to_owned())
            .collect()
    }

    /// The client endpoints, as a list for `etcd_client::Client::connect`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The first member's PID (0 when it is not running).
    pub fn pid(&self) -> u32 {
        self.members[0].proc.as_ref().map_or(0, Proc::pid)
    }

    /// The last `lines` lines of the first member's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.member_log_tail(0, lines)
    }

    fn member_log_tail(&self, i: usize, lines: usize) -> String {
        self.members
            .get(i)
            .map(|m| crate::process::tail(&m.log, lines))
            .unwrap_or_default()
    }

    /// Freezes every member (SIGSTOP): connections hang, nothing is answered.
    pub fn pause(&self) {
        for p in self.members.iter().filter_map(|m| m.proc.as_ref()) {
            signal(p.pid(), Signal::SIGSTOP);
        }
    }

    /// Continues every paused member (SIGCONT).
    pub fn resume(&self) {
        for p in self.members.iter().filter_map(|m| m.proc.as_ref()) {
            signal(p.pid(), Signal::SIGCONT);
        }
    }

    /// `kill -9` of member `i` (its data stays for [`Etcd::restart_member`]).
    pub async fn kill_member(&mut self, i: usize) -> anyhow::Result<()> {
        self.member(i)?;
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill9().await;
        }
        Ok(())
    }

    /// Starts member `i` again on its ports and data directory (it rejoins the
    /// cluster), without waiting: with a majority down it cannot answer yet.
    pub fn restart_member(&mut self, i: usize) -> anyhow::Result<()> {
        self.member(i)?;
        let m = &mut self.members[i];
        anyhow::ensure!(m.proc.is_none(), "{} is running", m.name);
        m.spawn()
    }

    /// A client of every member.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect(self.endpoints(), None).await?)
    }

    pub async fn stop(&mut self) {
        for p in self.members.iter_mut().filter_map(|m| m.proc.as_mut()) {
            p.terminate(Duration::from_secs(5)).await;
        }
    }
}
