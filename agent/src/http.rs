//! The agent's HTTP surface: `GET /health` (200 with `{node, role, pg_up,
//! epoch}` while PostgreSQL answers, 503 otherwise) and `GET /metrics`
//! (Prometheus text: heartbeats sent, commands by kind and result, role, pg_up,
//! epoch, self-fences, standby restarts). Anything else is 404.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use meridian_shared::records::Role;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::state::Shared;

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Replica => "replica",
        Role::Unknown => "unknown",
    }
}

/// The `/metrics` text.
pub fn render_metrics(shared: &Shared) -> String {
    let mut out = String::new();
    let m = &shared.metrics;
    let _ = writeln!(
        out,
        "# HELP meridian_agent_heartbeats_sent_total Heartbeats sent to the coordinator."
    );
    let _ = writeln!(out, "# TYPE meridian_agent_heartbeats_sent_total counter");
    let _ = writeln!(
        out,
        "meridian_agent_heartbeats_sent_total {}",
        m.heartbeats_sent.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP meridian_agent_commands_total Coordinator commands by kind and result."
    );
    let _ = writeln!(out, "# TYPE meridian_agent_commands_total counter");
    for ((kind, result), n) in m.commands() {
        let _ = writeln!(
            out,
            "meridian_agent_commands_total{{kind=\"{kind}\",result=\"{result}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP meridian_agent_role The node's role (1 for the current one)."
    );
    let _ = writeln!(out, "# TYPE meridian_agent_role gauge");
    let role = shared.role();
    for r in [Role::Primary, Role::Replica, Role::Unknown] {
        let _ = writeln!(
            out,
            "meridian_agent_role{{role=\"{}\"}} {}",
            role_name(r),
            u8::from(r == role)
        );
    }
    let _ = writeln!(
        out,
        "# HELP meridian_agent_pg_up Whether PostgreSQL answered the last probe."
    );
    let _ = writeln!(out, "# TYPE meridian_agent_pg_up gauge");
    let _ = writeln!(
        out,
        "meridian_agent_pg_up {}",
        u8::from(shared.status.borrow().pg_up)
    );
    let _ = writeln!(out, "# HELP meridian_agent_epoch_seen Highest epoch seen.");
    let _ = writeln!(out, "# TYPE meridian_agent_epoch_seen gauge");
    let _ = writeln!(out, "meridian_agent_epoch_seen {}", shared.epoch_seen());
    let _ = writeln!(
        out,
        "# HELP meridian_agent_self_fences_total Stops of a primary for lack of a lease."
    );
    let _ = writeln!(out, "# TYPE meridian_agent_self_fences_total counter");
    let _ = writeln!(
        out,
        "meridian_agent_self_fences_total {}",
        m.self_fences.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP meridian_agent_standby_restarts_total Restarts of a crashed standby."
    );
    let _ = writeln!(out, "# TYPE meridian_agent_standby_restarts_total counter");
    let _ = writeln!(
        out,
        "meridian_agent_standby_restarts_total {}",
        m.standby_restarts.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP meridian_agent_rewinds_total Successful pg_rewind runs."
    );
    let _ = writeln!(out, "# TYPE meridian_agent_rewinds_total counter");
    let _ = writeln!(
        out,
        "meridian_agent_rewinds_total {}",
        m.rewinds.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP meridian_agent_clones_total Clones with pg_basebackup."
    );
    let _ = writeln!(out, "# TYPE meridian_agent_clones_total counter");
    let _ = writeln!(
        out,
        "meridian_agent_clones_total {}",
        m.clones.load(Ordering::Relaxed)
    );
    out
}

fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => {
            let pg_up = shared.status.borrow().pg_up;
            let body = serde_json::json!({
                "node": shared.node,
                "role": role_name(shared.role()),
                "pg_up": pg_up,
                "epoch": shared.epoch_seen().0,
            })
            .to_string();
            let status = if pg_up {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "application/json", body)
        }
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            render_metrics(shared),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Serves `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(
            async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let resp = respond(&shared, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
            }
            .instrument(tracing::debug_span!("http", %peer)),
        );
    }
}
