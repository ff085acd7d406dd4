//! A throwaway single-member etcd for tests: the launcher's [`Etcd`] (free
//! loopback ports, ready once a real `get` succeeds) in a temp directory of its
//! own, removed on drop after the process is killed by its PID. When the drop
//! happens during a panic, the tail of etcd's log is printed first.
//! [`pause`](Etcd::pause)/[`resume`](Etcd::resume) (SIGSTOP/SIGCONT) inject
//! failures.
//!
//! Limits: one member, plain HTTP, loopback only.

use std::ops::Deref;

use anyhow::Context;
use meridian_launcher::etcd::Etcd;

/// A running etcd on loopback with its own temp directory; see [`Etcd`] for
/// what it can do.
pub struct EtcdServer {
    etcd: Etcd,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> anyhow::Result<EtcdServer> {
        let dir = tempfile::Builder::new()
            .prefix("meridian-etcd-")
            .tempdir()
            .context("creating etcd's temp dir")?;
        let etcd = Etcd::start(dir.path()).await?;
        Ok(EtcdServer { etcd, dir })
    }
}

impl Deref for EtcdServer {
    type Target = Etcd;

    fn deref(&self) -> &Etcd {
        &self.etcd
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "etcd in {} at the failure:\n{}",
                self.dir.path().display(),
                self.etcd.log_tail(30)
            );
        }
    }
}
