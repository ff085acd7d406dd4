//! Real-server tests of `meridian_agent::invalidation`: logical replication
//! from a PostgreSQL 15 primary (slot, publication, batches, confirmation only
//! after the ack, re-delivery after a restart) and the Redis applier (watermarks,
//! tag deletion, the pub/sub event, flushing older epochs, Redis down).
//! They need the PostgreSQL 15 server programs, the `postgres` OS user and
//! `redis-server` on PATH.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_agent::invalidation::batcher::Batch;
use meridian_agent::invalidation::redis_apply::{RedisApplier, RedisApplyConfig};
use meridian_agent::invalidation::stream::{self, StreamConfig};
use meridian_agent::postgres::{OsUser, PgBinaries, PgNode, PgNodeSpec};
use meridian_shared::cache_keys;
use meridian_shared::epoch::Epoch;
use meridian_shared::lsn::Lsn;
use redis::Commands;
use tokio::sync::mpsc;

fn free_port() -> u16 {
    // Below the kernel's ephemeral range: no port-0 bind or outgoing
    // connection can take it before the server binds it.
    meridian_launcher::ports::free_port().unwrap()
}

/// Waits for `cond` up to `deadline`, polling every 20 ms.
fn eventually(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Polls `cond` every 20 ms for up to 10 s without blocking the runtime.
async fn eventually_async(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

async fn recv_batch(rx: &mut mpsc::Receiver<Batch>, what: &str) -> Batch {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no batch for {what} within 10 s"))
        .expect("stream task ended")
}

/// Receives batches until one names `table`, skipping re-sends of others.
async fn batch_with(rx: &mut mpsc::Receiver<Batch>, table: &str) -> Batch {
    loop {
        let b = recv_batch(rx, table).await;
        if b.tables.iter().any(|t| t == table) {
            return b;
        }
    }
}

async fn confirmed_flush(c: &tokio_postgres::Client) -> Lsn {
    let s: String = c
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'meridian_inval'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

async fn current_lsn(c: &tokio_postgres::Client) -> Lsn {
    let s: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

async fn wait_confirmed(c: &tokio_postgres::Client, at_least: Lsn) -> Lsn {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let lsn = confirmed_flush(c).await;
        if lsn >= at_least || Instant::now() > end {
            return lsn;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The invalidation horizon the stream reports (`None` before its first report).
type Horizon = Arc<Mutex<Option<Lsn>>>;

fn spawn_stream(
    cfg: StreamConfig,
) -> (
    tokio::task::JoinHandle<()>,
    mpsc::Receiver<Batch>,
    mpsc::Sender<u64>,
    Horizon,
) {
    let (out_tx, out_rx) = mpsc::channel(64);
    let (ack_tx, mut ack_rx) = mpsc::channel(64);
    let horizon: Horizon = Arc::default();
    let reported = horizon.clone();
    let task = tokio::spawn(async move {
        let report = move |lsn| *reported.lock().unwrap() = Some(lsn);
        let r = stream::run(&cfg, &out_tx, &mut ack_rx, &report).await;
        panic!("stream ended: {r:?}");
    });
    (task, out_rx, ack_tx, horizon)
}

fn horizon_of(h: &Horizon) -> Lsn {
    h.lock().unwrap().unwrap_or(Lsn::ZERO)
}

async fn flush_lsn(c: &tokio_postgres::Client) -> Lsn {
    let s: String = c
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_changes_are_batched_and_confirmed_only_after_the_ack() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bins = PgBinaries::discover(None).expect("PostgreSQL server programs installed");
    let user = OsUser::ensure("postgres").await.unwrap();
    let mut spec = PgNodeSpec::new("inval0", dir.path().join("inval0"), free_port());
    spec.settings.fsync = false;
    let node = PgNode::new(bins, user, spec);
    node.initdb().await.unwrap();
    node.start().await.unwrap();
    node.wait_ready(Duration::from_secs(30)).await.unwrap();
    let c = node.client().await.unwrap();
    c.batch_execute(
        "CREATE SCHEMA app; CREATE TABLE public.t (id int primary key, v text);
         CREATE TABLE app.orders (id int primary key, qty int);",
    )
    .await
    .unwrap();

    let mut cfg = StreamConfig::new(&node.host(), node.port());
    cfg.status_interval = Duration::from_millis(100);
    cfg.resend_after = Duration::from_millis(300);
    let (task, mut rx, acks, horizon) = spawn_stream(cfg.clone());

    // The slot and the publication exist once streaming runs.
    let end = Instant::now() + Duration::from_secs(10);
    while c
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'meridian_inval' AND active",
            &[],
        )
        .await
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < end, "slot not active within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = current_lsn(&c).await;
    c.batch_execute("INSERT INTO public.t VALUES (1, 'a')")
        .await
        .unwrap();
    let after = current_lsn(&c).await;
    let one = batch_with(&mut rx, "public.t").await;
    assert_eq!(one.tables, vec!["public.t".to_owned()]);
    assert!(
        one.commit_lsn > before && one.commit_lsn <= after,
        "{before} < {} <= {after}",
        one.commit_lsn
    );

    // Not acked: re-sent, and neither the slot nor the invalidation horizon
    // moves past it.
    let again = recv_batch(&mut rx, "the re-send").await;
    assert_eq!(again, one, "an unacked batch is re-sent unchanged");
    assert!(confirmed_flush(&c).await < one.commit_lsn);
    assert!(horizon_of(&horizon) < one.commit_lsn);

    acks.send(one.batch_id).await.unwrap();
    let confirmed = wait_confirmed(&c, one.commit_lsn).await;
    assert!(confirmed >= one.commit_lsn, "confirmed {confirmed}");
    assert!(
        eventually_async(|| horizon_of(&horizon) >= one.commit_lsn).await,
        "the horizon follows the ack: {}",
        horizon_of(&horizon)
    );

    // Several tables in one transaction, TRUNCATE included.
    c.batch_execute(
        "BEGIN; UPDATE public.t SET v = 'b'; INSERT INTO app.orders VALUES (1, 1); COMMIT;
         TRUNCATE app.orders;",
    )
    .await
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut last = Lsn::ZERO;
    while !(seen.contains("public.t") && seen.contains("app.orders") && last > one.commit_lsn) {
        let b = recv_batch(&mut rx, "update + truncate").await;
        seen.extend(b.tables.iter().cloned());
        last = last.max(b.commit_lsn);
        acks.send(b.batch_id).await.unwrap();
    }
    let truncated_at = current_lsn(&c).await;
    let confirmed = wait_confirmed(&c, last).await;
    assert!(confirmed >= last && confirmed <= truncated_at);

    // WAL without table changes (a checkpoint record) moves the horizon up to
    // everything flushed: an idle primary's horizon keeps up with its replicas.
    c.batch_execute("CHECKPOINT").await.unwrap();
    let flushed = flush_lsn(&c).await;
    let end = Instant::now() + Duration::from_secs(10);
    while horizon_of(&horizon) < flushed {
        assert!(
            Instant::now() < end,
            "the horizon did not reach the flushed position {flushed}: {}",
            horizon_of(&horizon)
        );
        // Batches still unacked (the TRUNCATE's) hold it back until acked.
        while let Ok(b) = rx.try_recv() {
            acks.send(b.batch_id).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Everything is acked: no re-send can follow what is queued now.
    while rx.try_recv().is_ok() {}

    // A batch the coordinator never acked is delivered again after a restart.
    c.batch_execute("INSERT INTO app.orders VALUES (2, 2)")
        .await
        .unwrap();
    let lost = batch_with(&mut rx, "app.orders").await;
    task.abort();
    let _ = task.await;
    let (task, mut rx, _acks, _horizon) = spawn_stream(cfg.clone());
    let replayed = batch_with(&mut rx, "app.orders").await;
    assert_eq!(replayed.commit_lsn, lost.commit_lsn);
    assert_ne!(
        replayed.batch_id, lost.batch_id,
        "a new session numbers afresh"
    );
    task.abort();
    let _ = task.await;

    assert!(stream::drop_slot(&cfg).await.unwrap());
    assert!(!stream::drop_slot(&cfg).await.unwrap());
    drop(c);
    node.stop(meridian_agent::postgres::StopMode::Fast)
        .await
        .unwrap();
}

struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let server = RedisServer { child, port };
        assert!(
            eventually(Duration::from_secs(10), || server
                .client()
                .get_connection()
                .is_ok()),
            "redis-server did not come up"
        );
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_flush_against_a_real_redis() {
    let mut server = RedisServer::start();
    let mut con = server.client().get_connection().unwrap();
    let cluster = "c1";
    let e3 = Epoch(3);
    let entry_a = cache_keys::entry_key(cluster, e3, "aaa");
    let entry_b = cache_keys::entry_key(cluster, e3, "bbb");
    let entry_other = cache_keys::entry_key(cluster, e3, "other");
    let entry_old = cache_keys::entry_key(cluster, Epoch(2), "old");
    let tag_old = cache_keys::tag_key(cluster, Epoch(2), "public.t");
    for k in [&entry_a, &entry_b, &entry_other, &entry_old] {
        let _: () = con.set(k, "rows").unwrap();
    }
    let tag_t = cache_keys::tag_key(cluster, e3, "public.t");
    let _: () = con.sadd(&tag_t, &[&entry_a, &entry_b]).unwrap();
    let _: () = con.sadd(&tag_old, &entry_old).unwrap();
    let tag_other = cache_keys::tag_key(cluster, e3, "public.other");
    let _: () = con.sadd(&tag_other, &entry_other).unwrap();
    let wm_o = cache_keys::watermark_key(cluster, "app.o");
    let _: () = con.set(&wm_o, "5000").unwrap();

    // A subscriber for the published event.
    let (ev_tx, ev_rx) = std::sync::mpsc::channel::<String>();
    let sub_client = server.client();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sub = sub_client.get_connection().unwrap();
        let mut ps = sub.as_pubsub();
        ps.subscribe(cache_keys::INVALIDATE_CHANNEL).unwrap();
        ready_tx.send(()).unwrap();
        ps.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while let Ok(msg) = ps.get_message() {
            if ev_tx.send(msg.get_payload().unwrap()).is_err() {
                break;
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let applier = RedisApplier::new(&server.url(), cluster, RedisApplyConfig::default()).unwrap();
    let lsn = Lsn(1000);
    let out = applier
        .invalidate(&["t".to_owned(), "app.o".to_owned()], lsn, e3)
        .await
        .unwrap();
    assert_eq!(out.raised, 1, "app.o's watermark is already higher");
    assert_eq!(out.deleted, 2);
    let wm_t: String = con
        .get(cache_keys::watermark_key(cluster, "public.t"))
        .unwrap();
    assert_eq!(wm_t, "1000");
    let wm_o_now: String = con.get(&wm_o).unwrap();
    assert_eq!(wm_o_now, "5000", "a watermark is never lowered");
    let exists = |con: &mut redis::Connection, k: &str| -> bool { con.exists(k).unwrap() };
    assert!(!exists(&mut con, &entry_a));
    assert!(!exists(&mut con, &entry_b));
    assert!(!exists(&mut con, &tag_t));
    assert!(exists(&mut con, &entry_other), "untagged entries stay");
    assert!(
        exists(&mut con, &entry_old),
        "other epochs are FlushCache's job"
    );

    let event: cache_keys::InvalidationEvent =
        serde_json::from_str(&ev_rx.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
    assert_eq!(
        event,
        cache_keys::InvalidationEvent {
            tables: vec!["public.t".into(), "app.o".into()],
            lsn,
            epoch: e3
        }
    );

    // Applying an older LSN again is harmless; a larger decimal length compares right.
    applier
        .invalidate(&["public.t".to_owned()], Lsn(999), e3)
        .await
        .unwrap();
    let wm_t: String = con
        .get(cache_keys::watermark_key(cluster, "public.t"))
        .unwrap();
    assert_eq!(wm_t, "1000");
    applier
        .invalidate(&["public.t".to_owned()], Lsn(10_000), e3)
        .await
        .unwrap();
    let wm_t: String = con
        .get(cache_keys::watermark_key(cluster, "public.t"))
        .unwrap();
    assert_eq!(wm_t, "10000");

    // FlushCache for epoch 3 drops epoch 2 and keeps epoch 3 and the watermarks.
    let n = applier.flush_older_epochs(e3).await.unwrap();
    assert_eq!(n, 2);
    assert!(!exists(&mut con, &entry_old));
    assert!(!exists(&mut con, &tag_old));
    assert!(exists(&mut con, &entry_other));
    assert!(exists(&mut con, &tag_other));
    assert!(exists(&mut con, &wm_o));

    // Redis down: an error, quickly.
    drop(con);
    server.stop();
    let started = Instant::now();
    let res = applier
        .invalidate(&["public.t".to_owned()], Lsn(20_000), e3)
        .await;
    assert!(res.is_err(), "{res:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let fresh = RedisApplier::new(&server.url(), cluster, RedisApplyConfig::default()).unwrap();
    assert!(fresh.flush_older_epochs(e3).await.is_err());
}
