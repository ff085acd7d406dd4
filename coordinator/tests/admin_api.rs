//! The admin surface end to end: `serve_admin` and `serve_http` in-process over a
//! `ControlHandle` whose loop side the test drives, a real etcd, and the real
//! `meridianctl` binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use meridian_coordinator::admin::proto::{self, admin_client::AdminClient};
use meridian_coordinator::control::{
    self, ClusterEvent, ClusterStatus, ControlHandle, ControlLoopSide, NodeStatus, Operation,
    ProxyStatus,
};
use meridian_shared::keys::Keys;
use meridian_shared::records::{ClusterConfig, CoordinatorRecord, SyncMode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

const CLUSTER: &str = "admintest";
const DEADLINE: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    // Below the kernel's ephemeral range: no port-0 bind or outgoing
    // connection can take it before the server binds it.
    meridian_launcher::ports::free_port().unwrap()
}

/// A private etcd on free ports, killed (by PID) on drop.
struct Etcd {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    async fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let client = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = std::process::Command::new("/usr/bin/etcd")
            .arg("--name")
            .arg("admintest")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("admintest={peer}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start /usr/bin/etcd");
        let etcd = Etcd {
            child,
            url: client,
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([&etcd.url], None).await {
                if c.get("probe", None).await.is_ok() {
                    return etcd;
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "etcd did not come up; log: {}",
                std::fs::read_to_string(etcd._dir.path().join("etcd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([&self.url], None)
            .await
            .unwrap()
    }

    async fn config(&self) -> Option<ClusterConfig> {
        let resp = self
            .client()
            .await
            .get(Keys::new(CLUSTER).config(), None)
            .await
            .unwrap();
        resp.kvs()
            .first()
            .map(|kv| serde_json::from_slice(kv.value()).unwrap())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `cond` holds, or fails with `what`.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_listening(addr: SocketAddr) {
    eventually(&format!("{addr} listening"), || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
}

/// Starts `serve_admin`; dropping the sender shuts it down.
async fn start_admin(
    handle: ControlHandle,
    etcd: &Etcd,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let client = etcd.client().await;
    let task = tokio::spawn(async move {
        meridian_coordinator::admin::serve_admin(handle, client, Keys::new(CLUSTER), addr, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    wait_listening(addr).await;
    (addr, tx, task)
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn ctl_command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meridianctl"));
    cmd.args(args)
        .env_remove("MERIDIANCTL_ADMIN")
        .env_remove("MERIDIANCTL_ETCD")
        .env_remove("MERIDIANCTL_CLUSTER")
        .env_remove("MERIDIANCTL_DIR")
        .kill_on_drop(true);
    cmd
}

async fn ctl(args: &[&str]) -> Out {
    let out = tokio::time::timeout(DEADLINE, ctl_command(args).output())
        .await
        .unwrap_or_else(|_| panic!("meridianctl {args:?} did not finish"))
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ctl_ok(args: &[&str]) -> String {
    let out = ctl(args).await;
    assert_eq!(
        out.code, 0,
        "meridianctl {args:?} failed: {}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

fn status(coordinator: &str, active: bool) -> ClusterStatus {
    ClusterStatus {
        cluster: CLUSTER.into(),
        coordinator: coordinator.into(),
        active,
        epoch: 3,
        leader: Some("n1".into()),
        state: "serving".into(),
        paused: false,
        sync_mode: "off".into(),
        sync_standbys: vec![],
        nodes: vec![
            NodeStatus {
                name: "n1".into(),
                region: "us-east".into(),
                role: "primary".into(),
                state: "running".into(),
                timeline: 2,
                pg_addr: "127.0.0.1:5432".into(),
                member: true,
                pg_up: true,
                epoch_seen: 3,
                last_heartbeat_ms: Some(20),
                ..NodeStatus::default()
            },
            NodeStatus {
                name: "n2".into(),
                region: "us-west".into(),
                role: "replica".into(),
                state: "streaming".into(),
                timeline: 2,
                lag_bytes: Some(0),
                lag_ms: Some(12),
                pg_addr: "127.0.0.1:5433".into(),
                member: true,
                pg_up: true,
                epoch_seen: 3,
                last_heartbeat_ms: Some(30),
            },
        ],
        proxies: vec![ProxyStatus {
            id: "px-east".into(),
            region: "us-east".into(),
            listen_addr: "127.0.0.1:6432".into(),
            version: "0.1.0".into(),
        }],
        cache_unusable: Vec::new(),
    }
}

/// The loop side: answers operations (switchover succeeds, failover is refused)
/// and reports each one it received.
fn drive_loop(mut side: ControlLoopSide) -> (mpsc::UnboundedReceiver<Operation>, ControlLoopSide) {
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let (_, dummy_rx) = mpsc::channel(1);
    let mut ops = std::mem::replace(&mut side.operations, dummy_rx);
    tokio::spawn(async move {
        while let Some((op, answer)) = ops.recv().await {
            let result = match &op {
                Operation::Switchover { to } => Ok(format!(
                    "switched over to {}",
                    to.as_deref().unwrap_or("the best replica")
                )),
                Operation::Failover { to, .. } => {
                    Err(format!("{to} is not a member of the cluster"))
                }
            };
            let _ = seen_tx.send(op);
            let _ = answer.send(result);
        }
    });
    (seen_rx, side)
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn event(kind: &str, message: &str) -> ClusterEvent {
    ClusterEvent {
        at_ms: 1_700_000_000_000,
        kind: kind.into(),
        node: Some("n2".into()),
        epoch: 3,
        message: message.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meridianctl_against_the_active_coordinator() {
    let etcd = Etcd::start().await;
    let (handle, side) = control::channel();
    let (mut seen, side) = drive_loop(side);
    side.status.send(status("c1", true)).unwrap();
    let (addr, stop_admin, admin_task) = start_admin(handle.clone(), &etcd).await;
    let admin = addr.to_string();

    // status --json: the documented shape.
    let out = ctl_ok(&["--admin", &admin, "status", "--json"]).await;
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["epoch"], 3);
    assert_eq!(doc["leader"], "n1");
    assert_eq!(doc["state"], "serving");
    assert_eq!(doc["active"], true);
    let nodes = doc["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[1]["name"], "n2");
    assert_eq!(nodes[1]["region"], "us-west");
    assert_eq!(nodes[1]["role"], "replica");
    assert_eq!(nodes[1]["state"], "streaming");
    assert_eq!(nodes[1]["timeline"], 2);
    assert_eq!(nodes[1]["lag_bytes"], 0);
    assert_eq!(doc["proxies"][0]["id"], "px-east");

    // The table, flags after the subcommand.
    let table = ctl_ok(&["status", "--admin", &admin]).await;
    assert!(table.contains("| n1* "), "{table}");
    assert!(
        table.contains("Leader: n1 | State: serving | Epoch: 3"),
        "{table}"
    );
    assert!(
        table.contains("Proxies: px-east (us-east, 127.0.0.1:6432)"),
        "{table}"
    );

    // pause / resume change etcd's config.
    assert_eq!(etcd.config().await, None);
    let out = ctl_ok(&["--admin", &admin, "pause"]).await;
    assert!(out.contains("paused"), "{out}");
    assert_eq!(etcd.config().await.map(|c| c.paused), Some(true));
    let out = ctl_ok(&["--admin", &admin, "pause"]).await;
    assert!(out.contains("already paused"), "{out}");
    ctl_ok(&["--admin", &admin, "resume"]).await;
    assert_eq!(etcd.config().await.map(|c| c.paused), Some(false));

    // config set / get.
    let out = ctl_ok(&[
        "--admin",
        &admin,
        "config",
        "set",
        "failover_hold=3s",
        "sync_mode=on",
    ])
    .await;
    assert!(out.contains("\"failover_hold\": \"3s\""), "{out}");
    let cfg = etcd.config().await.unwrap();
    assert_eq!(cfg.failover_hold, Duration::from_secs(3));
    assert_eq!(
        ctl_ok(&["--admin", &admin, "config", "get", "failover_hold"])
            .await
            .trim(),
        "3s"
    );
    let bad = ctl(&["--admin", &admin, "config", "set", "suspect_after=10ms"]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("suspect_after"), "{}", bad.stderr);
    let bad = ctl(&["--admin", &admin, "config", "set", "bogus=1"]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("`bogus`"), "{}", bad.stderr);
    assert_eq!(
        etcd.config().await.unwrap().suspect_after,
        Duration::from_millis(500)
    );

    // Concurrent writers of different keys: the txn on mod_revision loses none.
    let writers = [
        vec!["config", "set", "max_failover_lag=7"],
        vec!["config", "set", "region_priority=us-west,us-east"],
        vec!["config", "set", "heartbeat_interval=50ms"],
        vec!["config", "set", "failover_hold=4s"],
        vec!["pause"],
    ];
    let runs = writers.iter().map(|w| {
        let mut args = vec!["--admin", admin.as_str()];
        args.extend(w.iter().copied());
        async move { ctl(&args).await }
    });
    for out in futures::future::join_all(runs).await {
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    }
    let cfg = etcd.config().await.unwrap();
    assert_eq!(cfg.max_failover_lag, 7);
    assert_eq!(cfg.region_priority, ["us-west", "us-east"]);
    assert_eq!(cfg.heartbeat_interval, Duration::from_millis(50));
    assert_eq!(cfg.failover_hold, Duration::from_secs(4));
    assert!(cfg.paused);
    assert_eq!(cfg.sync_mode, SyncMode::On, "kept from before");

    // The API directly: a whole config as JSON, unknown keys refused by name.
    let mut api = AdminClient::connect(format!("http://{admin}"))
        .await
        .unwrap();
    let reply = api
        .set_config(proto::SetConfigRequest {
            json: r#"{"paused": false, "max_failover_lag": 99}"#.into(),
            settings: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.changed);
    let cfg = etcd.config().await.unwrap();
    assert_eq!((cfg.paused, cfg.max_failover_lag), (false, 99));
    assert_eq!(
        cfg.failover_hold,
        Duration::from_secs(10),
        "defaults for the rest"
    );
    let err = api
        .set_config(proto::SetConfigRequest {
            json: r#"{"max_lag": 1}"#.into(),
            settings: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("`max_lag`"), "{}", err.message());
    let got = api
        .get_config(proto::GetConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    let got: ClusterConfig = serde_json::from_str(&got.json).unwrap();
    assert_eq!(got, cfg);

    // switchover goes through the loop; a refused failover exits 1 with the refusal.
    let out = ctl_ok(&["--admin", &admin, "switchover", "--to", "n2"]).await;
    assert!(out.contains("switched over to n2"), "{out}");
    assert_eq!(
        seen.recv().await,
        Some(Operation::Switchover {
            to: Some("n2".into())
        })
    );
    let refused = ctl(&["--admin", &admin, "failover", "--to", "n3", "--force"]).await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("n3 is not a member of the cluster"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        seen.recv().await,
        Some(Operation::Failover {
            to: "n3".into(),
            force: true
        })
    );

    // events: recent ones, and --follow for new ones.
    side.events.send(event("promoted", "first-marker")).unwrap();
    eventually("`meridianctl events` shows the emitted event", || {
        let admin = admin.clone();
        async move {
            let out = ctl_ok(&["--admin", &admin, "events"]).await;
            out.lines()
                .any(|l| l.contains("promoted node=n2 epoch=3 first-marker"))
        }
    })
    .await;
    let events = ctl_ok(&["--admin", &admin, "events"]).await;
    assert!(events.contains(" paused "), "pause is an event: {events}");

    let mut follower = ctl_command(&["--admin", &admin, "events", "--follow", "--recent", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(follower.stdout.take().unwrap()).lines();
    // Keep emitting until the follower (which subscribes asynchronously) prints one.
    let found = tokio::time::timeout(DEADLINE, async {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = tick.tick() => { let _ = side.events.send(event("suspect", "live-marker")); }
                line = lines.next_line() => {
                    let line = line.unwrap().expect("follower ended early");
                    if line.contains("live-marker") { return line; }
                }
            }
        }
    })
    .await
    .expect("events --follow printed the live event");
    assert!(found.contains("suspect node=n2"), "{found}");
    assert!(!found.contains("first-marker"));

    // Shutdown ends the followed stream: the follower exits and serve_admin returns.
    stop_admin.send(()).unwrap();
    tokio::time::timeout(DEADLINE, admin_task)
        .await
        .expect("serve_admin stops on shutdown with a follower connected")
        .unwrap();
    let status = tokio::time::timeout(DEADLINE, follower.wait())
        .await
        .expect("the follower exits when the coordinator shuts down")
        .unwrap();
    assert_eq!(status.code(), Some(3), "{status:?}");

    // Nothing listening: exit 3, naming the address.
    let dead = format!("127.0.0.1:{}", free_port());
    let out = ctl(&["--admin", &dead, "status"]).await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains(&dead), "{}", out.stderr);
    // No cluster given: usage.
    let out = ctl(&["status"]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--admin"), "{}", out.stderr);
    assert_eq!(ctl(&["frobnicate"]).await.code, 2);

    // HTTP: health, metrics, status page.
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (stop_http, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(meridian_coordinator::http::serve_http(
        handle.clone(),
        http,
        async {
            let _ = stop_rx.await;
        },
    ));
    wait_listening(http).await;
    let (code, body) = http_get(http, "/health").await;
    assert_eq!(code, 200);
    let health: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(health, serde_json::json!({"status": "ok", "active": true}));
    side.events
        .send(event("failover_started", "http-marker"))
        .unwrap();
    let (code, body) = http_get(http, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("meridian_epoch 3"), "{body}");
    assert!(
        body.contains("meridian_replica_lag_bytes{node=\"n2\"} 0"),
        "{body}"
    );
    eventually("failover counted in /metrics", || async move {
        http_get(http, "/metrics")
            .await
            .1
            .contains("meridian_failovers_total 1")
    })
    .await;
    let (code, page) = http_get(http, "/").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("<td>n2</td>") && page.contains("http-marker"),
        "{page}"
    );
    assert_eq!(http_get(http, "/nope").await.0, 404);
    stop_http.send(()).unwrap();
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("serve_http stops on shutdown")
        .unwrap()
        .unwrap();
}

fn write_cluster_file(dir: &Path, etcd: &str, admins: &[(&str, SocketAddr)]) {
    let file = meridian_launcher::ClusterFile {
        cluster: CLUSTER.into(),
        etcd: vec![etcd.into()],
        coordinators: admins
            .iter()
            .map(|(name, addr)| meridian_launcher::CoordinatorEntry {
                name: name.to_string(),
                admin_addr: addr.to_string(),
                pid: 0,
            })
            .collect(),
        regions: vec![],
        nodes: vec![],
    };
    std::fs::write(dir.join("cluster.json"), serde_json::to_vec(&file).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_refuses_and_discovery_finds_the_active() {
    let etcd = Etcd::start().await;
    let (active_handle, active_side) = control::channel();
    let (_seen, active_side) = drive_loop(active_side);
    active_side.status.send(status("c1", true)).unwrap();
    let (standby_handle, standby_side) = control::channel();
    standby_side.status.send(status("c2", false)).unwrap();
    let (active, _stop_a, _) = start_admin(active_handle, &etcd).await;
    let (standby, _stop_b, _) = start_admin(standby_handle, &etcd).await;

    // c1 wins the election with its admin address.
    let mut client = etcd.client().await;
    let lease = client.lease_grant(30, None).await.unwrap().id();
    let record = CoordinatorRecord {
        name: "c1".into(),
        admin_addr: active.to_string(),
        quic_addr: "127.0.0.1:1".into(),
        quic_addrs: Default::default(),
    };
    client
        .campaign(
            Keys::new(CLUSTER).coordinator_election(),
            serde_json::to_vec(&record).unwrap(),
            lease,
        )
        .await
        .unwrap();

    // The standby answers status and names the active coordinator.
    let out = ctl_ok(&["--admin", &standby.to_string(), "status", "--json"]).await;
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["active"], false);
    assert_eq!(doc["coordinator"], "c2");
    assert_eq!(doc["active_coordinator"]["admin_addr"], active.to_string());
    // ... and refuses mutations.
    for args in [
        vec!["pause"],
        vec!["switchover"],
        vec!["config", "set", "paused=true"],
    ] {
        let mut full = vec!["--admin".to_string(), standby.to_string()];
        full.extend(args.iter().map(|s| s.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        let out = ctl(&full).await;
        assert_eq!(out.code, 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr
                .contains(&format!("not the active coordinator; active is {active}")),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert_eq!(etcd.config().await, None, "a standby wrote config");

    // --etcd/--cluster: the election leader's admin address.
    let out = ctl_ok(&[
        "--etcd",
        &etcd.url,
        "--cluster",
        CLUSTER,
        "status",
        "--json",
    ])
    .await;
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["coordinator"], "c1");
    let out = ctl(&["--etcd", &etcd.url, "--cluster", "nosuch", "status"]).await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains("nosuch"), "{}", out.stderr);

    // --dir: the standby is listed first; the active one is used.
    let dir = tempfile::tempdir().unwrap();
    write_cluster_file(dir.path(), &etcd.url, &[("c2", standby), ("c1", active)]);
    let dir_arg = dir.path().to_str().unwrap();
    let out = ctl_ok(&["--dir", dir_arg, "status", "--json"]).await;
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["coordinator"], "c1");
    // Only the standby listed: its hint leads to the active one (through the env var).
    let hint_dir = tempfile::tempdir().unwrap();
    write_cluster_file(hint_dir.path(), &etcd.url, &[("c2", standby)]);
    let out = ctl_command(&["pause"])
        .env("MERIDIANCTL_DIR", hint_dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(etcd.config().await.map(|c| c.paused), Some(true));
    // Nothing reachable: exit 3 naming what was tried.
    let dead_dir = tempfile::tempdir().unwrap();
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    write_cluster_file(dead_dir.path(), &etcd.url, &[("c9", dead)]);
    let out = ctl(&["--dir", dead_dir.path().to_str().unwrap(), "status"]).await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(out.stderr.contains(&dead.to_string()), "{}", out.stderr);
}

#[tokio::test]
async fn certs_writes_a_dev_pki() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = ctl_ok(&["certs", "--dir", d, "--names", "n1,c1"]).await;
    for file in [
        "ca.pem",
        "ca-key.pem",
        "n1.pem",
        "n1-key.pem",
        "c1.pem",
        "c1-key.pem",
    ] {
        let path = dir.path().join(file);
        assert!(out.contains(path.to_str().unwrap()), "{out}");
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("-----BEGIN"));
    }
}
