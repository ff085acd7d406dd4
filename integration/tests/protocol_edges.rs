#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Protocol edges and session leaks answered as PostgreSQL answers them (issues 12, 13):
//! raw-socket clients send what drivers do not (invalid bytes in a Parse, unknown
//! Describe/Close kinds, parameter counts out of range, a Query during COPY, a duplicate
//! statement name) to PostgreSQL 15 directly and through the proxy — bound (session
//! pooling, one primary) and virtual (transaction pooling) — and the answers must be the
//! same messages with the same SQLSTATEs, the session going on afterwards (or, after a
//! Terminate behind a running statement, ending once it has answered). Then what
//! must not leak from one client to the next on a shared backend (a role), the
//! startup parameters the server refuses, and the debug log after failing logins.

mod common;

use std::process::Stdio;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::{trust_config, Proxy};
use meridian_integration::PgCluster;
use meridian_pgproxy::protocol::frontend;
use meridian_pgproxy::wire::{self, Frame, PROTOCOL_3_0};
use meridian_shared::config::{PoolMode, ProxyConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a test compares of a server message: its tag, and an error's severity and code.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Msg(char),
    Error(String, String),
}

struct Wire {
    s: TcpStream,
    buf: BytesMut,
}

impl Wire {
    /// Logs in (trust) with `params` and reads up to the first ReadyForQuery.
    async fn login(port: u16, params: &[(&str, &str)]) -> Result<Wire, Vec<Seen>> {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut w = Wire {
            s,
            buf: BytesMut::new(),
        };
        let mut body = BytesMut::new();
        body.put_i32(PROTOCOL_3_0);
        for (k, v) in [("user", "postgres"), ("database", "postgres")]
            .iter()
            .chain(params)
        {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut pkt = BytesMut::new();
        pkt.put_i32(body.len() as i32 + 4);
        pkt.put_slice(&body);
        w.s.write_all(&pkt).await.unwrap();
        let seen = w.until_ready().await;
        if seen
            .iter()
            .any(|m| matches!(m, Seen::Error(s, _) if s == "FATAL"))
        {
            return Err(seen);
        }
        Ok(w)
    }

    async fn send(&mut self, frames: &[Frame]) {
        for f in frames {
            self.s.write_all(&f.raw).await.unwrap();
        }
    }

    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = wire::try_frame(&mut self.buf, 1 << 30).unwrap() {
                return Some(f);
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read_buf(&mut self.buf))
                .await
                .expect("an answer within 10 s")
                .unwrap();
            if n == 0 {
                return None;
            }
        }
    }

    /// Messages up to and including the next ReadyForQuery (or the end).
    async fn until_ready(&mut self) -> Vec<Seen> {
        let mut out = Vec::new();
        while let Some(f) = self.frame().await {
            out.push(seen(&f));
            if f.tag == b'Z' {
                break;
            }
        }
        out
    }

    /// Messages up to the next one with tag `tag`, inclusive.
    async fn until(&mut self, tag: u8) -> Vec<Seen> {
        let mut out = Vec::new();
        while let Some(f) = self.frame().await {
            out.push(seen(&f));
            if f.tag == tag {
                break;
            }
        }
        out
    }
}

fn seen(f: &Frame) -> Seen {
    if f.tag == b'E' {
        let (sev, code, _) = wire::error_fields(f);
        Seen::Error(sev, code)
    } else {
        Seen::Msg(f.tag as char)
    }
}

fn err(code: &str) -> Seen {
    Seen::Error("ERROR".into(), code.into())
}

fn m(c: char) -> Seen {
    Seen::Msg(c)
}

fn sync() -> Frame {
    frontend::sync()
}

fn parse_raw(name: &[u8], query: &[u8], types: &[u8]) -> Frame {
    frontend::parse(name, query, types)
}

/// A Parse whose parameter section declares `count` and carries `oids` OIDs.
fn parse_counting(count: u16, oids: usize) -> Frame {
    let mut types = count.to_be_bytes().to_vec();
    for _ in 0..oids {
        types.extend_from_slice(&23i32.to_be_bytes());
    }
    parse_raw(b"", b"SELECT $1::int", &types)
}

/// What PostgreSQL answers a client that sends `frames` and reads to its ReadyForQuery;
/// then a `SELECT 1` must work on the same connection.
async fn answers(port: u16, frames: &[Frame]) -> Vec<Seen> {
    let mut w = Wire::login(port, &[]).await.expect("login");
    w.send(frames).await;
    let got = w.until_ready().await;
    w.send(&[frontend::query(b"SELECT 1")]).await;
    assert_eq!(
        w.until_ready().await,
        vec![m('T'), m('D'), m('C'), m('Z')],
        "port {port}: the session goes on after {got:?}"
    );
    got
}

fn config(cluster: &PgCluster, mode: PoolMode) -> ProxyConfig {
    let mut cfg = trust_config(cluster);
    cfg.pool.mode = mode;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_edges_are_answered_as_postgresql_answers_them() {
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    let direct = cluster.primary().port();
    let bound = Proxy::start(config(&cluster, PoolMode::Session)).await;
    let virt = Proxy::start(config(&cluster, PoolMode::Transaction)).await;
    let c = cluster.primary().client().await.unwrap();
    c.batch_execute("CREATE TABLE cp (x int)").await.unwrap();

    let cases: Vec<(&str, Vec<Frame>, Vec<Seen>)> = vec![
        (
            "Parse with invalid UTF-8",
            vec![parse_raw(b"", b"SELECT '\xff\xfe'", &[0, 0]), sync()],
            vec![err("22021"), m('Z')],
        ),
        (
            "Describe of an unknown kind",
            vec![Frame::new(b'D', b"X\0"), sync()],
            vec![err("08P01"), m('Z')],
        ),
        (
            "Close of an unknown kind",
            vec![Frame::new(b'C', b"X\0"), sync()],
            vec![err("08P01"), m('Z')],
        ),
        (
            "Parse declaring 65535 parameters and carrying one",
            vec![parse_counting(u16::MAX, 1), sync()],
            vec![err("08P01"), m('Z')],
        ),
        (
            "Parse with 40,000 parameters",
            vec![parse_counting(40_000, 40_000), sync()],
            vec![m('1'), m('Z')],
        ),
    ];
    for (what, frames, want) in &cases {
        for port in [direct, bound.port, virt.port] {
            assert_eq!(&answers(port, frames).await, want, "{what}, port {port}");
        }
    }

    // A Query during COPY FROM STDIN: the server fails the COPY and, having lost the
    // protocol's synchronization, ends the connection (ERROR then FATAL 08P01); the proxy
    // relays exactly that, in a bound and a virtual session alike.
    let mut outcomes = Vec::new();
    for port in [direct, bound.port, virt.port] {
        let mut w = Wire::login(port, &[]).await.unwrap();
        w.send(&[frontend::query(b"COPY cp FROM STDIN")]).await;
        assert_eq!(w.until(b'G').await, vec![m('G')], "port {port}");
        w.send(&[Frame::new(b'd', b"1\n"), frontend::query(b"SELECT 1")])
            .await;
        let mut all = Vec::new();
        while let Some(f) = w.frame().await {
            all.push(seen(&f));
        }
        outcomes.push(all);
    }
    assert_eq!(
        outcomes[0],
        vec![err("08P01"), Seen::Error("FATAL".into(), "08P01".into())],
        "PostgreSQL's answer"
    );
    assert_eq!(outcomes[1], outcomes[0], "bound");
    assert_eq!(outcomes[2], outcomes[0], "virtual");

    // Parse of a name in use: 42P05, as the server (bound: the server's; virtual: the
    // proxy's, which must fail the batch as the server would).
    for port in [direct, bound.port, virt.port] {
        let mut w = Wire::login(port, &[]).await.unwrap();
        w.send(&[parse_raw(b"s1", b"SELECT 1", &[0, 0]), sync()])
            .await;
        assert_eq!(w.until_ready().await, vec![m('1'), m('Z')]);
        w.send(&[
            frontend::query(b"BEGIN"),
            parse_raw(b"s1", b"SELECT 2", &[0, 0]),
            frontend::execute(b"", 0),
            sync(),
            frontend::query(b"SELECT 1"),
        ])
        .await;
        assert_eq!(w.until_ready().await, vec![m('C'), m('Z')], "port {port}");
        assert_eq!(
            w.until_ready().await,
            vec![err("42P05"), Seen::Msg('Z')],
            "port {port}: duplicate name"
        );
        assert_eq!(
            w.until_ready().await,
            vec![err("25P02"), m('Z')],
            "port {port}: the transaction failed with it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_the_server_refuses_end_the_login_with_its_error() {
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    let bound = Proxy::start(config(&cluster, PoolMode::Session)).await;
    let virt = Proxy::start(config(&cluster, PoolMode::Transaction)).await;
    for port in [cluster.primary().port(), bound.port, virt.port] {
        for (name, value, code) in [("nosuch", "1", "42704"), ("work_mem", "lots", "22023")] {
            let got = Wire::login(port, &[(name, value)]).await.err();
            let fatal = got
                .as_ref()
                .and_then(|g| g.iter().find(|m| matches!(m, Seen::Error(..))).cloned());
            assert_eq!(
                fatal,
                Some(Seen::Error("FATAL".into(), code.into())),
                "port {port}: {name}={value}: {got:?}"
            );
        }
        // The server's canonical names come back (the client sent its own spelling).
        for (asked, canonical) in [("utf-8", "UTF8"), ("eucjp", "EUC_JP")] {
            let mut w = Wire::login(port, &[("client_encoding", asked)])
                .await
                .unwrap();
            w.send(&[frontend::query(b"SHOW client_encoding")]).await;
            let mut value = None;
            while let Some(f) = w.frame().await {
                if f.tag == b'D' {
                    value = Some(String::from_utf8_lossy(&f.body()[6..]).into_owned());
                }
                if f.tag == b'Z' {
                    break;
                }
            }
            assert_eq!(value.as_deref(), Some(canonical), "port {port}: {asked}");
        }
    }
}

/// A Terminate sent right behind a statement, as libpq's `PQfinish` does while a query
/// runs: PostgreSQL reads it only once the statement has ended, so the statement runs,
/// its answers arrive and only then the connection closes. A client that closes its own
/// socket meanwhile (psycopg's `test_socket_closed`, from another thread) must see that,
/// not a close by the proxy. The same through the proxy, bound and virtual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_behind_a_running_statement_is_read_after_it_as_postgresql_does() {
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    let bound = Proxy::start(config(&cluster, PoolMode::Session)).await;
    let virt = Proxy::start(config(&cluster, PoolMode::Transaction)).await;
    let c = cluster.primary().client().await.unwrap();
    c.batch_execute("CREATE TABLE terminated_after (port int)")
        .await
        .unwrap();
    for port in [cluster.primary().port(), bound.port, virt.port] {
        let mut w = Wire::login(port, &[]).await.expect("login");
        let started = std::time::Instant::now();
        let sql = format!("SELECT pg_sleep(0.5); INSERT INTO terminated_after VALUES ({port})");
        w.send(&[frontend::query(sql.as_bytes()), Frame::new(b'X', b"")])
            .await;
        let mut got = Vec::new();
        while let Some(f) = w.frame().await {
            got.push(seen(&f));
        }
        let open_for = started.elapsed();
        assert_eq!(
            got,
            vec![m('T'), m('D'), m('C'), m('C'), m('Z')],
            "port {port}: the statement's answers, then the end"
        );
        assert!(
            open_for >= Duration::from_millis(450),
            "port {port}: closed after {open_for:?}, before the statement ended"
        );
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM terminated_after WHERE port = $1",
                &[&i32::from(port)],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "port {port}: the statement ran to its end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_set_by_one_client_never_reaches_the_next_on_a_shared_backend() {
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    cluster
        .primary()
        .client()
        .await
        .unwrap()
        .batch_execute("CREATE ROLE r1; GRANT r1 TO postgres")
        .await
        .unwrap();
    let mut cfg = config(&cluster, PoolMode::Transaction);
    cfg.pool.max_size = 1;
    let proxy = Proxy::start(cfg).await;
    let a = proxy.connect("postgres", "").await.unwrap();
    a.batch_execute("SET ROLE r1").await.unwrap();
    let user = |c: tokio_postgres::Client| async move {
        let u: String = c
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        (c, u)
    };
    let (a, u) = user(a).await;
    assert_eq!(u, "r1", "the client's own role stays with it");
    // Another client on the same (only) backend, while a is connected and after.
    let b = proxy.connect("postgres", "").await.unwrap();
    let (b, u) = user(b).await;
    assert_eq!(u, "postgres", "b sees a's role");
    drop(a);
    let (_b, u) = user(b).await;
    assert_eq!(u, "postgres");
}

/// Failing logins of every kind through a proxy logging at debug level: no password, no
/// SCRAM proof, nothing the client sent during authentication appears in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_debug_log_after_failing_logins() {
    const SECRET: &str = "Correct-Horse-9731";
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("proxy.toml");
    let port = meridian_integration::free_port().unwrap();
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"\"\n\
             [backends]\nprimary = \"127.0.0.1:{}\"\n\
             [[users]]\nname = \"app\"\npassword = \"{SECRET}\"\nbackend_user = \"postgres\"\n\
             [[users]]\nname = \"old\"\npassword = \"{SECRET}\"\nauth = \"md5\"\nbackend_user = \"postgres\"\n",
            cluster.primary().port()
        ),
    )
    .unwrap();
    let bin = meridian_launcher::binaries::Binaries::locate()
        .expect("cargo build --workspace --bins")
        .pgproxy;
    let mut child = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&conf)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = Vec::new();
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let collect = tokio::spawn(async move {
        let mut lines = Vec::new();
        let mut err = tokio::io::BufReader::new(stderr).lines();
        let mut out = tokio::io::BufReader::new(stdout).lines();
        loop {
            tokio::select! {
                l = err.next_line() => match l { Ok(Some(l)) => lines.push(l), _ => break },
                l = out.next_line() => if let Ok(Some(l)) = l { lines.push(l) },
            }
        }
        lines
    });
    meridian_integration::eventually(Duration::from_secs(20), "the proxy listening", || async {
        TcpStream::connect(("127.0.0.1", port)).await?;
        Ok(())
    })
    .await
    .unwrap();
    let dsn = |user: &str, pw: &str| {
        format!("host=127.0.0.1 port={port} user={user} dbname=postgres password={pw}")
    };
    // Wrong passwords by SCRAM and md5; an unknown user.
    for (user, pw) in [("app", "wrong"), ("old", "wrong"), ("nobody", SECRET)] {
        assert!(
            tokio_postgres::connect(&dsn(user, pw), tokio_postgres::NoTls)
                .await
                .is_err()
        );
    }
    // The secret sent where it does not belong: as the SASL mechanism, as the SCRAM
    // client-first message, as a cleartext password message to a SCRAM request.
    for payload in [
        {
            let mut b = BytesMut::new();
            b.put_slice(SECRET.as_bytes());
            b.put_u8(0);
            b.put_i32(4);
            b.put_slice(b"abcd");
            Frame::new(b'p', &b).raw.to_vec()
        },
        {
            let mut b = BytesMut::new();
            b.put_slice(b"SCRAM-SHA-256\0");
            b.put_i32(SECRET.len() as i32);
            b.put_slice(SECRET.as_bytes());
            Frame::new(b'p', &b).raw.to_vec()
        },
        Frame::new(b'p', format!("{SECRET}\0").as_bytes())
            .raw
            .to_vec(),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut body = BytesMut::new();
        body.put_i32(PROTOCOL_3_0);
        body.put_slice(b"user\0app\0\0");
        let mut pkt = BytesMut::new();
        pkt.put_i32(body.len() as i32 + 4);
        pkt.put_slice(&body);
        s.write_all(&pkt).await.unwrap();
        s.write_all(&payload).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
    }
    let pid = child.id().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    log.extend(collect.await.unwrap());
    assert!(
        log.iter()
            .any(|l| l.contains("authentication failed") || l.contains("DEBUG")),
        "the log was captured at debug level: {log:?}"
    );
    let leaks: Vec<&String> = log.iter().filter(|l| l.contains(SECRET)).collect();
    assert!(leaks.is_empty(), "the secret is in the log: {leaks:?}");
}
