//! Real-PostgreSQL tests of `meridian_agent::postgres`: initdb, start, stop,
//! kill, clone a standby with a slot, replay, promotion and pg_controldata.
//! They need the PostgreSQL 15 server programs (integration/run-tests.sh
//! installs them) and, when run as root, the `postgres` OS user (created if
//! missing).

#![allow(clippy::unwrap_used)] // a test binary: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use meridian_agent::postgres::{
    basebackup, wait_replay, ClusterState, Conninfo, OsUser, PgBinaries, PgError, PgNode,
    PgNodeSpec, StopMode,
};

const READY: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    // Below the kernel's ephemeral range: no port-0 bind or outgoing
    // connection can take it before the server binds it.
    meridian_launcher::ports::free_port().unwrap()
}

async fn setup() -> (tempfile::TempDir, PgBinaries, OsUser) {
    let dir = tempfile::tempdir().unwrap();
    // The postgres user must be able to reach the data directories.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bins = PgBinaries::discover(None).expect("PostgreSQL server programs installed");
    let user = OsUser::ensure("postgres").await.unwrap();
    (dir, bins, user)
}

fn spec(dir: &tempfile::TempDir, name: &str) -> PgNodeSpec {
    let mut spec = PgNodeSpec::new(name, dir.path().join(name), free_port());
    spec.settings.fsync = false;
    spec
}

fn refuses(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_standby_promote_stop_and_kill() {
    let (dir, bins, user) = setup().await;

    let primary = PgNode::new(bins.clone(), user.clone(), spec(&dir, "node0"));
    primary.initdb().await.unwrap();
    let meta = std::fs::metadata(primary.data_dir()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    primary.start().await.unwrap();
    primary.wait_ready(READY).await.unwrap();
    assert!(primary.is_running());
    assert!(!primary.is_in_recovery().await.unwrap());
    assert!(matches!(
        primary.start().await,
        Err(PgError::AlreadyRunning { .. })
    ));

    // Settings from meridian.conf are live.
    let c = primary.client().await.unwrap();
    let show = |name: &'static str| {
        let c = &c;
        async move {
            c.query_one(&format!("SHOW {name}"), &[])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(show("wal_level").await, "logical");
    assert_eq!(show("max_connections").await, "200");
    assert_eq!(show("fsync").await, "off");
    assert_eq!(show("data_checksums").await, "on");
    assert_eq!(show("port").await, primary.port().to_string());

    // Clone a standby through a slot created by pg_basebackup.
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let standby = PgNode::new(bins.clone(), user.clone(), spec(&dir, "node1"));
    let from = Conninfo::new(&primary.host(), primary.port(), "postgres", None);
    basebackup(&from, Some("node1"), &standby).await.unwrap();
    assert!(standby.data_dir().join("standby.signal").exists());
    standby.start().await.unwrap();
    standby.wait_ready(READY).await.unwrap();
    assert!(standby.is_in_recovery().await.unwrap());
    let slots: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'node1' AND slot_type = 'physical'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1, "pg_basebackup -C created the slot");

    c.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    let target = primary.current_wal_insert_lsn().await.unwrap();
    assert!(primary.current_wal_lsn().await.unwrap() <= target);
    let replayed = wait_replay(&standby, target, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(replayed >= target);
    let s = standby.client().await.unwrap();
    let n: i64 = s
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let app: String = c
        .query_one("SELECT application_name FROM pg_stat_replication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, "node1");

    // A second physical slot, created and dropped.
    let reserved = primary.create_physical_slot("spare").await.unwrap();
    assert!(
        reserved > meridian_agent::postgres::Lsn::ZERO,
        "the slot reserves WAL at once"
    );
    assert!(primary.drop_slot("spare").await.unwrap());
    assert!(!primary.drop_slot("spare").await.unwrap());

    // Fast stop of the primary leaves a clean, rewindable control file.
    let pid = primary.postmaster_pid().await.unwrap();
    assert!(pid > 0);
    drop(c);
    primary.stop(StopMode::Fast).await.unwrap();
    assert!(!primary.is_running());
    assert!(refuses(primary.port()));
    let control = primary.controldata().await.unwrap();
    assert_eq!(control.state, ClusterState::ShutDown);
    assert!(control.rewindable());
    assert_eq!(control.timeline, 1);

    // Promote the standby: a new timeline, writable.
    standby.promote().await.unwrap();
    assert!(!standby.is_in_recovery().await.unwrap());
    assert!(!standby.data_dir().join("standby.signal").exists());
    let s = standby.client().await.unwrap();
    s.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();
    assert!(standby.current_wal_lsn().await.unwrap() > target);
    // Promotion switched to timeline 2 (its history file is in pg_wal).
    assert!(std::fs::read_dir(standby.data_dir().join("pg_wal"))
        .unwrap()
        .any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with("00000002.history")));

    // Crash it: the port refuses at once, the control file says "in production".
    let port = standby.port();
    standby.kill9().await.unwrap();
    assert!(refuses(port));
    assert!(!standby.is_running());
    let control = standby.controldata().await.unwrap();
    assert_eq!(control.state, ClusterState::InProduction);

    // It restarts through crash recovery with the committed row.
    standby.start().await.unwrap();
    standby.wait_ready(READY).await.unwrap();
    let n: i64 = standby
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    standby.stop(StopMode::Immediate).await.unwrap();
    assert!(refuses(port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_node_kills_its_postmaster_and_a_bad_config_fails_fast() {
    let (dir, bins, user) = setup().await;
    let node = PgNode::new(bins.clone(), user.clone(), spec(&dir, "node0"));
    node.initdb().await.unwrap();
    node.start().await.unwrap();
    node.wait_ready(READY).await.unwrap();
    let pid = node.postmaster_pid().await.unwrap();
    let port = node.port();
    drop(node);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "postmaster {pid} survived its handle"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refuses(port));

    // A setting PostgreSQL rejects: wait_ready reports the exit with the log.
    let bad = PgNode::new(bins, user, spec(&dir, "node1"));
    bad.initdb().await.unwrap();
    bad.update_settings(|s| s.extra.push(("shared_buffers".into(), "not-a-size".into())))
        .await
        .unwrap();
    bad.start().await.unwrap();
    let err = bad.wait_ready(READY).await.unwrap_err();
    match &err {
        PgError::Exited { log_tail, .. } => {
            assert!(log_tail.contains("shared_buffers"), "{log_tail}")
        }
        other => panic!("expected Exited, got {other}"),
    }
}
