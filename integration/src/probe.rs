//! Small client-side probes the end-to-end tests and benchmarks share: the first value of a
//! simple query, a proxy's `/metrics` over plain HTTP, and one series read from that text.

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, SimpleQueryMessage};

/// The first column of the first row of a simple-protocol query (`None`: no row or NULL).
pub async fn simple_value(c: &Client, sql: &str) -> anyhow::Result<Option<String>> {
    for m in c.simple_query(sql).await.with_context(|| sql.to_owned())? {
        if let SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).map(str::to_owned));
        }
    }
    Ok(None)
}

/// `GET path` from an HTTP server at `addr` (`host:port`); the whole response, headers included.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The value of the first series in exposition text `body` whose name ends with `series`
/// (`cache_lookups_total{outcome="hit"}`: any registry prefix); 0 when absent.
pub fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            name.ends_with(series).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

/// [`metric`] read from a proxy's admin server at `addr`.
pub async fn proxy_metric(addr: &str, series: &str) -> anyhow::Result<f64> {
    Ok(metric(&http_get(addr, "/metrics").await?, series))
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn metric_matches_the_series_suffix() {
        let body = "# TYPE x counter\nmeridian_pgproxy_cache_lookups_total{outcome=\"hit\"} 3\n\
                    meridian_pgproxy_cache_lookups_total{outcome=\"miss\"} 1.5\n";
        assert_eq!(metric(body, "cache_lookups_total{outcome=\"hit\"}"), 3.0);
        assert_eq!(metric(body, "cache_lookups_total{outcome=\"miss\"}"), 1.5);
        assert_eq!(metric(body, "cache_lookups_total{outcome=\"stale\"}"), 0.0);
    }
}
