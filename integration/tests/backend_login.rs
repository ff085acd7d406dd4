#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The proxy's backend login against a real PostgreSQL, one role per
//! authentication method (trust, cleartext `password`, `md5`,
//! `scram-sha-256`), and the query it pipelines behind the login (the fencing
//! check of every new primary connection): it answers like a query sent after
//! the login, and a refused login never runs it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_integration::PgCluster;
use meridian_launcher::wanlink::{Link, LinkControl};
use meridian_pgproxy::backend::{BackendConn, BackendError, ConnectParams};
use meridian_pgproxy::tls::BackendTls;

const PASSWORD: &str = "s3cret pw";

fn params(cluster: &PgCluster, user: &str, password: Option<&str>) -> ConnectParams {
    ConnectParams {
        addr: Arc::from(format!("127.0.0.1:{}", cluster.primary().port())),
        user: user.to_owned(),
        database: "postgres".to_owned(),
        password: password.map(str::to_owned),
        tls: BackendTls::disabled(),
        connect_timeout: Duration::from_secs(5),
        max_message: 1 << 20,
    }
}

/// A statement with an effect, so a run that should not happen shows.
fn marking(user: &str) -> String {
    format!("INSERT INTO logins VALUES ('{user}') RETURNING who, current_user")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_login_method_carries_the_pipelined_query_and_a_refused_one_runs_nothing() {
    let cluster = PgCluster::builder()
        .hba([
            "host all u_password 127.0.0.1/32 password",
            "host all u_md5 127.0.0.1/32 md5",
            "host all u_scram 127.0.0.1/32 scram-sha-256",
        ])
        .start()
        .await
        .unwrap();
    let direct = cluster.primary().client().await.unwrap();
    direct
        .batch_execute(&format!(
            "CREATE TABLE logins (who text NOT NULL);
             GRANT INSERT, SELECT ON logins TO PUBLIC;
             CREATE ROLE u_trust LOGIN;
             CREATE ROLE u_password LOGIN PASSWORD '{PASSWORD}';
             CREATE ROLE u_scram LOGIN PASSWORD '{PASSWORD}';
             SET password_encryption = 'md5';
             CREATE ROLE u_md5 LOGIN PASSWORD '{PASSWORD}';"
        ))
        .await
        .unwrap();

    // (user, password given to the proxy): trust pipelines behind the startup
    // packet; a password configured for a trust login is simply not needed (the
    // query then goes after the login).
    let logins = [
        ("u_trust", None),
        ("u_trust", Some(PASSWORD)),
        ("u_password", Some(PASSWORD)),
        ("u_md5", Some(PASSWORD)),
        ("u_scram", Some(PASSWORD)),
    ];
    for (user, password) in logins {
        let p = params(&cluster, user, password);
        let (mut conn, rows) = BackendConn::connect_and_query(&p, &marking(user))
            .await
            .unwrap_or_else(|e| panic!("{user} ({password:?}): {e}"));
        assert_eq!(
            rows,
            vec![vec![Some(user.to_owned()), Some(user.to_owned())]],
            "{user}"
        );
        // The connection is in step afterwards: idle, and answering.
        assert_eq!(
            conn.state.tx_status,
            meridian_pgproxy::protocol::backend::TxStatus::Idle,
            "{user}"
        );
        let again = conn.simple_query("SELECT 1").await.unwrap();
        assert_eq!(again, vec![vec![Some("1".to_owned())]], "{user}");
        conn.terminate().await;
    }

    // Refused logins: a wrong password for each method, and none at all where
    // one is required. The pipelined INSERT must not have run.
    for user in ["u_password", "u_md5", "u_scram"] {
        for password in [Some("wrong"), None] {
            let p = params(&cluster, user, password);
            let err = BackendConn::connect_and_query(&p, &marking(user))
                .await
                .err()
                .unwrap_or_else(|| panic!("{user} ({password:?}) logged in"));
            assert!(
                matches!(err, BackendError::Auth(_)),
                "{user} ({password:?}): {err:?}"
            );
        }
    }
    // A refused trust-style login (unknown role) too.
    let p = params(&cluster, "nobody", None);
    assert!(BackendConn::connect_and_query(&p, &marking("nobody"))
        .await
        .is_err());

    let mut who: Vec<String> = direct
        .query("SELECT who FROM logins", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    who.sort();
    assert_eq!(
        who,
        ["u_md5", "u_password", "u_scram", "u_trust", "u_trust"],
        "only the accepted logins ran their query, once each"
    );
}

/// Round trips are counted through a delaying link: with the query pipelined,
/// a trust login plus the query take one round trip, as a login alone does;
/// sent after the login they would take two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipelined_query_costs_no_round_trip_of_its_own() {
    let one_way = Duration::from_millis(200);
    let cluster = PgCluster::builder().start().await.unwrap();
    let link = Link::start(
        "127.0.0.1:0".parse().unwrap(),
        format!("127.0.0.1:{}", cluster.primary().port()),
        LinkControl::new(one_way, Duration::ZERO),
    )
    .await
    .unwrap();
    let mut p = params(&cluster, "postgres", None);
    p.addr = Arc::from(link.local_addr().to_string());

    let started = Instant::now();
    let conn = BackendConn::connect(&p).await.unwrap();
    let login = started.elapsed();
    conn.terminate().await;
    let started = Instant::now();
    let (conn, rows) = BackendConn::connect_and_query(&p, "SELECT 7")
        .await
        .unwrap();
    let login_and_query = started.elapsed();
    conn.terminate().await;
    assert_eq!(rows, vec![vec![Some("7".to_owned())]]);

    let round_trip = one_way * 2;
    eprintln!("login {login:?}, login + pipelined query {login_and_query:?}");
    assert!(login >= round_trip, "a login took {login:?}");
    assert!(
        login_and_query < round_trip + round_trip / 2,
        "login + pipelined query took {login_and_query:?}, more than one round trip \
         ({round_trip:?}) by half"
    );
}
