//! One `redis-server` per region of a local cluster (the region's cache and
//! invalidation target; its agent gets `--redis`). No persistence
//! (`--save "" --appendonly no`), its own directory under the cluster dir,
//! loopback only. It can be stopped and started again on the same port, so a
//! test can take a region's Redis away and bring it back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ports::free_port;
use crate::process::Proc;
use crate::wait::eventually;

/// How long a started `redis-server` may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The redis-server program: `MERIDIAN_REDIS_BIN`, else `/usr/bin/redis-server`.
pub fn redis_program() -> PathBuf {
    std::env::var_os("MERIDIAN_REDIS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"))
}

/// A region's Redis.
pub struct RedisServer {
    pub region: String,
    pub port: u16,
    dir: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl RedisServer {
    /// Starts the region's Redis on a free loopback port with its data in
    /// `cluster_dir/redis/<region>` and its log in `logs/redis-<region>.log`, and
    /// waits until it answers `PING`. A port taken in between is retried.
    pub async fn start(cluster_dir: &Path, logs: &Path, region: &str) -> anyhow::Result<Self> {
        let program = redis_program();
        anyhow::ensure!(
            program.exists(),
            "{} not found: install Debian's redis-server (integration/run-tests.sh does), \
             or start without Redis (--no-redis / ClusterSpec.redis = false)",
            program.display()
        );
        let dir = cluster_dir.join("redis").join(region);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut last = None;
        for _ in 0..3 {
            let mut server = RedisServer {
                region: region.to_owned(),
                port: free_port()?,
                dir: dir.clone(),
                log: logs.join(format!("redis-{region}.log")),
                proc: None,
            };
            match server.start_again().await {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    /// Starts the stopped server again on the same port; waits for `PING`.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.proc.is_none(),
            "the Redis of {} is running",
            self.region
        );
        let args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &self.dir.to_string_lossy(),
            "--daemonize",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut proc = Proc::spawn(
            &format!("redis-{}", self.region),
            &redis_program(),
            &args,
            &[],
            &self.log,
        )?;
        let addr = self.addr();
        let ready = eventually(
            READY_TIMEOUT,
            &format!("redis of {} to answer PING", self.region),
            || {
                let addr = addr.clone();
                async move { ping(&addr).await }
            },
        )
        .await;
        if let Err(e) = ready {
            proc.kill9().await;
            return Err(e.context(format!("redis log:\n{}", proc.log_tail(20))));
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT` (the agents' `--redis`).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// SIGTERM (SIGKILL after 5 s) to its PID; a no-op when stopped.
    pub async fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.terminate(Duration::from_secs(5)).await;
        }
    }
}

/// One `PING` over raw RESP; Ok when the answer is `+PONG`.
pub async fn ping(addr: &str) -> anyhow::Result<()> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await?;
        anyhow::ensure!(
            &buf == b"+PONG\r\n",
            "answered {:?}",
            String::from_utf8_lossy(&buf)
        );
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("PING to {addr} timed out"))?
        .with_context(|| format!("PING to {addr}"))
}
