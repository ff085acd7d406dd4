//! The real `meridian-coordinator` binary against a real etcd, with in-test fake
//! agents speaking the QUIC protocol of docs/control-path.md: election and
//! takeover, bootstrap of the first leader, a corroborated failover (fence,
//! promote, publish), and no failover when only the primary's agent dies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use etcd_client::Client;
use meridian_shared::envelope::{self, AckResult, AgentMsg, CoordMsg, FrameDecoder, Heartbeat};
use meridian_shared::epoch::Epoch;
use meridian_shared::keys::Keys;
use meridian_shared::lsn::Lsn;
use meridian_shared::pki::{quic_client_config, write_dev_pki, PkiPaths, COORDINATOR_SERVER_NAME};
use meridian_shared::records::{
    CoordinatorRecord, LeaderRecord, LeaderState, MemberRecord, MemberTags, Role,
};
use tokio::sync::mpsc;

const CLUSTER: &str = "t";

fn free_tcp_port() -> u16 {
    // Below the kernel's ephemeral range: no port-0 bind or outgoing
    // connection can take it before the server binds it.
    meridian_launcher::ports::free_port().unwrap()
}

fn free_udp_port() -> u16 {
    meridian_launcher::ports::free_udp_port().unwrap()
}

/// Retries `f` until it succeeds or `deadline` passes.
async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        let last = match tokio::time::timeout(Duration::from_secs(2), f()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(e)) => e,
            Err(_) => anyhow!("attempt timed out"),
        };
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}: {last:#}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed (SIGKILL) on drop; its log is printed if the test fails.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            eprintln!("----- {} log (last lines) -----", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn spawn(name: &str, dir: &Path, cmd: &mut Command) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = cmd
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    Proc {
        name: name.to_string(),
        child,
        log,
    }
}

struct Env {
    dir: tempfile::TempDir,
    _etcd: Proc,
    etcd_url: String,
    keys: Keys,
}

impl Env {
    async fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let (client_port, peer_port) = (free_tcp_port(), free_tcp_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let etcd = spawn(
            "etcd",
            dir.path(),
            Command::new("/usr/bin/etcd")
                .arg("--name=t")
                .arg(format!("--data-dir={}", dir.path().join("etcd").display()))
                .arg(format!("--listen-client-urls={etcd_url}"))
                .arg(format!("--advertise-client-urls={etcd_url}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=t={peer}")),
        );
        write_dev_pki(
            &dir.path().join("pki"),
            &["coord-1", "coord-2", "node-a", "node-b"],
        )
        .unwrap();
        let env = Env {
            dir,
            _etcd: etcd,
            etcd_url,
            keys: Keys::new(CLUSTER),
        };
        eventually(Duration::from_secs(15), "etcd to serve", || async {
            let mut c = env.etcd().await?;
            c.get("probe", None).await?;
            Ok(())
        })
        .await;
        env
    }

    async fn etcd(&self) -> anyhow::Result<Client> {
        Ok(Client::connect([self.etcd_url.as_str()], None).await?)
    }

    fn pki(&self, name: &str) -> PkiPaths {
        PkiPaths::in_dir(&self.dir.path().join("pki"), name)
    }

    fn coordinator(&self, name: &str) -> Proc {
        let pki = self.pki(name);
        spawn(
            name,
            self.dir.path(),
            Command::new(env!("CARGO_BIN_EXE_meridian-coordinator"))
                .env("RUST_LOG", "info,meridian_coordinator=debug")
                .arg(format!("--name={name}"))
                .arg(format!("--cluster={CLUSTER}"))
                .arg(format!("--etcd={}", self.etcd_url))
                .arg(format!("--quic-listen=127.0.0.1:{}", free_udp_port()))
                .arg(format!("--admin-listen=127.0.0.1:{}", free_tcp_port()))
                .arg(format!("--http-listen=127.0.0.1:{}", free_tcp_port()))
                .arg(format!("--ca={}", pki.ca.display()))
                .arg(format!("--cert={}", pki.cert.display()))
                .arg(format!("--key={}", pki.key.display()))
                .arg("--election-ttl=2s"),
        )
    }

    /// The elected coordinator's record, if any.
    async fn elected(&self) -> anyhow::Result<Option<CoordinatorRecord>> {
        let mut c = self.etcd().await?;
        match c.leader(self.keys.coordinator_election()).await {
            Ok(resp) => match resp.kv() {
                Some(kv) => Ok(Some(serde_json::from_slice(kv.value())?)),
                None => Ok(None),
            },
            // etcd answers "election: no leader" as an error.
            Err(_) => Ok(None),
        }
    }

    async fn leader(&self) -> anyhow::Result<Option<LeaderRecord>> {
        let mut c = self.etcd().await?;
        let resp = c.get(self.keys.leader(), None).await?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some(serde_json::from_slice(kv.value())?)),
            None => Ok(None),
        }
    }

    async fn epoch(&self) -> anyhow::Result<Option<String>> {
        let mut c = self.etcd().await?;
        let resp = c.get(self.keys.epoch(), None).await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn register(&self, node: &str, pg_addr: &str, role: Role) {
        let member = MemberRecord {
            region: format!("{node}-region"),
            pg_addr: pg_addr.to_string(),
            agent_addr: "127.0.0.1:1".into(),
            role,
            tags: MemberTags::default(),
            version: None,
            pg_addrs: Default::default(),
        };
        let mut c = self.etcd().await.unwrap();
        c.put(
            self.keys.member(node),
            serde_json::to_vec(&member).unwrap(),
            None,
        )
        .await
        .unwrap();
    }
}

/// A fake agent: Hello, heartbeats every 100 ms from a shared template while
/// `beating`, commands forwarded to the test, acks sent on demand. Reconnects to
/// whichever coordinator the election names.
struct FakeAgent {
    hb: Arc<Mutex<Heartbeat>>,
    beating: Arc<AtomicBool>,
    /// Set once a heartbeat went out on a connection.
    connected: Arc<AtomicBool>,
    cmds: mpsc::UnboundedReceiver<CoordMsg>,
    out: mpsc::UnboundedSender<AgentMsg>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn heartbeat(node: &str, role: Role) -> Heartbeat {
    Heartbeat {
        node: node.into(),
        region: format!("{node}-region"),
        seq: 0,
        sent_at_ms: 0,
        role,
        pg_up: true,
        timeline: 1,
        write_lsn: (role == Role::Primary).then_some(Lsn(0x300_0000)),
        flush_lsn: Some(Lsn(0x300_0000)),
        replay_lsn: (role == Role::Replica).then_some(Lsn(0x300_0000)),
        receive_lsn: (role == Role::Replica).then_some(Lsn(0x300_0000)),
        receiver_streaming: false,
        upstream: None,
        replay_lag_ms: None,
        epoch_seen: Epoch::ZERO,
        invalidated_lsn: None,
    }
}

impl FakeAgent {
    fn start(env: &Env, node: &str, hb: Heartbeat) -> FakeAgent {
        let hb = Arc::new(Mutex::new(hb));
        let beating = Arc::new(AtomicBool::new(true));
        let connected = Arc::new(AtomicBool::new(false));
        let (cmd_tx, cmds) = mpsc::unbounded_channel();
        let (out, out_rx) = mpsc::unbounded_channel();
        let config = quic_client_config(&env.pki(node), Duration::from_secs(3)).unwrap();
        let task = tokio::spawn(agent_loop(
            env.etcd_url.clone(),
            node.to_string(),
            config,
            hb.clone(),
            beating.clone(),
            connected.clone(),
            cmd_tx,
            out_rx,
        ));
        FakeAgent {
            hb,
            beating,
            connected,
            cmds,
            out,
            task,
        }
    }

    async fn wait_connected(&self) {
        let connected = self.connected.clone();
        eventually(
            Duration::from_secs(10),
            "the fake agent to heartbeat",
            || {
                let connected = connected.clone();
                async move {
                    anyhow::ensure!(connected.load(Ordering::SeqCst), "not yet");
                    Ok(())
                }
            },
        )
        .await;
    }

    fn update(&self, f: impl FnOnce(&mut Heartbeat)) {
        f(&mut self.hb.lock().unwrap());
    }

    fn ack(&self, id: u64) {
        self.out
            .send(AgentMsg::Ack {
                id,
                result: AckResult::Ok,
            })
            .unwrap();
    }

    /// Waits for a command matching `pred`, acking (`Ok`) the `Follow`s,
    /// `SetSyncStandbys`, `FlushCache`s and `Invalidate`s that come before it;
    /// any other command fails the test.
    async fn expect(
        &mut self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&CoordMsg) -> bool,
    ) -> CoordMsg {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let msg = tokio::time::timeout_at(end, self.cmds.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("agent task ended");
            if pred(&msg) {
                return msg;
            }
            match msg {
                CoordMsg::Follow { id, .. }
                | CoordMsg::SetSyncStandbys { id, .. }
                | CoordMsg::FlushCache { id, .. }
                | CoordMsg::Invalidate { id, .. } => self.ack(id),
                other => panic!("while waiting for {what}: unexpected {other:?}"),
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn agent_loop(
    etcd_url: String,
    node: String,
    config: quinn::ClientConfig,
    hb: Arc<Mutex<Heartbeat>>,
    beating: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    cmds: mpsc::UnboundedSender<CoordMsg>,
    mut out: mpsc::UnboundedReceiver<AgentMsg>,
) {
    let keys = Keys::new(CLUSTER);
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let mut seq = 0u64;
    loop {
        let result: anyhow::Result<()> = async {
            let mut c = Client::connect([etcd_url.as_str()], None).await?;
            let resp = c.leader(keys.coordinator_election()).await?;
            let kv = resp.kv().context("no coordinator elected")?;
            let record: CoordinatorRecord = serde_json::from_slice(kv.value())?;
            let addr: SocketAddr = record.quic_addr.parse()?;
            let conn = endpoint.connect(addr, COORDINATOR_SERVER_NAME)?.await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let epoch_seen = hb.lock().unwrap().epoch_seen;
            send.write_all(&envelope::encode(&AgentMsg::Hello {
                node: node.clone(),
                region: format!("{node}-region"),
                epoch_seen,
            })?)
            .await?;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut decoder = FrameDecoder::default();
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if beating.load(Ordering::SeqCst) {
                            seq += 1;
                            let mut beat = hb.lock().unwrap().clone();
                            beat.seq = seq;
                            send.write_all(&envelope::encode(&AgentMsg::Heartbeat(beat))?).await?;
                            connected.store(true, Ordering::SeqCst);
                        }
                    }
                    Some(msg) = out.recv() => {
                        send.write_all(&envelope::encode(&msg)?).await?;
                    }
                    read = recv.read(&mut buf) => {
                        let n = read?.context("stream closed")?;
                        decoder.feed(&buf[..n]);
                        while let Some(msg) = decoder.next_message::<CoordMsg>()? {
                            let _ = cmds.send(msg);
                        }
                    }
                }
            }
        }
        .await;
        if let Err(e) = result {
            eprintln!("fake agent {node}: {e:#}; reconnecting");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn promote_epoch(msg: &CoordMsg) -> Option<(u64, Epoch)> {
    match msg {
        CoordMsg::Promote { id, epoch, .. } => Some((*id, *epoch)),
        _ => None,
    }
}

/// Bootstraps node-a as the primary of epoch 1 and acks its Promote.
async fn bootstrap(env: &Env, primary_pg: &str) -> FakeAgent {
    env.register("node-a", primary_pg, Role::Primary).await;
    let mut a = FakeAgent::start(env, "node-a", heartbeat("node-a", Role::Primary));
    let msg = a
        .expect("Promote{1}", Duration::from_secs(15), |m| {
            promote_epoch(m).is_some()
        })
        .await;
    let (id, epoch) = promote_epoch(&msg).unwrap();
    assert_eq!(epoch, Epoch(1));
    a.update(|hb| hb.epoch_seen = Epoch(1));
    a.ack(id);
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_active_coordinator_is_killed() {
    let env = Env::start().await;
    let mut c1 = env.coordinator("coord-1");
    let mut c2 = env.coordinator("coord-2");
    let first = eventually(
        Duration::from_secs(15),
        "an elected coordinator",
        || async { env.elected().await?.context("none yet") },
    )
    .await;
    assert!(first.name == "coord-1" || first.name == "coord-2");
    assert!(first.quic_addr.starts_with("127.0.0.1:"), "{first:?}");
    let (active, standby_name) = if first.name == "coord-1" {
        (&mut c1, "coord-2")
    } else {
        (&mut c2, "coord-1")
    };
    active.kill();
    let killed_at = Instant::now();
    let second = eventually(
        Duration::from_secs(10),
        "the standby to take over",
        || async {
            match env.elected().await? {
                Some(r) if r.name == standby_name => Ok(r),
                other => bail!("elected: {other:?}"),
            }
        },
    )
    .await;
    let took = killed_at.elapsed();
    assert_eq!(second.name, standby_name);
    // Lease TTL 2 s plus etcd's expiry granularity.
    assert!(took < Duration::from_secs(5), "takeover took {took:?}");

    // A restarted coordinator waits as standby; SIGTERM on the active one resigns
    // (exit 0) and hands over at once, without waiting for the lease TTL.
    let restarted_name = if standby_name == "coord-1" {
        "coord-2"
    } else {
        "coord-1"
    };
    let _restarted = env.coordinator(restarted_name);
    let active = if standby_name == "coord-1" {
        &mut c1
    } else {
        &mut c2
    };
    eventually(
        Duration::from_secs(10),
        "the restarted coordinator to campaign",
        || async {
            let mut c = env.etcd().await?;
            let opts = etcd_client::GetOptions::new()
                .with_prefix()
                .with_count_only();
            let n = c
                .get(env.keys.coordinator_election(), Some(opts))
                .await?
                .count();
            anyhow::ensure!(n == 2, "{n} campaigners");
            Ok(())
        },
    )
    .await;
    assert_eq!(env.elected().await.unwrap().unwrap().name, standby_name);
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(active.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let termed_at = Instant::now();
    let exit = eventually(
        Duration::from_secs(10),
        "the active coordinator to exit",
        || {
            let exited = active.child.try_wait();
            async move { exited?.context("still running") }
        },
    )
    .await;
    assert!(exit.success(), "exit status {exit:?}");
    eventually(
        Duration::from_secs(10),
        "the restarted coordinator to take over",
        || async {
            match env.elected().await? {
                Some(r) if r.name == restarted_name => Ok(()),
                other => bail!("elected: {other:?}"),
            }
        },
    )
    .await;
    let handover = termed_at.elapsed();
    assert!(
        handover < Duration::from_millis(1900),
        "resign handover took {handover:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_creates_the_first_leader_and_promotes_it_in_epoch_1() {
    let env = Env::start().await;
    let _c1 = env.coordinator("coord-1");
    let pg = format!("127.0.0.1:{}", free_tcp_port());
    let _a = bootstrap(&env, &pg).await;
    let leader = env.leader().await.unwrap().expect("leader written");
    assert_eq!(leader.node, "node-a");
    assert_eq!(leader.epoch, Epoch(1));
    assert_eq!(leader.state, LeaderState::Serving);
    assert_eq!(leader.pg_addr, pg);
    assert_eq!(leader.timeline, 1);
    assert_eq!(env.epoch().await.unwrap().as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corroborated_primary_failure_fences_promotes_and_publishes() {
    let env = Env::start().await;
    let _c1 = env.coordinator("coord-1");
    // Nothing listens on the primary's pg_addr: the coordinator's probe fails.
    let pg_a = format!("127.0.0.1:{}", free_tcp_port());
    let pg_b = format!("127.0.0.1:{}", free_tcp_port());
    let mut a = bootstrap(&env, &pg_a).await;
    env.register("node-b", &pg_b, Role::Replica).await;
    let mut replica = heartbeat("node-b", Role::Replica);
    replica.receiver_streaming = true;
    replica.upstream = Some("node-a".into());
    replica.epoch_seen = Epoch(1);
    let mut b = FakeAgent::start(&env, "node-b", replica);
    b.wait_connected().await;
    assert_eq!(env.leader().await.unwrap().unwrap().epoch, Epoch(1));

    // Postgres on node-a dies: its agent says so, node-b's receiver disconnects.
    a.update(|hb| hb.pg_up = false);
    b.update(|hb| {
        hb.receiver_streaming = false;
        hb.upstream = None;
    });

    let marked = eventually(
        Duration::from_secs(10),
        "leader failing_over in epoch 2",
        || async {
            match env.leader().await? {
                Some(l) if l.state == LeaderState::FailingOver => Ok(l),
                other => bail!("leader: {other:?}"),
            }
        },
    )
    .await;
    assert_eq!(marked.epoch, Epoch(2));
    assert_eq!(marked.node, "node-a");
    assert_eq!(
        marked.candidate.as_ref().map(|c| c.node.as_str()),
        Some("node-b")
    );
    assert_eq!(env.epoch().await.unwrap().as_deref(), Some("2"));

    let fence = a
        .expect("Fence{2}", Duration::from_secs(10), |m| {
            matches!(m, CoordMsg::Fence { .. })
        })
        .await;
    let CoordMsg::Fence { id, epoch } = fence else {
        unreachable!()
    };
    assert_eq!(epoch, Epoch(2));
    // No promotion before the fence is confirmed.
    while let Ok(msg) = b.cmds.try_recv() {
        assert!(
            promote_epoch(&msg).is_none(),
            "promote sent before the fence ack: {msg:?}"
        );
    }
    a.ack(id);

    let promote = b
        .expect("Promote{2}", Duration::from_secs(10), |m| {
            promote_epoch(m).is_some()
        })
        .await;
    let (id, epoch) = promote_epoch(&promote).unwrap();
    assert_eq!(epoch, Epoch(2));
    b.update(|hb| {
        hb.role = Role::Primary;
        hb.epoch_seen = Epoch(2);
        hb.timeline = 2;
        hb.write_lsn = Some(Lsn(0x300_1000));
        hb.replay_lsn = None;
        hb.receive_lsn = None;
    });
    b.ack(id);

    let serving = eventually(
        Duration::from_secs(10),
        "leader serving node-b in epoch 2",
        || async {
            match env.leader().await? {
                Some(l) if l.state == LeaderState::Serving && l.node == "node-b" => Ok(l),
                other => bail!("leader: {other:?}"),
            }
        },
    )
    .await;
    assert_eq!(serving.epoch, Epoch(2));
    assert_eq!(serving.pg_addr, pg_b);
    assert_eq!(serving.timeline, 2);

    // The old primary (agent alive, Postgres down) is told to follow the new one.
    let follow = a
        .expect("Follow node-b", Duration::from_secs(10), |m| {
            matches!(m, CoordMsg::Follow { .. })
        })
        .await;
    match follow {
        CoordMsg::Follow {
            leader,
            pg_addr,
            epoch,
            ..
        } => {
            assert_eq!(leader, "node-b");
            assert_eq!(pg_addr, pg_b);
            assert_eq!(epoch, Epoch(2));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_agent_on_a_live_primary_causes_no_failover() {
    let env = Env::start().await;
    let _c1 = env.coordinator("coord-1");
    // The primary's "Postgres" accepts connections (the probe cannot complete a
    // Postgres handshake with it, so the replica's streaming is what holds).
    let pg = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pg_a = pg.local_addr().unwrap().to_string();
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = pg.accept().await {
            held.push(sock);
        }
    });
    let a = bootstrap(&env, &pg_a).await;
    env.register(
        "node-b",
        &format!("127.0.0.1:{}", free_tcp_port()),
        Role::Replica,
    )
    .await;
    let mut replica = heartbeat("node-b", Role::Replica);
    replica.receiver_streaming = true;
    replica.upstream = Some(pg_a.clone());
    replica.epoch_seen = Epoch(1);
    let b = FakeAgent::start(&env, "node-b", replica);
    b.wait_connected().await;
    let before = env.leader().await.unwrap().unwrap();
    assert_eq!(before.node, "node-a");

    // The primary's agent dies (its heartbeats stop); Postgres and replication go on.
    a.beating.store(false, Ordering::SeqCst);
    drop(a);
    // Waiting a fixed time is the point here: we assert that a failover does NOT
    // happen within several detection periods (suspect_after is 500 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = env.leader().await.unwrap().unwrap();
    assert_eq!(after, before, "the leader record changed");
    assert_eq!(env.epoch().await.unwrap().as_deref(), Some("1"));
    accept.abort();
}

// ---------- the decision loop in-process, driven through the control seam ----------

use meridian_coordinator::control::{self, ControlHandle, Operation};
use meridian_coordinator::daemon;
use tokio::sync::{oneshot, watch};

/// `daemon::run` in this process, with the control handle the admin API would get.
struct InProcess {
    handle: ControlHandle,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

async fn in_process(env: &Env, name: &str, switchover_drain: Duration) -> InProcess {
    let server =
        meridian_shared::pki::quic_server_config(&env.pki(name), Duration::from_secs(3)).unwrap();
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let quic_addr = endpoint.local_addr().unwrap().to_string();
    let settings = daemon::Settings {
        name: name.to_string(),
        cluster: CLUSTER.to_string(),
        record: CoordinatorRecord {
            name: name.to_string(),
            admin_addr: "127.0.0.1:1".into(),
            quic_addr,
            quic_addrs: Default::default(),
        },
        election_ttl: Duration::from_secs(2),
        probe_timeout: Duration::from_millis(300),
        switchover_drain,
        command_retry: Duration::from_secs(1),
    };
    let (handle, side) = control::channel();
    let (stop, stop_rx) = watch::channel(false);
    let etcd = env.etcd().await.unwrap();
    let task = tokio::spawn(async move {
        daemon::run(settings, etcd, endpoint, side, stop_rx)
            .await
            .unwrap();
    });
    InProcess { handle, stop, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_drains_fences_waits_for_catch_up_then_promotes() {
    let env = Env::start().await;
    let drain = Duration::from_millis(500);
    let coord = in_process(&env, "coord-1", drain).await;
    let pg_a = format!("127.0.0.1:{}", free_tcp_port());
    let pg_b = format!("127.0.0.1:{}", free_tcp_port());
    let mut a = bootstrap(&env, &pg_a).await;
    env.register("node-b", &pg_b, Role::Replica).await;
    let mut replica = heartbeat("node-b", Role::Replica);
    replica.receiver_streaming = true;
    replica.upstream = Some("node-a".into());
    replica.epoch_seen = Epoch(1);
    let mut b = FakeAgent::start(&env, "node-b", replica);
    b.wait_connected().await;

    // The loop must have seen node-b before it can choose it: retry until accepted.
    let reply = eventually(Duration::from_secs(10), "switchover accepted", || async {
        let (tx, rx) = oneshot::channel();
        coord
            .handle
            .operations
            .send((Operation::Switchover { to: None }, tx))
            .await?;
        // Accepted operations answer only when done; a refusal answers at once.
        let mut rx = rx;
        match tokio::time::timeout(Duration::from_millis(300), &mut rx).await {
            Ok(Ok(Err(refused))) => bail!("refused: {refused}"),
            Ok(other) => bail!("unexpected answer {other:?}"),
            Err(_) => Ok(rx),
        }
    })
    .await;

    let marked = eventually(Duration::from_secs(10), "leader failing_over", || async {
        match env.leader().await? {
            Some(l) if l.state == LeaderState::FailingOver => Ok(l),
            other => bail!("leader: {other:?}"),
        }
    })
    .await;
    assert_eq!(marked.epoch, Epoch(2));
    assert_eq!(
        marked.candidate.as_ref().map(|c| c.node.as_str()),
        Some("node-b")
    );

    let fence = a
        .expect("Fence{2}", Duration::from_secs(10), |m| {
            matches!(m, CoordMsg::Fence { .. })
        })
        .await;
    // `since` is the coordinator's clock just before it wrote failing_over.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let drained = Duration::from_millis(now_ms.saturating_sub(marked.since));
    assert!(
        drained >= drain - Duration::from_millis(20),
        "fenced {drained:?} after failing_over; drain is {drain:?}"
    );
    assert!(
        drained >= drain / 2,
        "fenced {drained:?} after failing_over; drain is {drain:?}"
    );
    let CoordMsg::Fence { id, epoch } = fence else {
        unreachable!()
    };
    assert_eq!(epoch, Epoch(2));
    a.update(|hb| hb.pg_up = false);
    a.ack(id);

    // node-b still streams from the old primary: it may not have everything yet.
    // Waiting a fixed time is deliberate: we assert that no Promote comes meanwhile.
    tokio::time::sleep(Duration::from_millis(700)).await;
    while let Ok(msg) = b.cmds.try_recv() {
        assert!(
            promote_epoch(&msg).is_none(),
            "promoted before catching up: {msg:?}"
        );
    }
    // The old primary's walsender finished: node-b's receiver stops, all replayed.
    b.update(|hb| {
        hb.receiver_streaming = false;
        hb.upstream = None;
        hb.receive_lsn = Some(Lsn(0x300_0100));
        hb.replay_lsn = Some(Lsn(0x300_0100));
    });
    let promote = b
        .expect("Promote{2}", Duration::from_secs(10), |m| {
            promote_epoch(m).is_some()
        })
        .await;
    let (id, epoch) = promote_epoch(&promote).unwrap();
    assert_eq!(epoch, Epoch(2));
    b.update(|hb| {
        hb.role = Role::Primary;
        hb.epoch_seen = Epoch(2);
        hb.timeline = 2;
        hb.write_lsn = Some(Lsn(0x300_0200));
    });
    b.ack(id);

    let answer = tokio::time::timeout(Duration::from_secs(10), reply)
        .await
        .expect("switchover answered")
        .expect("answer sent");
    assert!(answer.is_ok(), "{answer:?}");
    let leader = env.leader().await.unwrap().unwrap();
    assert_eq!((leader.node.as_str(), leader.epoch), ("node-b", Epoch(2)));
    assert!(leader.is_serving());
    let status = coord.handle.status.borrow().clone();
    assert!(status.active);
    assert_eq!(status.leader.as_deref(), Some("node-b"));
    // The old primary is told to follow the new one.
    a.expect(
        "Follow node-b",
        Duration::from_secs(10),
        |m| matches!(m, CoordMsg::Follow { leader, .. } if leader == "node-b"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_records_standbys_before_widening_and_after_narrowing() {
    let env = Env::start().await;
    let mut c = env.etcd().await.unwrap();
    c.put(env.keys.config(), r#"{"sync_mode":"on"}"#, None)
        .await
        .unwrap();
    let _coord = in_process(&env, "coord-1", Duration::from_millis(300)).await;
    let pg_a = format!("127.0.0.1:{}", free_tcp_port());
    let mut a = bootstrap(&env, &pg_a).await;
    env.register(
        "node-b",
        &format!("127.0.0.1:{}", free_tcp_port()),
        Role::Replica,
    )
    .await;
    let mut replica = heartbeat("node-b", Role::Replica);
    replica.receiver_streaming = true;
    replica.upstream = Some("node-a".into());
    replica.epoch_seen = Epoch(1);
    let b = FakeAgent::start(&env, "node-b", replica);

    let sync_standbys = || async {
        let mut c = env.etcd().await.unwrap();
        let resp = c.get(env.keys.sync(), None).await.unwrap();
        resp.kvs().first().map(|kv| {
            serde_json::from_slice::<meridian_shared::records::SyncRecord>(kv.value()).unwrap()
        })
    };

    let widen = a
        .expect(
            "SetSyncStandbys node-b",
            Duration::from_secs(10),
            |m| matches!(m, CoordMsg::SetSyncStandbys { value, .. } if value.contains("node-b")),
        )
        .await;
    // The key already lists node-b when the primary is asked to wait for it.
    let record = sync_standbys().await.expect("sync key written first");
    assert!(record.standbys.contains("node-b"), "{record:?}");
    assert_eq!(record.leader, "node-a");
    let CoordMsg::SetSyncStandbys { id, value, epoch } = widen else {
        unreachable!()
    };
    assert_eq!(value, "ANY 1 (\"node-b\")");
    assert_eq!(epoch, Epoch(1));
    a.ack(id);

    // node-b stops streaming: mode `on` falls back to asynchronous.
    b.update(|hb| {
        hb.receiver_streaming = false;
        hb.upstream = None;
    });
    let narrow = a
        .expect(
            "SetSyncStandbys empty",
            Duration::from_secs(10),
            |m| matches!(m, CoordMsg::SetSyncStandbys { value, .. } if value.is_empty()),
        )
        .await;
    // Postgres is narrowed first; the key still covers what it may be waiting for.
    let record = sync_standbys().await.unwrap();
    assert!(record.standbys.contains("node-b"), "{record:?}");
    let CoordMsg::SetSyncStandbys { id, .. } = narrow else {
        unreachable!()
    };
    a.ack(id);
    eventually(
        Duration::from_secs(10),
        "the sync key to be narrowed",
        || async {
            let record = sync_standbys().await.context("no key")?;
            anyhow::ensure!(record.standbys.is_empty(), "{record:?}");
            Ok(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_resumes_a_failover_when_the_active_coordinator_dies_mid_way() {
    let env = Env::start().await;
    let mut c1 = env.coordinator("coord-1");
    let first = eventually(Duration::from_secs(15), "coord-1 elected", || async {
        env.elected().await?.context("none yet")
    })
    .await;
    assert_eq!(first.name, "coord-1");
    let _c2 = env.coordinator("coord-2");
    let pg_a = format!("127.0.0.1:{}", free_tcp_port());
    let pg_b = format!("127.0.0.1:{}", free_tcp_port());
    let mut a = bootstrap(&env, &pg_a).await;
    env.register("node-b", &pg_b, Role::Replica).await;
    let mut replica = heartbeat("node-b", Role::Replica);
    replica.receiver_streaming = true;
    replica.upstream = Some("node-a".into());
    replica.epoch_seen = Epoch(1);
    let mut b = FakeAgent::start(&env, "node-b", replica);
    b.wait_connected().await;

    a.update(|hb| hb.pg_up = false);
    b.update(|hb| {
        hb.receiver_streaming = false;
        hb.upstream = None;
    });
    // coord-1 marks the failover and fences; it dies before the fence is acked.
    a.expect(
        "Fence{2} from coord-1",
        Duration::from_secs(10),
        |m| matches!(m, CoordMsg::Fence { epoch, .. } if *epoch == Epoch(2)),
    )
    .await;
    c1.kill();
    let marked = env.leader().await.unwrap().unwrap();
    assert_eq!(marked.state, LeaderState::FailingOver);
    assert_eq!(marked.epoch, Epoch(2));

    // coord-2 is elected, the agents reconnect to it, it resumes the same plan.
    let fence = a
        .expect(
            "Fence{2} from coord-2",
            Duration::from_secs(15),
            |m| matches!(m, CoordMsg::Fence { epoch, .. } if *epoch == Epoch(2)),
        )
        .await;
    assert_eq!(env.elected().await.unwrap().unwrap().name, "coord-2");
    let CoordMsg::Fence { id, .. } = fence else {
        unreachable!()
    };
    a.ack(id);
    let promote = b
        .expect("Promote{2}", Duration::from_secs(10), |m| {
            promote_epoch(m).is_some()
        })
        .await;
    let (id, epoch) = promote_epoch(&promote).unwrap();
    assert_eq!(epoch, Epoch(2), "the resumed plan keeps its epoch");
    b.update(|hb| {
        hb.role = Role::Primary;
        hb.epoch_seen = Epoch(2);
        hb.timeline = 2;
    });
    b.ack(id);
    let serving = eventually(Duration::from_secs(10), "node-b serving", || async {
        match env.leader().await? {
            Some(l) if l.is_serving() => Ok(l),
            other => bail!("leader: {other:?}"),
        }
    })
    .await;
    assert_eq!((serving.node.as_str(), serving.epoch), ("node-b", Epoch(2)));
    assert_eq!(env.epoch().await.unwrap().as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_primary_whose_postgres_crashed_is_restarted_in_its_epoch() {
    let env = Env::start().await;
    let _c1 = env.coordinator("coord-1");
    let pg_a = format!("127.0.0.1:{}", free_tcp_port());
    let mut a = bootstrap(&env, &pg_a).await;
    // No replica exists: nothing can be promoted, so the coordinator asks the
    // agent to start its Postgres again as the primary of the same epoch.
    a.update(|hb| hb.pg_up = false);
    let restart = a
        .expect("Promote{1} (restart)", Duration::from_secs(15), |m| {
            promote_epoch(m).is_some()
        })
        .await;
    assert_eq!(promote_epoch(&restart).unwrap().1, Epoch(1));
    let leader = env.leader().await.unwrap().unwrap();
    assert_eq!((leader.node.as_str(), leader.epoch), ("node-a", Epoch(1)));
    assert!(leader.is_serving());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_failover_refuses_unknown_targets_and_promotes_a_named_replica() {
    let env = Env::start().await;
    let coord = in_process(&env, "coord-1", Duration::from_millis(300)).await;
    let pg_a = format!("127.0.0.1:{}", free_tcp_port());
    let mut a = bootstrap(&env, &pg_a).await;
    env.register(
        "node-b",
        &format!("127.0.0.1:{}", free_tcp_port()),
        Role::Replica,
    )
    .await;
    let mut replica = heartbeat("node-b", Role::Replica);
    replica.receiver_streaming = true;
    replica.upstream = Some("node-a".into());
    replica.epoch_seen = Epoch(1);
    let mut b = FakeAgent::start(&env, "node-b", replica);
    b.wait_connected().await;

    // Returns the answer's receiver (awaited by the caller, possibly with a timeout).
    #[allow(clippy::async_yields_async)]
    let ask = |op: Operation| {
        let ops = coord.handle.operations.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            ops.send((op, tx)).await.unwrap();
            rx
        }
    };
    let refused = ask(Operation::Failover {
        to: "nobody".into(),
        force: false,
    })
    .await
    .await
    .unwrap();
    assert!(refused.is_err(), "{refused:?}");
    let refused = ask(Operation::Failover {
        to: "node-a".into(),
        force: false,
    })
    .await
    .await
    .unwrap();
    assert!(refused.unwrap_err().contains("already the primary"));

    let reply = eventually(Duration::from_secs(10), "failover accepted", || async {
        let mut rx = ask(Operation::Failover {
            to: "node-b".into(),
            force: false,
        })
        .await;
        match tokio::time::timeout(Duration::from_millis(300), &mut rx).await {
            Ok(Ok(Err(refused))) => bail!("refused: {refused}"),
            Ok(other) => bail!("unexpected answer {other:?}"),
            Err(_) => Ok(rx),
        }
    })
    .await;
    // The primary is healthy and its agent reachable: it is fenced by command.
    let fence = a
        .expect(
            "Fence{2}",
            Duration::from_secs(10),
            |m| matches!(m, CoordMsg::Fence { epoch, .. } if *epoch == Epoch(2)),
        )
        .await;
    let CoordMsg::Fence { id, .. } = fence else {
        unreachable!()
    };
    a.update(|hb| hb.pg_up = false);
    a.ack(id);
    let promote = b
        .expect("Promote{2}", Duration::from_secs(10), |m| {
            promote_epoch(m).is_some()
        })
        .await;
    let (id, _) = promote_epoch(&promote).unwrap();
    b.update(|hb| {
        hb.role = Role::Primary;
        hb.epoch_seen = Epoch(2);
        hb.timeline = 2;
    });
    b.ack(id);
    let answer = tokio::time::timeout(Duration::from_secs(10), reply)
        .await
        .expect("failover answered")
        .expect("answer sent");
    assert!(answer.is_ok(), "{answer:?}");
    let leader = env.leader().await.unwrap().unwrap();
    assert_eq!((leader.node.as_str(), leader.epoch), ("node-b", Epoch(2)));
}

// ---------- invalidation fan-out (issue 4) ----------

/// Receives until `pred` matches, acking `FlushCache`/`Invalidate` (and the other
/// routine commands) that come before it.
async fn expect_invalidate(agent: &mut FakeAgent, what: &str) -> (u64, Vec<String>, Lsn, Epoch) {
    let msg = agent
        .expect(what, Duration::from_secs(10), |m| {
            matches!(m, CoordMsg::Invalidate { .. })
        })
        .await;
    let CoordMsg::Invalidate {
        id,
        tables,
        lsn,
        epoch,
    } = msg
    else {
        unreachable!()
    };
    (id, tables, lsn, epoch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_fan_out_to_every_region_and_an_empty_region_is_marked_unusable() {
    let env = Env::start().await;
    let _c1 = env.coordinator("coord-1");
    let pg = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pg_a = pg.local_addr().unwrap().to_string();
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = pg.accept().await {
            held.push(sock);
        }
    });
    let mut a = bootstrap(&env, &pg_a).await;
    env.register(
        "node-b",
        &format!("127.0.0.1:{}", free_tcp_port()),
        Role::Replica,
    )
    .await;
    let mut replica = heartbeat("node-b", Role::Replica);
    replica.receiver_streaming = true;
    replica.upstream = Some("node-a".into());
    replica.epoch_seen = Epoch(1);
    let mut b = FakeAgent::start(&env, "node-b", replica);
    b.wait_connected().await;

    // Both regions get the flush of epoch 1 first (acked inside `expect`), then the batch.
    let lsn = Lsn(0x300_0100);
    a.out
        .send(AgentMsg::Changes {
            batch_id: 42,
            tables: vec!["public.t".into()],
            commit_lsn: lsn,
        })
        .unwrap();
    let (id_b, tables, got_lsn, epoch) =
        expect_invalidate(&mut b, "Invalidate in node-b's region").await;
    assert_eq!(tables, vec!["public.t".to_owned()]);
    assert_eq!(got_lsn, lsn);
    assert_eq!(epoch, Epoch(1));
    let (id_a, ..) = expect_invalidate(&mut a, "Invalidate in node-a's region").await;
    a.ack(id_a);
    // The primary is not acked before every region acked.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(msg) = a.cmds.try_recv() {
        assert!(
            !matches!(msg, CoordMsg::Ack { .. }),
            "batch acked before node-b's region: {msg:?}"
        );
    }
    b.ack(id_b);
    a.expect("Ack{42}", Duration::from_secs(5), |m| {
        matches!(m, CoordMsg::Ack { batch_id: 42 })
    })
    .await;

    // node-b's agent goes silent: its region has no agent, is marked unusable
    // in etcd, and the primary's batch is acked anyway.
    b.beating.store(false, Ordering::SeqCst);
    drop(b);
    tokio::time::sleep(Duration::from_millis(800)).await; // > suspect_after (500 ms)
    a.out
        .send(AgentMsg::Changes {
            batch_id: 43,
            tables: vec!["app.o".into()],
            commit_lsn: Lsn(0x300_0200),
        })
        .unwrap();
    a.expect("Ack{43}", Duration::from_secs(10), |m| {
        matches!(m, CoordMsg::Ack { batch_id: 43 })
    })
    .await;
    let mut etcd = env.etcd().await.unwrap();
    let resp = etcd
        .get(format!("/meridian/{CLUSTER}/cache/node-b-region"), None)
        .await
        .unwrap();
    let kv = resp.kvs().first().expect("cache/node-b-region written");
    let rec: meridian_shared::cache_keys::CacheRegionRecord =
        serde_json::from_slice(kv.value()).unwrap();
    assert!(!rec.usable);
    assert!(rec.since > 0);
    accept.abort();
}
