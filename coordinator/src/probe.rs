//! The coordinator's own probe of the primary's PostgreSQL (DESIGN §4).
//!
//! Connects to `pg_addr` as user `postgres`, database `postgres`, and runs
//! `SELECT 1`, all within the probe timeout. A server that answers with an error
//! is still up (e.g. authentication is refused to the coordinator), except for
//! SQLSTATE class 57 (`cannot_connect_now`, `admin_shutdown`, …): a server that is
//! starting up or shutting down does not take writes. Anything else (refused,
//! reset, timeout) counts as down.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// Splits `host:port` (the port is required; `[v6]:port` is accepted).
pub fn split_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

/// Whether a database error still proves the server is up and running.
pub fn server_error_means_up(code: &SqlState) -> bool {
    !code.code().starts_with("57")
}

/// Probes `pg_addr`; `true` when PostgreSQL answered within `timeout`.
pub async fn probe(pg_addr: &str, timeout: Duration) -> bool {
    let Some((host, port)) = split_addr(pg_addr) else {
        return false;
    };
    let attempt = async {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&host)
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .application_name("meridian-coordinator-probe")
            .connect_timeout(timeout);
        match config.connect(NoTls).await {
            Ok((client, connection)) => {
                let conn = tokio::spawn(connection);
                let ok = match client.simple_query("SELECT 1").await {
                    Ok(_) => true,
                    Err(e) => e.code().is_some_and(server_error_means_up),
                };
                drop(client);
                conn.abort();
                ok
            }
            Err(e) => e.code().is_some_and(server_error_means_up),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            split_addr("127.0.0.1:5432"),
            Some(("127.0.0.1".to_string(), 5432))
        );
        assert_eq!(split_addr("[::1]:6000"), Some(("::1".to_string(), 6000)));
        assert_eq!(split_addr("host"), None);
        assert_eq!(split_addr(":5432"), None);
        assert_eq!(split_addr("h:x"), None);
    }

    #[test]
    fn server_errors() {
        assert!(server_error_means_up(&SqlState::INVALID_PASSWORD));
        assert!(server_error_means_up(&SqlState::TOO_MANY_CONNECTIONS));
        assert!(!server_error_means_up(&SqlState::CANNOT_CONNECT_NOW));
        assert!(!server_error_means_up(&SqlState::ADMIN_SHUTDOWN));
    }

    #[tokio::test]
    async fn refused_and_silent_servers_are_down() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(!probe(&format!("127.0.0.1:{port}"), Duration::from_millis(300)).await);
        // Accepts TCP but never speaks: down after the timeout.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let started = std::time::Instant::now();
        assert!(!probe(&addr.to_string(), Duration::from_millis(200)).await);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
