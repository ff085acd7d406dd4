//! `/health`, `/metrics` and the status page over plain HTTP/1.1 (hyper).
//!
//! Everything is rendered from the decision loop's status snapshot and from the
//! events this server has seen since it started (see [`crate::admin::events`]);
//! the rendering functions are pure and tested on their own. Counters such as
//! `meridian_failovers_total` therefore count what this coordinator process saw,
//! as Prometheus counters do. The page refreshes itself every 5 s.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::admin::events::{self, EventCounts, EventLog};
use crate::control::{ClusterEvent, ClusterStatus, ControlHandle};

/// Events shown on the status page.
pub const PAGE_EVENTS: usize = 50;

/// Serves HTTP on `listen` until `shutdown` resolves.
pub async fn serve_http(
    handle: ControlHandle,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("HTTP: cannot listen on {listen}: {e}"))?;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let log = EventLog::new(events::DEFAULT_CAPACITY);
    let mut collector_stop = stop_rx.clone();
    events::spawn_collector(&handle.events, log.clone(), async move {
        let _ = collector_stop.wait_for(|v| *v).await;
    });
    tracing::info!(%listen, "HTTP (health, metrics, status page) listening");
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop_rx.wait_for(|v| *v) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Accept errors (e.g. too many open files) are transient; keep serving.
                tracing::warn!(error = %e, "HTTP accept failed");
                continue;
            }
        };
        let status = handle.status.clone();
        let log = log.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let snapshot = status.borrow().clone();
                let log = log.clone();
                async move { Ok::<_, Infallible>(respond(&req, &snapshot, &log)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
    Ok(())
}

fn respond<B>(
    req: &Request<B>,
    status: &ClusterStatus,
    log: &Arc<EventLog>,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/health" => reply(StatusCode::OK, "application/json", health_json(status)),
        "/metrics" => match render_metrics(status, log.counts()) {
            Ok(text) => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("cannot encode metrics: {e}\n"),
            ),
        },
        "/" | "/status" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            render_page(status, &log.recent(PAGE_EVENTS)),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// `{"status":"ok","active":bool}`
pub fn health_json(status: &ClusterStatus) -> String {
    serde_json::json!({"status": "ok", "active": status.active}).to_string()
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The Prometheus (OpenMetrics) text of a snapshot and the event counters.
pub fn render_metrics(
    status: &ClusterStatus,
    counts: EventCounts,
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();

    let epoch = Gauge::<i64>::default();
    epoch.set(gauge_value(status.epoch));
    registry.register("meridian_epoch", "Current fencing epoch", epoch);

    let active = Gauge::<i64>::default();
    active.set(i64::from(status.active));
    registry.register(
        "meridian_coordinator_active",
        "1 when this coordinator is the active one",
        active,
    );

    let paused = Gauge::<i64>::default();
    paused.set(i64::from(status.paused));
    registry.register(
        "meridian_paused",
        "1 while automatic failover is paused",
        paused,
    );

    let serving = Gauge::<i64>::default();
    serving.set(i64::from(status.state == "serving"));
    registry.register(
        "meridian_leader_serving",
        "1 while the leader serves writes (0 while failing over or unknown)",
        serving,
    );

    let nodes = Family::<Vec<(String, String)>, Gauge>::default();
    for node in &status.nodes {
        nodes
            .get_or_create(&vec![
                ("role".to_string(), node.role.clone()),
                ("state".to_string(), node.state.clone()),
            ])
            .inc();
    }
    registry.register("meridian_nodes", "Nodes by role and state", nodes.clone());

    let lag = Family::<Vec<(String, String)>, Gauge>::default();
    let lag_ms = Family::<Vec<(String, String)>, Gauge>::default();
    for node in &status.nodes {
        let label = vec![("node".to_string(), node.name.clone())];
        if let Some(bytes) = node.lag_bytes {
            lag.get_or_create(&label).set(gauge_value(bytes));
        }
        if let Some(ms) = node.lag_ms {
            lag_ms.get_or_create(&label).set(gauge_value(ms));
        }
    }
    registry.register(
        "meridian_replica_lag_bytes",
        "Bytes a replica is behind the primary",
        lag,
    );
    registry.register(
        "meridian_replica_lag_ms",
        "Replay lag a replica reports, in milliseconds",
        lag_ms,
    );

    let proxies = Gauge::<i64>::default();
    proxies.set(gauge_value(status.proxies.len() as u64));
    registry.register("meridian_proxies", "Registered pgproxies", proxies);

    let failovers = Counter::<u64>::default();
    failovers.inc_by(counts.failovers);
    registry.register(
        "meridian_failovers",
        "Failovers started (seen by this coordinator process)",
        failovers,
    );
    let switchovers = Counter::<u64>::default();
    switchovers.inc_by(counts.switchovers);
    registry.register(
        "meridian_switchovers",
        "Switchovers started (seen by this coordinator process)",
        switchovers,
    );

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// The status page: cluster summary, nodes grouped by region, proxies, and the
/// most recent events (newest first).
pub fn render_page(status: &ClusterStatus, recent: &[ClusterEvent]) -> String {
    let e = |s: &str| escape(s);
    let mut page = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    let _ = write!(
        page,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>Meridian {cluster}</title><style>body{{font-family:sans-serif;margin:1.5em}}\
         table{{border-collapse:collapse;margin-bottom:1.5em}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}\
         .primary{{font-weight:bold}}</style></head><body>\n<h1>Meridian cluster {cluster}</h1>\n",
        cluster = e(&status.cluster)
    );
    let _ = writeln!(
        page,
        "<p>Coordinator <b>{}</b> ({}) · leader <b>{}</b> · state <b>{}</b> · epoch <b>{}</b> · \
         sync {} [{}] · automatic failover {}</p>",
        e(&status.coordinator),
        if status.active { "active" } else { "standby" },
        e(status.leader.as_deref().unwrap_or("none")),
        e(&status.state),
        status.epoch,
        e(&status.sync_mode),
        e(&status.sync_standbys.join(", ")),
        if status.paused { "<b>paused</b>" } else { "on" },
    );

    let mut regions: Vec<&str> = status.nodes.iter().map(|n| n.region.as_str()).collect();
    regions.sort_unstable();
    regions.dedup();
    page.push_str("<h2>Nodes</h2>\n<table><tr><th>Region</th><th>Node</th><th>Role</th><th>State</th>\
                   <th>TL</th><th>Lag (bytes)</th><th>Lag (ms)</th><th>Epoch</th><th>Postgres</th><th>Heartbeat</th></tr>\n");
    for region in regions {
        for n in status.nodes.iter().filter(|n| n.region == region) {
            let _ = writeln!(
                page,
                "<tr class=\"{role}\"><td>{region}</td><td>{name}</td><td>{role}</td><td>{state}</td><td>{tl}</td>\
                 <td>{lag}</td><td>{lag_ms}</td><td>{epoch}</td><td>{pg} ({up})</td><td>{hb}</td></tr>",
                role = e(&n.role),
                region = e(&n.region),
                name = e(&n.name),
                state = e(&n.state),
                tl = n.timeline,
                lag = opt(n.lag_bytes),
                lag_ms = opt(n.lag_ms),
                epoch = n.epoch_seen,
                pg = e(&n.pg_addr),
                up = if n.pg_up { "up" } else { "down" },
                hb = n
                    .last_heartbeat_ms
                    .map(|ms| format!("{ms} ms ago"))
                    .unwrap_or_default(),
            );
        }
    }
    page.push_str("</table>\n<h2>Proxies</h2>\n<table><tr><th>Id</th><th>Region</th><th>Listen</th><th>Version</th></tr>\n");
    for p in &status.proxies {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e(&p.id),
            e(&p.region),
            e(&p.listen_addr),
            e(&p.version)
        );
    }
    let _ = writeln!(
        page,
        "</table>\n<h2>Recent events</h2>\n<table><tr><th>At (unix ms)</th><th>Kind</th><th>Node</th><th>Epoch</th><th>Message</th></tr>"
    );
    for ev in recent.iter().rev() {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ev.at_ms,
            e(&ev.kind),
            e(ev.node.as_deref().unwrap_or("")),
            ev.epoch,
            e(&ev.message)
        );
    }
    page.push_str("</table>\n</body></html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{NodeStatus, ProxyStatus};

    fn status() -> ClusterStatus {
        ClusterStatus {
            cluster: "demo".into(),
            coordinator: "c1".into(),
            active: true,
            epoch: 7,
            leader: Some("us-east-1".into()),
            state: "serving".into(),
            sync_mode: "off".into(),
            nodes: vec![
                NodeStatus {
                    name: "us-east-1".into(),
                    region: "us-east".into(),
                    role: "primary".into(),
                    state: "running".into(),
                    ..NodeStatus::default()
                },
                NodeStatus {
                    name: "us-west-1".into(),
                    region: "us-west".into(),
                    role: "replica".into(),
                    state: "streaming".into(),
                    lag_bytes: Some(1234),
                    ..NodeStatus::default()
                },
            ],
            proxies: vec![ProxyStatus {
                id: "px<1>".into(),
                region: "us-east".into(),
                ..ProxyStatus::default()
            }],
            ..ClusterStatus::default()
        }
    }

    #[test]
    fn health_reports_activity() {
        let v: serde_json::Value = serde_json::from_str(&health_json(&status())).unwrap();
        assert_eq!(v, serde_json::json!({"status": "ok", "active": true}));
    }

    #[test]
    fn metrics_carry_the_snapshot() {
        let counts = EventCounts {
            failovers: 2,
            ..EventCounts::default()
        };
        let text = render_metrics(&status(), counts).unwrap();
        assert!(text.contains("meridian_epoch 7"), "{text}");
        assert!(text.contains("meridian_coordinator_active 1"), "{text}");
        assert!(
            text.contains("meridian_nodes{role=\"replica\",state=\"streaming\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("meridian_replica_lag_bytes{node=\"us-west-1\"} 1234"),
            "{text}"
        );
        assert!(text.contains("meridian_failovers_total 2"), "{text}");
    }

    #[test]
    fn page_lists_nodes_proxies_and_events_escaped() {
        let ev = ClusterEvent {
            at_ms: 5,
            kind: "promoted".into(),
            node: Some("us-west-1".into()),
            epoch: 7,
            message: "<script>".into(),
        };
        let page = render_page(&status(), &[ev]);
        assert!(page.contains("<td>us-west-1</td>"));
        assert!(page.contains("<td>1234</td>"));
        assert!(page.contains("px&lt;1&gt;"));
        assert!(page.contains("&lt;script&gt;"));
        assert!(!page.contains("<script>"));
        assert!(page.contains("demo"));
    }
}
