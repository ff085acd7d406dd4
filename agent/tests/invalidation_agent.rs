//! End-to-end test of invalidation in the `meridian-agent` binary (issue 4),
//! with real etcd, PostgreSQL 15, redis-server and a tiny in-test QUIC
//! coordinator (the harness of `agent_daemon.rs`).
//!
//! Scenario: node1 bootstraps as primary with `--redis`; a committed INSERT
//! arrives at the coordinator as `Changes` naming its table; the logical slot is
//! not confirmed past it until the coordinator's `Ack { batch_id }`, then it is;
//! `Invalidate` raises the table's watermark in Redis and deletes the tagged
//! entries; `FlushCache` drops older epochs; without `--redis` (node2's agent is
//! not needed: the unit tests cover it) nothing else changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_shared::envelope::{self, AckResult, AgentMsg, CoordMsg, FrameDecoder, Heartbeat};
use meridian_shared::epoch::Epoch;
use meridian_shared::keys::Keys;
use meridian_shared::lsn::Lsn;
use meridian_shared::pki::{self, PkiPaths};
use meridian_shared::records::{
    self, CoordinatorRecord, LeaderRecord, LeaderState, MemberRecord, Role,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;

const CLUSTER: &str = "t";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pid_alive(pid: i32) -> bool {
    // A zombie counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    pid_alive(pid).then_some(pid)
}

/// Waits until `f` returns `Some`, polling every 50 ms, up to `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
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
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    data_dir: Option<PathBuf>,
}

impl Proc {
    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// SIGTERM and wait for the exit status.
    fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
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

fn spawn(name: &str, cmd: &mut Command, log: PathBuf, data_dir: Option<PathBuf>) -> Proc {
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

async fn start_etcd(dir: &Path) -> (Proc, String) {
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
struct CoordState {
    sessions: HashMap<String, mpsc::UnboundedSender<CoordMsg>>,
    hellos: Vec<(String, Epoch)>,
    heartbeats: HashMap<String, (Instant, Heartbeat)>,
    acks: HashMap<u64, AckResult>,
    changes: Vec<(String, u64, Vec<String>, Lsn)>,
}

/// A minimal coordinator: accepts agents, records what they send, sends commands.
struct FakeCoordinator {
    state: Arc<Mutex<CoordState>>,
    _endpoint: quinn::Endpoint,
    next_id: u64,
}

impl FakeCoordinator {
    async fn start(pki_dir: &Path, etcd: &mut etcd_client::Client, keys: &Keys) -> FakeCoordinator {
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

    /// Sends `msg` once to `node`'s session.
    fn send(&self, node: &str, msg: CoordMsg) {
        let s = self.state.lock().unwrap();
        s.sessions
            .get(node)
            .expect("agent connected")
            .send(msg)
            .unwrap();
    }

    /// A heartbeat of `node` received after `after` satisfying `ok`.
    async fn wait_heartbeat(
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
    async fn command(
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

struct Env {
    dir: tempfile::TempDir,
    etcd_url: String,
    pki_dir: PathBuf,
}

impl Env {
    fn agent(
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

async fn pg(port: u16) -> Option<tokio_postgres::Client> {
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

async fn member(
    etcd: &mut etcd_client::Client,
    keys: &Keys,
    node: &str,
) -> Option<(MemberRecord, i64)> {
    let resp = etcd.get(keys.member(node), None).await.ok()?;
    let kv = resp.kvs().first()?;
    Some((records::decode("member", kv.value()).ok()?, kv.lease()))
}

async fn put_leader(
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

struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start(dir: &Path) -> RedisServer {
        let port = free_port();
        let log = std::fs::File::create(dir.join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        RedisServer { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn confirmed_flush(port: u16) -> Option<Lsn> {
    let c = pg(port).await?;
    let row = c
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'meridian_inval'",
            &[],
        )
        .await
        .ok()??;
    row.get::<_, Option<String>>(0)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_agent_streams_changes_and_applies_invalidations_to_redis() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pki_dir = dir.path().join("pki");
    pki::write_dev_pki(&pki_dir, &["coord", "node1"]).unwrap();
    let (_etcd_proc, etcd_url) = start_etcd(dir.path()).await;
    let redis_server = RedisServer::start(dir.path());
    let keys = Keys::new(CLUSTER);
    let mut etcd = etcd_client::Client::connect([etcd_url.clone()], None)
        .await
        .unwrap();
    let mut coord = FakeCoordinator::start(&pki_dir, &mut etcd, &keys).await;
    let env = Env {
        dir,
        etcd_url,
        pki_dir,
    };

    let redis_url = redis_server.url();
    let (_agent1, port1, _data1, _http1) =
        env.agent("node1", "region-node1", true, Some(&redis_url));
    eventually("members/node1 as primary", Duration::from_secs(60), || {
        let mut etcd = etcd.clone();
        let keys = keys.clone();
        async move {
            member(&mut etcd, &keys, "node1")
                .await
                .filter(|(m, _)| m.role == Role::Primary)
        }
    })
    .await;
    coord
        .wait_heartbeat(
            "node1",
            "primary heartbeat",
            Duration::from_secs(30),
            |hb| hb.pg_up && hb.role == Role::Primary,
        )
        .await;
    put_leader(&mut etcd, &keys, "node1", port1, 1, 1).await;
    let promoted = coord
        .command(
            "node1",
            |id| CoordMsg::Promote {
                id,
                epoch: Epoch(1),
            },
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(promoted, AckResult::Ok);

    // The agent creates the slot once it streams; a committed INSERT becomes a batch.
    eventually("the invalidation slot", Duration::from_secs(30), || async {
        confirmed_flush(port1).await
    })
    .await;
    let c = pg(port1).await.expect("postgres up");
    c.batch_execute("CREATE TABLE public.t (id int primary key); INSERT INTO public.t VALUES (1)")
        .await
        .unwrap();
    let state = coord.state.clone();
    let (from, batch_id, tables, lsn) =
        eventually("Changes naming public.t", Duration::from_secs(15), || {
            let found = state
                .lock()
                .unwrap()
                .changes
                .iter()
                .find(|(_, _, t, _)| t.iter().any(|x| x == "public.t"))
                .cloned();
            async move { found }
        })
        .await;
    assert_eq!(from, "node1");
    assert_eq!(tables, vec!["public.t".to_owned()]);
    let before_ack = confirmed_flush(port1).await.unwrap();
    assert!(
        before_ack < lsn,
        "confirmed {before_ack} before the ack of {lsn}"
    );

    coord.send("node1", CoordMsg::Ack { batch_id });
    let confirmed = eventually(
        "the slot confirmed after the ack",
        Duration::from_secs(15),
        || async { confirmed_flush(port1).await.filter(|l| *l >= lsn) },
    )
    .await;
    assert!(confirmed >= lsn);

    // Invalidate: the watermark rises and the tagged entries go.
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let mut r = redis.get_connection().unwrap();
    let entry = meridian_shared::cache_keys::entry_key(CLUSTER, Epoch(1), "q1");
    let tag = meridian_shared::cache_keys::tag_key(CLUSTER, Epoch(1), "public.t");
    redis::cmd("SET")
        .arg(&entry)
        .arg("rows")
        .query::<()>(&mut r)
        .unwrap();
    redis::cmd("SADD")
        .arg(&tag)
        .arg(&entry)
        .query::<()>(&mut r)
        .unwrap();
    let ack = coord
        .command(
            "node1",
            |id| CoordMsg::Invalidate {
                id,
                tables: tables.clone(),
                lsn,
                epoch: Epoch(1),
            },
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(ack, AckResult::Ok);
    let wm: String = redis::cmd("GET")
        .arg(meridian_shared::cache_keys::watermark_key(
            CLUSTER, "public.t",
        ))
        .query(&mut r)
        .unwrap();
    assert_eq!(wm, lsn.0.to_string());
    let exists: bool = redis::cmd("EXISTS").arg(&entry).query(&mut r).unwrap();
    assert!(!exists, "the tagged entry is deleted");

    // FlushCache drops an older epoch's entries.
    let old = meridian_shared::cache_keys::entry_key(CLUSTER, Epoch(0), "q0");
    redis::cmd("SET")
        .arg(&old)
        .arg("rows")
        .query::<()>(&mut r)
        .unwrap();
    let ack = coord
        .command(
            "node1",
            |id| CoordMsg::FlushCache {
                id,
                epoch: Epoch(1),
            },
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(ack, AckResult::Ok);
    let exists: bool = redis::cmd("EXISTS").arg(&old).query(&mut r).unwrap();
    assert!(!exists, "the older epoch's entry is flushed");
}
