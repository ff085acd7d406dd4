//! Component tests: a whole session (login and relay) driven over `tokio::io::duplex` by
//! a real client library (tokio-postgres), against scripted backends — the [`Model`]
//! server, which panics on any message it does not expect, behind a scripted
//! [`Connector`]. Every backend task is joined at the end, so a model that failed makes
//! the test fail.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use meridian_shared::config::{PoolMode, ProxyConfig};
use meridian_sqlroute::{Classifier, FunctionCatalog};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::backends::{Connector, Held};
use super::Login;
use crate::backend::BackendConn;
use crate::client::ClientConn;
use crate::engine::backend_state::BackendState;
use crate::engine::Refusal;
use crate::health::ReplicaTable;
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::protocol::frontend::FrontendMsg;
use crate::route::Which;
use crate::shared::{Shared, SharedParts};
use crate::stream::MaybeTls;
use crate::testing::Model;
use crate::tls::BackendTls;
use crate::topology::Topology;
use crate::wire::{self, Frame};

/// What the scripted backends saw: (backend kind, statement text) of every Query/Parse.
type Log = Arc<Mutex<Vec<(Which, String)>>>;

struct ScriptConnector {
    replica: bool,
    next_pid: AtomicI32,
    connects: Arc<AtomicUsize>,
    servers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    log: Log,
}

impl ScriptConnector {
    fn new(replica: bool) -> ScriptConnector {
        ScriptConnector {
            replica,
            next_pid: AtomicI32::new(4000),
            connects: Arc::default(),
            servers: Arc::default(),
            log: Arc::default(),
        }
    }
}

/// One scripted backend: the model server over the far end of a pipe.
async fn model_server(mut stream: DuplexStream, w: Which, log: Log) {
    let mut model = Model::new();
    let mut buf = BytesMut::new();
    loop {
        let f = loop {
            if let Some(f) = wire::try_frame(&mut buf, 1 << 20).expect("the proxy sends frames") {
                break f;
            }
            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        };
        if f.tag == b'X' {
            return;
        }
        match FrontendMsg::decode(&f) {
            FrontendMsg::Query(t) => log
                .lock()
                .unwrap()
                .push((w, String::from_utf8_lossy(&t).into_owned())),
            FrontendMsg::Parse(p) => log
                .lock()
                .unwrap()
                .push((w, String::from_utf8_lossy(&p.query).into_owned())),
            _ => {}
        }
        model.handle(&f);
        let mut out = Vec::new();
        for a in model.out.drain(..) {
            out.extend_from_slice(&a.raw);
        }
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

impl Connector for ScriptConnector {
    async fn connect(&self, w: Which, _replica: Option<Arc<str>>) -> Result<Held, Refusal> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(model_server(theirs, w, self.log.clone()));
        self.servers.lock().unwrap().push(task);
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        let state = BackendState::new(
            pid,
            vec![
                ("server_version".into(), "15.18".into()),
                ("client_encoding".into(), "UTF8".into()),
                (
                    "in_hot_standby".into(),
                    (if w == Which::Replica { "on" } else { "off" }).into(),
                ),
            ],
        );
        let conn = BackendConn::from_stream(
            MaybeTls::Memory(ours),
            Arc::from(format!("{w:?}:1")),
            state,
            1 << 30,
        );
        Ok(Held::Owned(Box::new(conn)))
    }

    async fn connect_dedicated(&self) -> Result<Held, Refusal> {
        self.connect(Which::Primary, None).await
    }

    fn still_current(&self, _w: Which, _c: &BackendConn) -> bool {
        true
    }

    fn replica_available(&self) -> bool {
        self.replica
    }

    fn follows_leader(&self) -> bool {
        false
    }
}

fn shared() -> Arc<Shared> {
    let cfg = ProxyConfig::default();
    let (_cfg_tx, config) = watch::channel(Arc::new(cfg.clone()));
    let (_topo_tx, topology) = watch::channel(Arc::new(Topology::from_config(&cfg)));
    let (_stop_tx, shutdown) = watch::channel(false);
    // The senders are dropped: nothing changes during a test.
    Arc::new(Shared::new(SharedParts {
        config,
        pools: Arc::new(Pools::default()),
        topology,
        replicas: ReplicaTable::default(),
        classifier: Classifier::new(64),
        catalog: FunctionCatalog::with_builtin_defaults(),
        metrics: Arc::new(Metrics::new()),
        backend_tls: BackendTls::from_config(&cfg.backend_tls).expect("no TLS"),
        tls_acceptor: None,
        shutdown,
        cache: None,
    }))
}

/// Starts a session behind a duplex and connects tokio-postgres to it. Returns the client
/// and the connector's handles (connect count, backend tasks, log) and the session task.
async fn session(
    mode: PoolMode,
    replica: bool,
) -> (
    tokio_postgres::Client,
    Arc<AtomicUsize>,
    Arc<Mutex<Vec<JoinHandle<()>>>>,
    Log,
    JoinHandle<()>,
) {
    let connector = ScriptConnector::new(replica);
    let (connects, servers, log) = (
        connector.connects.clone(),
        connector.servers.clone(),
        connector.log.clone(),
    );
    let (client_side, proxy_side) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(async move {
        let mut client = ClientConn::new(proxy_side, 1 << 30);
        let wire::StartupPacket::Startup { params, .. } =
            client.read_startup(10_000).await.expect("a startup packet")
        else {
            panic!("not a startup packet");
        };
        // Authentication is the handshake's job: trust here.
        client.send(&Frame::new(b'R', &0i32.to_be_bytes()));
        let startup_params = params
            .into_iter()
            .filter(|(k, _)| k != "user" && k != "database")
            .collect();
        let login = Login {
            user: "app".into(),
            database: "db".into(),
            backend_user: "app".into(),
            backend_password: None,
            mode,
            startup_params,
        };
        super::login::serve(shared(), client, login, connector)
            .await
            .expect("the session ends cleanly");
    });
    let (client, conn) = tokio_postgres::Config::new()
        .user("app")
        .dbname("db")
        .connect_raw(client_side, tokio_postgres::NoTls)
        .await
        .expect("login through the session");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, connects, servers, log, task)
}

async fn join_all(servers: &Arc<Mutex<Vec<JoinHandle<()>>>>) {
    let tasks: Vec<_> = servers.lock().unwrap().drain(..).collect();
    for t in tasks {
        t.await
            .expect("a scripted backend failed (it panics on what it does not expect)");
    }
}

async fn texts(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.query(sql, &[])
        .await
        .expect(sql)
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[tokio::test]
async fn a_bound_session_serves_simple_extended_pipelined_and_failing_queries() {
    let (c, connects, servers, log, task) = session(PoolMode::Session, false).await;
    let rows = c.simple_query("select 1").await.unwrap();
    let n = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(n, 3);
    assert_eq!(texts(&c, "select 2").await, ["1", "2", "3"]);
    // Pipelined: tokio-postgres sends all three before reading; the middle one fails.
    let (a, b, d) = tokio::join!(
        c.query("select a", &[]),
        c.query("select fail", &[]),
        c.execute("insert into t values (1)", &[])
    );
    assert_eq!(a.unwrap().len(), 3);
    let e = b.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22012"), "{e}");
    assert_eq!(d.unwrap(), 1);
    // A transaction, and a failure inside it.
    c.batch_execute("begin").await.unwrap();
    c.execute("insert into t values (2)", &[]).await.unwrap();
    assert!(c.query("select fail", &[]).await.is_err());
    let e = c
        .execute("insert into t values (3)", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25P02"), "{e}");
    c.batch_execute("rollback").await.unwrap();
    assert_eq!(texts(&c, "select 4").await.len(), 3);
    drop(c);
    task.await.unwrap();
    assert_eq!(connects.load(Ordering::SeqCst), 1, "one backend for life");
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .all(|(w, _)| *w == Which::Primary));
    join_all(&servers).await;
}

#[tokio::test]
async fn a_virtual_session_splits_reads_and_writes_and_renames_statements() {
    let (c, _connects, servers, log, task) = session(PoolMode::Session, true).await;
    assert_eq!(texts(&c, "select 1").await.len(), 3);
    c.execute("insert into t values (1)", &[]).await.unwrap();
    // The same statement again, prepared once per backend under the proxy's name.
    let s = c.prepare("select 5").await.unwrap();
    for _ in 0..3 {
        assert_eq!(c.query(&s, &[]).await.unwrap().len(), 3);
    }
    drop(c);
    task.await.unwrap();
    let log = log.lock().unwrap().clone();
    let on = |w: Which, text: &str| log.iter().filter(|(x, t)| *x == w && t == text).count();
    assert!(on(Which::Replica, "select 1") >= 1, "{log:?}");
    assert_eq!(on(Which::Replica, "insert into t values (1)"), 0);
    assert!(
        on(Which::Primary, "insert into t values (1)") >= 1,
        "{log:?}"
    );
    assert_eq!(on(Which::Replica, "select 5"), 1, "prepared once: {log:?}");
    join_all(&servers).await;
}

#[tokio::test]
async fn transaction_pooling_gives_backends_back_between_transactions() {
    let (c, connects, servers, _log, task) = session(PoolMode::Transaction, false).await;
    for i in 0..3 {
        c.batch_execute("begin").await.unwrap();
        c.execute(&format!("insert into t values ({i})"), &[])
            .await
            .unwrap();
        c.batch_execute("commit").await.unwrap();
    }
    drop(c);
    task.await.unwrap();
    // Not pooled here (owned connections close when given back): one per transaction,
    // plus the login's.
    assert_eq!(connects.load(Ordering::SeqCst), 4);
    join_all(&servers).await;
}
