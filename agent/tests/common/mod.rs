//! The agent end-to-end tests' harness: free ports, spawned processes killed on
//! drop, a real etcd, and a tiny in-test QUIC coordinator that records what the
//! agents send and sends them commands.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub use std::collections::HashMap;
pub use std::os::unix::fs::PermissionsExt;
pub use std::path::{Path, PathBuf};
pub use std::process::{Child, Command, Stdio};
pub use std::sync::{Arc, Mutex};
pub use std::time::{Duration, Instant};

pub use meridian_shared::envelope::{self, AckResult, AgentMsg, CoordMsg, FrameDecoder, Heartbeat};
pub use meridian_shared::epoch::Epoch;
pub use meridian_shared::keys::Keys;
pub use meridian_shared::lsn::Lsn;
pub use meridian_shared::pki::{self, PkiPaths};
pub use meridian_shared::records::{
    self, CoordinatorRecord, LeaderRecord, LeaderState, MemberRecord, Role,
};
pub use nix::sys::signal::{kill, Signal};
pub use nix::unistd::Pid;
pub use tokio::sync::mpsc;

pub const CLUSTER: &str = "t";

pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range: no port-0 bind or outgoing
    // connection can take it before the server binds it.
    meridian_launcher::ports::free_port().unwrap()
}

pub fn pid_alive(pid: i32) -> bool {
    // A zombie counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    pid_alive(pid).then_some(pid)
}

/// Waits until `f` returns `Some`, polling every 50 ms, up to `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process killed by pid when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    pub data_dir: Option<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("----- {} log (tail) -----", self.name);
            for l in &lines[lines.len().saturating_sub(80)..] {
                eprintln!("{l}");
            }
            if let Some(dir) = &self.data_dir {
                let pglog = dir.with_extension("log");
                let pg = std::fs::read_to_string(&pglog).unwrap_or_default();
                let lines: Vec<&str> = pg.lines().collect();
                eprintln!("----- {} postgres log (tail) -----", self.name);
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
        if matches!(self.child.try_wait(), Ok(None))
            && self.terminate(Duration::from_secs(15)).is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(pid) = self.data_dir.as_deref().and_then(postmaster_pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf, data_dir: Option<PathBuf>) -> Proc {
    let out = std::fs::File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
    Proc {
        name: name.to_owned(),
        child,
        log,
        data_dir,
    }
}

pub async fn start_etcd(dir: &Path) -> (Proc, String) {
    let client = free_port();
    let peer = free_port();
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let proc = spawn(
        "etcd",
        Command::new("/usr/bin/etcd")
            .arg("--name=t")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=t={peer_url}")),
        dir.join("etcd.log"),
        None,
    );
    let u = url.clone();
    eventually("etcd to answer", Duration::from_secs(20), || {
        let u = u.clone();
        async move {
            let mut c = etcd_client::Client::connect([u], None).await.ok()?;
            c.get("x", None).await.ok().map(|_| ())
        }
    })
    .await;
    (proc, url)
}

#[derive(Default)]
pub struct CoordState {
    pub sessions: HashMap<String, mpsc::UnboundedSender<CoordMsg>>,
    pub hellos: Vec<(String, Epoch)>,
    pub heartbeats: HashMap<String, (Instant, Heartbeat)>,
    pub acks: HashMap<u64, AckResult>,
    pub changes: Vec<(String, u64, Vec<String>, Lsn)>,
}

/// A minimal coordinator: accepts agents, records what they send, sends commands.
pub struct FakeCoordinator {
    pub state: Arc<Mutex<CoordState>>,
    pub _endpoint: quinn::Endpoint,
    pub next_id: u64,
}

impl FakeCoordinator {
    pub async fn start(
        pki_dir: &Path,
        etcd: &mut etcd_client::Client,
        keys: &Keys,
    ) -> FakeCoordinator {
        let cfg =
            pki::quic_server_config(&PkiPaths::in_dir(pki_dir, "coord"), Duration::from_secs(3))
                .unwrap();
        let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let state = Arc::new(Mutex::new(CoordState::default()));
        let ep = endpoint.clone();
        let st = state.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                        return;
                    };
                    let (tx, mut rx) = mpsc::unbounded_channel::<CoordMsg>();
                    tokio::spawn(async move {
                        while let Some(msg) = rx.recv().await {
                            if send
                                .write_all(&envelope::encode(&msg).unwrap())
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    });
                    let mut dec = FrameDecoder::default();
                    let mut buf = vec![0u8; 16384];
                    let mut node = None;
                    while let Ok(Some(n)) = recv.read(&mut buf).await {
                        dec.feed(&buf[..n]);
                        while let Ok(Some(msg)) = dec.next_message::<AgentMsg>() {
                            let mut s = st.lock().unwrap();
                            match msg {
                                AgentMsg::Hello {
                                    node: name,
                                    epoch_seen,
                                    ..
                                } => {
                                    s.sessions.insert(name.clone(), tx.clone());
                                    s.hellos.push((name.clone(), epoch_seen));
                                    node = Some(name);
                                }
                                AgentMsg::Heartbeat(hb) => {
                                    assert_eq!(
                                        Some(&hb.node),
                                        node.as_ref(),
                                        "heartbeat before hello"
                                    );
                                    s.heartbeats.insert(hb.node.clone(), (Instant::now(), hb));
                                }
                                AgentMsg::Ack { id, result } => {
                                    s.acks.insert(id, result);
                                }
                                AgentMsg::Changes {
                                    batch_id,
                                    tables,
                                    commit_lsn,
                                } => {
                                    let from = node.clone().unwrap_or_default();
                                    s.changes.push((from, batch_id, tables, commit_lsn));
                                }
                            }
                        }
                    }
                });
            }
        });
        // Proclaim ourselves in the election, as the active coordinator does.
        let lease = etcd.lease_grant(600, None).await.unwrap().id();
        let record = CoordinatorRecord {
            name: "coord".into(),
            admin_addr: "127.0.0.1:1".into(),
            quic_addr: addr.to_string(),
            quic_addrs: Default::default(),
        };
        etcd.campaign(
            keys.coordinator_election(),
            records::encode("coordinator", &record).unwrap(),
            lease,
        )
        .await
        .unwrap();
        FakeCoordinator {
            state,
            _endpoint: endpoint,
            next_id: 100,
        }
    }

    pub fn heartbeat(&self, node: &str) -> Option<Heartbeat> {
        self.state
            .lock()
            .unwrap()
            .heartbeats
            .get(node)
            .map(|(_, hb)| hb.clone())
    }

    /// Sends `msg` once to `node`'s session.
    pub fn send(&self, node: &str, msg: CoordMsg) {
        let s = self.state.lock().unwrap();
        s.sessions
            .get(node)
            .expect("agent connected")
            .send(msg)
            .unwrap();
    }

    /// A heartbeat of `node` received after `after` satisfying `ok`.
    pub async fn wait_heartbeat(
        &self,
        node: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Heartbeat) -> bool,
    ) -> Heartbeat {
        let after = Instant::now();
        let state = self.state.clone();
        eventually(&format!("{node}: {what}"), timeout, || {
            let hb = state
                .lock()
                .unwrap()
                .heartbeats
                .get(node)
                .filter(|(at, hb)| *at >= after && ok(hb))
                .map(|(_, hb)| hb.clone());
            async move { hb }
        })
        .await
    }

    /// Sends a command (re-sent every 2 s like a coordinator) and waits for its ack.
    pub async fn command(
        &mut self,
        node: &str,
        make: impl Fn(u64) -> CoordMsg,
        timeout: Duration,
    ) -> AckResult {
        self.next_id += 1;
        let id = self.next_id;
        let msg = make(id);
        let deadline = Instant::now() + timeout;
        let mut last_sent: Option<Instant> = None;
        loop {
            {
                let mut s = self.state.lock().unwrap();
                if let Some(r) = s.acks.remove(&id) {
                    return r;
                }
                if last_sent.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
                    if let Some(tx) = s.sessions.get(node) {
                        let _ = tx.send(msg.clone());
                        last_sent = Some(Instant::now());
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no ack from {node} for {msg:?} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub etcd_url: String,
    pub pki_dir: PathBuf,
}

impl Env {
    pub fn agent(
        &self,
        name: &str,
        region: &str,
        bootstrap: bool,
        redis: Option<&str>,
    ) -> (Proc, u16, PathBuf, u16) {
        let port = free_port();
        let http = free_port();
        let data_dir = self.dir.path().join(name);
        let p = PkiPaths::in_dir(&self.pki_dir, name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meridian-agent"));
        cmd.env("RUST_LOG", "info,meridian_agent=debug")
            .args(["--name", name, "--region", region, "--cluster", CLUSTER])
            .args(["--etcd", &self.etcd_url])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--pg-port", &port.to_string()])
            .arg("--ca")
            .arg(&p.ca)
            .arg("--cert")
            .arg(&p.cert)
            .arg("--key")
            .arg(&p.key)
            .args(["--pg-setting", "fsync=off"])
            .args(["--http-listen", &format!("127.0.0.1:{http}")]);
        if bootstrap {
            cmd.arg("--bootstrap");
        }
        if let Some(url) = redis {
            cmd.args(["--redis", url]);
        }
        let proc = spawn(
            name,
            &mut cmd,
            self.dir.path().join(format!("agent-{name}.log")),
            Some(data_dir.clone()),
        );
        (proc, port, data_dir, http)
    }
}

pub async fn pg(port: u16) -> Option<tokio_postgres::Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

pub async fn member(
    etcd: &mut etcd_client::Client,
    keys: &Keys,
    node: &str,
) -> Option<(MemberRecord, i64)> {
    let resp = etcd.get(keys.member(node), None).await.ok()?;
    let kv = resp.kvs().first()?;
    Some((records::decode("member", kv.value()).ok()?, kv.lease()))
}

pub async fn put_leader(
    etcd: &mut etcd_client::Client,
    keys: &Keys,
    node: &str,
    port: u16,
    epoch: u64,
    timeline: u32,
) {
    let leader = LeaderRecord {
        node: node.into(),
        region: format!("region-{node}"),
        pg_addr: format!("127.0.0.1:{port}"),
        epoch: Epoch(epoch),
        timeline,
        state: LeaderState::Serving,
        since: 0,
        candidate: None,
    };
    etcd.put(keys.epoch(), epoch.to_string(), None)
        .await
        .unwrap();
    etcd.put(
        keys.leader(),
        records::encode("leader", &leader).unwrap(),
        None,
    )
    .await
    .unwrap();
}
