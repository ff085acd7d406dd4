#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hostile and careless clients before the session (issue 13): what the proxy does
//! with clients that stall the login, announce huge messages, probe for user names,
//! name missing databases, pipeline behind an SSLRequest or send odd startup
//! parameters — compared, where PostgreSQL 15 behaves the same way, with a real
//! server given the same bytes. Raw-socket clients where a driver cannot produce the
//! input; the proxy runs in-process, so its memory is this process's.

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use common::{trust_config, Proxy};
use meridian_integration::{eventually, PgCluster};
use meridian_pgproxy::wire::{self, Frame, PROTOCOL_3_0, SSL_REQUEST};
use meridian_shared::config::{AuthMethod, ProxyConfig, UserConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

const PASSWORD: &str = "s3cret";

/// A startup packet (protocol 3.0) with `params`.
fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut b = BytesMut::new();
    b.put_i32(body.len() as i32 + 4);
    b.put_slice(&body);
    b.to_vec()
}

fn ssl_request() -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i32(8);
    b.put_i32(SSL_REQUEST);
    b.to_vec()
}

/// A `SASLInitialResponse` choosing SCRAM-SHA-256 with `data`.
fn sasl_initial(data: &str) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_slice(b"SCRAM-SHA-256\0");
    body.put_i32(data.len() as i32);
    body.put_slice(data.as_bytes());
    Frame::new(b'p', &body).raw.to_vec()
}

/// One server message as a test compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    /// An Authentication message: its code and data.
    Auth(i32, Vec<u8>),
    /// An ErrorResponse: severity, SQLSTATE, message.
    Error(String, String, String),
    Other(u8),
}

/// A raw protocol client.
struct Raw {
    s: TcpStream,
}

impl Raw {
    async fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        Raw { s }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    async fn byte(&mut self) -> u8 {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), self.s.read_exact(&mut b))
            .await
            .expect("no answer byte within 10 s")
            .unwrap();
        b[0]
    }

    /// The next message; `None` when the server closed the connection.
    async fn msg(&mut self) -> Option<Msg> {
        let mut head = [0u8; 5];
        let read = tokio::time::timeout(Duration::from_secs(10), self.s.read_exact(&mut head))
            .await
            .expect("no message within 10 s");
        if read.is_err() {
            return None;
        }
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.s.read_exact(&mut body).await.unwrap();
        let frame = Frame::new(head[0], &body);
        Some(match head[0] {
            b'R' => Msg::Auth(
                i32::from_be_bytes(body[..4].try_into().unwrap()),
                body[4..].to_vec(),
            ),
            b'E' => {
                let (s, c, m) = wire::error_fields(&frame);
                Msg::Error(s, c, m)
            }
            t => Msg::Other(t),
        })
    }

    /// Every message until the server closes the connection (within `within`).
    async fn rest(&mut self, within: Duration) -> Vec<Msg> {
        let mut raw = Vec::new();
        tokio::time::timeout(within, self.s.read_to_end(&mut raw))
            .await
            .expect("the server did not close the connection in time")
            .ok();
        parse(&raw)
    }
}

/// The messages in `raw` (whole messages only).
fn parse(raw: &[u8]) -> Vec<Msg> {
    let mut all = Vec::new();
    let mut buf = raw;
    while buf.len() >= 5 {
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        let frame = Frame::new(buf[0], &buf[5..1 + len]);
        all.push(match buf[0] {
            b'R' => Msg::Auth(
                i32::from_be_bytes(frame.body()[..4].try_into().unwrap()),
                frame.body()[4..].to_vec(),
            ),
            b'E' => {
                let (s, c, m) = wire::error_fields(&frame);
                Msg::Error(s, c, m)
            }
            t => Msg::Other(t),
        });
        buf = &buf[1 + len..];
    }
    assert!(buf.is_empty(), "a partial message at the end: {buf:?}");
    all
}

fn fatal(code: &str, message: &str) -> Msg {
    Msg::Error("FATAL".into(), code.into(), message.into())
}

fn scram_user(name: &str) -> UserConfig {
    UserConfig {
        name: name.into(),
        password: Some(PASSWORD.into()),
        scram_verifier: None,
        auth: None,
        backend_user: Some("postgres".into()),
        backend_password: None,
        pool_mode: None,
        databases: vec![],
    }
}

/// The proxy in front of `cluster` with SCRAM and one user, `app`.
fn scram_config(cluster: &PgCluster) -> ProxyConfig {
    let mut cfg = trust_config(cluster);
    cfg.auth = AuthMethod::ScramSha256;
    cfg.users = vec![scram_user("app")];
    cfg
}

/// A cluster whose `app` (and any other name in `users`) must log in with SCRAM.
async fn scram_cluster(users: &[&str], settings: &[(&str, &str)]) -> PgCluster {
    let mut b = PgCluster::builder().replicas(0).hba(
        users
            .iter()
            .map(|u| format!("host all {u} 127.0.0.1/32 scram-sha-256")),
    );
    for (k, v) in settings {
        b = b.setting(k, v);
    }
    let cluster = b.start().await.unwrap();
    let direct = cluster.primary().client().await.unwrap();
    direct
        .batch_execute(&format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'"))
        .await
        .unwrap();
    cluster
}

async fn metrics(proxy: &Proxy) -> String {
    meridian_integration::probe::http_get(&format!("127.0.0.1:{}", proxy.admin_port), "/metrics")
        .await
        .unwrap()
}

fn metric(body: &str, series: &str) -> f64 {
    meridian_integration::probe::metric(body, series)
}

/// The error a tokio-postgres login through `dsn` gets: (SQLSTATE, message).
async fn login_error(dsn: &str) -> (String, String) {
    let e = tokio_postgres::connect(dsn, NoTls)
        .await
        .err()
        .expect("the login must fail");
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

/// `VmSize` and `VmRSS` of this process (the proxy runs in it), in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("VmSize:"), field("VmRSS:"))
}

const GIB: u64 = 1 << 30;

/// A stalled login in its own task: what it read until the server closed the
/// connection, and how long the connection lasted.
type Stall = tokio::task::JoinHandle<(Vec<Msg>, Duration)>;

/// Three kinds of stalled login, started on `port`: a client that sends nothing, one
/// that sends its startup packet a byte every 300 ms, one that stops after
/// AuthenticationSASL. Returns once the last one has its AuthenticationSASL.
async fn stallers(port: u16) -> Vec<(&'static str, Stall)> {
    let mut silent = Raw::connect(port).await;
    let t = Instant::now();
    let silent =
        tokio::spawn(async move { (silent.rest(Duration::from_secs(30)).await, t.elapsed()) });

    let mut dribbler = Raw::connect(port).await;
    let t = Instant::now();
    let dribbler = tokio::spawn(async move {
        let packet = startup(&[("user", "app"), ("database", "postgres")]);
        let mut pace = tokio::time::interval(Duration::from_millis(300));
        let mut got = Vec::new();
        let mut sent = 0;
        let end = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut buf = [0u8; 512];
            tokio::select! {
                r = dribbler.s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                },
                _ = pace.tick(), if sent < packet.len() => {
                    if dribbler.s.write_all(&packet[sent..=sent]).await.is_err() {
                        break;
                    }
                    sent += 1;
                }
                _ = tokio::time::sleep_until(end) => panic!("the dribbler was never disconnected"),
            }
        }
        assert!(sent < packet.len(), "the whole startup packet went through");
        (parse(&got), t.elapsed())
    });

    let mut sasl = Raw::connect(port).await;
    let t = Instant::now();
    sasl.send(&startup(&[("user", "app")])).await;
    match sasl.msg().await {
        Some(Msg::Auth(10, mechanisms)) => assert!(
            String::from_utf8_lossy(&mechanisms).contains("SCRAM-SHA-256"),
            "{mechanisms:?}"
        ),
        other => panic!("expected AuthenticationSASL, got {other:?}"),
    }
    let sasl = tokio::spawn(async move { (sasl.rest(Duration::from_secs(30)).await, t.elapsed()) });
    vec![
        ("silent", silent),
        ("dribbler", dribbler),
        ("stopped after AuthenticationSASL", sasl),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_logins_are_dropped_after_client_login_timeout_and_a_real_client_gets_in() {
    let cluster = scram_cluster(&["app"], &[("authentication_timeout", "1s")]).await;
    let mut cfg = scram_config(&cluster);
    let timeout = Duration::from_secs(3);
    cfg.client_login_timeout = timeout;
    cfg.max_clients = 3;
    let proxy = Proxy::start(cfg).await;
    let dsn = proxy.dsn("app", &format!("password={PASSWORD}"));

    // The three stalled logins hold the three slots.
    let stalled = stallers(proxy.port).await;
    eventually(Duration::from_secs(5), "3 clients counted", || async {
        let n = metric(&metrics(&proxy).await, "pgproxy_clients");
        anyhow::ensure!(n == 3.0, "clients = {n}");
        Ok(())
    })
    .await
    .unwrap();
    let (code, message) = login_error(&dsn).await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("53300", "sorry, too many clients already")
    );

    // The timeout ends each of them: silently before the startup packet is complete,
    // with FATAL 57014 once it was.
    for (what, stall) in stalled {
        let (got, lasted) = stall.await.unwrap();
        // The proxy's clock starts at accept, which can come a little before the client's
        // (started once its connect returned): a few ms early is the same timeout.
        assert!(
            lasted + Duration::from_millis(50) >= timeout,
            "{what}: closed after {lasted:?}"
        );
        let expected = if what.starts_with("stopped") {
            vec![fatal("57014", "canceling authentication due to timeout")]
        } else {
            vec![]
        };
        assert_eq!(got, expected, "{what}");
    }
    assert_eq!(metric(&metrics(&proxy).await, "login_timeouts_total"), 3.0);

    // A real client gets in afterwards.
    let c = eventually(
        Duration::from_secs(10),
        "a login after the stalls",
        || async {
            let (c, conn) = tokio_postgres::connect(&dsn, NoTls).await?;
            tokio::spawn(conn);
            Ok(c)
        },
    )
    .await
    .unwrap();
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // PostgreSQL 15 (authentication_timeout = 1s) ends the same three stalls, without a
    // word even to the one that stopped in SCRAM (the proxy's 57014 is the one difference).
    for (what, stall) in stallers(cluster.primary().port()).await {
        let (got, _) = stall.await.unwrap();
        assert_eq!(got, vec![], "PostgreSQL, {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcing_a_gigabyte_costs_no_memory_before_or_after_login() {
    let cluster = scram_cluster(&["app"], &[]).await;
    let mut cfg = scram_config(&cluster);
    // A trust user for the after-login part.
    let mut plain = scram_user("postgres");
    plain.auth = Some(AuthMethod::Trust);
    cfg.users.push(plain);
    let proxy = Proxy::start(cfg).await;
    let announced = (GIB as u32) - 64;

    // Before authentication: a SASLInitialResponse announcing 1 GiB is refused from its
    // length alone with 08P01. PostgreSQL (limit 64 kB) ends the connection too, with
    // the 28P01 of a failed login.
    let before = memory();
    let mut refused = Vec::new();
    for _ in 0..8 {
        let mut raw = Raw::connect(proxy.port).await;
        raw.send(&startup(&[("user", "app")])).await;
        assert!(matches!(raw.msg().await, Some(Msg::Auth(10, _))));
        let mut head = vec![b'p'];
        head.extend(announced.to_be_bytes());
        raw.send(&head).await;
        refused.push(raw);
    }
    for mut raw in refused {
        assert_eq!(
            raw.rest(Duration::from_secs(10)).await,
            vec![fatal("08P01", "authentication message too long")]
        );
    }
    let after = memory();
    assert!(
        after.0 < before.0 + GIB / 2,
        "address space grew by {} MiB for 8 refused 1 GiB announcements",
        (after.0 - before.0) >> 20
    );
    let mut pg = Raw::connect(cluster.primary().port()).await;
    pg.send(&startup(&[("user", "app")])).await;
    assert!(matches!(pg.msg().await, Some(Msg::Auth(10, _))));
    let mut head = vec![b'p'];
    head.extend(announced.to_be_bytes());
    pg.send(&head).await;
    assert_eq!(
        pg.rest(Duration::from_secs(10)).await,
        vec![fatal(
            "28P01",
            "password authentication failed for user \"app\""
        )],
        "PostgreSQL"
    );

    // After login: two sessions each announce a 1 GiB query and send 24 MiB of it (more
    // than loopback's socket buffers hold, so the proxy has read most of it once the write
    // completes). Its buffers follow the bytes, not the announced length (it used to
    // reserve 1 GiB per connection at the first read).
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::connect(proxy.port).await;
        raw.send(&startup(&[("user", "postgres"), ("database", "postgres")]))
            .await;
        loop {
            match raw.msg().await {
                Some(Msg::Other(b'Z')) => break,
                Some(Msg::Error(..)) | None => panic!("login failed"),
                Some(_) => {}
            }
        }
        sessions.push(raw);
    }
    let before = memory();
    for raw in &mut sessions {
        let mut q = vec![b'Q'];
        q.extend(announced.to_be_bytes());
        q.extend(std::iter::repeat_n(b'x', 24 << 20));
        raw.send(&q).await;
    }
    let after = memory();
    assert!(
        after.0 < before.0 + GIB,
        "address space grew by {} MiB for 2 announced 1 GiB queries",
        (after.0 - before.0) >> 20
    );
    assert!(
        after.1 < before.1 + GIB / 2,
        "resident memory grew by {} MiB",
        (after.1 - before.1) >> 20
    );
    // The sessions are still there, waiting for the rest of their queries.
    for raw in &mut sessions {
        let mut probe = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(200), raw.s.peek(&mut probe)).await;
        assert!(r.is_err(), "the proxy answered or closed: {r:?}");
    }
}

/// What a client sees of a SCRAM login that sends a wrong proof, with the random parts
/// blanked: codes and mechanisms, the server-first message's shape, the verdict.
async fn wrong_proof_flow(port: u16, user: &str) -> (Vec<Msg>, String) {
    let mut raw = Raw::connect(port).await;
    raw.send(&startup(&[("user", user), ("database", "postgres")]))
        .await;
    let mut flow = vec![raw.msg().await.unwrap()];
    let client_nonce = "rOprNGfwEbeRWgbNEkqO";
    raw.send(&sasl_initial(&format!("n,,n=,r={client_nonce}")))
        .await;
    let cont = raw.msg().await.unwrap();
    let Msg::Auth(11, server_first) = &cont else {
        panic!("expected SASLContinue, got {cont:?}")
    };
    let server_first = String::from_utf8(server_first.clone()).unwrap();
    let attr = |k: &str| {
        server_first
            .split(',')
            .find_map(|a| a.strip_prefix(k))
            .unwrap()
            .to_owned()
    };
    let (nonce, salt, iterations) = (attr("r="), attr("s="), attr("i="));
    assert!(nonce.starts_with(client_nonce), "{server_first}");
    flow.push(Msg::Auth(
        11,
        format!(
            "r=<client nonce + {}>,s=<{} chars>,i={iterations}",
            nonce.len() - client_nonce.len(),
            salt.len()
        )
        .into_bytes(),
    ));
    // A well-formed client-final message whose proof is wrong.
    let proof = "A".repeat(43) + "=";
    raw.send(&Frame::new(b'p', format!("c=biws,r={nonce},p={proof}").as_bytes()).raw)
        .await;
    flow.extend(raw.rest(Duration::from_secs(10)).await);
    (flow, salt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_gets_the_flow_of_a_wrong_password_as_postgresql_gives_it() {
    let cluster = scram_cluster(&["app", "bob"], &[]).await;
    let proxy = Proxy::start(scram_config(&cluster)).await;

    // A driver sees the same error for both (the README used to promise 28000 for an
    // unknown user; PostgreSQL and the proxy say 28P01).
    let wrong = login_error(&proxy.dsn("app", "password=guess")).await;
    let unknown = login_error(&proxy.dsn("bob", "password=guess")).await;
    assert_eq!(
        wrong,
        (
            "28P01".into(),
            "password authentication failed for user \"app\"".into()
        )
    );
    assert_eq!(
        unknown,
        (
            "28P01".into(),
            "password authentication failed for user \"bob\"".into()
        )
    );

    // On the wire: the same messages, the same shapes, for the proxy and for PostgreSQL
    // (`app` exists on both, `bob` on neither; the names have one length).
    let blank = |flow: Vec<Msg>| -> Vec<Msg> {
        flow.into_iter()
            .map(|m| match m {
                Msg::Error(s, c, msg) => Msg::Error(s, c, msg.replace("bob", "app")),
                other => other,
            })
            .collect()
    };
    let (proxy_wrong, salt_app) = wrong_proof_flow(proxy.port, "app").await;
    let (proxy_unknown, salt_bob) = wrong_proof_flow(proxy.port, "bob").await;
    let (pg_wrong, _) = wrong_proof_flow(cluster.primary().port(), "app").await;
    let (pg_unknown, _) = wrong_proof_flow(cluster.primary().port(), "bob").await;
    assert_eq!(
        proxy_wrong,
        vec![
            Msg::Auth(10, b"SCRAM-SHA-256\0\0".to_vec()),
            Msg::Auth(11, b"r=<client nonce + 24>,s=<24 chars>,i=4096".to_vec()),
            fatal("28P01", "password authentication failed for user \"app\""),
        ]
    );
    assert_eq!(blank(proxy_unknown), proxy_wrong);
    assert_eq!(pg_wrong, proxy_wrong, "PostgreSQL's flow");
    assert_eq!(blank(pg_unknown), proxy_wrong, "PostgreSQL's mock flow");
    // The mock salt is the unknown user's own and stable across attempts.
    assert_ne!(salt_bob, salt_app);
    assert_eq!(wrong_proof_flow(proxy.port, "bob").await.1, salt_bob);
    assert_eq!(wrong_proof_flow(proxy.port, "app").await.1, salt_app);

    // The right password still works.
    let c = proxy
        .connect("app", &format!("password={PASSWORD}"))
        .await
        .unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
}

/// The `backend_connections` series in a `/metrics` body.
fn pool_series(body: &str) -> Vec<&str> {
    body.lines()
        .filter(|l| l.starts_with("meridian_pgproxy_backend_connections{"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_to_missing_databases_get_3d000_and_leave_no_pools_or_series() {
    let cluster = PgCluster::builder().replicas(1).start().await.unwrap();
    let proxy = Proxy::start(trust_config(&cluster)).await;
    let c = proxy.connect("postgres", "").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    let baseline = metrics(&proxy).await;
    let baseline_series = pool_series(&baseline).len();
    assert!(baseline_series > 0, "{baseline}");

    // The server's own answer, as a direct login gets it.
    let direct = login_error(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=nope_0",
        cluster.primary().port()
    ))
    .await;
    assert_eq!(
        direct,
        ("3D000".into(), "database \"nope_0\" does not exist".into())
    );
    for i in 0..200 {
        let got = login_error(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=nope_{i}",
            proxy.port
        ))
        .await;
        assert_eq!(
            got,
            (
                "3D000".into(),
                format!("database \"nope_{i}\" does not exist")
            ),
            "login {i}"
        );
    }
    let after = metrics(&proxy).await;
    let series = pool_series(&after);
    assert!(
        series.iter().all(|s| !s.contains("nope_")),
        "series of missing databases left: {series:?}"
    );
    assert_eq!(series.len(), baseline_series, "{series:?}");
    // The body may grow by the error counters' few lines, not per database.
    assert!(
        after.len() < baseline.len() + 2048,
        "/metrics grew from {} to {} bytes",
        baseline.len(),
        after.len()
    );
    assert_eq!(metric(&after, "errors_total{class=\"3D\"}"), 200.0);
    // The session that was there before is unaffected.
    c.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_left_without_connections_are_reclaimed_after_the_idle_timeout() {
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    let direct = cluster.primary().client().await.unwrap();
    for i in 0..20 {
        direct
            .batch_execute(&format!("CREATE ROLE idle_{i} LOGIN"))
            .await
            .unwrap();
    }
    let mut cfg = trust_config(&cluster);
    cfg.pool.idle_timeout = Duration::from_secs(2);
    // Pooled connections: a session-mode client of a static primary without replicas has
    // a server connection of its own, outside the pools.
    cfg.pool.mode = meridian_shared::config::PoolMode::Transaction;
    let proxy = Proxy::start(cfg).await;
    let users = |body: &str| {
        pool_series(body)
            .iter()
            .filter(|s| s.contains("user=\"idle_"))
            .count()
    };
    for i in 0..20 {
        let c = proxy.connect(&format!("idle_{i}"), "").await.unwrap();
        c.batch_execute("SELECT 1").await.unwrap();
        // The pool is there while its connection is in use.
        let body = metrics(&proxy).await;
        let user = format!("user=\"idle_{i}\"");
        assert_eq!(
            pool_series(&body)
                .iter()
                .filter(|s| s.contains(&user))
                .count(),
            2,
            "{body}"
        );
    }
    eventually(Duration::from_secs(20), "idle pools reclaimed", || async {
        let body = metrics(&proxy).await;
        anyhow::ensure!(users(&body) == 0, "{:?}", pool_series(&body));
        Ok(())
    })
    .await
    .unwrap();
    // Their backend connections are closed too.
    eventually(
        Duration::from_secs(10),
        "backends of idle pools gone",
        || async {
            let n: i64 = direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE 'idle\\_%'",
                    &[],
                )
                .await?
                .get(0);
            anyhow::ensure!(n == 0, "{n} left");
            Ok(())
        },
    )
    .await
    .unwrap();
    // And a user comes back to a fresh pool.
    let c = proxy.connect("idle_3", "").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_pipelined_behind_an_ssl_request_is_refused_as_postgresql_refuses_it() {
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    let proxy = Proxy::start(trust_config(&cluster)).await;
    for port in [proxy.port, cluster.primary().port()] {
        // SSLRequest and the startup packet in one write.
        let mut raw = Raw::connect(port).await;
        let mut both = ssl_request();
        both.extend(startup(&[("user", "postgres")]));
        raw.send(&both).await;
        assert_eq!(raw.byte().await, b'N', "port {port}");
        assert_eq!(
            raw.rest(Duration::from_secs(10)).await,
            vec![fatal(
                "08P01",
                "received unencrypted data after SSL request"
            )],
            "port {port}"
        );
        // A second SSLRequest after the first was answered.
        let mut raw = Raw::connect(port).await;
        raw.send(&ssl_request()).await;
        assert_eq!(raw.byte().await, b'N');
        raw.send(&ssl_request()).await;
        assert_eq!(
            raw.rest(Duration::from_secs(10)).await,
            vec![fatal(
                "0A000",
                "unsupported frontend protocol 1234.5679: server supports 3.0 to 3.0"
            )],
            "port {port}"
        );
        // SSLRequest answered, then the startup packet: a normal login.
        let mut raw = Raw::connect(port).await;
        raw.send(&ssl_request()).await;
        assert_eq!(raw.byte().await, b'N');
        raw.send(&startup(&[("user", "postgres")])).await;
        assert_eq!(raw.msg().await, Some(Msg::Auth(0, vec![])), "port {port}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_and_options_apply_as_postgresql_applies_them() {
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    let proxy = Proxy::start(trust_config(&cluster)).await;
    let ports = [proxy.port, cluster.primary().port()];
    for port in ports {
        let base = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
        // `options` settings apply (work_mem was never replayed before), and a parameter
        // sent on its own wins over the same one in `options`.
        let (c, conn) = tokio_postgres::connect(
            &format!(
                "{base} application_name=a options='-c application_name=b --work-mem=1234kB -cstatement_timeout=4321'"
            ),
            NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        for (setting, expected) in [
            ("application_name", "a"),
            ("work_mem", "1234kB"),
            ("statement_timeout", "4321ms"),
        ] {
            let v = meridian_integration::probe::simple_value(&c, &format!("SHOW {setting}"))
                .await
                .unwrap();
            assert_eq!(v.as_deref(), Some(expected), "port {port}: {setting}");
        }
        // Malformed options: PostgreSQL's FATAL, after authentication.
        for (options, code, message) in [
            ("-c foo", "42601", "-c foo requires a value"),
            (
                "word",
                "42601",
                "invalid command-line argument for server process: word",
            ),
        ] {
            let got = login_error(&format!("{base} options='{options}'")).await;
            assert_eq!(got, (code.into(), message.into()), "port {port}: {options}");
        }
        // A parameter name that cannot be a setting, on the wire.
        for (name, code, message) in [
            (
                "a b",
                "42704",
                "unrecognized configuration parameter \"a b\"",
            ),
            (
                "a.b c",
                "42602",
                "invalid configuration parameter name \"a.b c\"",
            ),
        ] {
            let mut raw = Raw::connect(port).await;
            raw.send(&startup(&[("user", "postgres"), (name, "1")]))
                .await;
            assert_eq!(
                raw.rest(Duration::from_secs(10)).await,
                vec![Msg::Auth(0, vec![]), fatal(code, message)],
                "port {port}: {name:?}"
            );
        }
    }
}

/// `VmRSS` of process `pid`, in bytes.
fn resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// After a 100 MB query and a 100 MB result, neither the session nor the pooled backend
/// connection that carried them keeps that memory (they used to keep ~100 MB each for
/// as long as they were reused). The backend is reused afterwards, so its buffers were
/// shrunk, not dropped with it. The proxy runs as its own process here, so that its
/// resident memory is its own (the client's buffers are this process's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_query_and_result_leave_no_memory_behind() {
    const SIZE: usize = 100 << 20;
    let cluster = PgCluster::builder().replicas(0).start().await.unwrap();
    let direct = cluster.primary().client().await.unwrap();
    let port = meridian_integration::free_port().unwrap();
    let bin = meridian_launcher::binaries::Binaries::locate()
        .expect("cargo build --workspace --bins")
        .pgproxy;
    let primary = format!("127.0.0.1:{}", cluster.primary().port());
    let child = tokio::process::Command::new(bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "",
        ])
        .args(["--primary", &primary, "--auth", "trust"])
        .args(["--pool-mode", "transaction", "--pool-size", "1"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let proxy_pid = child.id().unwrap();
    let dsn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let c = eventually(Duration::from_secs(20), "the proxy accepting", || async {
        let (c, conn) = tokio_postgres::connect(&dsn, NoTls).await?;
        tokio::spawn(conn);
        Ok(c)
    })
    .await
    .unwrap();
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let before = resident(proxy_pid);

    let row = c
        .query_one("SELECT repeat('x', $1)", &[&(SIZE as i32)])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0).len(), SIZE);
    drop(row);
    let text = format!("SELECT length('{}')", "y".repeat(SIZE));
    let answer = c.simple_query(&text).await.unwrap();
    drop(text);
    let length = answer.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(length, Some(SIZE.to_string()));
    drop(answer);

    // The same backend (a pool of one) serves the next statement.
    let again: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, pid);
    let alive: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(alive, 1, "the pooled backend is still there");
    let after = resident(proxy_pid);
    assert!(
        after < before + 32 * (1 << 20),
        "the proxy's resident memory grew by {} MiB after 100 MB each way",
        after.saturating_sub(before) >> 20
    );
}
